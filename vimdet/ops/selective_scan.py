"""Mamba's selective scan (Gu & Dao, arXiv 2312.00752, Alg. 2) with interchangeable backends.

For every batch b, channel d and state n, with ``delta`` after its bias and softplus::

    h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t]
    y[t] = sum_n C[t] * h[t] + D * u[t]          then   y[t] *= silu(z[t])

Backends, all with mamba-ssm's argument order, shapes and semantics:

- ``cuda``: mamba-ssm's fused CUDA kernel ``selective_scan_fn``; GPU tensors, mamba-ssm installed.
- ``chunked``: this project's portable scan in plain PyTorch (any device). The sequence is cut into
  chunks of about sqrt(L) steps; all chunks are scanned side by side, then the chunk carries are
  propagated, so a Python loop runs O(sqrt(L)) steps instead of L. Memory is linear in L. Its
  backward is a reverse scan of the same kind (a custom autograd function), not a replay of the
  forward graph.
- ``reference``: the plain per-step recurrence, for tests.

``auto`` is ``cuda`` when mamba-ssm imports and the tensors are on a GPU, else ``chunked``. The
choice is made in :func:`resolve_backend` only; it can be forced per call (``backend=``; the
Vim modules pass the config key ``MODEL.VIM.SCAN_BACKEND``) or by
the environment variable ``VIMDET_SCAN_BACKEND`` (which applies where ``auto`` was asked for).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Optional: compiled CUDA code, only present where `pip install vimdet[cuda]` succeeded.
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan
except ImportError:
    _mamba_selective_scan = None

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_chunked",
    "resolve_backend",
    "cuda_kernel_available",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "chunked", "reference")
ENV_VAR = "VIMDET_SCAN_BACKEND"
_INSTALL_HINT = (
    "The 'cuda' selective-scan backend needs mamba-ssm, which is not importable here. On a machine "
    "with a CUDA GPU and nvcc, install it with `pip install -e .[cuda]` (or "
    "`pip install mamba-ssm --no-build-isolation`), or choose another backend: "
    f"backend='chunked', MODEL.VIM.SCAN_BACKEND chunked, or {ENV_VAR}=chunked."
)

_logged_choices: set = set()


def cuda_kernel_available() -> bool:
    """Whether mamba-ssm's CUDA selective scan could be imported."""
    return _mamba_selective_scan is not None


def _check_backend_name(name: str, where: str) -> None:
    if name not in BACKENDS:
        raise ValueError(
            f"{where}: unknown selective-scan backend {name!r}; choose one of {BACKENDS}"
        )


def resolve_backend(requested: str, device: torch.device) -> str:
    """Map a requested backend to the one that runs for tensors on ``device``; log it once.

    Precedence: an explicit ``requested`` other than ``auto``, then ``$VIMDET_SCAN_BACKEND``, then
    the automatic choice.
    """
    _check_backend_name(requested, "selective_scan")
    name = requested
    source = "argument"
    if name == "auto" and os.environ.get(ENV_VAR):
        name, source = os.environ[ENV_VAR], f"${ENV_VAR}"
        _check_backend_name(name, ENV_VAR)
    if name == "auto":
        name = "cuda" if (cuda_kernel_available() and device.type == "cuda") else "chunked"
        source = "auto"
    if name == "cuda":
        if not cuda_kernel_available():
            raise RuntimeError(_INSTALL_HINT)
        if device.type != "cuda":
            raise ValueError(
                f"selective_scan: backend 'cuda' needs tensors on a CUDA device, got {device}. "
                "Move the model and inputs to the GPU, or use backend='chunked' on this device."
            )
    key = (name, device.type, source)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info(
            "selective_scan: using the %r backend on %s (chosen by %s)", name, device.type, source
        )
    return name


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    tensors = {
        "u": u,
        "delta": delta,
        "A": A,
        "B": B,
        "C": C,
        "D": D,
        "z": z,
        "delta_bias": delta_bias,
    }
    for name, value in tensors.items():
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(value)}")
        if not value.is_floating_point():
            raise TypeError(
                f"selective_scan: {name} must be a real floating-point tensor, got {value.dtype}"
            )
        if value.device != u.device:
            raise ValueError(
                f"selective_scan: {name} is on {value.device} but u is on {u.device}; "
                "put every input on the same device"
            )
    if u.dim() != 3:
        raise ValueError(
            f"selective_scan: u must be (batch, channels, length), got {tuple(u.shape)}"
        )
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(
            f"selective_scan: A must be (channels={channels}, state), got {tuple(A.shape)}"
        )
    state = A.shape[1]
    expected = {
        "delta": (batch, channels, length),
        "z": (batch, channels, length),
        "B": (batch, state, length),
        "C": (batch, state, length),
        "D": (channels,),
        "delta_bias": (channels,),
    }
    for name, shape in expected.items():
        value = tensors[name]
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} must have shape {shape} (from u "
                f"{tuple(u.shape)} and A {tuple(A.shape)}), got {tuple(value.shape)}"
            )


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish_output(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Add the skip term, gate with silu(z), cast to u's dtype. y: (B, C, L) fp32."""
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The recurrence one step at a time in fp32 (slow; the ground truth for tests).

    Shapes: u, delta, z (B, C, L); A (C, N); B, C (B, N, L); D, delta_bias (C,). Returns (B, C, L)
    in u's dtype.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    return _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    u32, A32, B32, C32 = u.float(), A.float(), B.float(), C.float()
    state = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A32)
        drive = (delta[:, :, t] * u32[:, :, t])[:, :, None] * B32[:, None, :, t]
        state = decay * state + drive
        outputs.append((state * C32[:, None, :, t]).sum(-1))
    y = torch.stack(outputs, dim=2)
    return _finish_output(y, u, D, z)


