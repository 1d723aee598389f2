"""Ops: the selective scan, one dispatcher over its Triton, CUDA, chunked and reference backends,
the mixer's depthwise convolutions of both directions, its projections whose backward GEMMs add
gradients in place, the blocks' residual add + RMSNorm, the pyramid's channel LayerNorm, and NMS
as an op with an exact fake kernel (for the exported detector)."""

from .conv import conv_both_directions
from .nms import nms
from .norm import (
    add_rms_norm,
    add_rms_norm_reference,
    channel_layer_norm,
    channel_layer_norm_reference,
)
from .projection import project_in_parts, project_sharing_input
from .scan_mamba import cuda_kernel_available
from .scan_triton import column_major_walk, row_major_walk, triton_available
from .selective_scan import (
    BACKENDS,
    ENV_VAR,
    bidirectional_selective_scan,
    bidirectional_selective_scan_recomputing,
    resolve_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "add_rms_norm_reference",
    "ENV_VAR",
    "bidirectional_selective_scan",
    "bidirectional_selective_scan_recomputing",
    "channel_layer_norm",
    "channel_layer_norm_reference",
    "column_major_walk",
    "conv_both_directions",
    "cuda_kernel_available",
    "nms",
    "project_in_parts",
    "project_sharing_input",
    "resolve_backend",
    "row_major_walk",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
    "triton_available",
]
