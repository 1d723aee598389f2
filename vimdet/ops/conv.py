"""Vim's depthwise convolutions of both scan directions (Zhu et al., arXiv 2401.09417), + SiLU.

The forward direction's conv is causal; the backward direction's, which Vim runs on the flipped
sequence, is unflipped an anti-causal conv with its taps reversed. Where the scan runs on the
``triton`` backend (:func:`vimdet.ops.resolve_backend`), both come from one Triton kernel that
reads the token-major x once and writes token-major outputs; elsewhere from ``F.conv1d``.

Both convs run along a walk over the token grid (:func:`vimdet.ops.scan_triton.column_major_walk`;
row-major by default), the same walk the scan then takes: the Triton kernel reads and writes the
tokens in place along it; ``F.conv1d`` runs on a copy gathered in walk order.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv_triton import conv_both_directions_triton
from .selective_scan import _check_walk, _walk_positions, resolve_backend

__all__ = ["conv_both_directions"]


def conv_both_directions(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    walk: Sequence[int] | None = None,
    backend: str = "auto",
) -> Tensor:
    """SiLU of both directions' depthwise convs of the token-major ``x``.

    Args:
        x: (batch, L, E), any strides (e.g. half of ``in_proj``'s output).
        weight: (2, E, K), the taps of the forward direction's ``nn.Conv1d`` (its (E, 1, K) weight
            without the middle axis), then the backward direction's.
        bias: (2, E), the two directions' conv biases.
        walk: (start, inner, inner_stride, outer_stride), the order of the tokens along which
            both convs run (see :func:`vimdet.ops.bidirectional_selective_scan`); None: row-major.
        backend: the scan backend; ``triton`` runs the fused kernel.

    Returns:
        (2, batch, L, E) indexed by token: at walk position t, direction 0 ``silu(b[0] + sum_j
        w[0, :, K-1-j] x[t-j])``, direction 1 ``silu(b[1] + sum_j w[1, :, K-1-j] x[t+j])``, x zero
        outside the sequence; x's dtype.
    """
    length, channels = x.shape[1], x.shape[2]
    if weight.dim() != 3 or tuple(weight.shape[:2]) != (2, channels) or bias.shape != (2, channels):
        raise ValueError(
            f"conv_both_directions: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must "
            f"be both directions' taps and biases stacked, (2, {channels}, K) and (2, {channels}) "
            f"for x's {channels} channels: torch.stack([conv1d.weight.squeeze(1), "
            f"conv1d_b.weight.squeeze(1)]) and torch.stack([conv1d.bias, conv1d_b.bias])"
        )
    if walk is not None:  # the kernel indexes tokens by the walk: it must be a permutation
        walk = tuple(int(v) for v in walk)
        _check_walk(walk, length)
    if resolve_backend(backend, x.device) == "triton":
        return conv_both_directions_triton(x, weight, bias, walk)
    if walk is None:
        return _conv_along_sequence(x, weight, bias)
    tokens = _walk_positions(walk, length, x.device)
    u = _conv_along_sequence(x.index_select(1, tokens), weight, bias)
    return torch.empty_like(u).index_copy_(2, tokens, u)


def _conv_along_sequence(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """:func:`conv_both_directions` along x's stored order, with ``F.conv1d``."""
    channels_first = x.transpose(1, 2)  # (batch, E, L), as F.conv1d reads it
    taps = weight.shape[-1]
    # Zeros before (causal) or after (anti-causal) the sequence: L outputs each, none discarded.
    forward = F.conv1d(
        F.pad(channels_first, (taps - 1, 0)), weight[0, :, None], bias[0], groups=x.shape[-1]
    )
    backward = F.conv1d(
        F.pad(channels_first, (0, taps - 1)),
        weight[1, :, None].flip(-1),
        bias[1],
        groups=x.shape[-1],
    )
    return F.silu(torch.stack([forward, backward])).transpose(2, 3)
