"""Mamba's selective scan (Gu & Dao, arXiv 2312.00752, Alg. 2): one entry point, many backends.

For every batch b, channel d and state n, with ``delta`` after its bias and softplus::

    h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t]
    y[t] = sum_n C[t] * h[t] + D * u[t]          then   y[t] *= silu(z[t])

Backends, all with mamba-ssm's argument order, shapes and semantics, each in its own module:

- ``triton`` (:mod:`.scan_triton`): ViMDet's own GPU scan in Triton (which ships with PyTorch).
- ``cuda`` (:mod:`.scan_mamba`): mamba-ssm's fused CUDA kernel; GPU tensors, mamba-ssm installed.
- ``chunked`` (:mod:`.scan_chunked`): this project's portable scan in plain PyTorch (any device).
- ``reference`` (:mod:`.scan_reference`): the plain per-step recurrence, for tests.

``auto`` is ``triton`` for tensors on a GPU when Triton imports, else ``chunked``. The
choice is made in :func:`resolve_backend` only; it can be forced per call (``backend=``; the
Vim modules pass the config key ``MODEL.VIM.SCAN_BACKEND``) or by the environment variable
``VIMDET_SCAN_BACKEND`` (which applies where ``auto`` was asked for). Inputs are checked here,
once per call, so the backend modules hold kernels and nothing else.

:func:`bidirectional_selective_scan` is Vim's two-direction scan over token-major tensors: one
launch per phase on ``triton``, two single-direction scans on flipped copies elsewhere.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._scan_common import check_inputs, check_walk_inputs
from .scan_chunked import scan_chunked
from .scan_mamba import INSTALL_HINT, cuda_kernel_available, scan_mamba
from .scan_reference import scan_reference
from .scan_triton import (
    TRITON_HINT,
    interpreting,
    scan_triton,
    scan_walk,
    scan_walk_recomputing_inputs,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "bidirectional_selective_scan",
    "bidirectional_selective_scan_recomputing",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_chunked",
    "resolve_backend",
    "cuda_kernel_available",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cuda", "chunked", "reference")
ENV_VAR = "VIMDET_SCAN_BACKEND"

_BACKEND_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "triton": scan_triton,
    "cuda": scan_mamba,
    "chunked": scan_chunked,
    "reference": scan_reference,
}
_logged_choices: set = set()


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
        name = "triton" if (triton_available() and device.type == "cuda") else "chunked"
        source = "auto"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(TRITON_HINT)
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"selective_scan: backend 'triton' needs tensors on a CUDA device, got {device} "
                "(TRITON_INTERPRET=1 runs it through Triton's CPU interpreter, for tests). Move "
                "the model and inputs to the GPU, or use backend='chunked' on this device."
            )
    if name == "cuda":
        if not cuda_kernel_available():
            raise RuntimeError(INSTALL_HINT)
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
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    scan = _BACKEND_FUNCTIONS[resolve_backend(backend, u.device)]
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def bidirectional_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    walk: Sequence[int] | None = None,
    backend: str = "auto",
) -> Tensor:
    """Vim's scan of both directions (Zhu et al., arXiv 2401.09417) over token-major tensors.

    Direction 0 walks the tokens in ``walk`` order (default row-major; see
    :func:`vimdet.ops.scan_triton.column_major_walk`), direction 1 walks them backwards. Each has
    its own parameters; both share the gate z. Any strides are read in place on ``triton``.

    Args:
        u, delta: (dirs, batch, L, E) with dirs = 1 or 2; delta before bias and softplus.
        A: (dirs, E, N). B, C: (dirs, batch, L, N). D, delta_bias: optional (dirs, E).
        z: optional (batch, L, E), applied as ``* silu(z)`` to each direction's output.
        delta_softplus: apply softplus to delta + delta_bias.
        walk: (start, inner, inner_stride, outer_stride), token = start + (p % inner) *
            inner_stride + (p // inner) * outer_stride for scan position p.
        backend: one of :data:`BACKENDS`.

    Returns:
        (batch, L, E) in u's dtype: the mean of the directions' outputs.
    """
    _check_scan_inputs(walk, u, delta, A, B, C, D, z, delta_bias)
    walk = None if walk is None else tuple(int(v) for v in walk)
    name = resolve_backend(backend, u.device)
    if name == "triton":
        return scan_walk(u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk)
    if torch.jit.is_tracing():  # one node in the trace: see _traced_scan_op
        walk = None if walk is None else list(walk)
        return _traced_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk, name)
    return _scan_directions(u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk, name)


def bidirectional_selective_scan_recomputing(
    make_inputs: Callable[..., tuple],
    tensors: Sequence[Tensor],
    z: Tensor | None = None,
    delta_softplus: bool = False,
    walk: Sequence[int] | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`bidirectional_selective_scan` of ``(u, delta, A, B, C, D, delta_bias) =
    make_inputs(*tensors)``, trading memory for a little compute where it can.

    When training on the ``triton`` backend, the scan's inputs are not kept for the backward pass:
    they are computed again there from ``tensors`` (in the Vim mixer, u and delta are two
    (2, batch, L, E) activations a block, recomputed by a conv and two thin matmuls). Everywhere
    else (other backends, no gradient, under ``torch.compile`` or ``torch.jit.trace``) this is the
    plain composition. ``make_inputs`` must give the same result each call (no randomness).

    Args:
        make_inputs: tensors -> (u, delta, A, B, C, D, delta_bias), as
            :func:`bidirectional_selective_scan` takes them (D and delta_bias may be None).
        tensors: every tensor that ``make_inputs`` differentiates through (inputs and weights).
        z, delta_softplus, walk, backend: as :func:`bidirectional_selective_scan`.
    """

    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if training and not tracing and resolve_backend(backend, tensors[0].device) == "triton":
        check = functools.partial(_check_scan_inputs, walk)
        return scan_walk_recomputing_inputs(make_inputs, tensors, z, delta_softplus, walk, check)
    u, delta, A, B, C, D, delta_bias = make_inputs(*tensors)
    return bidirectional_selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk, backend
    )


