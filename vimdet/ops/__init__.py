"""Ops: the selective scan, one dispatcher over its Triton, CUDA, chunked and reference backends."""

from .scan_mamba import cuda_kernel_available
from .scan_triton import column_major_walk, row_major_walk, triton_available
from .selective_scan import (
    BACKENDS,
    ENV_VAR,
    bidirectional_selective_scan,
    resolve_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "bidirectional_selective_scan",
    "column_major_walk",
    "cuda_kernel_available",
    "resolve_backend",
    "row_major_walk",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
    "triton_available",
]
