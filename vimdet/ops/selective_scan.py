"""Mamba's selective scan (Gu & Dao, arXiv 2312.00752, Alg. 2): one entry point, many backends.

For every batch b, channel d and state n, with ``delta`` after its bias and softplus::

    h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t]
    y[t] = sum_n C[t] * h[t] + D * u[t]          then   y[t] *= silu(z[t])

Backends, all with mamba-ssm's argument order, shapes and semantics, each in its own module:

- ``cuda`` (:mod:`.scan_mamba`): mamba-ssm's fused CUDA kernel; GPU tensors, mamba-ssm installed.
- ``chunked`` (:mod:`.scan_chunked`): this project's portable scan in plain PyTorch (any device).
- ``reference`` (:mod:`.scan_reference`): the plain per-step recurrence, for tests.

``auto`` is ``cuda`` when mamba-ssm imports and the tensors are on a GPU, else ``chunked``. The
choice is made in :func:`resolve_backend` only; it can be forced per call (``backend=``; the
Vim modules pass the config key ``MODEL.VIM.SCAN_BACKEND``) or by the environment variable
``VIMDET_SCAN_BACKEND`` (which applies where ``auto`` was asked for). Inputs are checked here,
once per call, so the backend modules hold kernels and nothing else.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Callable

import torch
from torch import Tensor

from ._scan_common import check_inputs
from .scan_chunked import scan_chunked
from .scan_mamba import INSTALL_HINT, cuda_kernel_available, scan_mamba
from .scan_reference import scan_reference

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

_BACKEND_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
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
        name = "cuda" if (cuda_kernel_available() and device.type == "cuda") else "chunked"
        source = "auto"
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