# Elements of one (B, L, channels, N) work tensor of the CPU scan: 4 Mi fp32 = 16 MiB, which
# measured fastest on the 2-core CI machine (8 MiB and 32 MiB were 1.4-1.7x slower).
_CPU_GROUP_ELEMENTS = 2**22


def _chunk_size(length: int) -> int:
    """Steps per chunk: a divisor of ``length`` near sqrt(length) when one exists (no padding)."""
    root = max(1, math.isqrt(length))
    for step in range(root, max(1, root // 2) - 1, -1):
        if length % step == 0:
            return step
    return root


def _linear_scan(decay: Tensor, drive: Tensor, reverse: bool = False) -> Tensor:
    """Solve h[t] = decay[t] * h[t-1] + drive[t] (h[-1] = 0) along dim 1, without autograd.

    ``reverse=True`` runs from the end instead: h[t] = decay[t] * h[t+1] + drive[t].
    decay, drive: (B, L, M) fp32 with decay in [0, 1]; returns (B, L, M).

    Chunks of T ~ sqrt(L) steps are scanned side by side (T Python steps over (B, L/T, M) slices),
    the L/T chunk carries are chained, and each position adds its chunk's carry times its
    cumulative decay since the chunk start. That decay lies in [0, 1], so nothing overflows.
    """
    batch, length, width = drive.shape
    steps = _chunk_size(length)
    chunks = -(-length // steps)
    padded = chunks * steps
    if padded != length:  # Padding is neutral: decay 1 and drive 0 after the end.
        decay = F.pad(decay, (0, 0, 0, padded - length), value=1.0)
        drive = F.pad(drive, (0, 0, 0, padded - length), value=0.0)
    decay = decay.reshape(batch, chunks, steps, width)
    drive = drive.reshape(batch, chunks, steps, width)
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    chunk_order = range(chunks - 1, -1, -1) if reverse else range(chunks)

    state = torch.empty_like(drive)
    cumulative = torch.empty_like(decay)
    previous = None
    for t in order:
        if previous is None:
            state[:, :, t] = drive[:, :, t]
            cumulative[:, :, t] = decay[:, :, t]
        else:
            torch.addcmul(drive[:, :, t], decay[:, :, t], state[:, :, previous], out=state[:, :, t])
            torch.mul(decay[:, :, t], cumulative[:, :, previous], out=cumulative[:, :, t])
        previous = t

    # carry_in[:, c] is the true state just before chunk c's first step (in scan order).
    carry_in = torch.zeros_like(state[:, :, 0])
    carry = carry_in[:, 0]
    last = previous  # the chunk's final step in scan order
    for index, c in enumerate(chunk_order):
        if index > 0:
            carry_in[:, c] = carry
        carry = torch.addcmul(state[:, c, last], cumulative[:, c, last], carry)
    state.addcmul_(cumulative, carry_in[:, :, None])
    return state.reshape(batch, padded, width)[:, :length]


class _SelectiveScanCore(torch.autograd.Function):
    """The state-space part of the scan, y = C . h, with a hand-written reverse-scan backward.

    Inputs, all fp32 and time-major: delta (B, L, C), A (C, N), delta_u = delta * u (B, L, C),
    B (B, L, N), C (B, L, N). Output y (B, L, C) = sum_n C[t, n] * h[t, :, n] where
    h[t] = exp(delta[t] * A) * h[t-1] + delta_u[t] * B[t].

    Backward: g[t] = dy[t] * C[t] + exp(delta[t+1] * A) * g[t+1] (a reverse scan); then
    d delta_u = g . B, dB = delta_u . g, and through d log_decay[t] = g[t] * decay[t] * h[t-1]
    come d delta and dA.
    """

    @staticmethod
    def forward(ctx, delta, A, delta_u, B, C):
        with torch.autocast(delta.device.type, enabled=False):  # fp32 inside, even under AMP
            return _SelectiveScanCore._forward(ctx, delta, A, delta_u, B, C)

    @staticmethod
    def backward(ctx, grad_y):
        with torch.autocast(grad_y.device.type, enabled=False):
            return _SelectiveScanCore._backward(ctx, grad_y.float())

    @staticmethod
    def _forward(ctx, delta, A, delta_u, B, C):
        batch, length, channels = delta.shape
        state_size = A.shape[1]
        decay = torch.mul(delta[..., None], A).exp_()  # (B, L, C, N)
        drive = torch.mul(delta_u[..., None], B[:, :, None])
        flat = (batch, length, channels * state_size)
        state = _linear_scan(decay.view(flat), drive.view(flat)).view_as(decay)
        del drive
        y = torch.einsum("blcn,bln->blc", state, C)
        ctx.save_for_backward(delta, A, delta_u, B, C, decay, state)
        return y

    @staticmethod
    def _backward(ctx, grad_y):
        delta, A, delta_u, B, C, decay, state = ctx.saved_tensors
        batch, length, channels, state_size = state.shape
        flat = (batch, length, channels * state_size)
        grad_y = grad_y.contiguous()
        grad_C = torch.matmul(grad_y[:, :, None], state).squeeze(2)
        grad_state = torch.mul(grad_y[..., None], C[:, :, None])
        next_decay = F.pad(decay[:, 1:], (0, 0, 0, 0, 0, 1), value=0.0)
        grad_drive = _linear_scan(next_decay.view(flat), grad_state.view(flat), reverse=True)
        grad_drive = grad_drive.view_as(state)
        del next_decay, grad_state
        grad_delta_u = torch.matmul(grad_drive, B[..., None]).squeeze(-1)
        grad_B = torch.matmul(delta_u[:, :, None], grad_drive).squeeze(2)
        # d log_decay[t] = g[t] * decay[t] * h[t-1], with h[-1] = 0; reuse grad_drive's memory.
        grad_log_decay = grad_drive.mul_(decay)
        grad_log_decay[:, 1:].mul_(state[:, :-1])
        grad_log_decay[:, 0] = 0
        grad_delta = (grad_log_decay * A).sum(-1)
        grad_A = (grad_log_decay * delta[..., None]).sum((0, 1))
        return grad_delta, grad_A, grad_delta_u, grad_B, grad_C


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The portable fast backend: a chunked scan in fp32 with a reverse-scan backward.

    Same shapes as :func:`selective_scan_reference`. Holds O(B * L * C * N) fp32 memory.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    return _scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    delta_t = delta.transpose(1, 2).contiguous()  # (B, L, C)
    delta_u = delta_t * u.float().transpose(1, 2)
    A, B, C = (
        A.float(),
        B.float().transpose(1, 2).contiguous(),
        C.float().transpose(1, 2).contiguous(),
    )
    # On the CPU, scan groups of channels whose (B, L, channels, N) work tensors stay small: they
    # are then reused from cache instead of streamed through memory (about 2x faster on 2 cores).
    # GPUs prefer one large launch.
    batch, length, channels = delta_t.shape
    group = channels
    if delta_t.device.type == "cpu":
        group = max(1, _CPU_GROUP_ELEMENTS // (batch * length * A.shape[1]))
    ys = [
        _SelectiveScanCore.apply(
            delta_t[..., c : c + group].contiguous(),
            A[c : c + group],
            delta_u[..., c : c + group].contiguous(),
            B,
            C,
        )
        for c in range(0, channels, group)
    ]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    return _finish_output(y.transpose(1, 2), u, D, z)


def _selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    # mamba-ssm's kernel wants contiguous (B, C, L) inputs and fp32 A/D/delta_bias.
    return _mamba_selective_scan(
        u.contiguous(),
        delta.contiguous(),
        A.float().contiguous(),
        B.contiguous(),
        C.contiguous(),
        None if D is None else D.float().contiguous(),
        None if z is None else z.contiguous(),
        None if delta_bias is None else delta_bias.float().contiguous(),
        delta_softplus,
    )


_BACKEND_FUNCTIONS = {
    "cuda": _selective_scan_cuda,
    "chunked": _scan_chunked,
    "reference": _scan_reference,
}


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Selective scan with mamba-ssm's interface; the backend is chosen by :func:`resolve_backend`.

    Args:
        u, delta: (B, C, L) input and step size (before ``delta_bias`` and softplus).
        A: (C, N) real state matrix (negative for a stable scan).
        B, C: (B, N, L) input-dependent input and output projections.
        D: optional (C,) skip weight. z: optional (B, C, L) gate, applied as ``y * silu(z)``.
        delta_bias: optional (C,) added to delta. delta_softplus: apply softplus to delta.
        backend: one of :data:`BACKENDS`.

    Returns:
        (B, C, L) tensor in u's dtype; the scan runs in fp32 on every backend.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    scan = _BACKEND_FUNCTIONS[resolve_backend(backend, u.device)]
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
