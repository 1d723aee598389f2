"""The ``cuda`` backend: mamba-ssm's fused CUDA kernel ``selective_scan_fn``, when installed.

mamba-ssm compiles CUDA code at install time, so it is optional: where it does not import,
:func:`cuda_kernel_available` is False and asking for this backend raises :data:`INSTALL_HINT`.
"""

from __future__ import annotations

from torch import Tensor

try:  # Optional: compiled CUDA code, only present where `pip install vimdet[cuda]` succeeded.
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan
except ImportError:
    _mamba_selective_scan = None

__all__ = ["INSTALL_HINT", "cuda_kernel_available", "scan_mamba"]

INSTALL_HINT = (
    "The 'cuda' selective-scan backend needs mamba-ssm, which is not importable here. On a machine "
    "with a CUDA GPU and nvcc, install it with `pip install -e .[cuda]` (or "
    "`pip install mamba-ssm --no-build-isolation`), or choose another backend: "
    "backend='chunked', MODEL.VIM.SCAN_BACKEND chunked, or VIMDET_SCAN_BACKEND=chunked."
)


def cuda_kernel_available() -> bool:
    """Whether mamba-ssm's CUDA selective scan could be imported."""
    return _mamba_selective_scan is not None


def scan_mamba(
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
    """mamba-ssm's kernel on CUDA tensors; it wants contiguous inputs and fp32 A, D, delta_bias.

    Arguments, shapes and result as :func:`vimdet.ops.selective_scan`, which checks the inputs.
    """
    if _mamba_selective_scan is None:
        raise RuntimeError(INSTALL_HINT)
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
