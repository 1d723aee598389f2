"""Checkpoint files and ViMDet's checkpointer, strict about the Vim trunk's tensors.

What a released Vim file holds and how it maps onto the trunk is model knowledge; it lives in
:mod:`vimdet.modeling.vim_weights`. This module reads files and loads them into a detector.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

from detectron2.checkpoint import DetectionCheckpointer
from torch import Tensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from vimdet.modeling.vim_weights import (
    TRUNK_PREFIX,
    adapt_trunk_to_options,
    convert_vim_state_dict,
    fit_trunk_state,
    is_released_vim_state,
    trunk_tensors,
)

from .io import load_checkpoint, state_dict_of
from .safety import SafeCheckpointerMixin, describe_keys_by_block

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
    - A Vim trunk loaded into a trunk with the options of docs/trunk_options.md fills the cross
      route's column parameters from the row routes' and leaves the attention blocks' weights
      new (:func:`~vimdet.modeling.vim_weights.adapt_trunk_to_options`), each logged.
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
            trunk, options = adapt_trunk_to_options(trunk_tensors(weights), net)
            _log_trunk_options(options)
            for key in options["dropped"]:
                del weights[TRUNK_PREFIX + key]
            fitted = fit_trunk_state(trunk, net, "loading MODEL.WEIGHTS")
            self.check_trunk_complete(fitted, net, newly_initialised=options["new"])
            weights.update({TRUNK_PREFIX + key: value for key, value in fitted.items()})
        return super()._load_model(checkpoint)


def _log_trunk_options(options: Dict[str, Any]) -> None:
    """Log what :func:`adapt_trunk_to_options` filled, dropped and left newly initialised."""
    if options["filled"]:
        pairs = sorted(
            {(k.split(".mixer.")[1], v.split(".mixer.")[1]) for k, v in options["filled"].items()}
        )
        logger.info(
            "MODEL.WEIGHTS has no column-route tensors for MODEL.VIM.SCAN_ROUTES 'cross': filled "
            "%s from the row routes' (%s)",
            describe_keys_by_block(options["filled"]),
            ", ".join(f"{column} <- {row}" for column, row in pairs),
        )
    if options["dropped"]:
        logger.info(
            "MODEL.WEIGHTS: dropped the Mamba mixer tensors of the attention blocks "
            "(MODEL.VIM.ATTENTION_BLOCKS): %s",
            describe_keys_by_block(options["dropped"]),
        )
    if options["new"]:
        logger.info(
            "MODEL.WEIGHTS: newly initialised (MODEL.VIM.ATTENTION_BLOCKS): %s",
            describe_keys_by_block(options["new"]),
        )
