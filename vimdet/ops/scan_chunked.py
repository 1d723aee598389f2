"""The chunked backend: the selective scan in plain PyTorch on any device, fast enough to train.

The sequence is cut into chunks of about sqrt(L) steps; all chunks are scanned side by side, then
the chunk carries are propagated, so a Python loop runs O(sqrt(L)) steps instead of L. Memory is
linear in L. The backward is a reverse scan of the same kind (a custom autograd function), not a
replay of the forward graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._scan_common import finish_output, prepare_delta

__all__ = ["scan_chunked"]

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


def scan_chunked(
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
    """The scan in fp32 by chunks, with a reverse-scan backward; holds O(B * L * C * N) memory.

    Arguments, shapes and result as :func:`vimdet.ops.selective_scan`, which checks the inputs.
    """
    delta = prepare_delta(delta, delta_bias, delta_softplus)
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
    return finish_output(y.transpose(1, 2), u, D, z)
