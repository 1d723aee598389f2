"""A checked, frozen config for ViMDet's command-line tools, with clear errors for bad input."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from detectron2.config import CfgNode, get_cfg

from .defaults import add_vimdet_config
from .overrides import check_overrides, explain_merge_error

__all__ = ["build_cfg"]

logger = logging.getLogger(__name__)


def build_cfg(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """get_cfg + ViMDet keys + the file + ``KEY VALUE`` overrides, checked; returns it frozen.

    Raises FileNotFoundError for a missing file; yacs's KeyError/AssertionError for an unknown
    key (with the closest keys) and ValueError for a wrong type, naming the source; ValueError for
    a flag among the overrides, a key without a value, a CUDA device without CUDA or an unknown
    AMP dtype. AMP is turned off (with a warning) on the CPU, where Detectron2's AMPTrainer cannot
    run.
    """
    cfg = get_cfg()
    add_vimdet_config(cfg)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"config file {config_file!r} does not exist; the configs ship in "
            "configs/ (e.g. configs/cascade_vim_t.yaml)"
        )
    check_overrides(opts)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as error:  # yacs: unknown key, wrong type
        raise explain_merge_error(error, cfg, config_file) from error
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but this machine has no usable "
            "CUDA GPU; add `MODEL.DEVICE cpu` to the command line"
        )
    if cfg.SOLVER.AMP.DTYPE not in ("bfloat16", "float16"):
        raise ValueError(
            f"SOLVER.AMP.DTYPE {cfg.SOLVER.AMP.DTYPE!r} is unknown; use bfloat16 or float16"
        )
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        logger.warning(
            "SOLVER.AMP.ENABLED needs a CUDA device; training in fp32 on %s", cfg.MODEL.DEVICE
        )
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    return cfg
