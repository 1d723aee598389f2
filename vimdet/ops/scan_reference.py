"""The reference backend: the selective scan's recurrence one step at a time, in fp32.

Slow (a Python loop over L); the ground truth the other backends are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._scan_common import finish_output, prepare_delta

__all__ = ["scan_reference"]


def scan_reference(
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
    """h[t] = exp(delta[t] A) h[t-1] + delta[t] B[t] u[t]; y[t] = C[t] . h[t], step by step.

    Arguments, shapes and result as :func:`vimdet.ops.selective_scan`, which checks the inputs.
    """
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    u32, A32, B32, C32 = u.float(), A.float(), B.float(), C.float()
    state = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A32)
        drive = (delta[:, :, t] * u32[:, :, t])[:, :, None] * B32[:, None, :, t]
        state = decay * state + drive
        outputs.append((state * C32[:, None, :, t]).sum(-1))
    y = torch.stack(outputs, dim=2)
    return finish_output(y, u, D, z)
