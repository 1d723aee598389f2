"""Config keys of ViMDet."""

from .defaults import add_vimdet_config

__all__ = ["add_vimdet_config"]
