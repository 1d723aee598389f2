# ruff: noqa: UP045 (torch.library infers op schemas from typing.Optional annotations)
"""The ``triton`` selective-scan backend: ViMDet's own GPU scan, one or two directions per launch.

``scan_walk(u, delta, A, B, C, ...)`` is the core: token-major inputs with a leading direction axis,
both of Vim's directions in one launch per phase (direction 1 walks the sequence from the end, so
nothing is flipped), softplus(delta + bias), the D skip, the SiLU(z) gate and the average of the
directions fused in. It is registered with ``torch.library`` as ``vimdet::scan_walk`` with its
autograd and fake (meta) implementations, so ``torch.compile`` sees one op and ``torch.export``
can carry it. The kernels are in :mod:`vimdet.ops.scan_triton_kernels`.

Shapes (dirs = 1 or 2; any strides, though a channel stride other than 1 costs a copy)::

    u, delta  (dirs, batch, L, E)     A (dirs, E, N)     B, C (dirs, batch, L, N)
    D, delta_bias  (dirs, E)          z (batch, L, E)    -> out (batch, L, E) in u's dtype

The walk (start, inner, inner_stride, outer_stride) maps scan position p to the token
start + (p % inner) * inner_stride + (p // inner) * outer_stride: row-major is (0, L, 1, 0) and
column-major over an H x W grid is (0, H, W, 1); direction 1 walks it backwards.
"""

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    import triton

    from . import scan_triton_kernels as kernels
except ImportError:
    triton = None
    kernels = None

__all__ = [
    "TRITON_HINT",
    "channel_sums",
    "column_major_walk",
    "interpreting",
    "row_major_walk",
    "scan_triton",
    "scan_walk",
    "scan_walk_recomputing_inputs",
    "triton_available",
]

# Positions per chunk (one tile of BLOCK_L rows). The carries between chunks, (batch, dirs,
# L / CHUNK, N, E) fp32, are computed in the forward pass and again in the backward pass rather than
# kept: at 16 they would hold 8 bytes per token and channel, four bf16 activations.
CHUNK = 16
# (channels per program, warps) of the forward kernels and of the backward kernel; measured best of
# those tried on an H200 at Vim-B shapes (docs/benchmarks.md).
FORWARD_BLOCK = (32, 1)
BACKWARD_BLOCK = (32, 1)
# Stages of the backward kernel's loop over states along row-major walks: its 255 registers a
# thread leave 2 warps a scheduler, which waited on the loads of each state's A, B, C and carries
# (ncu, H100). With 3 stages Triton copies them in two states ahead, and the kernel ran 14% faster.
# Along column walks (masked token loads, which Triton does not copy through shared memory) the
# whole backward pass ran 11% slower pipelined, and the forward kernels, at about three times the
# warps, ran slower too. They keep one stage.
BACKWARD_LOAD_STAGES = 3
# The chaining kernel's tile: chunks scanned at once, elements of the (N, E) slab per program, and
# warps. (16, 64, 2) took 5.3 ms of a ViMDet-B training step where (32, 64, 4) took 6.3 (H100,
# 1024², 72 launches; docs/benchmarks.md).
CARRY_CHUNKS = 16
CARRY_BLOCK = 64
CARRY_WARPS = 2
# (tokens, warps) of a program of the layout kernels (B and C to state-major, dB and dC back), and
# the (rows, elements, warps) tile of the channel sums' kernel: best of those tried on an H100 at
# ViMDet-T's and -B's shapes (1024², batch 2). There the channel sums took 20 and 53 µs (torch's sum
# and copies 39 and 62), dB and dC 16 and 47 µs (26 and 57), B and C to state-major 6 µs (the two
# pads 20 to 28).
LAYOUT_BLOCK = (64, 4)
SUMS_BLOCK = (32, 8)
CHANNEL_SUMS_BLOCK = (128, 32, 8)


TRITON_HINT = (
    "The 'triton' selective-scan backend needs Triton, which is not importable here. CUDA builds "
    "of PyTorch ship it (`pip install torch` on a Linux GPU machine); or choose another backend: "
    "MODEL.VIM.SCAN_BACKEND chunked (or cuda, with mamba-ssm), or VIMDET_SCAN_BACKEND=chunked."
)


