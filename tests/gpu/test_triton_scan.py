"""GPU tests of the Triton scan at real shapes: against mamba-ssm's kernel and the reference
recurrence, both directions, strided inputs, torch.compile and torch.export. Skipped without CUDA;
run on the GPU machine with `make test-gpu`."""

import pytest
import torch

from vimdet.modeling import VimFeaturePyramid, VisionMamba
from vimdet.ops import (
    bidirectional_selective_scan,
    column_major_walk,
    conv_both_directions,
    cuda_kernel_available,
    resolve_backend,
    selective_scan,
    triton_available,
)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="needs Triton"),
]
needs_mamba = pytest.mark.skipif(
    not cuda_kernel_available(), reason="needs mamba-ssm (pip install -e .[cuda])"
)

# Relative to the largest magnitude. bf16 outputs differ by bf16 rounding; mamba-ssm also computes
# exp and softplus with fast-math intrinsics.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def vim_inputs(batch, length, channels, dtype, dirs=2, state=16, seed=0):
    """Direction-stacked token-major inputs with Vim's init: A = -(1..16), dt in [1e-3, 0.1]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    dt = torch.exp(torch.rand(dirs, channels, generator=gen, device="cuda") * 4.6 - 6.9)
    a = torch.arange(1, state + 1, device="cuda", dtype=torch.float32)
    return {
        "u": randn(dirs, batch, length, channels),
        "delta": randn(dirs, batch, length, channels, scale=0.3),
        "A": -a.repeat(dirs, channels, 1) * (0.5 + torch.rand(dirs, channels, 1, device="cuda")),
        "B": randn(dirs, batch, length, state),
        "C": randn(dirs, batch, length, state),
        "D": torch.randn(dirs, channels, generator=gen, device="cuda"),
        "z": randn(batch, length, channels),
        "delta_bias": torch.log(torch.expm1(dt)),
    }


def output_and_grads(scan, inputs, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out = scan(**{**dict.fromkeys(inputs), **leaves}, delta_softplus=True, **kwargs)
    upstream = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
    grads = torch.autograd.grad((out.float() * upstream).sum(), list(leaves.values()))
    return out.detach(), dict(zip(leaves, grads))


def assert_close(actual, expected, dtype, what, tolerance=None):
    """Within ``tolerance`` (default: ``TOLERANCE[dtype]``) of expected's largest magnitude."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = expected.float().abs().max().clamp(min=1e-6)
    error = ((actual.float() - expected.float()).abs().max() / scale).item()
    bound = TOLERANCE[dtype] if tolerance is None else tolerance
    assert error <= bound, f"{what}: relative error {error:.2e}"


def assert_same(scan_a, scan_b, inputs, dtype, **kwargs):
    out_a, grads_a = output_and_grads(scan_a, inputs, **kwargs)
    out_b, grads_b = output_and_grads(scan_b, inputs, **kwargs)
    assert_close(out_a, out_b, dtype, "output")
    for name, grad in grads_b.items():
        assert_close(grads_a[name], grad, dtype, f"grad of {name}")


def triton_scan(**kwargs):
    return bidirectional_selective_scan(**kwargs, backend="triton")


def mamba_scan(**kwargs):  # two selective_scan_fn calls on flipped, transposed copies
    return bidirectional_selective_scan(**kwargs, backend="cuda")


