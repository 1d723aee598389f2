"""Modeling: the Vim trunk, its feature pyramid and what is known about Vim weights.

Importing this package registers the ``build_vim_fpn_backbone`` backbone.
"""

from .backbone import VimFeaturePyramid, build_vim_fpn_backbone, vim_trunk_kwargs
from .vim import VIM_SIZES, BiMambaMixer, RMSNorm, VimBlock, VisionMamba, resize_pos_embed
from .vim_weights import (
    TRUNK_PREFIX,
    convert_vim_state_dict,
    fit_trunk_state,
    is_released_vim_state,
    trunk_tensors,
    vim_layer_id,
    vim_lr_decay_rate,
)

__all__ = [
    "TRUNK_PREFIX",
    "VIM_SIZES",
    "BiMambaMixer",
    "RMSNorm",
    "VimBlock",
    "VimFeaturePyramid",
    "VisionMamba",
    "build_vim_fpn_backbone",
    "convert_vim_state_dict",
    "fit_trunk_state",
    "is_released_vim_state",
    "resize_pos_embed",
    "trunk_tensors",
    "vim_layer_id",
    "vim_lr_decay_rate",
    "vim_trunk_kwargs",
]
