"""GPU tests of the fused Vim block (Triton add + RMSNorm, conv of both directions and scan)
against the reference trunk (PyTorch ops, the chunked scan) at real widths: outputs and every
gradient in fp32 and bf16, an odd grid, batch 2, drop path in training and evaluation; the
pyramid's channel LayerNorm against PyTorch's at real map sizes; and torch.compile of a block over
two token counts without graph breaks. Skipped without CUDA."""

import copy

import pytest
import torch

from vimdet.modeling import VimBlock, VisionMamba
from vimdet.ops import (
    add_rms_norm,
    add_rms_norm_reference,
    bidirectional_selective_scan,
    channel_layer_norm,
    channel_layer_norm_reference,
    triton_available,
)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="needs Triton"),
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_reference_at_vim_b_width(out_dtype):
    torch.manual_seed(0)
    shape = (2, 52 * 84, 768)  # an 832x1344 image's tokens at Vim-B's width
    hidden = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn(shape, device="cuda", requires_grad=True)
    weight = (torch.rand(768, device="cuda") + 0.5).requires_grad_()
    scale = torch.tensor([0.0, 1.25], device="cuda")
    results = []
    for function in (
        lambda *a: add_rms_norm(*a, backend="triton"),
        add_rms_norm_reference,
    ):
        normed, stream = function(hidden, residual, weight, 1e-5, scale, out_dtype)
        loss = (
            normed.float() * torch.linspace(-1, 1, normed.numel(), device="cuda").view_as(normed)
        ).sum() + stream.square().mean()
        results.append((normed, stream, *torch.autograd.grad(loss, (hidden, residual, weight))))
    tolerance = 1e-5 if out_dtype == torch.float32 else 1e-2
    names = ("normed", "stream", "d_hidden", "d_residual", "d_weight")
    for name, actual, expected in zip(names, *results):
        assert actual.dtype == expected.dtype, name
        # d_hidden is bf16 like hidden: bf16 rounding.
        limit = 1e-2 if name == "d_hidden" else tolerance
        assert relative_error(actual, expected) < limit, name


@pytest.mark.parametrize(
    "shape, dtype, channels_last",
    [
        ((2, 256, 208, 336), torch.bfloat16, True),  # an 832x1344 image pair's stride-4 level
        ((2, 384, 104, 168), torch.float32, True),  # its stride-8 upsampling's norm, fp32
        ((512, 256, 7, 7), torch.bfloat16, False),  # a box head's ROIs, NCHW from ROIAlign
    ],
)
def test_channel_layer_norm_matches_reference(shape, dtype, channels_last):
    torch.manual_seed(0)
    x = (2 + torch.randn(shape, device="cuda")).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.rand(shape[1], device="cuda") + 0.5).requires_grad_()
    bias = torch.randn(shape[1], device="cuda", requires_grad=True)
    upstream = torch.randn(shape, device="cuda").to(dtype)
    results = []
    for function in (
        lambda *a: channel_layer_norm(*a, backend="triton"),
        channel_layer_norm_reference,
    ):
        out = function(x, weight, bias, 1e-6)
        results.append((out, *torch.autograd.grad(out, (x, weight, bias), upstream)))
    # bf16: the output and dx are rounded to bf16; the parameter gradients sum fp32 products over
    # every pixel in a different order.
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name, actual, expected in zip(("out", "dx", "dweight", "dbias"), *results):
        assert actual.dtype == expected.dtype, name
        limit = tolerance if name in ("out", "dx") else 1e-4
        assert relative_error(actual, expected) < limit, name
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)


def paired_trunks(drop_path_rate: float, **options):
    torch.manual_seed(0)
    kwargs = dict(embed_dim=384, depth=4, out_blocks=(2, 4), drop_path_rate=drop_path_rate)
    kwargs.update(options)
    fused = VisionMamba(scan_backend="triton", **kwargs).cuda()
    reference = VisionMamba(scan_backend="chunked", **kwargs).cuda()
    reference.load_state_dict(fused.state_dict())
    return fused, reference


