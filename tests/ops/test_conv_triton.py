"""The Triton depthwise convolutions of both directions through Triton's CPU interpreter, against
``F.conv1d`` with Vim's flip definition of the backward direction; values and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from vimdet.ops import (
    column_major_walk,
    conv_both_directions,
    conv_triton,
    scan_triton,
    triton_available,
)

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


def both_directions(x, weight, bias, weight_b, bias_b, walk=None, backend="triton"):
    """``conv_both_directions`` of each direction's ``nn.Conv1d`` parameters, stacked as it takes
    them (the gradients reach the separate tensors through the stack)."""
    return conv_both_directions(
        x,
        torch.stack([weight[:, 0], weight_b[:, 0]]),
        torch.stack([bias, bias_b]),
        walk=walk,
        backend=backend,
    )


def both_directions_from_rows(x, weight, bias, weight_b, bias_b):
    """``conv_both_directions`` of taps and biases read in place from one (2, K + 1, E) tensor of
    rows, as ``BiMambaMixer._scan_weights`` passes them: taps at stride E, biases at stride 1."""
    taps = weight.shape[-1]
    rows = torch.cat([weight[:, 0].t(), bias[None], weight_b[:, 0].t(), bias_b[None]])
    rows = rows.unflatten(0, (2, -1))
    stacked_taps, stacked_bias = rows[:, :taps].transpose(1, 2), rows[:, taps]
    assert not stacked_taps.is_contiguous() and not stacked_bias.is_contiguous()
    return conv_both_directions(x, stacked_taps, stacked_bias, backend="triton")


@pytest.mark.parametrize("stack", [both_directions, both_directions_from_rows])
@pytest.mark.parametrize("length, channels", [(1, 3), (13, 9), (40, 20)])
def test_triton_conv_matches_flip_definition(monkeypatch, length, channels, stack):
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
    for function in (stack, flip_definition):
        leaves = [xz.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
        out = function(leaves[0][..., :channels], *leaves[1:])  # x: half of in_proj's output
        upstream = torch.linspace(-1, 1, out.numel()).view_as(out)
        results.append((out, torch.autograd.grad((out * upstream).sum(), leaves)))
    (out, grads), (expected, expected_grads) = results
    assert out.shape == (2, 2, length, channels)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, grad, expected_grad in zip(("x", "w", "b", "w_b", "b_b"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_input_keeps_its_dtype_and_matches_fp32(monkeypatch):
    # bf16 x, as under autocast: u and dx are bf16, the backward's gradients of the
    # pre-activations and all sums fp32. Against the fp32 definition on the same values, to
    # bf16's rounding (relative to the largest magnitude of each tensor).
    monkeypatch.setattr(conv_triton, "BLOCK", (8, 8))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 21, 12, generator=gen).to(torch.bfloat16)
    params = [torch.randn(*shape, generator=gen) for shape in ((12, 1, 4), (12,)) * 2]
    results = []
    for function, x_in in (
        (both_directions, x),
        (flip_definition, x.float()),
    ):
        leaves = [x_in.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
        out = function(*leaves)
        upstream = torch.linspace(-1, 1, out.numel()).view_as(out)
        results.append((out, torch.autograd.grad((out.float() * upstream).sum(), leaves)))
    (out, grads), (expected, expected_grads) = results
    assert out.dtype == grads[0].dtype == torch.bfloat16
    for name, actual, reference in zip(
        ("output", "x", "w", "b", "w_b", "b_b"), (out, *grads), (expected, *expected_grads)
    ):
        error = (actual.float() - reference).abs().max() / reference.abs().max()
        assert error < 1.6e-2, (name, error.item())


def test_registered_op_passes_opcheck():
    # torch.library's checks of the schema, the fake (meta) kernel and the autograd registration.
    x = torch.randn(1, 9, 6, requires_grad=True)
    weight = torch.randn(2, 6, 4, requires_grad=True)
    bias = torch.randn(2, 6, requires_grad=True)
    torch.library.opcheck(
        torch.ops.vimdet.conv_both_directions.default,
        (x, weight, bias, column_major_walk(3, 3)),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def transposed_grid(x, height, width):
    """(batch, H*W, E) row-major -> (batch, W*H, E) row-major over the transposed W x H grid."""
    return x.reshape(x.shape[0], height, width, -1).transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("height, width", [(5, 7), (6, 3), (1, 4)])
def test_column_walk_equals_conv_of_the_transposed_grid(monkeypatch, backend, height, width):
    # Along the column-major walk, both directions' convs must equal the row-order convs of an
    # explicitly transposed grid (read back in the original token order); values and gradients.
    # Triton reads the grid in place along the walk; the fallback gathers a copy.
    monkeypatch.setattr(conv_triton, "BLOCK", (8, 8))
    channels = 5
    gen = torch.Generator().manual_seed(height * width)
    x = torch.randn(2, height * width, channels, generator=gen)
    params = [
        torch.randn(channels, 1, 4, generator=gen),
        torch.randn(channels, generator=gen),
        torch.randn(channels, 1, 4, generator=gen),
        torch.randn(channels, generator=gen),
    ]
    walk = column_major_walk(height, width)

    def along_columns(x, *params):
        return both_directions(x, *params, walk=walk, backend=backend)

    def transposed(x, *params):
        u = flip_definition(transposed_grid(x, height, width), *params)
        return torch.stack([transposed_grid(u[d], width, height) for d in range(2)])

    results = []
    for function in (along_columns, transposed):
        leaves = [x.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
        out = function(*leaves)
        upstream = torch.linspace(-1, 1, out.numel()).view_as(out)
        results.append((out, torch.autograd.grad((out * upstream).sum(), leaves)))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, grad, expected_grad in zip(("x", "w", "b", "w_b", "b_b"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_weights_not_stacked_are_refused(backend):
    # The (E, 1, K) weight and (E,) bias of one nn.Conv1d, as before the directions were stacked:
    # a clear error, not a conv of the wrong taps; the old five-argument call is a TypeError.
    x = torch.randn(1, 6, 4)
    weight, bias = torch.randn(4, 1, 4), torch.randn(4)
    with pytest.raises(
        ValueError,
        match=r"must be both directions' taps and biases stacked, "
        r"\(2, 4, K\) and \(2, 4\)",
    ):
        conv_both_directions(x, weight, bias, backend=backend)
    with pytest.raises(TypeError, match="positional argument"):
        conv_both_directions(x, weight, bias, weight, bias)


def test_walk_that_is_not_a_permutation_is_refused():
    x = torch.randn(1, 6, 4)
    with pytest.raises(ValueError, match="does not visit each of the 6 tokens once"):
        conv_both_directions(
            x, torch.randn(2, 4, 4), torch.randn(2, 4), walk=[0, 3, 1, 1], backend="triton"
        )


def test_gradient_of_any_layout_is_read_right(monkeypatch):
    # The backward kernel reads du with adjacent channels; a sum of u hands it an expanded
    # (stride 0) gradient, a transposed product a strided one. Both are copied first.
    monkeypatch.setattr(conv_triton, "BLOCK", (8, 8))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 11, 6, generator=gen)
    params = [torch.randn(*shape, generator=gen) for shape in ((6, 1, 4), (6,)) * 2]
    upstream = torch.randn(2, 2, 6, 11, generator=gen).transpose(2, 3)  # (2, B, L, E), strided
    for loss in (lambda out: out.sum(), lambda out: (out * upstream).sum()):
        results = []
        for function in (both_directions, flip_definition):
            leaves = [x.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
            results.append(torch.autograd.grad(loss(function(*leaves)), leaves))
        for name, grad, expected in zip(("x", "w", "b", "w_b", "b_b"), *results):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5, msg=name)
