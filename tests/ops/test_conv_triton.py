"""The Triton depthwise convolutions of both directions through Triton's CPU interpreter, against
``F.conv1d`` with Vim's flip definition of the backward direction; values and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from vimdet.ops import conv_both_directions, conv_triton, scan_triton, triton_available

pytestmark = pytest.mark.skipif(
    not (triton_available() and scan_triton.interpreting()),
    reason="runs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU)",
)


def flip_definition(x, weight, bias, weight_b, bias_b):
    """Vim's released computation: causal convs, the backward one on the flipped sequence."""
    length, channels = x.shape[1], x.shape[2]
    taps = weight.shape[-1]
    x = x.transpose(1, 2)
    forward = F.conv1d(x, weight, bias, padding=taps - 1, groups=channels)[..., :length]
    backward = F.conv1d(x.flip(-1), weight_b, bias_b, padding=taps - 1, groups=channels)
    backward = backward[..., :length].flip(-1)
    return F.silu(torch.stack([forward, backward])).transpose(2, 3)


@pytest.mark.parametrize("length, channels", [(1, 3), (13, 9), (40, 20)])
def test_triton_conv_matches_flip_definition(monkeypatch, length, channels):
    monkeypatch.setattr(conv_triton, "BLOCK", (8, 8))  # several tiles in both directions
    gen = torch.Generator().manual_seed(length)
    xz = torch.randn(2, length, 2 * channels, generator=gen)
    params = [
        torch.randn(channels, 1, 4, generator=gen),
        torch.randn(channels, generator=gen),
        torch.randn(channels, 1, 4, generator=gen),
        torch.randn(channels, generator=gen),
    ]
    results = []
    for function in (
        lambda *args: conv_both_directions(*args, backend="triton"),
        flip_definition,
    ):
        leaves = [xz.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
        out = function(leaves[0][..., :channels], *leaves[1:])  # x: half of in_proj's output
        upstream = torch.linspace(-1, 1, out.numel()).view_as(out)
        results.append((out, torch.autograd.grad((out * upstream).sum(), leaves)))
    (out, grads), (expected, expected_grads) = results
    assert out.shape == (2, 2, length, channels)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, grad, expected_grad in zip(("x", "w", "b", "w_b", "b_b"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5, msg=name)


def test_registered_op_passes_opcheck():
    # torch.library's checks of the schema, the fake (meta) kernel and the autograd registration.
    x = torch.randn(1, 9, 6, requires_grad=True)
    weight = torch.randn(2, 6, 4, requires_grad=True)
    bias = torch.randn(2, 6, requires_grad=True)
    torch.library.opcheck(
        torch.ops.vimdet.conv_both_directions.default,
        (x, weight, bias),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
