"""Checkpoint files and ViMDet's checkpointer, strict about the Vim trunk's tensors.

What a released Vim file holds and how it maps onto the trunk is model knowledge; it lives in
:mod:`vimdet.modeling.vim_weights`. This module reads files and loads them into a detector.
"""

from __future__ import annotations

import logging
from typing import Dict

from detectron2.checkpoint import DetectionCheckpointer
from torch import Tensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from vimdet.modeling.vim_weights import (
    TRUNK_PREFIX,
    convert_vim_state_dict,
    fit_trunk_state,
    is_released_vim_state,
    trunk_tensors,
)

from .io import load_checkpoint, state_dict_of
from .safety import SafeCheckpointerMixin

__all__ = ["VimDetCheckpointer", "load_checkpoint_file"]

logger = logging.getLogger(__name__)


def load_checkpoint_file(path: str) -> Dict[str, Tensor]:
    """Read a .pth file safely (see :mod:`vimdet.checkpoint.io`) and return its state dict."""
    return state_dict_of(load_checkpoint(path), path)


class VimDetCheckpointer(SafeCheckpointerMixin, DetectionCheckpointer):
    """Detectron2's checkpointer, strict about the Vim trunk: the one way weights get in.

    - Trunk tensors of the wrong shape are an error: Detectron2 would skip them with a warning
      and silently train, say, a Vim-B detector from a Vim-T checkpoint.
    - A released Vim classification file given as MODEL.WEIGHTS is converted on the fly (its
      keys have no ``backbone.net.`` prefix, so Detectron2 would load none of them).
    - The position grid is resized (with a log line) when only its size differs.
    - Files are read without running code, saved atomically, resumed with a fallback, and the
      trunk must be complete (:class:`~vimdet.checkpoint.safety.SafeCheckpointerMixin`).
    """

    def _load_model(self, checkpoint):
        model = self.model.module if hasattr(self.model, "module") else self.model
        net = getattr(getattr(model, "backbone", None), "net", None)
        weights = checkpoint.get("model")
        if net is not None and isinstance(weights, dict):
            # What fvcore does before matching, so that .pkl (numpy) and DDP-saved files are
            # checked like the rest.
            self._convert_ndarray_to_tensor(weights)
            consume_prefix_in_state_dict_if_present(weights, "module.")
            if is_released_vim_state(weights):
                trunk, report = convert_vim_state_dict(weights, expected_dim=net.embed_dim)
                logger.info(
                    "MODEL.WEIGHTS is a released Vim checkpoint: converted it, dropping %s",
                    ", ".join(report["dropped"]) or "nothing",
                )
                weights = {TRUNK_PREFIX + key: value for key, value in trunk.items()}
                checkpoint["model"] = weights
            fitted = fit_trunk_state(trunk_tensors(weights), net, "loading MODEL.WEIGHTS")
            self.check_trunk_complete(fitted, net)
            weights.update({TRUNK_PREFIX + key: value for key, value in fitted.items()})
        return super()._load_model(checkpoint)
