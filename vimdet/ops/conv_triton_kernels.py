"""Triton kernels of Vim's depthwise convolutions of both directions, token-major, fused with SiLU.

For x (batch, L, E) and taps w (E, K) of each direction, from one read of x:

    u_fwd[t] = silu(bias + sum_j w[K-1-j] * x[t-j])        (causal, the forward direction)
    u_bwd[t] = silu(bias_b + sum_j w_b[K-1-j] * x[t+j])    (anti-causal: Vim's flipped branch)

with x zero outside the sequence. The sequence is the token grid read along a walk (start, inner,
inner_stride, outer_stride): position t is the token start + (t % inner) * inner_stride + (t //
inner) * outer_stride, so a column-major walk reads a row-major grid in place (row-major is (0, L,
1, 0), and ``ROW_MAJOR`` skips the arithmetic). x, u and dx are indexed by token. The backward
pass, one kernel, recomputes the pre-activations from x and, for the K - 1 positions past each end
of its tile that dx needs, the gradients of the pre-activations too.

A program owns BLOCK_L positions of BLOCK_E channels. As in the scan's kernels
(:mod:`vimdet.ops.scan_triton_kernels`), a lane owns one channel and holds the tile's positions in
registers (the row strides are left unspecialised, so that Triton does not vectorise along the
channels): the tile is read once, and its copies shifted by one to K - 1 positions are register
moves (``_shift_rows``) with the rows past the tile's ends read as single rows.
"""

import triton
import triton.language as tl

from .scan_triton_kernels import _shift_rows, _sigmoid, _silu_derivative, _walk_token

__all__ = ["conv_backward_kernel", "conv_forward_kernel"]


@triton.jit
def _rows(
    ptr, pos, length, offs_e, e_ok, stride_l, walk_start, inner, s_inner, s_outer,
    ROW_MAJOR: tl.constexpr,
):  # fmt: skip
    """Walk positions ``pos`` (R,) of a token-indexed (L, E) tensor at channels ``offs_e`` as fp32
    (R, BLOCK_E), zero outside the sequence."""
    ok = (pos >= 0) & (pos < length)
    token = _walk_token(tl.where(ok, pos, 0), walk_start, inner, s_inner, s_outer, ROW_MAJOR)
    values = tl.load(
        ptr + token[:, None] * stride_l + offs_e[None, :],
        mask=ok[:, None] & e_ok[None, :],
        other=0.0,
    )
    return values.to(tl.float32)


@triton.jit
def _shifted(
    tile,
    ptr,
    first,
    shift,
    length,
    offs_e,
    e_ok,
    stride_l,
    walk_start,
    inner,
    s_inner,
    s_outer,
    ROW_MAJOR: tl.constexpr,
    AHEAD: tl.constexpr,
):
    """``tile`` (rows at walk positions first + r, shifted by ``shift`` - 1 so far) shifted once
    more: row r then holds position first + r + shift (``AHEAD``) or first + r - shift, the row
    that comes in read from ``ptr``."""
    BLOCK_L: tl.constexpr = tile.shape[0]
    if AHEAD:
        edge = first + BLOCK_L - 1 + shift + tl.arange(0, 1)
    else:
        edge = first - shift + tl.arange(0, 1)
    row = _rows(
        ptr, edge, length, offs_e, e_ok, stride_l, walk_start, inner, s_inner, s_outer, ROW_MAJOR
    )
    return _shift_rows(tile, row, AHEAD)


@triton.jit
def _tap(w_ptr, tap, offs_e, e_ok, s_w_e, s_w_k):
    """Tap ``tap`` of the (E, K) taps at channels ``offs_e``, fp32 (1, BLOCK_E)."""
    values = tl.load(w_ptr + offs_e * s_w_e + tap * s_w_k, mask=e_ok, other=0.0)
    return values.to(tl.float32)[None, :]


