"""Triton kernels of Vim's depthwise convolutions of both directions, token-major, fused with SiLU.

For x (batch, L, E) and taps w (E, K) of each direction, from one read of x:

    u_fwd[t] = silu(bias + sum_j w[K-1-j] * x[t-j])        (causal, the forward direction)
    u_bwd[t] = silu(bias_b + sum_j w_b[K-1-j] * x[t+j])    (anti-causal: Vim's flipped branch)

with x zero outside the sequence. The sequence is the token grid read along a walk (start, inner,
inner_stride, outer_stride): position t is the token start + (t % inner) * inner_stride + (t //
inner) * outer_stride, so a column-major walk reads a row-major grid in place (row-major is (0, L,
1, 0)). x, u and dx are indexed by token; the scratch g of the backward pass by position. The
backward pass recomputes the pre-activations from x.
"""

import triton
import triton.language as tl

__all__ = ["conv_backward_input_kernel", "conv_backward_kernel", "conv_forward_kernel"]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _token(position, start, inner, inner_stride, outer_stride):
    """The token at walk ``position`` (any int tensor; out-of-range positions give junk)."""
    return start + (position % inner) * inner_stride + (position // inner) * outer_stride


@triton.jit
def _shifted(ptr, rows, shift, length, offs_e, e_ok, stride_l, start, inner, s_inner, s_outer):
    """Walk positions ``rows + shift`` of a token-indexed (L, E) tensor as fp32, zero outside the
    sequence."""
    src = rows + shift
    ok = (src >= 0) & (src < length)
    token = _token(tl.where(ok, src, 0), start, inner, s_inner, s_outer)
    values = tl.load(
        ptr + token[:, None] * stride_l + offs_e[None, :],
        mask=ok[:, None] & e_ok[None, :],
        other=0.0,
    )
    return values.to(tl.float32)


@triton.jit
def _pre_activations(
    x_ptr,
    w_ptr,
    bias_ptr,
    rows,
    length,
    offs_e,
    e_ok,
    s_x_l,
    s_w_dir,
    s_w_e,
    s_w_k,
    s_bias_dir,
    start,
    inner,
    s_inner,
    s_outer,
    TAPS: tl.constexpr,
):
    """Both directions' conv outputs at walk positions ``rows`` before SiLU, (BLOCK_L, BLOCK_E)
    fp32 each."""
    fwd = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    bwd = tl.load(bias_ptr + s_bias_dir + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(TAPS):
        tap = TAPS - 1 - j
        w_fwd = tl.load(w_ptr + offs_e * s_w_e + tap * s_w_k, mask=e_ok, other=0.0).to(tl.float32)
        w_bwd = tl.load(w_ptr + s_w_dir + offs_e * s_w_e + tap * s_w_k, mask=e_ok, other=0.0)
        x_back = _shifted(
            x_ptr, rows, -j, length, offs_e, e_ok, s_x_l, start, inner, s_inner, s_outer
        )
        x_ahead = _shifted(
            x_ptr, rows, j, length, offs_e, e_ok, s_x_l, start, inner, s_inner, s_outer
        )
        fwd += w_fwd[None, :] * x_back
        bwd += w_bwd.to(tl.float32)[None, :] * x_ahead
    return fwd, bwd


@triton.jit
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
    start,
    inner,
    s_inner,
    s_outer,
    TAPS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """u (2, batch, L, E) = SiLU of both directions' convs along the walk of x (batch, L, E); x's
    channel stride is 1. Grid: (cdiv(L, BLOCK_L), cdiv(E, BLOCK_E), batch)."""
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    fwd, bwd = _pre_activations(
        x_ptr + b * s_x_b,
        w_ptr,
        bias_ptr,
        rows,
        length,
        offs_e,
        e_ok,
        s_x_l,
        s_w_dir,
        s_w_e,
        s_w_k,
        s_bias_dir,
        start,
        inner,
        s_inner,
        s_outer,
        TAPS,
    )
    row_ok = rows < length
    mask = row_ok[:, None] & e_ok[None, :]
    tokens = _token(tl.where(row_ok, rows, 0), start, inner, s_inner, s_outer)
    out = u_ptr + b * s_u_b + tokens[:, None] * s_u_l + offs_e[None, :]
    tl.store(out, (fwd * _sigmoid(fwd)).to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(out + s_u_dir, (bwd * _sigmoid(bwd)).to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_backward_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    du_ptr,
    g_ptr,
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
    start,
    inner,
    s_inner,
    s_outer,
    TAPS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """The gradients of the pre-activations, g = du * SiLU'(pre) (2, batch, L, E) by walk
    position in g's dtype, and each program's partial sums of the tap and bias gradients (from g
    in fp32), (batch * L blocks, 2, TAPS + 1, E): the taps' rows, then the bias's; added up by the
    caller in a fixed order."""
    b = tl.program_id(2).to(tl.int64)
    block = b * tl.num_programs(0) + tl.program_id(0)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    x_ptr += b * s_x_b
    fwd, bwd = _pre_activations(
        x_ptr,
        w_ptr,
        bias_ptr,
        rows,
        length,
        offs_e,
        e_ok,
        s_x_l,
        s_w_dir,
        s_w_e,
        s_w_k,
        s_bias_dir,
        start,
        inner,
        s_inner,
        s_outer,
        TAPS,
    )
    row_ok = rows < length
    mask = row_ok[:, None] & e_ok[None, :]
    tokens = _token(tl.where(row_ok, rows, 0), start, inner, s_inner, s_outer)
    du = du_ptr + b * s_du_b + tokens[:, None] * s_du_l + offs_e[None, :]
    g_out = g_ptr + ((b * length + rows[:, None]) * channels + offs_e[None, :])
    for d in tl.static_range(2):
        if d == 0:
            pre = fwd
        else:
            pre = bwd
        sig = _sigmoid(pre)
        grad = tl.load(du + d * s_du_dir, mask=mask, other=0.0).to(tl.float32)
        grad = tl.where(mask, grad * sig * (1.0 + pre * (1.0 - sig)), 0.0)
        tl.store(
            g_out + d * tl.num_programs(2) * length * channels,
            grad.to(g_ptr.dtype.element_ty),
            mask=mask,
        )
        part_rows = part_ptr + (block * 2 + d) * (TAPS + 1) * channels + offs_e
        tl.store(part_rows + TAPS * channels, tl.sum(grad, axis=0), mask=e_ok)
        for j in tl.static_range(TAPS):
            # Tap K-1-j reads x at position t - j (forward) or t + j (backward).
            x_shift = _shifted(
                x_ptr,
                rows,
                (2 * d - 1) * j,
                length,
                offs_e,
                e_ok,
                s_x_l,
                start,
                inner,
                s_inner,
                s_outer,
            )
            tl.store(
                part_rows + (TAPS - 1 - j) * channels, tl.sum(grad * x_shift, axis=0), mask=e_ok
            )


@triton.jit
def conv_backward_input_kernel(
    g_ptr,
    w_ptr,
    dx_ptr,
    length,
    channels,
    batch,
    s_w_dir,
    s_w_e,
    s_w_k,
    s_dx_b,
    s_dx_l,
    start,
    inner,
    s_inner,
    s_outer,
    TAPS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """dx[token(t)] = sum_j w[K-1-j] g_fwd[t+j] + w_b[K-1-j] g_bwd[t-j], from g (2, batch, L, E)
    by walk position t, summed in fp32."""
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    g_fwd = g_ptr + b * length * channels
    g_bwd = g_fwd + batch * length * channels
    dx = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(TAPS):
        tap = TAPS - 1 - j
        w_fwd = tl.load(w_ptr + offs_e * s_w_e + tap * s_w_k, mask=e_ok, other=0.0).to(tl.float32)
        w_bwd = tl.load(w_ptr + s_w_dir + offs_e * s_w_e + tap * s_w_k, mask=e_ok, other=0.0)
        w_bwd = w_bwd.to(tl.float32)
        # g is stored by walk position: read it along the identity walk (0, L, 1, 0).
        dx += w_fwd[None, :] * _shifted(
            g_fwd, rows, j, length, offs_e, e_ok, channels, 0, length, 1, 0
        )
        dx += w_bwd[None, :] * _shifted(
            g_bwd, rows, -j, length, offs_e, e_ok, channels, 0, length, 1, 0
        )
    row_ok = rows < length
    mask = row_ok[:, None] & e_ok[None, :]
    tokens = _token(tl.where(row_ok, rows, 0), start, inner, s_inner, s_outer)
    tl.store(
        dx_ptr + b * s_dx_b + tokens[:, None] * s_dx_l + offs_e[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=mask,
    )
