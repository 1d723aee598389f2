"""GPU tests: mamba-ssm's CUDA scan against the chunked and reference backends; the backbone under
bf16 autocast. Skipped without CUDA or mamba-ssm; run on the GPU machine with `make test-gpu`."""

import functools

import pytest
import torch

from vimdet.modeling import VimFeaturePyramid, VisionMamba
from vimdet.ops import (
    cuda_kernel_available,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not cuda_kernel_available(), reason="needs mamba-ssm (pip install -e .[cuda])"
    ),
]

# Relative to the largest magnitude. bf16 outputs differ by bf16 rounding; the CUDA kernel also
# computes exp and softplus with fast-math intrinsics.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


def vim_t_inputs(length, dtype, batch=2, channels=384, state=16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    tensors = {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length, scale=0.5),
        "A": -torch.exp(
            torch.log(torch.arange(1, state + 1, device="cuda", dtype=torch.float32))
        ).repeat(channels, 1),
        "B": randn(batch, state, length),
        "C": randn(batch, state, length),
        "D": torch.ones(channels, device="cuda"),
        "z": randn(batch, channels, length),
        "delta_bias": torch.full((channels,), -3.0, device="cuda"),
    }
    for value in tensors.values():
        value.requires_grad_()
    return tensors


def forward_backward(scan, inputs):
    for value in inputs.values():
        value.grad = None
    out = scan(**inputs, delta_softplus=True)
    weight = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
    (out.float() * weight).sum().backward()
    return out.detach(), {k: v.grad.detach().clone() for k, v in inputs.items()}


cuda_scan = functools.partial(selective_scan, backend="cuda")


def assert_close(actual, expected, dtype, what):
    scale = expected.float().abs().max().clamp(min=1e-6)
    error = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [256, 4096])
def test_cuda_matches_chunked(length, dtype):
    inputs = vim_t_inputs(length, dtype)
    cuda_out, cuda_grads = forward_backward(cuda_scan, inputs)
    chunked_out, chunked_grads = forward_backward(selective_scan_chunked, inputs)
    assert cuda_out.dtype == dtype
    assert_close(cuda_out, chunked_out, dtype, "output")
    for name in cuda_grads:
        assert_close(cuda_grads[name], chunked_grads[name], dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_matches_reference(dtype):
    inputs = vim_t_inputs(128, dtype, batch=1)
    cuda_out, cuda_grads = forward_backward(cuda_scan, inputs)
    ref_out, ref_grads = forward_backward(selective_scan_reference, inputs)
    assert_close(cuda_out, ref_out, dtype, "output")
    for name in cuda_grads:
        assert_close(cuda_grads[name], ref_grads[name], dtype, f"grad of {name}")


def paired_backbones():
    torch.manual_seed(0)

    def backbone(backend):
        net = VisionMamba(embed_dim=192, depth=4, out_blocks=(1, 2, 3, 4), scan_backend=backend)
        return VimFeaturePyramid(net, in_blocks=(1, 2, 3, 4)).cuda()

    fast = backbone("cuda")
    portable = backbone("chunked")
    portable.load_state_dict(fast.state_dict())
    return fast, portable


def test_backbone_bf16_autocast_cuda_vs_chunked():
    fast, portable = paired_backbones()
    image = torch.randn(2, 3, 256, 320, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_fast = fast(image)
        out_portable = portable(image)
    for name in out_fast:
        assert out_fast[name].shape == out_portable[name].shape
        assert_close(out_fast[name], out_portable[name], torch.bfloat16, name)
    for outputs, model in ((out_fast, fast), (out_portable, portable)):
        sum(v.float().square().mean() for v in outputs.values()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_backbone_fp32_gradients_cuda_vs_chunked():
    fast, portable = paired_backbones()
    image = torch.randn(1, 3, 128, 192, device="cuda")
    for model in (fast, portable):
        sum(v.square().mean() for v in model(image).values()).backward()
    for (name, p_fast), p_portable in zip(fast.named_parameters(), portable.parameters()):
        assert_close(p_fast.grad, p_portable.grad, torch.float32, f"grad of {name}")
