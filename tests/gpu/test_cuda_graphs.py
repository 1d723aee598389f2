"""GPU tests of the backbone replayed as CUDA graphs (MODEL.VIM_FPN.CUDA_GRAPHS) against the same
backbone run eagerly: training steps with an optimizer between them (outputs, every gradient,
bf16 autocast with its cache on, as Detectron2's AMP trainer runs it), one capture per shape and
mode, eager runs past the limit, evaluation outputs that outlive the next call, drop path
drawn afresh at every replay, the backbone inside DistributedDataParallel, as Detectron2's
trainer wraps it on several GPUs, and replays launched before the check for moved weights (dropped
when they moved; never for a run that writes to its weights). Skipped without CUDA."""

import logging

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vimdet.modeling import VimFeaturePyramid, VisionMamba
from vimdet.modeling.cuda_graphs import CudaGraphs
from vimdet.ops import triton_available

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="needs Triton"),
]


def backbone(cuda_graphs: int, drop_path_rate: float = 0.0) -> VimFeaturePyramid:
    torch.manual_seed(0)
    net = VisionMamba(
        embed_dim=192,
        depth=4,
        out_blocks=(1, 2, 3, 4),
        drop_path_rate=drop_path_rate,
        scan_backend="triton",
    )
    return VimFeaturePyramid(net, in_blocks=(1, 2, 3, 4), out_channels=64, cuda_graphs=cuda_graphs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_training_steps_match_eager_ones(dtype):
    eager, graphed = backbone(0).cuda(), backbone(2).cuda()
    optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for step in range(3):
        # The optimizer's update reaches the graph through in-place copies of the parameters
        # (as a checkpoint load does); equal weights each step keep bf16 rounding from growing.
        graphed.load_state_dict(eager.state_dict())
        images = torch.randn(2, 3, 128, 192, device="cuda")
        results = []
        for model in (eager, graphed):
            model.zero_grad()
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                levels = model(images)
            loss = sum((level.float() * level.float().tanh()).mean() for level in levels.values())
            loss.backward()
            results.append((levels, {n: p.grad.clone() for n, p in model.named_parameters()}))
        optimizer.step()
        (eager_levels, eager_grads), (graphed_levels, graphed_grads) = results
        for name in eager_levels:
            error = relative_error(graphed_levels[name], eager_levels[name])
            assert error < tolerance, (step, name, error)
        assert eager_grads.keys() == graphed_grads.keys()
        for name in eager_grads:
            error = relative_error(graphed_grads[name], eager_grads[name])
            assert error < tolerance, (step, name, error)
    assert len(graphed.graphs) == 1  # one capture served the three steps


def test_gradients_accumulate_over_replays_as_eager_ones_do():
    models = [backbone(0).cuda(), backbone(1).cuda()]
    models[1].load_state_dict(models[0].state_dict())
    batches = [torch.randn(2, 3, 128, 128, device="cuda") for _ in range(3)]
    for model in models:
        for images in batches:  # no zero_grad: .grad sums the three backward passes
            sum(level.square().mean() for level in model(images).values()).backward()
    for (name, eager), graphed in zip(models[0].named_parameters(), models[1].parameters()):
        assert relative_error(graphed.grad, eager.grad) < 1e-4, name


def test_one_capture_per_shape_and_mode_and_eager_past_the_limit(caplog):
    eager, graphed = backbone(0).cuda(), backbone(2).cuda()
    graphed.load_state_dict(eager.state_dict())
    small = torch.randn(1, 3, 128, 128, device="cuda")
    large = torch.randn(1, 3, 128, 256, device="cuda")
    graphed.train()
    graphed(small)["p2"].sum().backward()
    eager.eval()
    graphed.eval()
    with torch.no_grad():
        first = graphed(small)
        assert len(graphed.graphs) == 2
        second = graphed(small * 2)  # a replay of the same capture
        expected = eager(small)
        for name in expected:  # outputs without gradients are copies: the replay kept them
            assert relative_error(first[name], expected[name]) < 1e-5, name
            assert not torch.equal(first[name], second[name]), name
        with caplog.at_level(logging.WARNING, logger="vimdet.modeling.cuda_graphs"):
            past_limit = graphed(large)
            graphed(large)
    assert len(graphed.graphs) == 2
    warnings = [r for r in caplog.records if "run eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "(1, 3, 128, 256)" in warnings[0].getMessage()
    with torch.no_grad():
        for name, level in eager(large).items():
            assert relative_error(past_limit[name], level) < 1e-5, name


class _KeepsCopies(torch.autograd.Function):
    """x * weight, keeping four copies of x as an attribute of its node: autograd frees saved
    tensors after the backward pass, attributes only with the graph (as a closure over an
    activation did in the mixer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.copies = x.repeat(4)
        return x * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad.sum().view(1)


class _KeepsCopiesModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _KeepsCopies.apply(x, self.weight)


def capturing_step_peak() -> float:
    """The peak memory of a training step that captures :class:`_KeepsCopiesModule`, in inputs."""
    module, x = _KeepsCopiesModule().cuda(), torch.randn(2**24, device="cuda")  # 64 MiB
    graphs = CudaGraphs(1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    graphs(module, module, x).sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / x.nbytes


def test_a_capture_holds_one_pass_of_autograd_graph_at_a_time():
    # The warm-up passes and the captured pass each drop the last one's autograd graph before they
    # run: a warm-up pass that ran while the previous one's outputs (and graph) were alive held
    # ViMDet-B's in_proj outputs twice, 1.1 GiB more at 1024², batch 2. One pass at a time: the
    # captured input, the output, its four copies and the output's gradient (7 inputs' worth); a
    # warm-up pass beside the last one's graph held the input, two outputs and eight copies (11).
    peak = capturing_step_peak()
    assert peak < 9, peak


def test_drop_path_draws_new_samples_at_every_replay():
    model = backbone(1, drop_path_rate=0.5).cuda().train()
    images = torch.randn(8, 3, 64, 64, device="cuda")
    outputs = []
    for _ in range(4):
        levels = model(images)
        outputs.append(levels["p4"].detach().clone())
        levels["p4"].sum().backward()
    assert len(model.graphs) == 1
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_evaluation_replays_follow_weight_updates():
    # The evaluation graph must read the live position grid: Detectron2 evaluates between
    # training steps (TEST.EVAL_PERIOD), and a graph holding a cached resize would replay the
    # grid of the first evaluation. 128x192 inputs need a resized grid (pretrained 224: 14x14).
    eager, graphed = backbone(0).cuda().eval(), backbone(2).cuda().eval()
    graphed.load_state_dict(eager.state_dict())
    images = torch.randn(1, 3, 128, 192, device="cuda")
    with torch.no_grad():
        graphed(images)
        eager.net.pos_embed.add_(torch.randn_like(eager.net.pos_embed))  # an update in place
        graphed.net.pos_embed.copy_(eager.net.pos_embed)
        expected, actual = eager(images), graphed(images)
    assert len(graphed.graphs) == 1
    for name in expected:
        assert relative_error(actual[name], expected[name]) < 1e-5, name


def test_a_second_forward_before_the_backward_runs_eagerly(caplog):
    eager, graphed = backbone(0).cuda(), backbone(2).cuda()
    graphed.load_state_dict(eager.state_dict())
    first, second = (torch.randn(1, 3, 128, 128, device="cuda") for _ in range(2))
    graphed(first)["p3"].sum().backward()  # the capture
    with caplog.at_level(logging.WARNING, logger="vimdet.modeling.cuda_graphs"):
        for model in (eager, graphed):
            model.zero_grad()
            # Every level in both terms: each parameter then gets a gradient from both passes.
            loss = sum(level.sum() for level in model(first).values())
            loss = loss + sum(level.square().mean() for level in model(second).values())
            loss.backward()
    assert any("ran again before the backward pass" in r.getMessage() for r in caplog.records)
    pairs = list(zip(eager.named_parameters(), graphed.parameters()))
    without = [name for (name, e), a in pairs if e.grad is None or a.grad is None]
    assert not without, f"no gradient (eager or graphed): {without}"
    for (name, expected), actual in pairs:
        assert relative_error(actual.grad, expected.grad) < 1e-4, name


def test_graphed_backbone_trains_inside_distributed_data_parallel(tmp_path):
    # DDP keeps the parameters' AccumulateGrad nodes from its construction, on the default stream;
    # a capture whose backward ran into them failed on several GPUs ("operation would make the
    # legacy stream depend on a capturing blocking stream"). One NCCL process builds the same
    # reducer and hooks as several do.
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        eager, graphed = backbone(0).cuda(), backbone(1).cuda()
        models = [DistributedDataParallel(m, device_ids=[0]) for m in (eager, graphed)]
        optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-3)
        for step in range(3):
            graphed.load_state_dict(eager.state_dict())  # in place: the capture reads it
            images = torch.randn(2, 3, 128, 128, device="cuda")
            grads = []
            for model in models:
                model.zero_grad()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    levels = model(images)
                loss = sum((lv.float() * lv.float().tanh()).mean() for lv in levels.values())
                loss.backward()
                grads.append({n: p.grad.clone() for n, p in model.module.named_parameters()})
            optimizer.step()
            for name, expected in grads[0].items():
                error = relative_error(grads[1][name], expected)
                assert error < 2e-2, (step, name, error)
        assert len(graphed.graphs) == 1
    finally:
        dist.destroy_process_group()


def test_replays_start_before_the_weights_check_and_are_discarded_when_weights_moved(
    monkeypatch,
):
    # The forward graph is launched before the host walks the module for moved weights; when the
    # walk finds them moved (a checkpoint loaded with assign=True: new memory, new values), that
    # replay's outputs are dropped with its graphs, and the step matches the eager one.
    from vimdet.modeling import cuda_graphs

    events = []
    for cls, name in (
        (cuda_graphs._Capture, "forward"),
        (cuda_graphs.CudaGraphs, "forget_stale_captures"),
    ):
        original = getattr(cls, name)

        def logged(*args, _original=original, _name=name, **kwargs):
            events.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, name, logged)
    eager, graphed = backbone(0).cuda(), backbone(1).cuda()
    graphed.load_state_dict(eager.state_dict())
    images = torch.randn(2, 3, 128, 128, device="cuda")
    graphed(images)["p3"].sum().backward()  # the capture
    events.clear()
    graphed(images)["p3"].sum().backward()
    assert events == ["forward", "forget_stale_captures"]  # one replay, launched first
    torch.manual_seed(1)
    new_weights = backbone(0).cuda().state_dict()
    eager.load_state_dict(new_weights)
    graphed.load_state_dict({k: v.clone() for k, v in new_weights.items()}, assign=True)
    results = []
    for model in (eager, graphed):
        model.zero_grad()
        levels = model(images)
        sum(level.square().mean() for level in levels.values()).backward()
        results.append((levels, [p.grad for p in model.parameters()]))
    (eager_levels, eager_grads), (graphed_levels, graphed_grads) = results
    assert len(graphed.graphs) == 1  # captured again
    for name in eager_levels:
        assert relative_error(graphed_levels[name], eager_levels[name]) < 1e-4, name
    for expected, actual in zip(eager_grads, graphed_grads):
        assert relative_error(actual, expected) < 1e-4


class CountingModule(torch.nn.Module):
    """Writes to a buffer in place at every call, as a norm's running statistics do."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.linear(x)


def test_a_run_that_writes_to_its_weights_replays_only_after_the_check():
    from vimdet.modeling.cuda_graphs import CudaGraphs

    module, graphs = CountingModule().cuda(), CudaGraphs(1)
    x = torch.randn(4, 8, device="cuda")
    for _ in range(3):
        graphs(module, module.forward, x).sum().backward()
    (capture,) = graphs._captures.values()
    assert not capture.launch_before_check
    assert graphs._launch_before_check(module, x) is None
    # Two warm-up passes and three replays (a capture records the kernels without running them).
    assert module.calls.item() == 5
