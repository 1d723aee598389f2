"""Checkpoints: reading checkpoint files, and a checkpointer strict about trunk shapes."""

from .vim_checkpoint import VimDetCheckpointer, load_checkpoint_file

__all__ = ["VimDetCheckpointer", "load_checkpoint_file"]
