"""Ops: the selective scan with its CUDA, chunked and reference backends."""

from .selective_scan import (
    BACKENDS,
    ENV_VAR,
    cuda_kernel_available,
    resolve_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "cuda_kernel_available",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]
