"""Triton kernels of Vim's residual add + RMSNorm (Zhang & Sennrich 2019), the fp32 stream kept,
and of LayerNorm (Ba et al., arXiv 1607.06450) over rows, the pyramid's and heads' channel norm.

For rows r of the token-major stream (batch * L, D), with s the optional per-sample drop-path
scale (0 or 1 / keep) of the row's sample::

    res_out[r] = res[r] + s * h[r]          (fp32; res absent: s * h[r])
    out[r] = res_out[r] * rsqrt(mean(res_out[r]^2) + eps) * w

The backward pass recomputes the norm from ``res_out`` (which the next block keeps anyway), so
nothing but the stream is stored. LayerNorm's rows x (rows, C) are a channels-last map's pixels::

    out[r] = (x[r] - mean(x[r])) * rsqrt(var(x[r]) + eps) * w + b

computed in fp32 and stored in x's dtype; its backward recomputes the mean and variance from x.
"""

import triton
import triton.language as tl

__all__ = [
    "add_rms_norm_backward_kernel",
    "add_rms_norm_forward_kernel",
    "layer_norm_backward_kernel",
    "layer_norm_forward_kernel",
]


@triton.jit
def _row_tile(tile, rows_total, dim, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows of tile number ``tile``, the channel offsets and the in-bounds mask of the tile."""
    rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)  # int64 offsets
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < rows_total)[:, None] & (cols < dim)[None, :]
    return rows, cols, mask


@triton.jit
def add_rms_norm_forward_kernel(
    h_ptr,
    res_ptr,
    scale_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    rows_total,
    length,
    dim,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out (rows, D) in out's dtype and res_out (rows, D) fp32; all row-contiguous with row
    stride D. Grid: (cdiv(rows, BLOCK_ROWS),)."""
    rows, cols, mask = _row_tile(tl.program_id(0), rows_total, dim, BLOCK_ROWS, BLOCK_D)
    offsets = rows[:, None] * dim + cols[None, :]
    stream = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows // length, mask=rows < rows_total, other=0.0)
        stream = stream * scale[:, None]
    if HAS_RESIDUAL:
        stream = tl.load(res_ptr + offsets, mask=mask, other=0.0) + stream
    tl.store(res_out_ptr + offsets, stream, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(stream * stream, axis=1) / dim + eps)
    weight = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    out = stream * rstd[:, None] * weight[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_rms_norm_backward_kernel(
    dout_ptr,
    dres_out_ptr,
    res_out_ptr,
    scale_ptr,
    w_ptr,
    dh_ptr,
    dres_ptr,
    dw_part_ptr,
    rows_total,
    length,
    dim,
    eps,
    HAS_DRES_OUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """From dout (rows, D) and dres_out (rows, D) fp32: dh (rows, D) in h's dtype, dres (rows,
    D) fp32 and this program's partial sum of the weight's gradient, dw_part (programs, D) fp32,
    added up by the caller in a fixed order."""
    rows, cols, mask = _row_tile(tl.program_id(0), rows_total, dim, BLOCK_ROWS, BLOCK_D)
    offsets = rows[:, None] * dim + cols[None, :]
    stream = tl.load(res_out_ptr + offsets, mask=mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(stream * stream, axis=1) / dim + eps)
    normed = stream * rstd[:, None]
    weight = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dw_part_ptr + tl.program_id(0) * dim + cols, tl.sum(dout * normed, axis=0), cols < dim)
    dnormed = dout * weight[None, :]
    # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (g - x_hat * mean(g * x_hat)).
    dstream = rstd[:, None] * (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / dim)[:, None])
    if HAS_DRES_OUT:
        dstream += tl.load(dres_out_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        tl.store(dres_ptr + offsets, dstream, mask=mask)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows // length, mask=rows < rows_total, other=0.0)
        dstream = dstream * scale[:, None]
    tl.store(dh_ptr + offsets, dstream.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _standardized(x_ptr, offsets, mask, dim, eps):
    """x's tile in fp32, standardized per row (0 outside the mask), and the rows' 1 / std."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    centered = tl.where(mask, x - (tl.sum(x, axis=1) / dim)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / dim + eps)
    return centered * rstd[:, None], rstd


@triton.jit
def layer_norm_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    rows_total,
    dim,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out (rows, C) in out's dtype from x (rows, C), both row-contiguous with row stride C.
    Grid: (cdiv(rows, BLOCK_ROWS),)."""
    rows, cols, mask = _row_tile(tl.program_id(0), rows_total, dim, BLOCK_ROWS, BLOCK_D)
    offsets = rows[:, None] * dim + cols[None, :]
    normed, _ = _standardized(x_ptr, offsets, mask, dim, eps)
    weight = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    out = normed * weight[None, :] + bias[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_backward_kernel(
    dout_ptr,
    x_ptr,
    w_ptr,
    dx_ptr,
    dw_part_ptr,
    db_part_ptr,
    rows_total,
    dim,
    eps,
    tiles,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """From dout (rows, C): dx (rows, C) in x's dtype, and this program's partial sums of the
    weight's and bias's gradients, dw_part and db_part (programs, C) fp32, added up by the caller
    in a fixed order. Each program takes the tiles pid, pid + programs, ... of ``tiles`` and adds
    their gradient terms element-wise, summing over rows once at its end (a sum over a tile's rows
    at every tile crosses warps, and made this kernel 2x slower on an H100)."""
    cols = tl.arange(0, BLOCK_D)
    weight = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    dweight = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        rows, cols, mask = _row_tile(tile, rows_total, dim, BLOCK_ROWS, BLOCK_D)
        offsets = rows[:, None] * dim + cols[None, :]
        normed, rstd = _standardized(x_ptr, offsets, mask, dim, eps)
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dweight += dout * normed
        dbias += dout
        dnormed = dout * weight[None, :]
        # d/dx of (x - mean) * rstd: rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
        mean_dnormed = tl.sum(dnormed, axis=1) / dim
        mean_projection = tl.sum(dnormed * normed, axis=1) / dim
        dx = rstd[:, None] * (dnormed - mean_dnormed[:, None] - normed * mean_projection[:, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = tl.program_id(0) * dim + cols
    tl.store(dw_part_ptr + part, tl.sum(dweight, axis=0), mask=cols < dim)
    tl.store(db_part_ptr + part, tl.sum(dbias, axis=0), mask=cols < dim)
