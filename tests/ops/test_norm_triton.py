"""The fused residual add + RMSNorm and the channel LayerNorm through Triton's CPU interpreter,
against independent float64 computations of their formulas (values and every gradient), and the
fused trunk (the Triton norm, conv and scan) against the reference trunk (PyTorch ops) with the
same weights."""

import pytest
import torch

from vimdet.modeling import VimFeaturePyramid, VisionMamba
from vimdet.ops import (
    add_rms_norm,
    channel_layer_norm,
    norm_triton,
    scan_triton,
    triton_available,
)

pytestmark = pytest.mark.skipif(
    not (triton_available() and scan_triton.interpreting()),
    reason="runs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU)",
)


def float64_formula(hidden, residual, weight, eps, drop_scale):
    """stream = residual + scale * hidden; normed = stream / rms(stream) * weight, in float64."""
    stream = hidden.double()
    if drop_scale is not None:
        stream = stream * drop_scale.double()[:, None, None]
    if residual is not None:
        stream = stream + residual.double()
    rms = stream.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    return stream / rms * weight.double(), stream


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("with_drop", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_matches_formula(monkeypatch, with_residual, with_drop, out_dtype):
    monkeypatch.setattr(norm_triton, "TILE_ELEMENTS", 64)  # 4 rows a program: several programs
    gen = torch.Generator().manual_seed(3)
    batch, length, dim = 3, 7, 13  # odd width: a masked tail in every row
    hidden = torch.randn(batch, length, dim, generator=gen).requires_grad_()
    residual = torch.randn(batch, length, dim, generator=gen).requires_grad_()
    weight = (1 + 0.5 * torch.randn(dim, generator=gen)).requires_grad_()
    drop_scale = torch.tensor([0.0, 1.25, 1.25]) if with_drop else None
    res = residual if with_residual else None
    leaves = [hidden, weight] + ([residual] if with_residual else [])

    normed, stream = add_rms_norm(hidden, res, weight, 1e-5, drop_scale, out_dtype, "triton")
    expected_normed, expected_stream = float64_formula(hidden, res, weight, 1e-5, drop_scale)
    assert normed.dtype == out_dtype and stream.dtype == torch.float32
    # fp32 rounding, or bf16's 8-bit mantissa for a bf16 output.
    tolerance = 1e-2 if out_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(normed.double(), expected_normed, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(stream.double(), expected_stream, rtol=1e-6, atol=1e-6)

    # Both outputs feed the loss, as in the trunk (the stream goes on to the next block).
    up_normed = torch.linspace(-1, 1, normed.numel()).view_as(normed)
    up_stream = torch.linspace(2, -1, stream.numel()).view_as(stream)
    grads = torch.autograd.grad(
        (normed.float() * up_normed).sum() + (stream * up_stream).sum(), leaves
    )
    expected_grads = torch.autograd.grad(
        (expected_normed * up_normed.double()).sum() + (expected_stream * up_stream.double()).sum(),
        leaves,
    )
    for name, grad, expected in zip(("hidden", "weight", "residual"), grads, expected_grads):
        # The float64 graph's gradients arrive in the leaves' dtype (fp32). A bf16 output's
        # gradient is bf16 too, which rounds the upstream gradient.
        grad_tolerance = 1e-2 if out_dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(
            grad, expected, rtol=grad_tolerance, atol=grad_tolerance, msg=name
        )
    if with_drop:  # the dropped sample's branch gets no gradient; its stream does
        assert grads[0][0].abs().max() == 0


def channel_layer_norm_float64(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over dim 1, in float64."""
    x = x.double()
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    shape = (1, -1, 1, 1)
    return (x - mean) / (var + eps).sqrt() * weight.double().view(shape) + bias.double().view(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_layer_norm_matches_formula(monkeypatch, dtype, channels_last):
    # 4 rows a tile (18 tiles) and, off the GPU, 4 programs in the backward pass: programs that
    # walk several tiles and add up their weight gradients; 13 channels: a masked tail in every row.
    monkeypatch.setattr(norm_triton, "LAYER_NORM_TILE_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(5)
    x = (3 + 2 * torch.randn(2, 13, 5, 7, generator=gen)).to(dtype)  # a mean far from 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (1 + 0.5 * torch.randn(13, generator=gen)).requires_grad_()
    bias = torch.randn(13, generator=gen).requires_grad_()

    out = channel_layer_norm(x, weight, bias, 1e-6, backend="triton")
    expected = channel_layer_norm_float64(x, weight, bias, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    # fp32 rounding, or bf16's 8-bit mantissa for a bf16 map.
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)

    upstream = torch.linspace(-1, 1, out.numel()).view_as(out)
    grads = torch.autograd.grad((out.float() * upstream).sum(), (x, weight, bias))
    expected_grads = torch.autograd.grad((expected * upstream.double()).sum(), (x, weight, bias))
    for name, grad, expected_grad in zip(("x", "weight", "bias"), grads, expected_grads):
        assert grad.dtype == expected_grad.dtype, name
        # bf16: the upstream gradient and dx are rounded to bf16.
        grad_tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(
            grad.float(), expected_grad.float(), rtol=grad_tolerance, atol=grad_tolerance, msg=name
        )


def test_channel_layer_norm_of_an_empty_map():
    # A box head's norm when an image has no proposals: no rows, zero parameter gradients.
    x = torch.randn(0, 8, 7, 7, requires_grad=True)
    weight = torch.ones(8, requires_grad=True)
    bias = torch.zeros(8, requires_grad=True)
    out = channel_layer_norm(x, weight, bias, backend="triton")
    assert out.shape == (0, 8, 7, 7)
    grads = torch.autograd.grad(out.sum(), (x, weight, bias))
    assert grads[0].shape == x.shape
    assert not grads[1].any() and not grads[2].any()


def test_registered_ops_pass_opcheck():
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    residual = torch.randn(2, 5, 6, requires_grad=True)
    weight = torch.randn(6, requires_grad=True)
    torch.library.opcheck(
        torch.ops.vimdet.add_rms_norm.default,
        (hidden, residual, weight, torch.tensor([1.0, 2.0]), 1e-5, torch.float32),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    pixels = torch.randn(2, 3, 4, 6, requires_grad=True)
    torch.library.opcheck(
        torch.ops.vimdet.layer_norm_rows.default,
        (pixels, torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True), 1e-6),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_fused_trunk_matches_reference_trunk():
    # Triton norm + conv + scan against PyTorch norm + F.conv1d + chunked scan; an odd 3x5 grid,
    # batch 2, every parameter's gradient. Training with drop path (block 3 drops at rate 0.5,
    # from the same RNG draws on both sides), then evaluation, where nothing drops.
    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, depth=3, d_state=4, out_blocks=(2, 3))
    kwargs.update(drop_path_rate=0.5, pretrain_img_size=64)
    fused = VisionMamba(scan_backend="triton", **kwargs).train()
    reference = VisionMamba(scan_backend="chunked", **kwargs).train()
    reference.load_state_dict(fused.state_dict())
    image = torch.randn(2, 3, 48, 80)
    outputs = []
    for net in (fused, reference):
        torch.manual_seed(1)
        features = net(image)
        loss = sum(
            (f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for f in features.values()
        )
        loss.backward()
        with torch.no_grad():
            outputs.append((features, net.eval()(image)))
    (train_fused, eval_fused), (train_reference, eval_reference) = outputs
    assert not torch.allclose(train_fused["block3"], eval_fused["block3"])  # a sample dropped
    for name in train_fused:
        torch.testing.assert_close(train_fused[name], train_reference[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(eval_fused[name], eval_reference[name], rtol=1e-4, atol=1e-4)
    for (name, p_fused), p_reference in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(
            p_fused.grad, p_reference.grad, rtol=1e-3, atol=1e-4, msg=f"grad of {name}"
        )


def test_fused_pyramid_matches_reference_pyramid():
    # The Triton trunk and channel norms against the reference ones in every level (strides 4 to
    # 32 and p6), batch 2, every parameter's gradient.
    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, depth=2, d_state=4, out_blocks=(1, 2), pretrain_img_size=64)
    pyramids = [
        VimFeaturePyramid(
            VisionMamba(scan_backend=backend, **kwargs),
            in_blocks=(1, 1, 2, 2),
            strides=(4, 8, 16, 32),
            out_channels=8,
        )
        for backend in ("triton", "chunked")
    ]
    norms = [m for m in pyramids[0].modules() if type(m).__name__ == "ChannelLayerNorm"]
    assert len(norms) == 9 and all(norm.backend == "triton" for norm in norms)
    with torch.no_grad():  # norms that are not the identity at initialization
        for norm in norms:
            norm.weight.normal_(1, 0.5)
            norm.bias.normal_()
    pyramids[1].load_state_dict(pyramids[0].state_dict())
    image = torch.randn(2, 3, 64, 96)
    outputs = []
    for pyramid in pyramids:
        levels = pyramid(image)
        loss = sum((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for f in levels.values())
        loss.backward()
        outputs.append(levels)
    assert list(outputs[0]) == ["p2", "p3", "p4", "p5", "p6"]
    for name in outputs[0]:
        torch.testing.assert_close(outputs[0][name], outputs[1][name], rtol=1e-4, atol=1e-4)
    for (name, fused), reference in zip(pyramids[0].named_parameters(), pyramids[1].parameters()):
        torch.testing.assert_close(fused.grad, reference.grad, rtol=1e-3, atol=1e-4, msg=name)
