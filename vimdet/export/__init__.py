"""A ViMDet detector for deployment: ``torch.export`` programs and ONNX at a fixed input size
(:mod:`vimdet.export.programs`), through an inference path without data-dependent Python
branches (:mod:`vimdet.export.inference`)."""

from vimdet.export.inference import export_inference
from vimdet.export.programs import (
    EXPORTABLE_BACKENDS,
    ONNX_BACKENDS,
    check_export_backend,
    check_export_size,
    detector_adapter,
    export_backbone,
    export_detector,
    fixed_size_inference,
    instances_from_outputs,
    onnx_translations,
    scan_backends,
    trace_detector,
)

__all__ = [
    "EXPORTABLE_BACKENDS",
    "ONNX_BACKENDS",
    "check_export_backend",
    "check_export_size",
    "detector_adapter",
    "export_backbone",
    "export_detector",
    "export_inference",
    "fixed_size_inference",
    "instances_from_outputs",
    "onnx_translations",
    "scan_backends",
    "trace_detector",
]
