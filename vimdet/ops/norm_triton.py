# ruff: noqa: UP045 (torch.library infers op schemas from typing.Optional annotations)
"""Vim's residual add + RMSNorm and the pyramid's channel LayerNorm in Triton, registered as
``vimdet::add_rms_norm`` and ``vimdet::layer_norm_rows`` with their autograd and fake
implementations. The kernels are in :mod:`vimdet.ops.norm_triton_kernels`."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .scan_triton import device_guard

try:
    import triton

    from . import norm_triton_kernels as kernels
except ImportError:
    triton = None
    kernels = None

__all__ = ["add_rms_norm_triton", "layer_norm_rows_triton"]

# Elements of a program's (rows, D) tile: 8192 fp32 values keep a tile in registers at D = 768.
TILE_ELEMENTS = 8192
# The LayerNorm's tiles are smaller, with 4 warps, and its backward pass runs 4 programs an SM,
# each adding up its tiles' weight and bias gradients (partial sums (programs, C) at any map
# size). The fastest of the tiles, warps and programs tried on an H100 at the pyramid's and box
# heads' shapes (docs/benchmarks.md, eighteenth round).
LAYER_NORM_TILE_ELEMENTS = 2048
LAYER_NORM_WARPS = 4
LAYER_NORM_BACKWARD_PROGRAMS_PER_SM = 4


def _launch_shape(rows: int, dim: int, tile_elements: int) -> Tuple[int, int, int]:
    """(programs, BLOCK_ROWS, BLOCK_D) for a (rows, dim) stream, tiles of about
    ``tile_elements``."""
    block_d = triton.next_power_of_2(dim)
    block_rows = max(1, min(tile_elements // block_d, triton.next_power_of_2(rows)))
    return triton.cdiv(rows, block_rows), block_rows, block_d


def _multiprocessors(device: torch.device) -> int:
    """The GPU's SM count; 1 elsewhere (Triton's interpreter on the CPU)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_warps(block_rows: int, block_d: int) -> int:
    return 8 if block_rows * block_d >= 8192 else 4


@torch.library.custom_op("vimdet::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    hidden: Tensor,
    residual: Optional[Tensor],
    weight: Tensor,
    drop_scale: Optional[Tensor],
    eps: float,
    out_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor]:
    batch, length, dim = hidden.shape
    rows = batch * length
    out = torch.empty((batch, length, dim), dtype=out_dtype, device=hidden.device)
    res_out = torch.empty((batch, length, dim), dtype=torch.float32, device=hidden.device)
    programs, block_rows, block_d = _launch_shape(rows, dim, TILE_ELEMENTS)
    with device_guard(hidden):
        kernels.add_rms_norm_forward_kernel[(programs,)](
            hidden, residual, drop_scale, weight, out, res_out, rows, length, dim, eps,
            HAS_RESIDUAL=residual is not None, HAS_SCALE=drop_scale is not None,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=_num_warps(block_rows, block_d),
        )  # fmt: skip
    return out, res_out


@_add_rms_norm_op.register_fake
def _add_rms_norm_fake(hidden, residual, weight, drop_scale, eps, out_dtype):
    return (
        hidden.new_empty(hidden.shape, dtype=out_dtype),
        hidden.new_empty(hidden.shape, dtype=torch.float32),
    )


