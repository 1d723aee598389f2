"""What every selective-scan backend shares: the input checks and the fp32 pre- and post-steps.

Shapes (mamba-ssm's): u, delta, z (B, C, L); A (C, N); B, C (B, N, L); D, delta_bias (C,).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_inputs", "check_walk_inputs", "prepare_delta", "finish_output"]


def check_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
) -> None:
    """Raise TypeError/ValueError naming the first input of the wrong kind, device or shape."""
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z}
    tensors["delta_bias"] = delta_bias
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


def check_walk_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
) -> None:
    """The checks of :func:`check_inputs` for the token-major, direction-stacked layout:
    u, delta (dirs, batch, L, E); A (dirs, E, N); B, C (dirs, batch, L, N); D, delta_bias
    (dirs, E); z (batch, L, E); dirs is 1 or 2."""
    if not isinstance(u, Tensor) or u.dim() != 4 or u.shape[0] not in (1, 2):
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u)
        raise ValueError(
            f"bidirectional_selective_scan: u must be (dirs=1 or 2, batch, length, channels), "
            f"got {shape}"
        )
    dirs, batch, length, channels = u.shape
    if not isinstance(A, Tensor) or A.dim() != 3 or tuple(A.shape[:2]) != (dirs, channels):
        shape = tuple(A.shape) if isinstance(A, Tensor) else type(A)
        raise ValueError(
            f"bidirectional_selective_scan: A must be (dirs={dirs}, channels={channels}, state), "
            f"got {shape}"
        )
    state = A.shape[2]
    expected = {
        "delta": (dirs, batch, length, channels),
        "B": (dirs, batch, length, state),
        "C": (dirs, batch, length, state),
        "D": (dirs, channels),
        "z": (batch, length, channels),
        "delta_bias": (dirs, channels),
    }
    tensors = {"delta": delta, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, value in tensors.items():
        if value is not None and isinstance(value, Tensor) and tuple(value.shape) != expected[name]:
            raise ValueError(
                f"bidirectional_selective_scan: {name} must have shape {expected[name]} (from u "
                f"{tuple(u.shape)} and A {tuple(A.shape)}), got {tuple(value.shape)}"
            )
    # Types, dtypes and devices as for one direction (checked on the first direction's slices).
    check_inputs(
        u[0].transpose(1, 2),
        delta[0].transpose(1, 2),
        A[0],
        B[0].transpose(1, 2),
        C[0].transpose(1, 2),
        None if D is None else D[0],
        None if z is None else z.transpose(1, 2),
        None if delta_bias is None else delta_bias[0],
    )


def prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """softplus(delta + delta_bias) (each step optional) in fp32. delta: (B, C, L)."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def finish_output(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Add the skip term, gate with silu(z), cast to u's dtype. y: (B, C, L) fp32."""
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)