OPTIONS = {  # the default trunk, and the trunk options of docs/trunk_options.md
    "row": {},
    "row_column": {"scan_routes": "row_column"},
    "cross+attention": {"scan_routes": "cross", "attention_blocks": (4,)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fused_trunk_matches_reference_trunk(dtype, training, option):
    fused, reference = paired_trunks(drop_path_rate=0.3, **OPTIONS[option])
    image = torch.randn(2, 3, 20 * 16, 33 * 16, device="cuda")  # an odd 20x33 grid
    results = []
    for net in (fused, reference):
        net.train(training)
        torch.manual_seed(1)  # the same drop-path draws
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            features = net(image)
        loss = sum(f.float().square().mean() for f in features.values())
        loss.backward()
        results.append((features, {n: p.grad for n, p in net.named_parameters()}))
    (features, grads), (expected_features, expected_grads) = results
    # fp32: summation order only. bf16: the GEMMs round to bf16 in both, but their inputs
    # already differ by the fused ops' rounding.
    limit = 2e-3 if dtype == torch.float32 else 5e-2
    for name in features:
        assert relative_error(features[name], expected_features[name]) < limit, name
    for name in grads:
        assert relative_error(grads[name], expected_grads[name]) < limit, f"grad of {name}"


def test_compiled_block_has_no_graph_breaks_across_sizes():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = VimBlock(192, drop_path=0.1, scan_backend="triton").cuda()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)  # fails on a graph break
    for tokens in (1000, 1333):  # multi-scale training changes the token count every step
        hidden = torch.randn(2, tokens, 192, device="cuda", requires_grad=True)
        residual = torch.randn(2, tokens, 192, device="cuda", requires_grad=True)
        block.eval()
        eager = block(hidden, residual)
        out = compiled(hidden, residual)
        for actual, expected in zip(out, eager):
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        block.train()
        sum(t.float().sum() for t in compiled(hidden, residual)).backward()
        assert torch.isfinite(hidden.grad).all() and torch.isfinite(residual.grad).all()


def test_recomputed_scan_inputs_give_the_same_gradients_with_less_memory():
    # On triton the mixer recomputes u and delta in the backward pass instead of keeping them. Four
    # Vim-B-wide blocks under bf16 autocast, against the same blocks whose mixers keep the scan's
    # inputs (the plain composition, called directly): the same gradients, and a training step
    # whose peak is lower by at least two blocks' u and delta.
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(VimBlock(768, scan_backend="triton") for _ in range(4)).cuda()
    hidden = torch.randn(2, 52 * 84, 768, device="cuda", requires_grad=True)

    def step():
        out, residual = hidden, None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for block in blocks:
                out, residual = block(out, residual)
        loss = out.float().square().mean() + residual.mean()
        return torch.autograd.grad(loss, [hidden, *blocks.parameters()])

    def keeping_inputs(mixer):
        def scan_both_ways(x, z, walk, suffixes):
            weights = mixer._scan_weights(suffixes)
            u, delta, A, B, C, D, bias = mixer._scan_inputs(walk, x, *weights)
            return bidirectional_selective_scan(
                u, delta, A, B, C, D, z, bias, True, walk, backend="triton"
            )

        return scan_both_ways

    peaks, results = [], []
    for recompute in (True, False):
        if not recompute:
            for block in blocks:
                block.mixer._scan_both_ways = keeping_inputs(block.mixer)
        step()  # warm-up: compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results.append(step())
        peaks.append(torch.cuda.max_memory_allocated() - base)
    for recomputed, kept in zip(*results):
        assert relative_error(recomputed, kept) < 1e-2
    scan_inputs_bytes = 2 * (2 * 2 * 52 * 84 * 1536 * 2)  # u and delta of one block, bf16
    assert peaks[0] < peaks[1] - 2 * scan_inputs_bytes, [p / 2**20 for p in peaks]


def test_padded_rank_on_the_gpu_equals_the_cpus_unpadded_one():
    # On the GPU the mixer pads Vim-T's dt rank (12) to 16 with zeros, so that cuBLAS gets
    # 16-byte aligned rows; on the CPU it does not pad. The same block in fp32 on both ("auto":
    # the fused path on the GPU, the reference on the CPU): the same output and every parameter's
    # gradient (x_proj's and dt_proj's included), up to summation order.
    torch.manual_seed(0)
    block = VimBlock(192, scan_backend="auto")
    assert block.mixer.dt_rank == 12
    hidden = torch.randn(2, 9 * 11, 192)
    results = []
    for device in ("cuda", "cpu"):
        moved = copy.deepcopy(block).to(device)
        out, residual = moved(hidden.to(device), None)
        loss = (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum()
        names, params = zip(*moved.named_parameters())
        results.append((out, *torch.autograd.grad(loss + residual.sum(), params)))
    for name, actual, expected in zip(("output", *names), *results):
        assert relative_error(actual.cpu(), expected) < 1e-3, name