def _check_scan_inputs(
    walk: Sequence[int] | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """The checks of :func:`bidirectional_selective_scan` on the scan's inputs."""
    check_walk_inputs(u, delta, A, B, C, D, z, delta_bias)
    if walk is not None:  # the kernels index tokens by the walk: it must be a permutation
        _check_walk(tuple(int(v) for v in walk), u.shape[2])


def _scan_directions(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    walk: Sequence[int] | None,
    name: str,
) -> Tensor:
    """The scan of both directions on a single-direction backend ``name`` (not ``triton``): one
    scan per direction, on copies gathered in walk order. Inputs as
    :func:`bidirectional_selective_scan`, checked."""
    length = u.shape[2]
    scan = _BACKEND_FUNCTIONS[name]
    order = None if walk is None else _walk_positions(walk, length, u.device)
    orders = [order]
    if u.shape[0] == 2:
        orders.append((torch.arange(length, device=u.device) if order is None else order).flip(0))
    total = None
    for d, tokens in enumerate(orders):
        y = scan(
            _channel_major(u[d], tokens),
            _channel_major(delta[d], tokens),
            A[d],
            _channel_major(B[d], tokens),
            _channel_major(C[d], tokens),
            None if D is None else D[d],
            None if z is None else _channel_major(z, tokens),
            None if delta_bias is None else delta_bias[d],
            delta_softplus,
        ).transpose(1, 2)
        if tokens is not None:
            y = torch.empty_like(y).index_copy_(1, tokens, y)
        total = y.float() if total is None else total + y.float()
    return (total / u.shape[0]).to(u.dtype)


# Under ``torch.jit.trace`` (fvcore's FLOP and activation counts, TorchScript export), a scan on a
# single-direction backend is recorded as this one op instead of the backend's many small ops (or
# its autograd function, which the tracer records as an opaque ``prim::PythonOp``), just as the
# ``triton`` backend is one ``vimdet::scan_walk``. It runs the same backend on the same inputs, so
# what the model computes does not change; fvcore counts it with
# :func:`vimdet.ops.flops.scan_flop_jit`. Inference only (no autograd formula): tracing is.
_traced_scan_op = torch.library.custom_op(
    "vimdet::bidirectional_scan",
    _scan_directions,
    mutates_args=(),
    schema="(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? delta_bias, bool delta_softplus, int[]? walk, str name) -> Tensor",
)


@_traced_scan_op.register_fake
def _traced_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, walk, name):
    return u.new_empty(u.shape[1:])


def _channel_major(tensor: Tensor, tokens: Tensor | None) -> Tensor:
    """(batch, L, C) -> (batch, C, L), its tokens in ``tokens`` order (None: as stored)."""
    if tokens is not None:
        tensor = tensor.index_select(1, tokens)
    return tensor.transpose(1, 2)


@functools.lru_cache(maxsize=64)
def _check_walk(walk: tuple[int, int, int, int], length: int) -> None:
    """Raise ValueError unless ``walk`` visits each of ``length`` tokens exactly once."""
    start, inner, inner_stride, outer_stride = walk
    visited = (
        {start + (p % inner) * inner_stride + (p // inner) * outer_stride for p in range(length)}
        if inner > 0
        else set()
    )
    if visited != set(range(length)):
        raise ValueError(
            f"bidirectional_selective_scan: walk {walk} does not visit each of the {length} "
            "tokens once; use row_major_walk or column_major_walk"
        )


def _walk_positions(walk: Sequence[int], length: int, device: torch.device) -> Tensor:
    """The token visited at each scan position of a checked ``walk``."""
    start, inner, inner_stride, outer_stride = walk
    position = torch.arange(length, device=device)
    return start + (position % inner) * inner_stride + (position // inner) * outer_stride


def _with_input_checks(kernel: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``kernel`` called directly (not through :func:`selective_scan`), its inputs checked first."""
    signature = inspect.signature(kernel)

    @functools.wraps(kernel)
    def checked(*args, **kwargs) -> Tensor:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        softplus = inputs.pop("delta_softplus")
        check_inputs(**inputs)
        return kernel(**inputs, delta_softplus=softplus)

    return checked


#: The per-step recurrence (the ground truth for tests), with :func:`selective_scan`'s arguments.
selective_scan_reference = _with_input_checks(scan_reference)
#: The portable chunked backend, with :func:`selective_scan`'s arguments.
selective_scan_chunked = _with_input_checks(scan_chunked)