def triton_available() -> bool:
    """Whether Triton (and so this backend) can be imported."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``, read as
    Triton reads it); False without Triton."""
    return kernels is not None and kernels.triton_interprets()


def row_major_walk(length: int) -> List[int]:
    """The walk over ``length`` tokens in storage order."""
    return [0, length, 1, 0]


def column_major_walk(height: int, width: int) -> List[int]:
    """The walk down the columns of a row-major ``height`` x ``width`` token grid."""
    return [0, height, width, 1]


def _num_chunks(length: int) -> int:
    return (length + CHUNK - 1) // CHUNK


def _block_e(channels: int, block: int) -> int:
    return min(block, triton.next_power_of_2(channels))


def _strides(tensor: Optional[Tensor], ndim: int) -> Tuple[int, ...]:
    """Strides of ``tensor``, or zeros for an absent optional input."""
    return tuple(tensor.stride()) if tensor is not None else (0,) * ndim


def _walk_args(walk: Sequence[int]) -> Tuple[int, int, int, int]:
    start, inner, inner_stride, outer_stride = (int(v) for v in walk)
    return start, inner, inner_stride, outer_stride


def _is_row_major(walk: Sequence[int], length: int) -> bool:
    return list(_walk_args(walk)) == row_major_walk(length)


def _state_major(B: Tensor, C: Tensor) -> Tuple[Tensor, Tensor]:
    """B and C, (dirs, batch, L, N), as (dirs, batch, N, chunks * CHUNK) views of one contiguous
    copy, zeros past L (``state_major_kernel``): the kernels then read each state's run of tokens
    as vectors."""
    dirs, batch, length, state = B.shape
    padded = _num_chunks(length) * CHUNK
    out = B.new_empty((2, dirs, batch, state, padded), dtype=torch.promote_types(B.dtype, C.dtype))
    grid = (triton.cdiv(padded, LAYOUT_BLOCK[0]), dirs * batch, 2)
    kernels.state_major_kernel[grid](
        B,
        C,
        out,
        length,
        padded,
        *B.stride(),
        *C.stride(),
        batch,
        STATE=state,
        BLOCK_N=triton.next_power_of_2(state),
        BLOCK_T=LAYOUT_BLOCK[0],
        num_warps=LAYOUT_BLOCK[1],
    )
    return out[0], out[1]


def _unit_channel_stride(x: Optional[Tensor]) -> Optional[Tensor]:
    """``x`` itself if its channels are adjacent, else a contiguous copy: the kernels give each lane
    a channel and read a token's channels as one row (the mixer's tensors are never copied)."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _token_major_sums(parts: Tensor, length: int, dtypes: Sequence[torch.dtype]) -> List[Tensor]:
    """dB and dC, contiguous (dirs, batch, L, N) in ``dtypes``, from the backward kernel's
    (2, dirs, E blocks, batch, N, padded L) partials, summed over E blocks in one launch
    (``token_major_sums_kernel``); the layout the op's fake implementation promises."""
    _, dirs, e_blocks, batch, state, padded = parts.shape
    sums = [parts.new_empty((dirs, batch, length, state), dtype=dtype) for dtype in dtypes]
    grid = (triton.cdiv(length, SUMS_BLOCK[0]), dirs * batch, 2)
    kernels.token_major_sums_kernel[grid](
        parts,
        *sums,
        length,
        padded,
        e_blocks,
        batch,
        STATE=state,
        BLOCK_N=triton.next_power_of_2(state),
        BLOCK_T=SUMS_BLOCK[0],
        num_warps=SUMS_BLOCK[1],
    )
    return sums


def channel_sums(
    parts: Tensor, slots: Tensor, first: Optional[Tensor] = None, second: Optional[Tensor] = None
) -> None:
    """Adds up per-program partial sums of per-channel gradients in one launch
    (``channel_sums_kernel``): ``parts`` (dirs, rows, vectors, E) fp32, its last two dims
    contiguous; its first S vectors into ``slots`` (dirs, E, S), the next ones into ``first`` and
    ``second`` (dirs, E) contiguous, written in place in their own dtypes."""
    dirs, rows, vectors, channels = parts.shape
    if parts.stride(3) != 1 or parts.stride(2) != channels:
        raise ValueError(f"channel_sums: parts {tuple(parts.shape)} needs contiguous (vectors, E)")
    grid = (triton.cdiv(vectors * channels, CHANNEL_SUMS_BLOCK[1]), dirs)
    kernels.channel_sums_kernel[grid](
        parts,
        slots,
        first if first is not None else slots,
        second if second is not None else slots,
        rows,
        channels,
        parts.stride(0),
        parts.stride(1),
        *slots.stride(),
        SLOTS=slots.shape[-1],
        VECTORS=vectors,
        HAS_FIRST=first is not None,
        HAS_SECOND=second is not None,
        BLOCK_ROWS=CHANNEL_SUMS_BLOCK[0],
        BLOCK=CHANNEL_SUMS_BLOCK[1],
        num_warps=CHANNEL_SUMS_BLOCK[2],
    )


