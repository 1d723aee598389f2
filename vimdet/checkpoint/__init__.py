"""Checkpoints: released Vim weights -> ViMDet, and a checkpointer strict about trunk shapes."""

from .vim_checkpoint import (
    TRUNK_PREFIX,
    VimDetCheckpointer,
    convert_vim_state_dict,
    load_checkpoint_file,
    load_vim_trunk,
)

__all__ = [
    "TRUNK_PREFIX",
    "VimDetCheckpointer",
    "convert_vim_state_dict",
    "load_checkpoint_file",
    "load_vim_trunk",
]
