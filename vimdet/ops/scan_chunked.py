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


def _to_steps(x: Tensor, steps: int) -> Tensor:
    """(B, L, F) -> (T, B, K, F) contiguous: K = ceil(L / T) chunks of T steps, step-major.

    Positions past L are zeros, which the scan treats as neutral (delta 0 gives decay 1 and no
    drive). Step-major, one step of every chunk is one contiguous slice.
    """
    batch, length, features = x.shape
    chunks = -(-length // steps)
    if chunks * steps != length:
        x = F.pad(x, (0, 0, 0, chunks * steps - length))
    return x.reshape(batch, chunks, steps, features).permute(2, 0, 1, 3).contiguous()


def _from_steps(x: Tensor, length: int) -> Tensor:
    """(T, B, K, F) -> (B, L, F): the inverse of :func:`_to_steps`."""
    steps, batch, chunks, features = x.shape
    return x.permute(1, 2, 0, 3).reshape(batch, chunks * steps, features)[:, :length]


def _linear_scan_(state: Tensor, decay: Tensor, reverse: bool = False) -> Tensor:
    """Solve the recurrence in place over ``state``, which holds the drive on entry.

    Forward: h[p] = decay[p] * h[p-1] + drive[p]. Reverse: h[p] = decay[p+1] * h[p+1] + drive[p]
    (the adjoint scan of the backward pass). Positions p run over the chunked layout of
    :func:`_to_steps`: state, decay (T, B, K, ...) fp32 with decay in [0, 1].

    Each chunk is scanned on its own (T Python steps over contiguous (B, K, ...) slices) while the
    product of its decays is kept; then the K chunk carries are chained and each position adds
    its chunk's carry times that product. The product lies in [0, 1], so nothing overflows.
    """
    steps, chunks = state.shape[0], state.shape[2]
    product = torch.empty_like(state)
    carry = torch.zeros_like(state[0])  # (B, K, ...): what flows into each chunk
    if not reverse:
        product[0] = decay[0]
        for t in range(1, steps):
            state[t].addcmul_(decay[t], state[t - 1])
            torch.mul(decay[t], product[t - 1], out=product[t])
        for k in range(1, chunks):  # the true state at the previous chunk's last step
            torch.addcmul(
                state[-1, :, k - 1], product[-1, :, k - 1], carry[:, k - 1], out=carry[:, k]
            )
    else:
        product[-1] = 1.0
        for t in range(steps - 2, -1, -1):
            state[t].addcmul_(decay[t + 1], state[t + 1])
            torch.mul(decay[t + 1], product[t + 1], out=product[t])
        for k in range(chunks - 2, -1, -1):  # the next chunk's true first state, decayed
            first = torch.addcmul(state[0, :, k + 1], product[0, :, k + 1], carry[:, k + 1])
            torch.mul(decay[0, :, k + 1], first, out=carry[:, k])
    return state.addcmul_(product, carry)


class _SelectiveScanCore(torch.autograd.Function):
    """The state-space part of the scan, y = C . h, with a hand-written reverse-scan backward.

    Inputs, all fp32 and time-major: delta (B, L, C), A (C, N), delta_u = delta * u (B, L, C),
    B (B, L, N), C (B, L, N). Output y (B, L, C) = sum_n C[t, n] * h[t, n, :] where
    h[t] = exp(delta[t] * A) * h[t-1] + delta_u[t] * B[t].

    Inside, every tensor is in the chunked layout of :func:`_to_steps` with the channels
    innermost, the state as (T, B, K, N, C): the (delta x A) and (delta_u x B) products then
    broadcast along contiguous channels, and each scan step reads contiguous slices.

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
        length = delta.shape[1]
        steps = _chunk_size(length)
        delta, delta_u, B, C = (_to_steps(x, steps) for x in (delta, delta_u, B, C))
        decay = torch.mul(delta[..., None, :], A.t()).exp_()  # (T, B, K, N, C)
        state = _linear_scan_(torch.mul(delta_u[..., None, :], B[..., None]), decay)
        y = torch.mul(state, C[..., None]).sum(-2)
        ctx.save_for_backward(delta, A, delta_u, B, C, decay, state)
        ctx.length = length
        return _from_steps(y, length)

    @staticmethod
    def _backward(ctx, grad_y):
        delta, A, delta_u, B, C, decay, state = ctx.saved_tensors
        grad_y = _to_steps(grad_y, delta.shape[0])[..., None, :]  # (T, B, K, 1, C)
        grad_C = torch.mul(state, grad_y).sum(-1)
        grad_drive = _linear_scan_(torch.mul(grad_y, C[..., None]), decay, reverse=True)
        grad_delta_u = torch.mul(grad_drive, B[..., None]).sum(-2)
        grad_B = torch.mul(grad_drive, delta_u[..., None, :]).sum(-1)
        # d log_decay[t] = g[t] * decay[t] * h[t-1], with h[-1] = 0; reuse grad_drive's memory.
        # The position before a chunk's first step is the previous chunk's last one.
        grad_log_decay = grad_drive.mul_(decay)
        grad_log_decay[1:].mul_(state[:-1])
        grad_log_decay[0, :, 1:].mul_(state[-1, :, :-1])
        grad_log_decay[0, :, 0] = 0
        grad_delta = torch.mul(grad_log_decay, A.t()).sum(-2)
        grad_A = torch.mul(grad_log_decay, delta[..., None, :]).sum((0, 1, 2)).t()
        length = ctx.length
        return (
            _from_steps(grad_delta, length),
            grad_A,
            _from_steps(grad_delta_u, length),
            _from_steps(grad_B, length),
            _from_steps(grad_C, length),
        )


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
            delta_t[..., c : c + group],
            A[c : c + group],
            delta_u[..., c : c + group],
            B,
            C,
        )
        for c in range(0, channels, group)
    ]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    return finish_output(y.transpose(1, 2), u, D, z)