def device_guard(tensor: Tensor):
    """Launch on ``tensor``'s GPU (Triton launches on the current device); a no-op on the CPU."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _state_carries(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B_state_major: Tensor,
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    walk: Sequence[int],
) -> Tensor:
    """The state entering every chunk: (batch, dirs, chunks, N, E) fp32. B is state-major
    (``_state_major``)."""
    dirs, batch, length, channels = u.shape
    state = A.shape[-1]
    chunks = _num_chunks(length)
    block_e, warps = FORWARD_BLOCK
    block_e = _block_e(channels, block_e)
    chunk_states = u.new_empty((batch, dirs, chunks, state, channels), dtype=torch.float32)
    logsums = u.new_empty((batch, dirs, chunks, channels), dtype=torch.float32)
    bias = delta_bias if delta_bias is not None else A
    grid = (chunks, triton.cdiv(channels, block_e), batch)
    kernels.chunk_state_kernel[grid](
        u,
        delta,
        bias,
        A,
        B_state_major,
        chunk_states,
        logsums,
        length,
        channels,
        batch,
        *_walk_args(walk),
        *u.stride(),
        *delta.stride(),
        _strides(delta_bias, 2)[0],
        *A.stride(),
        *B_state_major.stride()[:3],
        NUM_DIRS=dirs,
        ROW_MAJOR=_is_row_major(walk, length),
        STATE=state,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus,
        BLOCK_L=CHUNK,
        BLOCK_E=block_e,
        num_warps=warps,
    )
    return _chain_chunks(chunk_states, logsums, A, adjoint=False)


def _chain_chunks(chunk_values: Tensor, logsums: Tensor, A: Tensor, adjoint: bool) -> Tensor:
    """The value entering every chunk, from each chunk's (batch, dirs, chunks, N, E) value and
    (batch, dirs, chunks, E) summed dt (``chunk_carry_kernel``)."""
    batch, dirs, chunks, state, channels = chunk_values.shape
    carries = torch.empty_like(chunk_values)
    grid = (triton.cdiv(state * channels, CARRY_BLOCK), batch * dirs)
    kernels.chunk_carry_kernel[grid](
        chunk_values,
        logsums,
        A,
        carries,
        chunks,
        channels,
        *A.stride(),
        NUM_DIRS=dirs,
        STATE=state,
        DIR0_DOWN=adjoint,
        CHUNK_TILE=CARRY_CHUNKS,
        BLOCK=CARRY_BLOCK,
        num_warps=CARRY_WARPS,
    )
    return carries


def _scan_walk_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    walk: Sequence[int],
) -> Tensor:
    dirs, batch, length, channels = u.shape
    state = A.shape[-1]
    row_major = _is_row_major(walk, length)
    u, delta, z = (_unit_channel_stride(t) for t in (u, delta, z))
    with device_guard(u):
        B, C = _state_major(B, C)
        carries = _state_carries(u, delta, A, B, delta_bias, delta_softplus, walk)
        out = u.new_empty((batch, length, channels))
        # The first direction's output waits here, in fp32, for the second one's.
        partial = out.new_empty(out.shape, dtype=torch.float32) if dirs > 1 else out
        block_e, warps = FORWARD_BLOCK
        block_e = _block_e(channels, block_e)
        grid = (_num_chunks(length), triton.cdiv(channels, block_e), batch)
        for d in range(dirs):
            kernels.scan_output_kernel[grid](
                u[d],
                delta[d],
                delta_bias[d] if delta_bias is not None else A,
                A[d],
                B[d],
                C[d],
                D[d] if D is not None else A,
                z if z is not None else u,
                carries[:, d],
                partial,
                out,
                length,
                channels,
                *_walk_args(walk),
                *u[d].stride(),
                *delta[d].stride(),
                *A[d].stride(),
                *B[d].stride()[:2],
                *C[d].stride()[:2],
                *_strides(z, 3),
                carries.stride(0),
                *out.stride(),
                channels,
                REVERSE=d == 1,
                NUM_DIRS=dirs,
                ROW_MAJOR=row_major,
                ADD_PARTIAL=d > 0,
                FINAL=d == dirs - 1,
                STATE=state,
                HAS_D=D is not None,
                HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus,
                BLOCK_L=CHUNK,
                BLOCK_E=block_e,
                num_warps=warps,
            )
    return out


def _scan_walk_backward(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    walk: Sequence[int],
) -> Tuple[Tensor, ...]:
    dirs, batch, length, channels = u.shape
    state = A.shape[-1]
    chunks = _num_chunks(length)
    bias = delta_bias if delta_bias is not None else A
    row_major = _is_row_major(walk, length)
    B_tokens, C_tokens = B, C
    dout, u, delta, z = (_unit_channel_stride(t) for t in (dout, u, delta, z))
    with device_guard(u):
        B, C = _state_major(B, C)
        carries = _state_carries(u, delta, A, B, delta_bias, delta_softplus, walk)
        # 1. The adjoint each chunk passes on when nothing enters it, chained against the walk.
        block_e, warps = FORWARD_BLOCK
        block_e = _block_e(channels, block_e)
        chunk_adjoints = torch.empty_like(carries)
        logsums = u.new_empty((batch, dirs, chunks, channels), dtype=torch.float32)
        kernels.chunk_adjoint_kernel[(chunks, triton.cdiv(channels, block_e), batch)](
            dout,
            z if z is not None else u,
            delta,
            bias,
            A,
            C,
            chunk_adjoints,
            logsums,
            length,
            channels,
            batch,
            *_walk_args(walk),
            *dout.stride(),
            *_strides(z, 3),
            *delta.stride(),
            _strides(delta_bias, 2)[0],
            *A.stride(),
            *C.stride()[:3],
            NUM_DIRS=dirs,
            ROW_MAJOR=row_major,
            STATE=state,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus,
            BLOCK_L=CHUNK,
            BLOCK_E=block_e,
            num_warps=warps,
        )
        adjoint_carries = _chain_chunks(chunk_adjoints, logsums, A, adjoint=True)
        # 2. Every gradient, from states and adjoints recomputed inside each chunk, one launch per
        # direction.
        block_e, warps = BACKWARD_BLOCK
        block_e = _block_e(channels, block_e)
        e_blocks = triton.cdiv(channels, block_e)
        du = torch.empty((dirs, batch, length, channels), dtype=u.dtype, device=u.device)
        ddelta = torch.empty((dirs, batch, length, channels), dtype=delta.dtype, device=u.device)
        dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else None
        partial = u.new_empty((batch, length, channels), dtype=torch.float32) if dirs > 1 else du
        # The partial sums, two tensors so that each is added up by one reduction: dB and dC
        # per E block, (dB or dC, dirs, E blocks, batch, N, padded L); dA, dD and dbias per chunk,
        # (dirs, batch * chunks, N + 2, E), state rows, then dD's row and dbias's.
        f32 = {"dtype": torch.float32, "device": u.device}
        token_parts = torch.empty((2, dirs, e_blocks, *B.shape[1:]), **f32)
        dB_parts, dC_parts = token_parts
        channel_parts = torch.empty((dirs, batch * chunks, state + 2, channels), **f32)
        dA_parts, dD_parts, dbias_parts = channel_parts.split([state, 1, 1], dim=2)
        for d in range(dirs):
            kernels.scan_backward_kernel[(chunks, e_blocks, batch)](
                dout,
                u[d],
                delta[d],
                bias[d] if delta_bias is not None else A,
                A[d],
                B[d],
                C[d],
                D[d] if D is not None else A,
                z if z is not None else u,
                carries[:, d],
                adjoint_carries[:, d],
                partial,
                du[d],
                ddelta[d],
                dz if dz is not None else du,
                dB_parts[d],
                dC_parts[d],
                dA_parts[d],
                dD_parts[d],
                dbias_parts[d],
                length,
                channels,
                *_walk_args(walk),
                *dout.stride(),
                *u[d].stride(),
                *delta[d].stride(),
                *A[d].stride(),
                *B[d].stride()[:2],
                *C[d].stride()[:2],
                *_strides(z, 3),
                carries.stride(0),
                *du[d].stride(),
                *ddelta[d].stride(),
                *_strides(dz, 3),
                *dB_parts[d].stride()[:3],
                channel_parts.stride(1),
                channels,
                REVERSE=d == 1,
                NUM_DIRS=dirs,
                ROW_MAJOR=row_major,
                ADD_PARTIAL=d > 0,
                FINAL=d == dirs - 1,
                STATE=state,
                HAS_D=D is not None,
                HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus,
                BLOCK_L=CHUNK,
                BLOCK_E=block_e,
                LOAD_STAGES=BACKWARD_LOAD_STAGES if row_major else 1,
                num_warps=warps,
            )
        # 3. The partial sums, added in a fixed order (deterministic; no atomics).
        dB, dC = _token_major_sums(token_parts, length, (B_tokens.dtype, C_tokens.dtype))
        dA, dD, dbias = (
            torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else None
            for t in (A, D, delta_bias)
        )
        # dD's row is always there; without D it is skipped.
        channel_sums(channel_parts, dA, dD, dbias)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


# --- torch.library registration --------------------------------------------------------------
# Absent optional gradients travel as empty tensors: custom ops return tensors only.


def _or_empty(tensor: Optional[Tensor], like: Tensor) -> Tensor:
    return tensor if tensor is not None else like.new_empty(0)


@torch.library.custom_op("vimdet::scan_walk", mutates_args=())
def _scan_walk_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    walk: List[int],
) -> Tensor:
    return _scan_walk_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk)


@_scan_walk_op.register_fake
def _scan_walk_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk):
    dirs, batch, length, channels = u.shape
    return u.new_empty((batch, length, channels))


@torch.library.custom_op("vimdet::scan_walk_backward", mutates_args=())
def _scan_walk_backward_op(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    walk: List[int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_walk_backward(
        dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk
    )
    return du, ddelta, dA, dB, dC, _or_empty(dD, u), _or_empty(dz, u), _or_empty(dbias, u)


@_scan_walk_backward_op.register_fake
def _scan_walk_backward_fake(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk):
    def like(tensor):
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)

    return (
        like(u),
        like(delta),
        like(A),
        like(B),
        like(C),
        like(D) if D is not None else u.new_empty(0),
        like(z) if z is not None else u.new_empty(0),
        like(delta_bias) if delta_bias is not None else u.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus
    ctx.walk = walk


def _backward(ctx, grad_out):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_walk_backward_op(
        grad_out, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.walk
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        dbias if delta_bias is not None else None,
        None,
        None,
    )


_scan_walk_op.register_autograd(_backward, setup_context=_setup_context)


def _op_arguments(u, delta, A, B, C, D, z, delta_bias, walk):
    """scan_walk's arguments as the registered op takes them: A contiguous, D and delta_bias with
    adjacent channels, and a walk of plain ints (under torch.jit.trace, sizes are traced values,
    which the op's int[] rejects). The kernels read A at any strides, but with its channels
    adjacent the chunk-state and chunk-adjoint kernels ran 7 to 9% slower (H100, ViMDet-B)."""
    walk = [int(v) for v in walk] if walk is not None else row_major_walk(int(u.shape[2]))
    D, delta_bias = (_unit_channel_stride(t) for t in (D, delta_bias))
    return u, delta, A.contiguous(), B, C, D, z, delta_bias, walk


def _compile_errors():
    return (triton.CompilationError, triton.OutOfResources)


def _compile_failure(error: Exception, device: torch.device) -> RuntimeError:
    return RuntimeError(
        f"the Triton selective scan failed to compile on {device} ({error}). Use another "
        "backend for now (MODEL.VIM.SCAN_BACKEND chunked, or cuda with mamba-ssm; or "
        "VIMDET_SCAN_BACKEND=chunked) and report the error with your GPU and Triton versions"
    )


def scan_walk(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    walk: Optional[Sequence[int]] = None,
) -> Tensor:
    """The selective scan of one or two directions along ``walk`` (default: row-major).

    Shapes in the module docstring; returns (batch, L, E) in u's dtype: the directions' outputs
    averaged, each with its D skip, gated by SiLU(z).
    """
    if triton is None:
        raise RuntimeError(TRITON_HINT)
    u, delta, A, B, C, D, z, delta_bias, walk = _op_arguments(
        u, delta, A, B, C, D, z, delta_bias, walk
    )
    try:
        return _scan_walk_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk)
    except _compile_errors() as error:
        raise _compile_failure(error, u.device) from error


class _ScanRecomputingInputs(torch.autograd.Function):
    """``scan_walk(*make_inputs(*tensors), z, ...)`` keeping only ``tensors`` and z for the
    backward pass, which computes the scan's inputs again (under the forward's autocast) and runs
    the scan's backward op on them; their own backward follows through autograd."""

    @staticmethod
    def forward(ctx, make_inputs, check, z, delta_softplus, walk, *tensors):
        device_type = tensors[0].device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        ctx.make_inputs, ctx.delta_softplus, ctx.walk = make_inputs, delta_softplus, walk
        u, delta, A, B, C, D, delta_bias = make_inputs(*tensors)
        if check is not None:
            check(u, delta, A, B, C, D, z, delta_bias)
        ctx.save_for_backward(z, *tensors)
        return scan_walk(u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk)

    @staticmethod
    def backward(ctx, dout):
        z, *tensors = ctx.saved_tensors
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        with (
            torch.enable_grad(),
            torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled),
        ):
            inputs = ctx.make_inputs(*leaves)
        u, delta, A, B, C, D, delta_bias = (t.detach() if t is not None else None for t in inputs)
        u, delta, A, B, C, D, z, delta_bias, walk = _op_arguments(
            u, delta, A, B, C, D, z, delta_bias, ctx.walk
        )
        try:
            du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_walk_backward_op(
                dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, walk
            )
        except _compile_errors() as error:
            raise _compile_failure(error, u.device) from error
        input_grads = (du, ddelta, dA, dB, dC, dD, dbias)
        pairs = [
            (value, grad)
            for value, grad in zip(inputs, input_grads)
            if value is not None and value.requires_grad
        ]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        found = iter(
            torch.autograd.grad(
                [value for value, _ in pairs],
                wanted,
                [grad for _, grad in pairs],
                allow_unused=True,
            )
            if pairs and wanted
            else ()
        )
        leaf_grads = [next(found) if leaf.requires_grad else None for leaf in leaves]
        return (None, None, dz if z is not None else None, None, None, *leaf_grads)


