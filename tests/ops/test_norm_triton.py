"""The fused residual add + RMSNorm through Triton's CPU interpreter, against an independent
float64 computation of the formula (values and every gradient), and the fused trunk (the Triton
norm, conv and scan) against the reference trunk (PyTorch ops) with the same weights."""

import pytest
import torch

from vimdet.modeling import VisionMamba
from vimdet.ops import add_rms_norm, norm_triton, scan_triton, triton_available

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


def test_registered_op_passes_opcheck():
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    residual = torch.randn(2, 5, 6, requires_grad=True)
    weight = torch.randn(6, requires_grad=True)
    torch.library.opcheck(
        torch.ops.vimdet.add_rms_norm.default,
        (hidden, residual, weight, torch.tensor([1.0, 2.0]), 1e-5, torch.float32),
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
