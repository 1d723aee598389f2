"""Modeling: the Vim trunk, its feature pyramid, the ROI heads with fused norms and what is known
about Vim weights.

Importing this package registers the ``build_vim_fpn_backbone`` backbone and the
``FusedNormConvFCHead`` box and ``FusedNormMaskHead`` mask heads.
"""

from .backbone import (
    ChannelLayerNorm,
    VimFeaturePyramid,
    build_vim_fpn_backbone,
    vim_trunk_kwargs,
)
from .heads import FusedNormConvFCHead, FusedNormMaskHead, fuse_channel_layer_norms
from .vim import (
    SCAN_ROUTES,
    VIM_SIZES,
    AttentionMixer,
    BiMambaMixer,
    RMSNorm,
    VimBlock,
    VisionMamba,
    resize_pos_embed,
)
from .vim_weights import (
    TRUNK_PREFIX,
    adapt_trunk_to_options,
    convert_vim_state_dict,
    fit_trunk_state,
    is_released_vim_state,
    trunk_tensors,
    vim_layer_id,
    vim_lr_decay_rate,
)

__all__ = [
    "SCAN_ROUTES",
    "TRUNK_PREFIX",
    "VIM_SIZES",
    "AttentionMixer",
    "BiMambaMixer",
    "ChannelLayerNorm",
    "FusedNormConvFCHead",
    "FusedNormMaskHead",
    "RMSNorm",
    "VimBlock",
    "VimFeaturePyramid",
    "VisionMamba",
    "adapt_trunk_to_options",
    "build_vim_fpn_backbone",
    "convert_vim_state_dict",
    "fit_trunk_state",
    "fuse_channel_layer_norms",
    "is_released_vim_state",
    "resize_pos_embed",
    "trunk_tensors",
    "vim_layer_id",
    "vim_lr_decay_rate",
    "vim_trunk_kwargs",
]