@triton.jit
def _pre_activations(
    x_ptr,
    x,
    w_ptr,
    bias_ptr,
    first,
    length,
    offs_e,
    e_ok,
    s_x_l,
    s_w_dir,
    s_w_e,
    s_w_k,
    s_bias_dir,
    walk_start,
    inner,
    s_inner,
    s_outer,
    ROW_MAJOR: tl.constexpr,
    TAPS: tl.constexpr,
):
    """Both directions' conv outputs before SiLU at the tile's positions, (BLOCK_L, BLOCK_E) fp32
    each, from the tile ``x`` of those positions."""
    fwd = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    bwd = tl.load(bias_ptr + s_bias_dir + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    fwd += _tap(w_ptr, TAPS - 1, offs_e, e_ok, s_w_e, s_w_k) * x
    bwd += _tap(w_ptr + s_w_dir, TAPS - 1, offs_e, e_ok, s_w_e, s_w_k) * x
    back = x
    ahead = x
    for j in tl.static_range(1, TAPS):
        back = _shifted(
            back,
            x_ptr,
            first,
            j,
            length,
            offs_e,
            e_ok,
            s_x_l,
            walk_start,
            inner,
            s_inner,
            s_outer,
            ROW_MAJOR,
            False,
        )
        ahead = _shifted(
            ahead,
            x_ptr,
            first,
            j,
            length,
            offs_e,
            e_ok,
            s_x_l,
            walk_start,
            inner,
            s_inner,
            s_outer,
            ROW_MAJOR,
            True,
        )
        fwd += _tap(w_ptr, TAPS - 1 - j, offs_e, e_ok, s_w_e, s_w_k) * back
        bwd += _tap(w_ptr + s_w_dir, TAPS - 1 - j, offs_e, e_ok, s_w_e, s_w_k) * ahead
    return fwd, bwd


@triton.jit(do_not_specialize=["s_x_l", "s_u_l"])
def conv_forward_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    u_ptr,
    length,
    channels,
    s_x_b,
    s_x_l,
    s_w_dir,
    s_w_e,
    s_w_k,
    s_bias_dir,
    s_u_dir,
    s_u_b,
    s_u_l,
    walk_start,
    inner,
    s_inner,
    s_outer,
    ROW_MAJOR: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """u (2, batch, L, E) = SiLU of both directions' convs along the walk of x (batch, L, E); x's
    channel stride is 1. Grid: (cdiv(L, BLOCK_L), cdiv(E, BLOCK_E), batch)."""
    b = tl.program_id(2).to(tl.int64)
    first = tl.program_id(0) * BLOCK_L
    pos = first + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    x_ptr += b * s_x_b
    x = _rows(
        x_ptr, pos, length, offs_e, e_ok, s_x_l, walk_start, inner, s_inner, s_outer, ROW_MAJOR
    )
    fwd, bwd = _pre_activations(
        x_ptr,
        x,
        w_ptr,
        bias_ptr,
        first,
        length,
        offs_e,
        e_ok,
        s_x_l,
        s_w_dir,
        s_w_e,
        s_w_k,
        s_bias_dir,
        walk_start,
        inner,
        s_inner,
        s_outer,
        ROW_MAJOR,
        TAPS,
    )
    pos_ok = pos < length
    tokens = _walk_token(tl.where(pos_ok, pos, 0), walk_start, inner, s_inner, s_outer, ROW_MAJOR)
    out = u_ptr + b * s_u_b + tokens[:, None] * s_u_l + offs_e[None, :]
    mask = pos_ok[:, None] & e_ok[None, :]
    tl.store(out, (fwd * _sigmoid(fwd)).to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(out + s_u_dir, (bwd * _sigmoid(bwd)).to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_row(
    x_ptr,
    du_ptr,
    w_ptr,
    bias_ptr,
    p,
    length,
    offs_e,
    e_ok,
    s_x_l,
    s_du_l,
    s_w_e,
    s_w_k,
    walk_start,
    inner,
    s_inner,
    s_outer,
    ROW_MAJOR: tl.constexpr,
    TAPS: tl.constexpr,
    AHEAD: tl.constexpr,
):
    """One direction's g = du * SiLU'(pre) at the single walk position ``p``, (1, BLOCK_E) fp32,
    zero outside the sequence; ``AHEAD``: the anti-causal direction, whose pre-activation reads x
    at p + j (the causal one at p - j). Pointers are the direction's."""
    pos = p + tl.arange(0, 1)
    pre = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(TAPS):
        if AHEAD:
            source = pos + j
        else:
            source = pos - j
        x = _rows(
            x_ptr,
            source,
            length,
            offs_e,
            e_ok,
            s_x_l,
            walk_start,
            inner,
            s_inner,
            s_outer,
            ROW_MAJOR,
        )
        pre += _tap(w_ptr, TAPS - 1 - j, offs_e, e_ok, s_w_e, s_w_k) * x
    du = _rows(
        du_ptr, pos, length, offs_e, e_ok, s_du_l, walk_start, inner, s_inner, s_outer, ROW_MAJOR
    )
    return du * _silu_derivative(pre)


@triton.jit(do_not_specialize=["s_x_l", "s_du_l", "s_dx_l"])
def conv_backward_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    du_ptr,
    dx_ptr,
    part_ptr,
    length,
    channels,
    s_x_b,
    s_x_l,
    s_w_dir,
    s_w_e,
    s_w_k,
    s_bias_dir,
    s_du_dir,
    s_du_b,
    s_du_l,
    s_dx_b,
    s_dx_l,
    walk_start,
    inner,
    s_inner,
    s_outer,
    ROW_MAJOR: tl.constexpr,
    TAPS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Both directions' backward pass from du (2, batch, L, E): with g = du * SiLU'(pre) of each
    direction (pre-activations recomputed from x, in fp32),

        dx[t] = sum_j w[K-1-j] g_fwd[t+j] + w_b[K-1-j] g_bwd[t-j]

    in dx's dtype, and each program's partial sums of the tap and bias gradients, (batch * L
    blocks, 2, TAPS + 1, E): the taps' rows, then the bias's; added up by the caller in a fixed
    order. The K - 1 values of g past each end of the tile that dx needs are recomputed here."""
    b = tl.program_id(2).to(tl.int64)
    block = b * tl.num_programs(0) + tl.program_id(0)
    first = tl.program_id(0) * BLOCK_L
    pos = first + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    x_ptr += b * s_x_b
    du_ptr += b * s_du_b
    x = _rows(
        x_ptr, pos, length, offs_e, e_ok, s_x_l, walk_start, inner, s_inner, s_outer, ROW_MAJOR
    )
    fwd, bwd = _pre_activations(
        x_ptr,
        x,
        w_ptr,
        bias_ptr,
        first,
        length,
        offs_e,
        e_ok,
        s_x_l,
        s_w_dir,
        s_w_e,
        s_w_k,
        s_bias_dir,
        walk_start,
        inner,
        s_inner,
        s_outer,
        ROW_MAJOR,
        TAPS,
    )
    dx = tl.zeros_like(x)
    for d in tl.static_range(2):
        if d == 0:
            pre = fwd
        else:
            pre = bwd
        du = _rows(
            du_ptr + d * s_du_dir,
            pos,
            length,
            offs_e,
            e_ok,
            s_du_l,
            walk_start,
            inner,
            s_inner,
            s_outer,
            ROW_MAJOR,
        )
        grad = du * _silu_derivative(pre)
        part_rows = part_ptr + (block * 2 + d) * (TAPS + 1) * channels + offs_e
        tl.store(part_rows + TAPS * channels, tl.sum(grad, axis=0), mask=e_ok)
        # Tap K-1-j reads x at position t - j (forward) or t + j (backward); dx[t] reads g at
        # t + j (forward) or t - j (backward).
        tap = _tap(w_ptr + d * s_w_dir, TAPS - 1, offs_e, e_ok, s_w_e, s_w_k)
        dx += tap * grad
        # x's shifted copies are made again (register moves and one edge row each) rather than
        # kept from _pre_activations, which would hold three more tiles live.
        x_shifted = x
        grad_shifted = grad
        tl.store(part_rows + (TAPS - 1) * channels, tl.sum(grad * x, axis=0), mask=e_ok)
        for j in tl.static_range(1, TAPS):
            x_shifted = _shifted(
                x_shifted,
                x_ptr,
                first,
                j,
                length,
                offs_e,
                e_ok,
                s_x_l,
                walk_start,
                inner,
                s_inner,
                s_outer,
                ROW_MAJOR,
                d == 1,
            )
            tl.store(
                part_rows + (TAPS - 1 - j) * channels,
                tl.sum(grad * x_shifted, axis=0),
                mask=e_ok,
            )
            if d == 0:
                edge = first + BLOCK_L - 1 + j
            else:
                edge = first - j
            grad_edge = _grad_row(
                x_ptr,
                du_ptr + d * s_du_dir,
                w_ptr + d * s_w_dir,
                bias_ptr + d * s_bias_dir,
                edge,
                length,
                offs_e,
                e_ok,
                s_x_l,
                s_du_l,
                s_w_e,
                s_w_k,
                walk_start,
                inner,
                s_inner,
                s_outer,
                ROW_MAJOR,
                TAPS,
                d == 1,
            )
            grad_shifted = _shift_rows(grad_shifted, grad_edge, d == 0)
            tap = _tap(w_ptr + d * s_w_dir, TAPS - 1 - j, offs_e, e_ok, s_w_e, s_w_k)
            dx += tap * grad_shifted
    pos_ok = pos < length
    tokens = _walk_token(tl.where(pos_ok, pos, 0), walk_start, inner, s_inner, s_outer, ROW_MAJOR)
    tl.store(
        dx_ptr + b * s_dx_b + tokens[:, None] * s_dx_l + offs_e[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=pos_ok[:, None] & e_ok[None, :],
    )
