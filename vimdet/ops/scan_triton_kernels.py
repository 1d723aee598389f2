"""Triton kernels of the chunked selective scan (Gu & Dao, arXiv 2312.00752), 1 or 2 directions.

The scan of one direction, for each batch b, channel e and state n, dt = softplus(delta + bias):

    h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * u[t] * B[t]      y[t] = C[t] . h[t] + D * u[t]

Walk positions p = 0 .. L-1 are mapped to tokens by an affine two-level walk (``_walk_token``), so
that a kernel reads token-major tensors in place for row-major and column-major orders alike.
Direction 0 scans the positions upwards, direction 1 downwards (Vim's backward branch, no flips).
The positions are cut into chunks of BLOCK_L; a program owns one chunk of BLOCK_E channels of one
batch element, for every direction, and loops over the N states. Chunks are joined by their carries:

1. ``chunk_state_kernel``: each chunk's end state from a zero start, and its summed dt.
2. ``chunk_carry_kernel``: the state entering every chunk, chained in walk order (also used for the
   adjoint carries of the backward pass, chained the other way).
3. ``scan_output_kernel``: each chunk scanned from its entering state (``tl.associative_scan`` over
   (decay, drive) pairs), summed over states and directions, the D skip and SiLU(z) gate fused in.
4. ``chunk_adjoint_kernel`` and ``scan_backward_kernel``: the backward pass, which recomputes the
   states inside a chunk from the saved chunk carries instead of storing (B, L, E, N) states.
5. ``state_major_kernel``, ``token_major_sums_kernel`` and ``channel_sums_kernel``: B and C into
   the state-major layout the others read, and the backward kernels' partial sums added up (the
   scan's, and the conv's of :mod:`vimdet.ops.conv_triton`), each in one launch.

Every decay is exp2 of a non-positive exponent (A < 0, dt >= 0): nothing is divided by a cumulative
decay. All arithmetic is fp32; tensors are read and written in their own dtypes.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = [
    "channel_sums_kernel",
    "chunk_adjoint_kernel",
    "chunk_carry_kernel",
    "chunk_state_kernel",
    "scan_backward_kernel",
    "scan_output_kernel",
    "state_major_kernel",
    "token_major_sums_kernel",
    "triton_interprets",
]


def triton_interprets() -> bool:
    """Whether Triton runs kernels through its CPU interpreter, as Triton itself reads
    ``TRITON_INTERPRET``: from Triton 3.4 its knob (1, true, on or yes, in any case), before it
    only ``1``."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The softplus's log2, compiled, is libdevice's fast_log2f: one ``lg2.approx`` (relative error about
# 2**-22), where ``tl.log2`` lowers to a polynomial of about 25 instructions. Triton's interpreter
# runs no libdevice functions: there it is ``tl.log2``.
FAST_LOG2 = tl.constexpr(not triton_interprets())


@triton.jit
def _combine(decay_left, value_left, decay_right, value_right):
    """Compose two steps of h -> decay * h + value; ``left`` comes first in scan order."""
    return decay_left * decay_right, value_left * decay_right + value_right


@triton.jit
def _scan_rows(decay, value, start, REVERSE: tl.constexpr):
    """h[t] = decay[t] * h[t -/+ 1] + value[t] down the rows (``REVERSE``: up from the last row),
    from h = ``start`` (E,) before the first. The start is folded into the first row's value, so
    no cumulative decay is formed. A reverse scan is a forward scan of the flipped tiles: Triton
    lowers reverse scans through warp shuffles, flips of rows a thread holds through register
    moves."""
    ROWS: tl.constexpr = decay.shape[0]
    if REVERSE:
        first = tl.arange(0, ROWS)[:, None] == ROWS - 1
    else:
        first = tl.arange(0, ROWS)[:, None] == 0
    value += tl.where(first, decay * start[None, :], 0.0)
    if REVERSE:
        _, h = tl.associative_scan(
            (tl.flip(decay, 0), tl.flip(value, 0)), axis=0, combine_fn=_combine
        )
        return tl.flip(h, 0)
    _, h = tl.associative_scan((decay, value), axis=0, combine_fn=_combine)
    return h


@triton.jit
def _cumsum_rows(x, REVERSE: tl.constexpr):
    """Inclusive sum down the rows (``REVERSE``: up), by flips as in ``_scan_rows``."""
    if REVERSE:
        return tl.flip(tl.cumsum(tl.flip(x, 0), axis=0), 0)
    return tl.cumsum(x, axis=0)