def scan_walk_recomputing_inputs(
    make_inputs: Callable[..., Tuple[Optional[Tensor], ...]],
    tensors: Sequence[Tensor],
    z: Optional[Tensor] = None,
    delta_softplus: bool = False,
    walk: Optional[Sequence[int]] = None,
    check: Optional[Callable[..., None]] = None,
) -> Tensor:
    """``scan_walk(u, delta, A, B, C, D, z, delta_bias, ...)`` with ``(u, delta, A, B, C, D,
    delta_bias) = make_inputs(*tensors)``, where the scan's inputs are not kept for the backward
    pass but computed again there from ``tensors``: in the Vim mixer, u and delta are two
    (2, batch, L, E) activations a block, and their recomputation is a conv and two thin matmuls.
    ``make_inputs`` must give the same result each call (no randomness). ``check(u, delta, A, B,
    C, D, z, delta_bias)``, if given, runs once, in the forward pass.

    The backward pass keeps ``make_inputs`` until autograd's graph goes, which may be after the
    backward pass has run: it must not hold activations (a closure over z would keep its memory)."""
    if triton is None:
        raise RuntimeError(TRITON_HINT)
    walk = [int(v) for v in walk] if walk is not None else None
    return _ScanRecomputingInputs.apply(make_inputs, check, z, delta_softplus, walk, *tensors)


def scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """One direction with mamba-ssm's layout (u, delta, z (B, E, L); B, C (B, N, L)); the result
    (B, E, L) is a transposed view of the kernel's token-major output."""
    out = scan_walk(
        u.transpose(1, 2)[None],
        delta.transpose(1, 2)[None],
        A[None],
        B.transpose(1, 2)[None],
        C.transpose(1, 2)[None],
        None if D is None else D[None],
        None if z is None else z.transpose(1, 2),
        None if delta_bias is None else delta_bias[None],
        delta_softplus,
    )
    return out.transpose(1, 2)
