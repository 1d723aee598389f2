"""Datasets for ViMDet.

Importing this package registers the built-in synthetic ``vimdet_shapes_*`` datasets in
Detectron2's catalogs (registration only; their files are generated on first use).
COCO itself uses Detectron2's own built-in registrations (``coco_2017_train``, ...).
"""

from .checks import CheckedDatasetMapper, explain_dataset_errors
from .shapes import (
    SHAPES_CLASSES,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    register_builtin_shapes,
    register_shapes_dataset,
)

__all__ = [
    "CheckedDatasetMapper",
    "explain_dataset_errors",
    "SHAPES_CLASSES",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "register_builtin_shapes",
    "register_shapes_dataset",
]

register_builtin_shapes()
