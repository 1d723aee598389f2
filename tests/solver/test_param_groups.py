"""Layer-wise learning-rate decay and the no-weight-decay set."""

import pytest
import torch
from detectron2.config import get_cfg

import vimdet  # noqa: F401
from vimdet import add_vimdet_config
from vimdet.modeling import VimFeaturePyramid, VisionMamba, vim_layer_id
from vimdet.solver import build_vimdet_optimizer, vim_param_groups


class TinyDetector(torch.nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        net = VisionMamba(embed_dim=16, depth=depth, out_blocks=(depth,))
        self.backbone = VimFeaturePyramid(net, in_blocks=(depth,), strides=(16,), out_channels=8)
        self.head = torch.nn.Linear(8, 2)
        self.head_norm = torch.nn.GroupNorm(2, 8)


def test_layer_ids():
    assert vim_layer_id("backbone.net.patch_embed.proj.weight", 24) == 0
    assert vim_layer_id("backbone.net.pos_embed", 24) == 0
    assert vim_layer_id("backbone.net.layers.0.mixer.in_proj.weight", 24) == 1
    assert vim_layer_id("backbone.net.layers.23.norm.weight", 24) == 24
    assert vim_layer_id("backbone.stages.0.1.weight", 24) == 25
    assert vim_layer_id("roi_heads.box_predictor.cls_score.weight", 24) == 25


def test_groups_scale_and_decay():
    model = TinyDetector(depth=3)
    groups = vim_param_groups(model, base_lr=1.0, weight_decay=0.1, layer_decay=0.5, depth=3)
    settings = {}
    for group in groups:
        for param in group["params"]:
            settings[id(param)] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert len(settings) == len(named)  # every parameter exactly once

    def lr_and_decay(name):
        return settings[id(named[name])]

    assert lr_and_decay("backbone.net.pos_embed") == (pytest.approx(0.5**4), 0.0)
    assert lr_and_decay("backbone.net.patch_embed.proj.weight") == (pytest.approx(0.5**4), 0.1)
    assert lr_and_decay("backbone.net.layers.0.mixer.in_proj.weight") == (0.5**3, 0.1)
    assert lr_and_decay("backbone.net.layers.2.mixer.out_proj.weight") == (0.5, 0.1)
    for no_decay in ("A_log", "A_b_log", "D", "D_b", "conv1d.bias", "dt_proj.bias"):
        assert lr_and_decay(f"backbone.net.layers.1.mixer.{no_decay}") == (0.5**2, 0.0)
    assert lr_and_decay("backbone.net.layers.1.norm.weight")[1] == 0.0
    assert lr_and_decay("backbone.stages.0.0.norm.weight") == (1.0, 0.0)  # the pyramid's LN
    assert lr_and_decay("backbone.stages.0.0.weight") == (1.0, 0.1)
    assert lr_and_decay("head_norm.weight") == (1.0, 0.0)
    assert lr_and_decay("head.weight") == (1.0, 0.1)
    assert lr_and_decay("head.bias") == (1.0, 0.0)


def test_optimizer_from_config_clips_full_model_norm():
    cfg = get_cfg()
    add_vimdet_config(cfg)
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    model = TinyDetector()
    optimizer = build_vimdet_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    for param in model.parameters():
        param.grad = torch.full_like(param, 100.0)
    optimizer.step()
    total = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total == pytest.approx(1.0, rel=1e-4)
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="use ADAMW or SGD"):
        build_vimdet_optimizer(cfg, model)
