# ruff: noqa: UP045 (torch.library infers op schemas from typing.Optional annotations)
"""Vim's depthwise convolutions of both directions in Triton, registered as
``vimdet::conv_both_directions`` with its autograd and fake implementations.

x (batch, L, E), any batch and token strides -> u (2, batch, L, E) contiguous: direction 0 the
causal conv + SiLU, direction 1 the anti-causal one (Vim's flipped branch, unflipped), both along a
walk over the tokens (:func:`vimdet.ops.scan_triton.column_major_walk`; row-major by default), read
and written in place. The kernels are in :mod:`vimdet.ops.conv_triton_kernels`.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .scan_triton import (
    _is_row_major,
    _unit_channel_stride,
    channel_sums,
    device_guard,
    row_major_walk,
)

try:
    import triton

    from . import conv_triton_kernels as kernels
except ImportError:
    triton = None
    kernels = None

__all__ = ["conv_both_directions_triton"]

# (positions, channels) of a program's tile, and its warps: a lane a channel, 16 positions in its
# registers. Best of those tried inside ViMDet-B's training step on an H100 (docs/benchmarks.md):
# the backward kernel at 32 positions needs 255 registers and ran 41% slower in the step.
BLOCK = (16, 64)
WARPS = 2


def _grid(x: Tensor) -> Tuple[int, int, int]:
    batch, length, channels = x.shape
    return (triton.cdiv(length, BLOCK[0]), triton.cdiv(channels, BLOCK[1]), batch)


@torch.library.custom_op("vimdet::conv_both_directions", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Tensor, walk: List[int]) -> Tensor:
    batch, length, channels = x.shape
    u = x.new_empty((2, batch, length, channels))
    with device_guard(x):
        kernels.conv_forward_kernel[_grid(x)](
            x, weight, bias, u, length, channels, x.stride(0), x.stride(1),
            *weight.stride(), bias.stride(0),
            u.stride(0), u.stride(1), u.stride(2), *walk, ROW_MAJOR=_is_row_major(walk, length),
            TAPS=weight.shape[-1], BLOCK_L=BLOCK[0], BLOCK_E=BLOCK[1], num_warps=WARPS,
        )  # fmt: skip
    return u


@_conv_op.register_fake
def _conv_fake(x, weight, bias, walk):
    return x.new_empty((2, *x.shape))


@torch.library.custom_op("vimdet::conv_both_directions_backward", mutates_args=())
def _conv_backward_op(
    du: Tensor, x: Tensor, weight: Tensor, bias: Tensor, walk: List[int]
) -> Tuple[Tensor, Tensor, Tensor]:
    batch, length, channels = x.shape
    taps = weight.shape[-1]
    row_major = _is_row_major(walk, length)
    du = _unit_channel_stride(du)  # e.g. expanded, from a sum of u
    grid = _grid(x)
    blocks = grid[0] * batch
    f32 = {"dtype": torch.float32, "device": x.device}
    # Each program's partial sums of the taps' and the bias's gradients, one tensor that one
    # reduction adds up: (blocks, 2, taps + 1, E), the bias's row last.
    parts = torch.empty((blocks, 2, taps + 1, channels), **f32)
    dx = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)
    with device_guard(x):
        kernels.conv_backward_kernel[grid](
            x, weight, bias, du, dx, parts, length, channels,
            x.stride(0), x.stride(1), *weight.stride(), bias.stride(0),
            du.stride(0), du.stride(1), du.stride(2), dx.stride(0), dx.stride(1), *walk,
            ROW_MAJOR=row_major, TAPS=taps, BLOCK_L=BLOCK[0], BLOCK_E=BLOCK[1], num_warps=WARPS,
        )  # fmt: skip
        # Partial sums added in a fixed order: deterministic, no atomics.
        dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        dbias = torch.empty_like(bias, memory_format=torch.contiguous_format)
        channel_sums(parts.transpose(0, 1), dweight, dbias)
    return dx, dweight, dbias


@_conv_backward_op.register_fake
def _conv_backward_fake(du, x, weight, bias, walk):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, walk = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.walk = walk


def _backward(ctx, du):
    x, weight, bias = ctx.saved_tensors
    return (*_conv_backward_op(du, x, weight, bias, ctx.walk), None)


_conv_op.register_autograd(_backward, setup_context=_setup_context)


def conv_both_directions_triton(
    x: Tensor, weight: Tensor, bias: Tensor, walk: Optional[Sequence[int]] = None
) -> Tensor:
    """x (batch, L, E); weight (2, E, K) taps of both directions; bias (2, E); a checked walk
    (None: row-major) -> u (2, batch, L, E) in x's dtype, indexed by token. x and bias are read in
    place when their channels are contiguous, weight at any strides."""
    x, bias = _unit_channel_stride(x), _unit_channel_stride(bias)
    walk = [int(v) for v in walk] if walk is not None else row_major_walk(int(x.shape[1]))
    return _conv_op(x, weight, bias, walk)
