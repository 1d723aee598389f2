"""Checkpoint files and ViMDet's checkpointer, strict about the Vim trunk's tensors.

What a released Vim file holds and how it maps onto the trunk is model knowledge; it lives in
:mod:`vimdet.modeling.vim_weights`. This module reads files and loads them into a detector.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Dict, Mapping

import torch
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

__all__ = ["VimDetCheckpointer", "load_checkpoint_file"]

logger = logging.getLogger(__name__)


def load_checkpoint_file(path: str) -> Dict[str, Tensor]:
    """Read a .pth/.pkl file and return its state dict (the ``model`` entry if there is one).

    Released Vim files also pickle their training arguments, so the file is fully unpickled:
    load only files you trust.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} does not exist; give the path of a Vim "
            ".pth file (e.g. vim_t_midclstok_76p1acc.pth)"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"checkpoint {path!r} could not be read by torch.load ({error}); is it a "
            "complete PyTorch checkpoint file?"
        ) from error
    if isinstance(content, Mapping) and isinstance(content.get("model"), Mapping):
        content = content["model"]
    if not isinstance(content, Mapping):
        raise ValueError(f"checkpoint {path!r} holds a {type(content).__name__}, not a state dict")
    return dict(content)


class VimDetCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer, strict about the Vim trunk: the one way weights get in.

    - Trunk tensors of the wrong shape are an error: Detectron2 would skip them with a warning
      and silently train, say, a Vim-B detector from a Vim-T checkpoint.
    - A released Vim classification file given as MODEL.WEIGHTS is converted on the fly (its
      keys have no ``backbone.net.`` prefix, so Detectron2 would load none of them).
    - The position grid is resized (with a log line) when only its size differs.
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
            weights.update({TRUNK_PREFIX + key: value for key, value in fitted.items()})
        return super()._load_model(checkpoint)