@triton.jit
def _walk_token(
    pos, walk_start, walk_inner, walk_inner_stride, walk_outer_stride, ROW_MAJOR: tl.constexpr
):
    """Token index of walk position ``pos``: start + (pos % inner) * inner_stride + (pos // inner)
    * outer_stride. Row-major is (0, L, 1, 0); column-major over an H x W grid is (0, H, W, 1).
    ``ROW_MAJOR`` walks are the identity: the compiler then sees contiguous rows."""
    if ROW_MAJOR:
        return pos
    return (
        walk_start
        + (pos % walk_inner) * walk_inner_stride
        + (pos // walk_inner) * walk_outer_stride
    )


@triton.jit
def _shift_rows(x, edge, UP: tl.constexpr):
    """x moved by one row, ``edge`` (1, E) filling the row left open: (R, E) -> (R, E), R a power
    of two. ``UP``: row r gets row r + 1 (the last gets ``edge``); else row r - 1 (the first gets
    ``edge``). Rows are a thread's registers in the kernels' layout, so this moves no data between
    threads: it is written as a recursion over even and odd rows because Triton has no slices."""
    R: tl.constexpr = x.shape[0]
    E: tl.constexpr = x.shape[1]
    if R == 1:
        return edge
    else:
        even, odd = tl.split(tl.permute(tl.reshape(x, [R // 2, 2, E]), [0, 2, 1]))
        # Interleaved again below as rows 2k and 2k + 1.
        if UP:
            first = odd
            second = _shift_rows(even, edge, UP)
        else:
            first = _shift_rows(odd, edge, UP)
            second = even
        return tl.reshape(tl.permute(tl.join(first, second), [0, 2, 1]), [R, E])


@triton.jit
def _lane_swap(x, BIT: tl.constexpr):
    """x with columns c and c ^ BIT exchanged, exactly (an xor of the bits): (R, E) -> (R, E).
    A column is a lane in the kernels' layout: the exchange is one ``shfl.sync.bfly`` a register."""
    R: tl.constexpr = x.shape[0]
    E: tl.constexpr = x.shape[1]
    bits = tl.reshape(x.to(tl.int32, bitcast=True), [R, E // (2 * BIT), 2, BIT])
    swapped = bits ^ tl.xor_sum(bits, axis=2, keep_dims=True)
    return tl.reshape(swapped, [R, E]).to(tl.float32, bitcast=True)


@triton.jit
def _halve_rows(x, column):
    """A reduce-scatter step: (R, E) -> (R/2, E). Columns c and c ^ R add up rows r and r + R/2;
    the column with bit R set keeps the sums of the upper half, its partner those of the lower
    half. One exchange for two rows, where summing both rows over both columns takes two.
    ``column``: (1, E), the column indices."""
    R: tl.constexpr = x.shape[0]
    E: tl.constexpr = x.shape[1]
    lower, higher = tl.split(tl.permute(tl.reshape(x, [2, R // 2, E]), [1, 2, 0]))
    upper = (column & R) != 0
    return tl.where(upper, higher, lower) + _lane_swap(tl.where(upper, lower, higher), R)


@triton.jit
def _reduce_scatter_rows(x, column):
    """``_halve_rows`` until one row is left: (R, E = 2R) -> (1, E), R a power of two. Column c
    then holds row c // 2 summed over the R columns of c's parity (a recursion, as in
    ``_shift_rows``)."""
    if x.shape[0] == 1:
        return x
    else:
        return _reduce_scatter_rows(_halve_rows(x, column), column)


@triton.jit
def _channel_sums_of_two(x, y):
    """Row sums of two (R, E) tiles over their E = 2R columns, as (1, E): column 2r holds x's sum
    of row r, column 2r + 1 y's. A transposing butterfly: log2(R) halvings of each tile, then one
    exchange between the two, 2R - 1 exchanges in all where ``tl.sum`` over the columns' lanes
    takes 2R log2(E)."""
    tl.static_assert(x.shape[1] == 2 * x.shape[0], "a butterfly of R rows needs 2R columns")
    column = tl.arange(0, x.shape[1])[None, :]
    x = _reduce_scatter_rows(x, column)
    y = _reduce_scatter_rows(y, column)
    odd = (column & 1) != 0
    return tl.where(odd, y, x) + _lane_swap(tl.where(odd, x, y), 1)


@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)) in fp32. Through exp2, which Triton lowers to one ``ex2.approx.ftz``:
    ``tl.exp`` adds a guard against subnormal results, which the sum with 1 would round away."""
    return 1.0 / (1.0 + tl.exp2(x * -LOG2E))


@triton.jit
def _load_dt(
    delta_ptr,
    bias_ptr,
    tok,
    rows_ok,
    offs_e,
    e_ok,
    stride_l,
    stride_e,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    REREAD: tl.constexpr = False,
):
    """dt = softplus(delta + bias) as fp32 (BLOCK_L, BLOCK_E), 0 on rows past the sequence; also
    returns delta + bias (for the softplus gradient). ``REREAD`` as in ``_load_tile``."""
    pre = _load_tile(delta_ptr, tok, rows_ok, offs_e, e_ok, stride_l, stride_e, REREAD)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    return tl.where(rows_ok[:, None] & e_ok[None, :], dt, 0.0), pre


@triton.jit
def _silu_derivative(x):
    """d silu(x) / dx = s * (1 + x * (1 - s)), s = sigmoid(x), in fp32."""
    sig = _sigmoid(x)
    return sig * (1.0 + x * (1.0 - sig))


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) in fp32, x itself above 20 (as mamba-ssm); through exp2 and log2, as
    ``_sigmoid``."""
    if FAST_LOG2:
        log2 = libdevice.fast_log2f(1.0 + tl.exp2(x * LOG2E))
    else:
        log2 = tl.log2(1.0 + tl.exp2(x * LOG2E))
    return tl.where(x <= 20.0, log2 * LN2, x)


@triton.jit
def _load_dt_row(
    delta_ptr,
    bias_ptr,
    tok,
    ok,
    offs_e,
    e_ok,
    stride_l,
    stride_e,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    """dt of the single token ``tok`` as fp32 (BLOCK_E,), 0 unless ``ok``."""
    mask = ok & e_ok
    pre = tl.load(delta_ptr + tok * stride_l + offs_e * stride_e, mask=mask, other=0.0)
    pre = pre.to(tl.float32)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    return tl.where(mask, dt, 0.0)


@triton.jit
def _load_tile(ptr, tok, rows_ok, offs_e, e_ok, stride_l, stride_e, REREAD: tl.constexpr = False):
    """A (BLOCK_L, BLOCK_E) tile as fp32, zeros outside the sequence. ``REREAD`` marks a second
    read of a tile after the loop over states: its addresses are summed in the other order, so that
    the compiler recomputes them (and the mask) instead of keeping the first read's (two registers
    per element) live through the loop."""
    if REREAD:
        mask = e_ok[None, :] & rows_ok[:, None]
        return tl.load(
            ptr + (offs_e[None, :] * stride_e + tok[:, None] * stride_l), mask=mask, other=0.0
        ).to(tl.float32)
    mask = rows_ok[:, None] & e_ok[None, :]
    return tl.load(
        ptr + tok[:, None] * stride_l + offs_e[None, :] * stride_e, mask=mask, other=0.0
    ).to(tl.float32)


@triton.jit
def _gate_grad(
    dout, z_ptr, tok, rows_ok, offs_e, e_ok, stride_z_l, stride_z_e, scale, HAS_Z: tl.constexpr
):
    """dy = dout * scale * silu(z): the gradient of every direction's ungated output."""
    dy = dout * scale
    if HAS_Z:
        zt = _load_tile(z_ptr, tok, rows_ok, offs_e, e_ok, stride_z_l, stride_z_e)
        dy = dy * zt * _sigmoid(zt)
    return dy


@triton.jit
def _channel_column(ptr, offs_e, e_ok, n, stride_e, stride_n):
    """State n of a per-channel (E, N) tensor (A, or a chunk's carries) as fp32 (BLOCK_E,)."""
    return tl.load(ptr + offs_e * stride_e + n * stride_n, mask=e_ok, other=0.0).to(tl.float32)


@triton.jit
def _token_column(ptr, tok, rows_ok, n, stride_n, ROW_MAJOR: tl.constexpr):
    """State n of B or C, stored state-major (N, padded L), at the tile's tokens as fp32
    (BLOCK_L,). Along a row-major walk the rows are contiguous and the padding covers whole chunks,
    so the load needs no mask and is vectorized."""
    if ROW_MAJOR:
        return tl.load(ptr + n * stride_n + tok).to(tl.float32)
    return tl.load(ptr + n * stride_n + tok, mask=rows_ok, other=0.0).to(tl.float32)


@triton.jit
def _store_token_column(ptr, values, tok, rows_ok, n, stride_n, ROW_MAJOR: tl.constexpr):
    """Store (BLOCK_L,) fp32 values as state n of a state-major (N, padded L) tensor; as in
    ``_token_column``, a row-major walk's rows need no mask."""
    if ROW_MAJOR:
        tl.store(ptr + n * stride_n + tok, values)
    else:
        tl.store(ptr + n * stride_n + tok, values, mask=rows_ok)


@triton.jit(do_not_specialize=["s_u_l", "s_dl_l"])
def chunk_state_kernel(
    u_ptr,
    delta_ptr,
    bias_ptr,
    A_ptr,
    B_ptr,
    state_ptr,
    logsum_ptr,
    length,
    channels,
    batch,
    walk_start,
    walk_inner,
    walk_inner_stride,
    walk_outer_stride,
    s_u_dir,
    s_u_b,
    s_u_l,
    s_u_e,
    s_dl_dir,
    s_dl_b,
    s_dl_l,
    s_dl_e,
    s_bias_dir,
    s_A_dir,
    s_A_e,
    s_A_n,
    s_B_dir,
    s_B_b,
    s_B_n,
    NUM_DIRS: tl.constexpr,
    ROW_MAJOR: tl.constexpr,
    STATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Per chunk and direction: the state leaving the chunk when it is entered with zero state,
    ``state`` (batch, dirs, chunks, N, E), and the chunk's summed dt, ``logsum`` (batch, dirs,
    chunks, E), so that the chunk maps an entering state h to exp(A * logsum) * h + state."""
    chunk = tl.program_id(0)
    e_block = tl.program_id(1)
    b = tl.program_id(2)
    n_chunks = tl.num_programs(0)
    pos = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
    rows_ok = pos < length
    tok = _walk_token(pos, walk_start, walk_inner, walk_inner_stride, walk_outer_stride, ROW_MAJOR)
    offs_e = e_block * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    for d in tl.static_range(NUM_DIRS):
        dt, _ = _load_dt(
            delta_ptr + d * s_dl_dir + b.to(tl.int64) * s_dl_b,
            bias_ptr + d * s_bias_dir,
            tok,
            rows_ok,
            offs_e,
            e_ok,
            s_dl_l,
            s_dl_e,
            HAS_BIAS,
            SOFTPLUS,
        )
        u = _load_tile(
            u_ptr + d * s_u_dir + b.to(tl.int64) * s_u_b, tok, rows_ok, offs_e, e_ok, s_u_l, s_u_e
        )
        dtu = dt * u
        # Summed dt of the positions after each one in this direction's walk order.
        total = tl.sum(dt, axis=0)
        after = total[None, :] - _cumsum_rows(dt, d == 1)
        out_row = (b * NUM_DIRS + d) * n_chunks + chunk
        a_ptr = A_ptr + d * s_A_dir
        b_ptr = B_ptr + d * s_B_dir + b.to(tl.int64) * s_B_b
        for n in range(STATE):
            a2 = _channel_column(a_ptr, offs_e, e_ok, n, s_A_e, s_A_n) * LOG2E
            bn = _token_column(b_ptr, tok, rows_ok, n, s_B_n, ROW_MAJOR)
            state = tl.sum(tl.exp2(after * a2[None, :]) * dtu * bn[:, None], axis=0)
            tl.store(state_ptr + (out_row * STATE + n) * channels + offs_e, state, mask=e_ok)
        tl.store(logsum_ptr + out_row * channels + offs_e, total, mask=e_ok)


@triton.jit
def chunk_carry_kernel(
    state_ptr,
    logsum_ptr,
    A_ptr,
    carry_ptr,
    n_chunks,
    channels,
    s_A_dir,
    s_A_e,
    s_A_n,
    NUM_DIRS: tl.constexpr,
    STATE: tl.constexpr,
    DIR0_DOWN: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Chain the chunks: carry[c] = the value entering chunk c; leaving it is
    exp(A * logsum[c]) * carry[c] + state[c]. Direction 0 runs up the chunks and direction 1 down
    (``DIR0_DOWN`` swaps them, for adjoints). Each step scans CHUNK_TILE chunks at once
    (``tl.associative_scan``), reading the chunk before each one in chaining order, so that the
    scan yields the values entering them. Grid: (cdiv(N * E, BLOCK), batch * dirs)."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    d = row % NUM_DIRS
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < STATE * channels
    n = idx // channels
    e = idx % channels
    a2 = tl.load(A_ptr + d * s_A_dir + e * s_A_e + n * s_A_n, mask=ok, other=0.0)
    a2 = a2.to(tl.float32) * LOG2E
    if DIR0_DOWN:
        down = (d == 0).to(tl.int32)
    else:
        down = (d == 1).to(tl.int32)
    rows = tl.arange(0, CHUNK_TILE)
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_chunks, CHUNK_TILE):
        step = start + rows  # positions in chaining order
        before = step - 1  # the chunk whose leaving value enters this one
        before_ok = (before >= 0) & (step < n_chunks)
        chunk = step + down * (n_chunks - 1 - 2 * step)
        chunk_before = before + down * (n_chunks - 1 - 2 * before)
        slab = (row * n_chunks + chunk_before).to(tl.int64)
        mask = before_ok[:, None] & ok[None, :]
        state = tl.load(
            state_ptr + slab[:, None] * STATE * channels + idx[None, :], mask=mask, other=0.0
        )
        logsum = tl.load(logsum_ptr + slab[:, None] * channels + e[None, :], mask=mask, other=0.0)
        cumulative, entering = tl.associative_scan(
            (tl.exp2(a2[None, :] * logsum), state), axis=0, combine_fn=_combine
        )
        entering += cumulative * carry[None, :]
        slab = (row * n_chunks + chunk).to(tl.int64)
        tl.store(
            carry_ptr + slab[:, None] * STATE * channels + idx[None, :],
            entering,
            mask=(step < n_chunks)[:, None] & ok[None, :],
        )
        carry = tl.sum(tl.where(rows[:, None] == CHUNK_TILE - 1, entering, 0.0), axis=0)


@triton.jit(do_not_specialize=["s_u_l", "s_dl_l", "s_z_l", "s_o_l", "s_partial_l"])
def scan_output_kernel(
    u_ptr,
    delta_ptr,
    bias_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    carry_ptr,
    partial_ptr,
    out_ptr,
    length,
    channels,
    walk_start,
    walk_inner,
    walk_inner_stride,
    walk_outer_stride,
    s_u_b,
    s_u_l,
    s_u_e,
    s_dl_b,
    s_dl_l,
    s_dl_e,
    s_A_e,
    s_A_n,
    s_B_b,
    s_B_n,
    s_C_b,
    s_C_n,
    s_z_b,
    s_z_l,
    s_z_e,
    s_carry_b,
    s_o_b,
    s_o_l,
    s_o_e,
    s_partial_l,
    REVERSE: tl.constexpr,
    NUM_DIRS: tl.constexpr,
    ROW_MAJOR: tl.constexpr,
    ADD_PARTIAL: tl.constexpr,
    FINAL: tl.constexpr,
    STATE: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One direction's C . h + D * u over a chunk (``REVERSE``: walking down), plus the earlier
    directions' sum from ``partial`` (batch, L, E) fp32 if ``ADD_PARTIAL``. The last direction
    (``FINAL``) writes the mean over directions times SiLU(z) to ``out``; the others write their
    sum to ``partial``. Pointers are those of this direction. Grid: (chunks, E blocks, batch)."""
    chunk = tl.program_id(0)
    e_block = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pos = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
    rows_ok = pos < length
    tok = _walk_token(pos, walk_start, walk_inner, walk_inner_stride, walk_outer_stride, ROW_MAJOR)
    offs_e = e_block * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    mask = rows_ok[:, None] & e_ok[None, :]
    dt, _ = _load_dt(
        delta_ptr + b * s_dl_b,
        bias_ptr,
        tok,
        rows_ok,
        offs_e,
        e_ok,
        s_dl_l,
        s_dl_e,
        HAS_BIAS,
        SOFTPLUS,
    )
    u = _load_tile(u_ptr + b * s_u_b, tok, rows_ok, offs_e, e_ok, s_u_l, s_u_e)
    dtu = dt * u
    if HAS_D:
        y = u * tl.load(D_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    else:
        y = tl.zeros_like(dtu)
    carry_ptr += b * s_carry_b + chunk * STATE * channels
    B_ptr += b * s_B_b
    C_ptr += b * s_C_b
    for n in range(STATE):
        a2 = _channel_column(A_ptr, offs_e, e_ok, n, s_A_e, s_A_n) * LOG2E
        bn = _token_column(B_ptr, tok, rows_ok, n, s_B_n, ROW_MAJOR)
        cn = _token_column(C_ptr, tok, rows_ok, n, s_C_n, ROW_MAJOR)
        entering = _channel_column(carry_ptr, offs_e, e_ok, n, 1, channels)
        h = _scan_rows(tl.exp2(dt * a2[None, :]), dtu * bn[:, None], entering, REVERSE)
        y += h * cn[:, None]
    partial_ptrs = partial_ptr + (b * length + tok[:, None]) * s_partial_l + offs_e[None, :]
    if ADD_PARTIAL:
        y += tl.load(partial_ptrs, mask=mask, other=0.0)
    if FINAL:
        y = y * (1.0 / NUM_DIRS)
        if HAS_Z:
            zt = _load_tile(z_ptr + b * s_z_b, tok, rows_ok, offs_e, e_ok, s_z_l, s_z_e)
            y = y * zt * _sigmoid(zt)
        tl.store(
            out_ptr + b * s_o_b + tok[:, None] * s_o_l + offs_e[None, :] * s_o_e,
            y.to(out_ptr.dtype.element_ty),
            mask=mask,
        )
    else:
        tl.store(partial_ptrs, y, mask=mask)


@triton.jit(do_not_specialize=["s_do_l", "s_z_l", "s_dl_l"])
def chunk_adjoint_kernel(
    dout_ptr,
    z_ptr,
    delta_ptr,
    bias_ptr,
    A_ptr,
    C_ptr,
    state_ptr,
    logsum_ptr,
    length,
    channels,
    batch,
    walk_start,
    walk_inner,
    walk_inner_stride,
    walk_outer_stride,
    s_do_b,
    s_do_l,
    s_do_e,
    s_z_b,
    s_z_l,
    s_z_e,
    s_dl_dir,
    s_dl_b,
    s_dl_l,
    s_dl_e,
    s_bias_dir,
    s_A_dir,
    s_A_e,
    s_A_n,
    s_C_dir,
    s_C_b,
    s_C_n,
    NUM_DIRS: tl.constexpr,
    ROW_MAJOR: tl.constexpr,
    STATE: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Per chunk and direction, the adjoint of the state (g[t] = dy[t] C[t] + decay[t'] g[t'],
    t' the position after t in the walk) at the chunk's first walk position when nothing enters from
    the later chunks, and the summed dt that carries an entering adjoint to that position. Layouts
    as in ``chunk_state_kernel``; the adjoints are then chained by ``chunk_carry_kernel``."""
    chunk = tl.program_id(0)
    e_block = tl.program_id(1)
    b = tl.program_id(2)
    n_chunks = tl.num_programs(0)
    pos = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
    rows_ok = pos < length
    tok = _walk_token(pos, walk_start, walk_inner, walk_inner_stride, walk_outer_stride, ROW_MAJOR)
    offs_e = e_block * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    b64 = b.to(tl.int64)
    dout = _load_tile(dout_ptr + b64 * s_do_b, tok, rows_ok, offs_e, e_ok, s_do_l, s_do_e)
    dy = _gate_grad(
        dout, z_ptr + b64 * s_z_b, tok, rows_ok, offs_e, e_ok, s_z_l, s_z_e, 1.0 / NUM_DIRS, HAS_Z
    )
    for d in tl.static_range(NUM_DIRS):
        delta_d = delta_ptr + d * s_dl_dir + b64 * s_dl_b
        dt, _ = _load_dt(
            delta_d,
            bias_ptr + d * s_bias_dir,
            tok,
            rows_ok,
            offs_e,
            e_ok,
            s_dl_l,
            s_dl_e,
            HAS_BIAS,
            SOFTPLUS,
        )
        # The chunk's first position in walk order, and the one whose adjoint enters the chunk (the
        # first of the next chunk in walk order).
        if d == 0:
            first_pos = chunk * BLOCK_L
            entry_pos = chunk * BLOCK_L + BLOCK_L
        else:
            first_pos = chunk * BLOCK_L + BLOCK_L - 1
            entry_pos = chunk * BLOCK_L - 1
        entry_ok = (entry_pos >= 0) & (entry_pos < length)
        entry_tok = _walk_token(
            entry_pos, walk_start, walk_inner, walk_inner_stride, walk_outer_stride, ROW_MAJOR
        )
        entry_dt = _load_dt_row(
            delta_d,
            bias_ptr + d * s_bias_dir,
            entry_tok,
            entry_ok,
            offs_e,
            e_ok,
            s_dl_l,
            s_dl_e,
            HAS_BIAS,
            SOFTPLUS,
        )
        first_dt = tl.sum(tl.where((pos == first_pos)[:, None], dt, 0.0), axis=0)
        # Summed dt from the first walk position (exclusive) to each one (inclusive).
        since_first = _cumsum_rows(dt, d == 1) - first_dt[None, :]
        out_row = (b * NUM_DIRS + d) * n_chunks + chunk
        a_ptr = A_ptr + d * s_A_dir
        c_ptr = C_ptr + d * s_C_dir + b64 * s_C_b
        for n in range(STATE):
            a2 = _channel_column(a_ptr, offs_e, e_ok, n, s_A_e, s_A_n) * LOG2E
            cn = _token_column(c_ptr, tok, rows_ok, n, s_C_n, ROW_MAJOR)
            adjoint = tl.sum(tl.exp2(since_first * a2[None, :]) * dy * cn[:, None], axis=0)
            tl.store(state_ptr + (out_row * STATE + n) * channels + offs_e, adjoint, mask=e_ok)
        logsum = tl.sum(dt, axis=0) - first_dt + entry_dt
        tl.store(logsum_ptr + out_row * channels + offs_e, logsum, mask=e_ok)


@triton.jit(
    do_not_specialize=[
        "s_do_l",
        "s_u_l",
        "s_dl_l",
        "s_z_l",
        "s_du_l",
        "s_dd_l",
        "s_dz_l",
        "s_partial_l",
    ]
)
def scan_backward_kernel(
    dout_ptr,
    u_ptr,
    delta_ptr,
    bias_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    carry_ptr,
    adj_carry_ptr,
    partial_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dB_part_ptr,
    dC_part_ptr,
    dA_part_ptr,
    dD_part_ptr,
    dbias_part_ptr,
    length,
    channels,
    walk_start,
    walk_inner,
    walk_inner_stride,
    walk_outer_stride,
    s_do_b,
    s_do_l,
    s_do_e,
    s_u_b,
    s_u_l,
    s_u_e,
    s_dl_b,
    s_dl_l,
    s_dl_e,
    s_A_e,
    s_A_n,
    s_B_b,
    s_B_n,
    s_C_b,
    s_C_n,
    s_z_b,
    s_z_l,
    s_z_e,
    s_carry_b,
    s_du_b,
    s_du_l,
    s_du_e,
    s_dd_b,
    s_dd_l,
    s_dd_e,
    s_dz_b,
    s_dz_l,
    s_dz_e,
    s_dBp_blk,
    s_dBp_b,
    s_dBp_n,
    s_dAp_row,
    s_partial_l,
    REVERSE: tl.constexpr,
    NUM_DIRS: tl.constexpr,
    ROW_MAJOR: tl.constexpr,
    ADD_PARTIAL: tl.constexpr,
    FINAL: tl.constexpr,
    STATE: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
    LOAD_STAGES: tl.constexpr,
):
    """Gradients of one direction of ``scan_output_kernel`` over a chunk of BLOCK_E channels.

    du and ddelta are written whole. dB and dC are summed over this program's channels into
    partials (E blocks, batch, N, L), by a butterfly where BLOCK_E = 2 BLOCK_L (the GPU's 32
    and 16), else by ``tl.sum``; dA, dD and dbias over its positions into partials, rows of
    (batch * chunks, ...) that are ``s_dAp_row`` apart (the caller keeps all three in one
    tensor): the caller adds them up in a fixed order, without atomics. dz needs
    every direction's ungated output: it is summed through ``partial`` as in the forward, and
    the ``FINAL`` direction writes dz. Pointers are those of this direction. ``LOAD_STAGES``: the
    loop's software pipelining (Triton copies the next states' A, B, C and carries in while one is
    worked on).
    """
    chunk = tl.program_id(0)
    e_block = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_chunks = tl.num_programs(0)
    pos = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
    rows_ok = pos < length
    tok = _walk_token(pos, walk_start, walk_inner, walk_inner_stride, walk_outer_stride, ROW_MAJOR)
    offs_e = e_block * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    mask = rows_ok[:, None] & e_ok[None, :]
    dout = _load_tile(dout_ptr + b * s_do_b, tok, rows_ok, offs_e, e_ok, s_do_l, s_do_e)
    dy = _gate_grad(
        dout, z_ptr + b * s_z_b, tok, rows_ok, offs_e, e_ok, s_z_l, s_z_e, 1.0 / NUM_DIRS, HAS_Z
    )
    delta_ptr += b * s_dl_b
    dt, _ = _load_dt(
        delta_ptr, bias_ptr, tok, rows_ok, offs_e, e_ok, s_dl_l, s_dl_e, HAS_BIAS, SOFTPLUS
    )
    # The decay of the next walk position carries the adjoint back to this one: inside the chunk it
    # is the state's decay one row on; past the chunk's end it is that of the next chunk's first
    # position, whose dt is read here.
    if REVERSE:
        edge_pos = chunk * BLOCK_L - 1
    else:
        edge_pos = chunk * BLOCK_L + BLOCK_L
    edge_ok = (edge_pos >= 0) & (edge_pos < length)
    edge_tok = _walk_token(
        edge_pos, walk_start, walk_inner, walk_inner_stride, walk_outer_stride, ROW_MAJOR
    )
    edge_dt = _load_dt_row(
        delta_ptr, bias_ptr, edge_tok, edge_ok, offs_e, e_ok, s_dl_l, s_dl_e, HAS_BIAS, SOFTPLUS
    )
    u = _load_tile(u_ptr + b * s_u_b, tok, rows_ok, offs_e, e_ok, s_u_l, s_u_e)
    dtu = dt * u
    if HAS_D:
        skip = tl.load(D_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
        y = u * skip[None, :]
    else:
        y = tl.zeros_like(dtu)
    d_dtu = tl.zeros_like(dtu)
    d_dt = tl.zeros_like(dtu)
    carry_ptr += b * s_carry_b + chunk * STATE * channels
    adj_carry_ptr += b * s_carry_b + chunk * STATE * channels
    part_row = b * n_chunks + chunk
    dB_part_ptr += e_block * s_dBp_blk + b * s_dBp_b
    dC_part_ptr += e_block * s_dBp_blk + b * s_dBp_b
    B_ptr += b * s_B_b
    C_ptr += b * s_C_b
    for n in tl.range(STATE, num_stages=LOAD_STAGES):
        a = _channel_column(A_ptr, offs_e, e_ok, n, s_A_e, s_A_n)
        bn = _token_column(B_ptr, tok, rows_ok, n, s_B_n, ROW_MAJOR)
        cn = _token_column(C_ptr, tok, rows_ok, n, s_C_n, ROW_MAJOR)
        entering = _channel_column(carry_ptr, offs_e, e_ok, n, 1, channels)
        adj_entering = _channel_column(adj_carry_ptr, offs_e, e_ok, n, 1, channels)
        a2 = a * LOG2E
        drive = dtu * bn[:, None]
        decay = tl.exp2(dt * a2[None, :])
        h = _scan_rows(decay, drive, entering, REVERSE)
        next_decay = _shift_rows(decay, tl.exp2(edge_dt * a2)[None, :], not REVERSE)
        g = _scan_rows(next_decay, dy * cn[:, None], adj_entering, not REVERSE)
        if HAS_Z:
            y += h * cn[:, None]
        # d log(decay[t]) = g[t] * decay[t] * h[t-1] = g[t] * (h[t] - drive[t]).
        d_log_decay = g * (h - drive)
        d_dt += d_log_decay * a[None, :]
        d_dtu += g * bn[:, None]
        tl.store(
            dA_part_ptr + part_row * s_dAp_row + n * channels + offs_e,
            tl.sum(d_log_decay * dt, axis=0),
            mask=e_ok,
        )
        if BLOCK_E == 2 * BLOCK_L:
            # dB and dC of row r come out of columns 2r and 2r + 1. Their addresses are made here,
            # not kept through the loop: the kernel has no registers to spare.
            sums = tl.reshape(_channel_sums_of_two(g * dtu, dy * h), [BLOCK_E])
            column = tl.arange(0, BLOCK_E)
            sum_pos = chunk * BLOCK_L + column // 2
            sum_tok = _walk_token(
                sum_pos, walk_start, walk_inner, walk_inner_stride, walk_outer_stride, ROW_MAJOR
            )
            sum_ptrs = tl.where(column % 2 == 0, dB_part_ptr, dC_part_ptr) + n * s_dBp_n
            tl.store(sum_ptrs + sum_tok, sums, mask=sum_pos < length)
        else:
            _store_token_column(
                dB_part_ptr, tl.sum(g * dtu, axis=1), tok, rows_ok, n, s_dBp_n, ROW_MAJOR
            )
            _store_token_column(
                dC_part_ptr, tl.sum(dy * h, axis=1), tok, rows_ok, n, s_dBp_n, ROW_MAJOR
            )
    # The inputs that only the final gradients need are read again rather than kept in registers
    # through the loop over states.
    u = _load_tile(u_ptr + b * s_u_b, tok, rows_ok, offs_e, e_ok, s_u_l, s_u_e, True)
    du = d_dtu * dt
    if HAS_D:
        du += dy * skip[None, :]
        tl.store(dD_part_ptr + part_row * s_dAp_row + offs_e, tl.sum(dy * u, axis=0), mask=e_ok)
    d_pre = d_dt + d_dtu * u
    if SOFTPLUS:
        _, pre = _load_dt(
            delta_ptr, bias_ptr, tok, rows_ok, offs_e, e_ok, s_dl_l, s_dl_e, HAS_BIAS, False, True
        )
        d_pre = d_pre * _sigmoid(pre)
    d_pre = tl.where(mask, d_pre, 0.0)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part_row * s_dAp_row + offs_e, tl.sum(d_pre, axis=0), mask=e_ok)
    tl.store(
        du_ptr + b * s_du_b + tok[:, None] * s_du_l + offs_e[None, :] * s_du_e,
        du.to(du_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        ddelta_ptr + b * s_dd_b + tok[:, None] * s_dd_l + offs_e[None, :] * s_dd_e,
        d_pre.to(ddelta_ptr.dtype.element_ty),
        mask=mask,
    )
    if HAS_Z:
        partial_ptrs = partial_ptr + (b * length + tok[:, None]) * s_partial_l + offs_e[None, :]
        if ADD_PARTIAL:
            y += tl.load(partial_ptrs, mask=mask, other=0.0)
        if FINAL:
            # out = y / dirs * silu(z).
            dout = _load_tile(
                dout_ptr + b * s_do_b, tok, rows_ok, offs_e, e_ok, s_do_l, s_do_e, True
            )
            zt = _load_tile(z_ptr + b * s_z_b, tok, rows_ok, offs_e, e_ok, s_z_l, s_z_e, True)
            dz = dout * (y * (1.0 / NUM_DIRS)) * _silu_derivative(zt)
            tl.store(
                dz_ptr + b * s_dz_b + tok[:, None] * s_dz_l + offs_e[None, :] * s_dz_e,
                dz.to(dz_ptr.dtype.element_ty),
                mask=mask,
            )
        else:
            tl.store(partial_ptrs, y, mask=mask)


# --- The scan's layout copies and its partial sums, one launch each ---------------------------


@triton.jit
def state_major_kernel(
    B_ptr,
    C_ptr,
    out_ptr,
    length,
    padded_length,
    s_B_dir,
    s_B_b,
    s_B_l,
    s_B_n,
    s_C_dir,
    s_C_b,
    s_C_l,
    s_C_n,
    batch,
    STATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """B and C, (dirs, batch, L, N) at any strides, into one contiguous (2, dirs, batch, N,
    padded L) tensor, zeros past L (see ``_token_column``). Grid: (cdiv(padded L, BLOCK_T),
    dirs * batch, 2), axis 2 picking B or C."""
    t_block = tl.program_id(0)
    row = tl.program_id(1)  # direction * batch + batch element
    which = tl.program_id(2)
    d = row // batch
    b = row % batch
    offs_t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < STATE
    load_mask = n_ok[:, None] & (offs_t < length)[None, :]
    if which == 0:
        src = B_ptr + d * s_B_dir + b.to(tl.int64) * s_B_b
        ptrs = src + offs_n[:, None] * s_B_n + offs_t[None, :] * s_B_l
    else:
        src = C_ptr + d * s_C_dir + b.to(tl.int64) * s_C_b
        ptrs = src + offs_n[:, None] * s_C_n + offs_t[None, :] * s_C_l
    values = tl.load(ptrs, mask=load_mask, other=0.0)
    slab = (which * tl.num_programs(1) + row).to(tl.int64) * STATE * padded_length
    tl.store(
        out_ptr + slab + offs_n[:, None] * padded_length + offs_t[None, :],
        values,
        mask=n_ok[:, None] & (offs_t < padded_length)[None, :],
    )


@triton.jit
def token_major_sums_kernel(
    parts_ptr,
    dB_ptr,
    dC_ptr,
    length,
    padded_length,
    e_blocks,
    batch,
    STATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """dB and dC, contiguous (dirs, batch, L, N) in their own dtype, as the sums over E blocks of
    the backward kernel's contiguous (2, dirs, E blocks, batch, N, padded L) fp32 partials, added
    in E block order. Grid: (cdiv(L, BLOCK_T), dirs * batch, 2), axis 2 picking dB or dC."""
    t_block = tl.program_id(0)
    row = tl.program_id(1)  # direction * batch + batch element
    which = tl.program_id(2)
    d = row // batch
    b = row % batch
    dirs = tl.num_programs(1) // batch
    offs_t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    mask = (offs_t < length)[:, None] & (offs_n < STATE)[None, :]
    offsets = offs_n[None, :] * padded_length + offs_t[:, None]
    total = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for blk in range(e_blocks):
        slab = (((which * dirs + d) * e_blocks + blk) * batch + b).to(tl.int64)
        total += tl.load(parts_ptr + slab * STATE * padded_length + offsets, mask=mask, other=0.0)
    out = (row.to(tl.int64) * length + offs_t[:, None]) * STATE + offs_n[None, :]
    if which == 0:
        tl.store(dB_ptr + out, total.to(dB_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dC_ptr + out, total.to(dC_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_sums_kernel(
    parts_ptr,
    slots_ptr,
    first_ptr,
    second_ptr,
    rows,
    channels,
    s_p_dir,
    s_p_row,
    s_slots_dir,
    s_slots_e,
    s_slots_s,
    SLOTS: tl.constexpr,
    VECTORS: tl.constexpr,
    HAS_FIRST: tl.constexpr,
    HAS_SECOND: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-program partial sums of per-channel gradients added up over their rows, in a fixed
    order: ``parts`` (dirs, rows, VECTORS, E) fp32 at strides (``s_p_dir``, ``s_p_row``, E, 1),
    its first SLOTS vectors into ``slots`` (dirs, E, SLOTS) at any strides (dA of the scan, the
    conv's taps), the next one or two into ``first`` and ``second`` (dirs, E) contiguous (dD and
    dbias, the conv's bias), each in its own dtype. Grid: (cdiv(VECTORS * E, BLOCK), dirs)."""
    pid = tl.program_id(0)
    d = tl.program_id(1)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < VECTORS * channels
    slab = parts_ptr + d.to(tl.int64) * s_p_dir
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, rows, BLOCK_ROWS):
        offs_r = start + tl.arange(0, BLOCK_ROWS)
        tile = tl.load(
            slab + offs_r[:, None].to(tl.int64) * s_p_row + idx[None, :],
            mask=(offs_r < rows)[:, None] & ok[None, :],
            other=0.0,
        )
        total += tl.sum(tile, axis=0)
    slot = idx // channels
    e = idx % channels
    tl.store(
        slots_ptr + d * s_slots_dir + e * s_slots_e + slot * s_slots_s,
        total.to(slots_ptr.dtype.element_ty),
        mask=ok & (slot < SLOTS),
    )
    if HAS_FIRST:
        tl.store(
            first_ptr + d * channels + e,
            total.to(first_ptr.dtype.element_ty),
            mask=ok & (slot == SLOTS),
        )
    if HAS_SECOND:
        tl.store(
            second_ptr + d * channels + e,
            total.to(second_ptr.dtype.element_ty),
            mask=ok & (slot == SLOTS + 1),
        )
