"""FLOP and activation counts of ViMDet's own ops, as fvcore handles (see docs/analysis.md).

fvcore (and Detectron2's ``tools/analyze_model.py``) counts a model by tracing it with
``torch.jit.trace`` and adding a count per traced op. It counts one fused multiply-add as one
flop (a (m, k) @ (k, n) matmul is m*k*n), and leaves out element-wise ops, activations and
transcendentals (Detectron2 ignores ``aten::add``, ``aten::mul``, ``aten::exp``, ...). ViMDet
follows that convention.

The selective scan appears in a trace as one op whatever its backend: ``vimdet::scan_walk``
(``triton``) or ``vimdet::bidirectional_scan`` (the others, see
:mod:`vimdet.ops.selective_scan`), both with the token-major inputs u, delta (dirs, batch, L, E),
A (dirs, E, N). Its count, :func:`scan_flops`, is the work of the recurrence itself::

    per direction, batch element, token, channel and state (4 per state step):
        delta * A                    1   (its exp is not counted)
        (delta * u) * B              1
        h = exp(delta A) * h + dBu   1   (one multiply-add)
        y += C * h                   1   (one multiply-add)
    per direction, batch element, token and channel (3 per channel step):
        delta * u                    1
        y + D * u                    1   (one multiply-add)
        y * silu(z)                  1   (the gate; silu, softplus(delta + bias) not counted)

so ``dirs * batch * L * E * (4 N + 3)``; the mean of the two directions (one add per output)
is element-wise and not counted. The depthwise convolutions of both directions,
``vimdet::conv_both_directions`` (``triton``) or two ``F.conv1d`` elsewhere, count
``2 * batch * L * E * K``: fvcore's count of a convolution (bias and SiLU not counted). The
blocks' residual add + RMSNorm, ``vimdet::add_rms_norm`` (``triton``) or PyTorch's element-wise
ops elsewhere, counts 0 FLOPs and 0 activations either way (element-wise work).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

__all__ = [
    "SCAN_FLOPS_PER_CHANNEL_STEP",
    "SCAN_FLOPS_PER_STATE_STEP",
    "VIMDET_ACTIVATION_HANDLES",
    "VIMDET_FLOP_HANDLES",
    "conv_both_directions_flops",
    "scan_flops",
]

#: Counted operations per direction, token, channel and state of the scan (see the module doc).
SCAN_FLOPS_PER_STATE_STEP = 4
#: Counted operations per direction, token and channel of the scan, outside the state loop.
SCAN_FLOPS_PER_CHANNEL_STEP = 3


def scan_flops(dirs: int, batch: int, length: int, channels: int, state: int) -> int:
    """FLOPs of a selective scan of ``dirs`` directions over (batch, length, channels) with
    ``state`` states per channel: dirs * batch * length * channels * (4 * state + 3)."""
    steps = dirs * batch * length * channels
    return steps * (SCAN_FLOPS_PER_STATE_STEP * state + SCAN_FLOPS_PER_CHANNEL_STEP)


def conv_both_directions_flops(batch: int, length: int, channels: int, taps: int) -> int:
    """FLOPs of both directions' depthwise convs of ``taps`` taps: 2 * batch * length *
    channels * taps (one multiply-add per tap and output, as fvcore counts ``F.conv1d``)."""
    return 2 * batch * length * channels * taps


def _shape(value: Any) -> List[int]:
    """The static shape of a traced value (``torch._C.Value`` of a complete tensor type)."""
    sizes = value.type().sizes()
    if sizes is None:
        raise ValueError(f"vimdet.ops.flops: the traced value {value} has no static shape")
    return list(sizes)


def scan_flop_jit(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """fvcore handle of ``vimdet::scan_walk`` and ``vimdet::bidirectional_scan``: inputs
    (u (dirs, batch, L, E), delta, A (dirs, E, N), ...) -> :func:`scan_flops`."""
    dirs, batch, length, channels = _shape(inputs[0])
    state = _shape(inputs[2])[-1]
    return scan_flops(dirs, batch, length, channels, state)


def conv_both_directions_flop_jit(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """fvcore handle of ``vimdet::conv_both_directions``: x (batch, L, E), weight (2, E, K)
    -> :func:`conv_both_directions_flops`."""
    batch, length, channels = _shape(inputs[0])
    taps = _shape(inputs[1])[-1]
    return conv_both_directions_flops(batch, length, channels, taps)


def output_activation_jit(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """fvcore activation handle: the elements of the op's output, as fvcore counts a conv's."""
    count = 1
    for size in _shape(outputs[0]):
        count *= size
    return count


def elementwise_jit(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """fvcore handle of ``vimdet::add_rms_norm``: element-wise work, which fvcore's convention
    leaves out (0), as it leaves out the PyTorch ops that compute it off the ``triton`` path."""
    return 0


#: fvcore FLOP handles of ViMDet's ops: ``FlopCountAnalysis(...).set_op_handle(**these)``.
VIMDET_FLOP_HANDLES: Dict[str, Callable[..., int]] = {
    "vimdet::scan_walk": scan_flop_jit,
    "vimdet::bidirectional_scan": scan_flop_jit,
    "vimdet::conv_both_directions": conv_both_directions_flop_jit,
    "vimdet::add_rms_norm": elementwise_jit,
}
#: fvcore activation handles of ViMDet's ops (output elements; none for element-wise work).
VIMDET_ACTIVATION_HANDLES: Dict[str, Callable[..., int]] = {
    **dict.fromkeys(VIMDET_FLOP_HANDLES, output_activation_jit),
    "vimdet::add_rms_norm": elementwise_jit,
}
