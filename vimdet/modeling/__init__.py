"""Modeling: the Vim trunk and its feature pyramid (importing this registers the backbone)."""

from .backbone import VimFeaturePyramid, build_vim_fpn_backbone, vim_trunk_kwargs
from .vim import VIM_SIZES, BiMambaMixer, RMSNorm, VimBlock, VisionMamba, resize_pos_embed

__all__ = [
    "VIM_SIZES",
    "BiMambaMixer",
    "RMSNorm",
    "VimBlock",
    "VimFeaturePyramid",
    "VisionMamba",
    "build_vim_fpn_backbone",
    "resize_pos_embed",
    "vim_trunk_kwargs",
]
