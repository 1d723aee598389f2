"""ViMDet: Vision Mamba backbones for Detectron2 detectors.

``import vimdet`` registers the ``build_vim_fpn_backbone`` backbone in Detectron2's
``BACKBONE_REGISTRY``, the built-in ``vimdet_shapes_*`` datasets in its ``DatasetCatalog`` and
the ``vimdet://`` paths of the shipped weights in its ``PathManager``; :func:`add_vimdet_config`
adds ViMDet's config keys.
"""

__version__ = "0.1.0"

from . import data, model_zoo, modeling  # noqa: F401  (imported for registration)
from .config import add_vimdet_config

__all__ = ["__version__", "add_vimdet_config"]
