"""Optimizer parameter groups for ViTDet-style fine-tuning of a Vim detector.

Detectron2's ``get_default_optimizer_params`` builds the groups, with a layer-wise learning-rate
decay (Clark et al. 2020; ViTDet, arXiv 2203.16527) as its ``lr_factor_func``: the patch embedding
and position grid get ``decay ** (depth + 1)``, block i (0-based) gets ``decay ** (depth - i)``,
everything outside the trunk gets 1 (:func:`vimdet.modeling.vim_lr_decay_rate`). No weight decay
for biases, norm layers (Detectron2's and its channel ``LayerNorm``) and the parameters flagged
``_no_weight_decay`` by their module (``pos_embed``, ``A_log``, ``D``, the RMSNorm weights).
"""

from __future__ import annotations

import functools
from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.layers.batch_norm import LayerNorm
from detectron2.solver.build import (
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)
from torch import nn

from vimdet.modeling import TRUNK_PREFIX, vim_lr_decay_rate

__all__ = ["is_no_weight_decay", "vim_param_groups", "build_vimdet_optimizer"]


def is_no_weight_decay(param: nn.Parameter) -> bool:
    """Whether the module that owns ``param`` flagged it ``_no_weight_decay`` (mamba-ssm's flag)."""
    return getattr(param, "_no_weight_decay", False)


def vim_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    layer_decay: float,
    depth: int,
    prefix: str = TRUNK_PREFIX,
) -> List[Dict]:
    """Group trainable parameters by (lr, weight decay); one dict per group."""
    groups = get_default_optimizer_params(
        model,
        base_lr=base_lr,
        weight_decay=weight_decay,
        weight_decay_norm=0.0,
        weight_decay_bias=0.0,
        lr_factor_func=functools.partial(
            vim_lr_decay_rate, depth=depth, layer_decay=layer_decay, prefix=prefix
        ),
    )
    # Detectron2 knows torch's norm types by class; its own channel LayerNorm (the pyramid's
    # and the box head's "LN") and the flagged parameters join the no-decay groups here.
    no_decay = {p for m in model.modules() if isinstance(m, LayerNorm) for p in m.parameters()}
    no_decay |= {p for p in model.parameters() if is_no_weight_decay(p)}
    split = []
    for group in groups:
        for params, decay in (
            ([p for p in group["params"] if p not in no_decay], group["weight_decay"]),
            ([p for p in group["params"] if p in no_decay], 0.0),
        ):
            if params:
                split.append({**group, "params": params, "weight_decay": decay})
    return reduce_param_groups(split)


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