@needs_mamba
@pytest.mark.parametrize(
    "channels, length, batch, dtype",
    [
        (384, 4200, 1, torch.float32),  # Vim-T, 800x1344
        (384, 7056, 8, torch.bfloat16),  # Vim-T, 1344x1344
        (1536, 4096, 2, torch.float32),  # Vim-B, 1024x1024
        (1536, 4200, 8, torch.bfloat16),
        (1536, 7056, 1, torch.bfloat16),
    ],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_both_directions_match_mamba(channels, length, batch, dtype):
    inputs = vim_inputs(batch, length, channels, dtype)
    assert_same(triton_scan, mamba_scan, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(dtype):
    inputs = vim_inputs(2, 301, 384, dtype)
    reference = lambda **kw: bidirectional_selective_scan(**kw, backend="reference")  # noqa: E731
    assert_same(triton_scan, reference, inputs, dtype)


def test_two_directions_equal_two_single_calls_on_flipped_inputs():
    inputs = vim_inputs(2, 1000, 384, torch.float32)

    def single_calls(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        total = 0
        for d in range(2):
            flip = (lambda t: t.flip(1)) if d == 1 else (lambda t: t)
            y = selective_scan(
                flip(u[d]).transpose(1, 2),
                flip(delta[d]).transpose(1, 2),
                A[d],
                flip(B[d]).transpose(1, 2),
                flip(C[d]).transpose(1, 2),
                D[d],
                flip(z).transpose(1, 2),
                delta_bias[d],
                delta_softplus,
                backend="triton",
            )
            total = total + flip(y.transpose(1, 2)).float()
        return (total / 2).to(u.dtype)

    assert_same(triton_scan, single_calls, inputs, torch.float32)


def test_strided_inputs_match_contiguous_ones():
    # What the mixer passes: B and C are slices of one projection, z half of another, u transposed.
    inputs = vim_inputs(2, 4200, 384, torch.bfloat16)
    strided = dict(inputs)
    projected = torch.randn(2, 2, 4200, 48 + 32, device="cuda", dtype=torch.bfloat16)
    projected[..., 48:64], projected[..., 64:] = inputs["B"], inputs["C"]
    strided["B"], strided["C"] = projected[..., 48:64], projected[..., 64:]
    xz = torch.cat([torch.randn_like(inputs["z"]), inputs["z"]], dim=-1)
    strided["z"] = xz[..., 384:]
    strided["u"] = inputs["u"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not any(strided[k].is_contiguous() for k in ("u", "B", "C", "z"))
    out_strided, grads_strided = output_and_grads(triton_scan, strided)
    out, grads = output_and_grads(triton_scan, inputs)
    torch.testing.assert_close(out_strided, out, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_strided[name], grads[name], rtol=1e-6, atol=1e-6)


def test_column_walk_matches_transposed_grid():
    height, width = 45, 77
    inputs = vim_inputs(1, height * width, 384, torch.float32)
    on_grid = lambda **kw: triton_scan(**kw, walk=column_major_walk(height, width))  # noqa: E731
    reference = lambda **kw: bidirectional_selective_scan(  # noqa: E731
        **kw, walk=column_major_walk(height, width), backend="chunked"
    )
    assert_same(on_grid, reference, inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("walk", [None, (50, 84)], ids=["rows", "columns of 50x84"])
def test_conv_of_both_directions_matches_conv1d(dtype, walk):
    # Vim-B's inner width at 800x1344; x is half of in_proj's output, as in the mixer. The
    # column walk (MODEL.VIM.SCAN_ROUTES) reads x in place; the F.conv1d path gathers a copy.
    walk = None if walk is None else column_major_walk(*walk)
    gen = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(2, 4200, 2 * 1536, generator=gen, device="cuda").to(dtype)
    params = [
        torch.randn(1536, 1, 4, generator=gen, device="cuda") * 0.5,
        torch.randn(1536, generator=gen, device="cuda"),
        torch.randn(1536, 1, 4, generator=gen, device="cuda") * 0.5,
        torch.randn(1536, generator=gen, device="cuda"),
    ]
    results = []
    for backend in ("triton", "chunked"):  # chunked: the F.conv1d path
        leaves = [xz.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            weight, bias, weight_b, bias_b = leaves[1:]
            out = conv_both_directions(
                leaves[0][..., :1536],
                torch.stack([weight[:, 0], weight_b[:, 0]]),
                torch.stack([bias, bias_b]),
                walk=walk,
                backend=backend,
            )
        upstream = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
        results.append((out, torch.autograd.grad((out.float() * upstream).sum(), leaves)))
    (out, grads), (expected, expected_grads) = results
    assert_close(out, expected, dtype, "output")
    for name, grad, expected_grad in zip(("x", "w", "b", "w_b", "b_b"), grads, expected_grads):
        assert_close(grad, expected_grad, dtype, f"grad of {name}")


def test_auto_picks_triton_on_gpu():
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


class _ScanModule(torch.nn.Module):
    def forward(self, u, delta, A, B, C, D, z, delta_bias):
        return bidirectional_selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, backend="triton"
        )


def test_torch_compile_sees_one_op_without_graph_breaks():
    torch._dynamo.reset()
    compiled = torch.compile(_ScanModule(), fullgraph=True, dynamic=True)  # fails on a break
    for length in (1000, 1333):  # multi-scale training changes the token count
        inputs = vim_inputs(2, length, 384, torch.bfloat16)
        eager_out, eager_grads = output_and_grads(triton_scan, inputs)
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out = compiled(*[leaves[name] for name in NAMES])
        upstream = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
        grads = torch.autograd.grad((out.float() * upstream).sum(), list(leaves.values()))
        torch.testing.assert_close(out, eager_out)
        for name, grad in zip(leaves, grads):
            torch.testing.assert_close(grad, eager_grads[name])


def test_torch_export_keeps_the_custom_op():
    inputs = vim_inputs(1, 500, 384, torch.float32)
    args = tuple(inputs[name] for name in NAMES)
    exported = torch.export.export(_ScanModule(), args)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "vimdet.scan_walk.default" in targets, targets
    torch.testing.assert_close(exported.module()(*args), _ScanModule()(*args))


def paired_backbones():
    torch.manual_seed(0)

    def backbone(backend):
        net = VisionMamba(embed_dim=192, depth=4, out_blocks=(2, 3, 4), scan_backend=backend)
        # No max-pooled levels (p5, p6): the backends' features are a few ulps apart, and where two
        # of them nearly tie, a max pool's gradient goes to different pixels (up to 1.3e-2 apart
        # in p5's weights' gradients).
        return VimFeaturePyramid(
            net, in_blocks=(2, 3, 4), strides=(4, 8, 16), top_block=False
        ).cuda()

    fast, reference = backbone("triton"), backbone("cuda")
    reference.load_state_dict(fast.state_dict())
    return fast, reference


@needs_mamba
def test_backbone_bf16_autocast_triton_vs_cuda():
    fast, reference = paired_backbones()
    image = torch.randn(2, 3, 256, 320, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_fast, out_reference = fast(image), reference(image)
    for name in out_fast:
        assert_close(out_fast[name], out_reference[name], torch.bfloat16, name)
    sum(v.float().square().mean() for v in out_fast.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())


@needs_mamba
def test_backbone_fp32_gradients_triton_vs_cuda(monkeypatch):
    # The pyramid's convs in full fp32, so that the scans' differences are what is compared: TF32
    # (cuDNN's default) rounds the backends' features, a few ulps apart, to values 2e-4 apart.
    # A parameter's gradient sums every pixel's, with cancellation: the backends' differences,
    # under 1e-6 of the outputs, came to 0.97e-3-1.1e-3 of the largest entry (the patch
    # embedding's and the p4 convs', four images, H100), against 1e-3 for a single scan.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    fast, reference = paired_backbones()
    image = torch.randn(1, 3, 128, 192, device="cuda")
    for model in (fast, reference):
        sum(v.square().mean() for v in model(image).values()).backward()
    for (name, p_fast), p_reference in zip(fast.named_parameters(), reference.parameters()):
        assert_close(p_fast.grad, p_reference.grad, torch.float32, f"grad of {name}", 3e-3)
