"""Optimizer parameter groups for ViTDet-style fine-tuning of a Vim detector.

Layer-wise learning-rate decay (Clark et al. 2020; ViTDet, arXiv 2203.16527): the patch
embedding and position grid get ``decay ** (depth + 1)``, block i (0-based) gets
``decay ** (depth - i)``, everything outside the trunk gets 1. No weight decay for norms, biases,
``pos_embed`` and the SSM parameters ``A_log``, ``A_b_log``, ``D`` and ``D_b``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

from vimdet.checkpoint import TRUNK_PREFIX

__all__ = ["vim_layer_id", "is_no_weight_decay", "vim_param_groups", "build_vimdet_optimizer"]

_NO_DECAY_NAMES = ("pos_embed", "A_log", "A_b_log")


def vim_layer_id(name: str, depth: int, prefix: str = TRUNK_PREFIX) -> int:
    """0 for the trunk's stem, i + 1 for ``layers.{i}``, depth + 1 for everything else."""
    if not name.startswith(prefix):
        return depth + 1
    local = name[len(prefix) :]
    if local.startswith(("patch_embed.", "pos_embed")):
        return 0
    if local.startswith("layers."):
        return int(local.split(".")[1]) + 1
    return depth + 1


def is_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases, D/D_b (all 1-D), pos_embed, A_log and A_b_log."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES


def vim_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    layer_decay: float,
    depth: int,
    prefix: str = TRUNK_PREFIX,
) -> List[Dict]:
    """Group trainable parameters by (lr scale, weight decay); one dict per group."""
    groups: Dict[Tuple[float, float], Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = layer_decay ** (depth + 1 - vim_layer_id(name, depth, prefix))
        decay = 0.0 if is_no_weight_decay(name, param) else weight_decay
        group = groups.setdefault(
            (scale, decay),
            {"params": [], "lr": base_lr * scale, "weight_decay": decay},
        )
        group["params"].append(param)
    return list(groups.values())


def _with_full_model_clipping(optimizer_cls: type, max_norm: float, norm_type: float) -> type:
    """Subclass ``optimizer_cls`` so that ``step`` first clips the norm of all gradients."""

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradientClipping.__name__ = f"{optimizer_cls.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_vimdet_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`vim_param_groups`, with gradient clipping.

    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` may be Detectron2's per-parameter "value" or "norm", or
    "full_model": one norm over all gradients (as in DETR-style recipes). Weight decay and
    learning rates come from :func:`vim_param_groups`; Detectron2's WEIGHT_DECAY_NORM,
    WEIGHT_DECAY_BIAS and BIAS_LR_FACTOR are not used.
    """
    inner = model.module if hasattr(model, "module") else model
    depth = len(inner.backbone.net.layers)
    groups = vim_param_groups(
        inner, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.LAYER_DECAY, depth
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {"betas": tuple(cfg.SOLVER.BETAS)}
    elif name == "SGD":
        optimizer_cls = torch.optim.SGD
        kwargs = {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER {cfg.SOLVER.OPTIMIZER!r} is unknown; use ADAMW or SGD")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
    return optimizer_cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
