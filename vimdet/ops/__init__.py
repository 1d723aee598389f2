"""Ops: the selective scan, one dispatcher over its CUDA, chunked and reference backends."""

from .scan_mamba import cuda_kernel_available
from .selective_scan import (
    BACKENDS,
    ENV_VAR,
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
