"""Config keys of ViMDet, and the checked config its tools run with."""

from .build import build_cfg
from .defaults import add_vimdet_config

__all__ = ["add_vimdet_config", "build_cfg"]
