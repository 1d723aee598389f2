"""Detectron2's conv ROI heads with their channel LayerNorms fused, registered with Detectron2.

ViTDet's Cascade recipe (Li et al., arXiv 2203.16527) puts a channel LayerNorm ("LN") after each
of the box head's four 3x3 convs, on (ROIs, 256, 7, 7) maps: 1000 ROIs an image at test time, 512
in training, in each of three stages. Detectron2's ``LayerNorm`` is five element-wise passes in
Python; :class:`ChannelLayerNorm` is one fused kernel (:func:`vimdet.ops.channel_layer_norm`, its
backend ``auto``: Triton on a GPU) with the same parameters, so these heads load the same
checkpoints as Detectron2's.
"""

from __future__ import annotations

from detectron2.layers.batch_norm import LayerNorm
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    FastRCNNConvFCHead,
    MaskRCNNConvUpsampleHead,
)
from torch import nn

from .backbone import ChannelLayerNorm

__all__ = ["FusedNormConvFCHead", "FusedNormMaskHead", "fuse_channel_layer_norms"]


def fuse_channel_layer_norms(module: nn.Module) -> int:
    """Replace every Detectron2 ``LayerNorm`` inside ``module`` by a :class:`ChannelLayerNorm`
    with the same parameters (names, values) and eps; returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LayerNorm):
                fused = ChannelLayerNorm(child.weight.shape[0], eps=child.eps)
                fused.load_state_dict(child.state_dict())
                fused.to(child.weight.device, child.weight.dtype)
                setattr(parent, name, fused)
                replaced += 1
    return replaced


@ROI_BOX_HEAD_REGISTRY.register()
class FusedNormConvFCHead(FastRCNNConvFCHead):
    """Detectron2's ``FastRCNNConvFCHead`` (``MODEL.ROI_BOX_HEAD``: convs, then FCs) with its "LN"
    norms fused by :func:`fuse_channel_layer_norms`; takes the same config keys and checkpoints."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fuse_channel_layer_norms(self)


@ROI_MASK_HEAD_REGISTRY.register()
class FusedNormMaskHead(MaskRCNNConvUpsampleHead):
    """Detectron2's ``MaskRCNNConvUpsampleHead`` (``MODEL.ROI_MASK_HEAD``) with its "LN" norms
    fused by :func:`fuse_channel_layer_norms`; takes the same config keys and checkpoints."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fuse_channel_layer_norms(self)