@torch.library.custom_op("vimdet::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward_op(
    dout: Tensor,
    dres_out: Optional[Tensor],
    res_out: Tensor,
    weight: Tensor,
    drop_scale: Optional[Tensor],
    eps: float,
    hidden_dtype: torch.dtype,
    has_residual: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dresidual (empty when there was no residual), dweight)."""
    batch, length, dim = res_out.shape
    rows = batch * length
    programs, block_rows, block_d = _launch_shape(rows, dim, TILE_ELEMENTS)
    f32 = {"dtype": torch.float32, "device": res_out.device}
    dhidden = torch.empty((batch, length, dim), dtype=hidden_dtype, device=res_out.device)
    dresidual = torch.empty((batch, length, dim) if has_residual else (0,), **f32)
    dw_parts = torch.empty((programs, dim), **f32)
    with device_guard(res_out):
        kernels.add_rms_norm_backward_kernel[(programs,)](
            dout, dres_out, res_out, drop_scale, weight, dhidden, dresidual, dw_parts,
            rows, length, dim, eps, HAS_DRES_OUT=dres_out is not None,
            HAS_RESIDUAL=has_residual, HAS_SCALE=drop_scale is not None,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=_num_warps(block_rows, block_d),
        )  # fmt: skip
    # Partial sums added in a fixed order: deterministic, no atomics.
    return dhidden, dresidual, dw_parts.sum(0).to(weight.dtype)


@_add_rms_norm_backward_op.register_fake
def _add_rms_norm_backward_fake(
    dout, dres_out, res_out, weight, drop_scale, eps, hidden_dtype, has_residual
):
    return (
        res_out.new_empty(res_out.shape, dtype=hidden_dtype),
        res_out.new_empty(res_out.shape if has_residual else (0,)),
        weight.new_empty(weight.shape),
    )


def _setup_context(ctx, inputs, output):
    hidden, residual, weight, drop_scale, eps, _ = inputs
    ctx.save_for_backward(output[1], weight, drop_scale)
    ctx.eps = eps
    ctx.hidden_dtype = hidden.dtype
    ctx.has_residual = residual is not None


def _backward(ctx, dout, dres_out):
    res_out, weight, drop_scale = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(res_out)
    dhidden, dresidual, dweight = _add_rms_norm_backward_op(
        dout.contiguous(),
        None if dres_out is None else dres_out.contiguous(),
        res_out,
        weight,
        drop_scale,
        ctx.eps,
        ctx.hidden_dtype,
        ctx.has_residual,
    )
    return dhidden, dresidual if ctx.has_residual else None, dweight, None, None, None


_add_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def add_rms_norm_triton(
    hidden: Tensor,
    residual: Optional[Tensor],
    weight: Tensor,
    drop_scale: Optional[Tensor],
    eps: float,
    out_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor]:
    """hidden (batch, L, D), residual (batch, L, D) fp32 or None, weight (D,), drop_scale
    (batch,) fp32 or None -> (normed in ``out_dtype``, res_out fp32), both (batch, L, D)."""
    residual = None if residual is None else residual.contiguous()
    drop_scale = None if drop_scale is None else drop_scale.contiguous()
    return _add_rms_norm_op(
        hidden.contiguous(), residual, weight.contiguous(), drop_scale, eps, out_dtype
    )


@torch.library.custom_op("vimdet::layer_norm_rows", mutates_args=())
def _layer_norm_rows_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    dim = x.shape[-1]
    rows = x.numel() // dim
    out = torch.empty_like(x)
    if rows == 0:  # e.g. a head's norm over no boxes
        return out
    programs, block_rows, block_d = _launch_shape(rows, dim, LAYER_NORM_TILE_ELEMENTS)
    with device_guard(x):
        kernels.layer_norm_forward_kernel[(programs,)](
            x, weight, bias, out, rows, dim, eps, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            num_warps=LAYER_NORM_WARPS,
        )  # fmt: skip
    return out


@_layer_norm_rows_op.register_fake
def _layer_norm_rows_fake(x, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("vimdet::layer_norm_rows_backward", mutates_args=())
def _layer_norm_rows_backward_op(
    dout: Tensor, x: Tensor, weight: Tensor, eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias)."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    dx = torch.empty_like(x)
    if rows == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight)
    tiles, block_rows, block_d = _launch_shape(rows, dim, LAYER_NORM_TILE_ELEMENTS)
    programs = min(tiles, LAYER_NORM_BACKWARD_PROGRAMS_PER_SM * _multiprocessors(x.device))
    parts = torch.empty((2, programs, dim), dtype=torch.float32, device=x.device)
    with device_guard(x):
        kernels.layer_norm_backward_kernel[(programs,)](
            dout, x, weight, dx, parts[0], parts[1], rows, dim, eps, tiles,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=LAYER_NORM_WARPS,
        )  # fmt: skip
    # Partial sums added in a fixed order: deterministic, no atomics.
    return dx, parts[0].sum(0).to(weight.dtype), parts[1].sum(0).to(weight.dtype)


@_layer_norm_rows_backward_op.register_fake
def _layer_norm_rows_backward_fake(dout, x, weight, eps):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_rows_setup_context(ctx, inputs, output):
    x, weight, _, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _layer_norm_rows_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_rows_backward_op(dout.contiguous(), x, weight, ctx.eps)
    return dx, dweight, dbias, None


_layer_norm_rows_op.register_autograd(
    _layer_norm_rows_backward, setup_context=_layer_norm_rows_setup_context
)


def layer_norm_rows_triton(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim of x (..., C), in fp32, stored in x's dtype; weight and bias
    (C,). x is made row-contiguous first (a channels-last map's (B, H, W, C) view already is)."""
    return _layer_norm_rows_op(x.contiguous(), weight.contiguous(), bias.contiguous(), eps)
