"""Optimizer construction: layer-decayed parameter groups for Vim detectors."""

from .param_groups import build_vimdet_optimizer, is_no_weight_decay, vim_param_groups

__all__ = ["build_vimdet_optimizer", "is_no_weight_decay", "vim_param_groups"]
