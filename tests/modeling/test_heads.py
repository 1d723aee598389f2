"""The ROI heads with fused channel LayerNorms against Detectron2's own heads: registered, built
from the same config keys, the same checkpoint keys, and equal outputs and gradients."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.layers.batch_norm import LayerNorm
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    FastRCNNConvFCHead,
    MaskRCNNConvUpsampleHead,
)

import vimdet  # noqa: F401
from vimdet import add_vimdet_config
from vimdet.modeling import ChannelLayerNorm, FusedNormConvFCHead, FusedNormMaskHead


def head_cfg():
    cfg = get_cfg()
    add_vimdet_config(cfg)
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 2, 16
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC, cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 1, 32
    cfg.MODEL.ROI_BOX_HEAD.NORM = "LN"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV, cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 2, 16
    cfg.MODEL.ROI_MASK_HEAD.NORM = "LN"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    return cfg


@pytest.mark.parametrize(
    "registry, fused_cls, detectron2_cls, size",
    [
        (ROI_BOX_HEAD_REGISTRY, FusedNormConvFCHead, FastRCNNConvFCHead, 7),
        (ROI_MASK_HEAD_REGISTRY, FusedNormMaskHead, MaskRCNNConvUpsampleHead, 14),
    ],
)
def test_fused_head_equals_detectron2s_head(registry, fused_cls, detectron2_cls, size):
    assert registry.get(fused_cls.__name__) is fused_cls
    torch.manual_seed(0)
    shape = ShapeSpec(channels=8, height=size, width=size)
    reference, fused = detectron2_cls(head_cfg(), shape), fused_cls(head_cfg(), shape)
    assert sum(isinstance(m, LayerNorm) for m in reference.modules()) == 2
    assert not any(isinstance(m, LayerNorm) for m in fused.modules())
    assert sum(isinstance(m, ChannelLayerNorm) for m in fused.modules()) == 2
    # Same checkpoint keys; loaded both ways. Norm parameters away from 1 and 0, or the norm's
    # affine part would test nothing.
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.normal_()
    fused.load_state_dict(reference.state_dict())
    reference.load_state_dict(fused.state_dict())
    rois = torch.randn(5, 8, size, size)
    outputs = []
    for head in (reference, fused):
        x = rois.clone().requires_grad_()
        if isinstance(head, MaskRCNNConvUpsampleHead):
            out = head.layers(x)
        else:
            out = head(x)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads = torch.autograd.grad((out * weights).sum(), [x, *head.parameters()])
        outputs.append((out, grads))
    (expected, expected_grads), (actual, actual_grads) = outputs
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
