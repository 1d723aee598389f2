"""Released Vim classification checkpoints -> ViMDet trunk weights, and a strict checkpointer.

A released file holds ``{"model": state_dict}`` with 415 tensors (for 24 blocks): the trunk,
``cls_token``, ``pos_embed`` with the class row in the middle of the sequence (row M // 2 of
M + 1), ``norm_f`` and the classifier ``head``. The detector keeps the trunk, drops the class
token, its position row, ``norm_f`` and ``head``, and keeps the position grid (resized to each
input's token grid at run time).
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from vimdet.modeling.vim import resize_pos_embed

from .io import load_checkpoint, state_dict_of
from .safety import SafeCheckpointerMixin, released_layout_problems

__all__ = [
    "TRUNK_PREFIX",
    "VimDetCheckpointer",
    "convert_vim_state_dict",
    "load_checkpoint_file",
    "load_vim_trunk",
]

logger = logging.getLogger(__name__)

# Where the trunk lives inside the detector: GeneralizedRCNN.backbone (VimFeaturePyramid).net.
TRUNK_PREFIX = "backbone.net."
_DROPPED_PREFIXES = ("head.", "norm_f.", "cls_token")
_REQUIRED_KEYS = (
    "patch_embed.proj.weight",
    "pos_embed",
    "layers.0.mixer.in_proj.weight",
    "layers.0.mixer.A_b_log",
)


def load_checkpoint_file(path: str) -> Dict[str, Tensor]:
    """Read a .pth file safely (see :mod:`vimdet.checkpoint.io`) and return its state dict."""
    return state_dict_of(load_checkpoint(path), path)


def _split_cls_row(pos_embed: Tensor) -> Tuple[Tensor, bool]:
    """Return the (1, M, C) patch rows of a (1, M or M+1, C) pos_embed and whether a row was cut."""
    rows = pos_embed.shape[1]
    if math.isqrt(rows) ** 2 == rows:
        return pos_embed, False
    patches = rows - 1
    if math.isqrt(patches) ** 2 != patches:
        raise ValueError(
            f"pos_embed has {rows} rows: neither a square grid nor a square grid plus "
            "one class-token row; this is not a Vim checkpoint ViMDet can convert"
        )
    middle = patches // 2
    return torch.cat([pos_embed[:, :middle], pos_embed[:, middle + 1 :]], dim=1), True


def convert_vim_state_dict(
    state_dict: Mapping[str, Tensor], expected_dim: int | None = None
) -> Tuple[Dict[str, Tensor], Dict[str, List[str]]]:
    """Turn a released Vim state dict into trunk weights with the trunk's own names.

    Returns ``(trunk_state, report)`` where report has the ``kept`` and ``dropped`` keys. Raises
    ValueError if the dict is not a Vim checkpoint or its width differs from ``expected_dim``.
    """
    missing = [key for key in _REQUIRED_KEYS if key not in state_dict]
    if missing:
        sample = ", ".join(list(state_dict)[:5])
        raise ValueError(
            f"not a Vim checkpoint: keys {missing} are missing (its first keys are: "
            f"{sample}). Expected a released Vim .pth with patch_embed, pos_embed and "
            "layers.{i}.mixer.* tensors"
        )
    layout = released_layout_problems(state_dict)
    if layout:
        raise ValueError(f"not a Vim checkpoint ViMDet can load: {'; '.join(layout)}")
    width = state_dict["patch_embed.proj.weight"].shape[0]
    if expected_dim is not None and width != expected_dim:
        raise ValueError(
            f"the checkpoint is {width} wide but the model is {expected_dim} wide "
            "(Vim-T 192, Vim-S 384, Vim-B 768); pick the matching MODEL.VIM.SIZE or "
            "checkpoint"
        )
    trunk, kept, dropped = {}, [], []
    for key, value in state_dict.items():
        if key.startswith(_DROPPED_PREFIXES):
            dropped.append(key)
            continue
        if key == "pos_embed":
            value, had_cls_row = _split_cls_row(value)
            if had_cls_row:
                dropped.append("pos_embed[class-token row]")
        trunk[key] = value
        kept.append(key)
    return trunk, {"kept": kept, "dropped": dropped}


def _fit_to_trunk(trunk_state: Dict[str, Tensor], net: nn.Module, where: str) -> Dict[str, Tensor]:
    """Resize pos_embed to the trunk's grid; raise if any other trunk tensor's shape differs."""
    own = net.state_dict()
    fitted = dict(trunk_state)
    if "pos_embed" in fitted and "pos_embed" in own:
        src = fitted["pos_embed"]
        side = math.isqrt(src.shape[1])
        if (
            src.shape[1] != own["pos_embed"].shape[1]
            and side * side == src.shape[1]
            and src.shape[2] == own["pos_embed"].shape[2]
        ):
            logger.info(
                "%s: resizing the %dx%d position grid to the model's %dx%d",
                where,
                side,
                side,
                *net.pretrain_grid,
            )
            fitted["pos_embed"] = resize_pos_embed(src, (side, side), net.pretrain_grid)
    wrong = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in fitted.items()
        if key in own and value.shape != own[key].shape
    ]
    if wrong:
        listing = "\n  ".join(wrong[:8]) + ("\n  ..." if len(wrong) > 8 else "")
        raise ValueError(
            f"{where}: {len(wrong)} trunk tensors have the wrong shape:\n  {listing}\nThe "
            f"checkpoint's Vim size differs from the model's (embed dim {net.embed_dim}, depth "
            f"{net.depth}): set MODEL.VIM.SIZE (or EMBED_DIM/DEPTH) to match the checkpoint"
        )
    return fitted


def _trunk_tensors(detector_state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The ``backbone.net.*`` entries of a detector state dict, with the trunk's own names."""
    return {
        key[len(TRUNK_PREFIX) :]: value
        for key, value in detector_state.items()
        if key.startswith(TRUNK_PREFIX)
    }


def load_vim_trunk(net: nn.Module, path: str) -> Dict[str, List[str]]:
    """Load a released (or converted) Vim checkpoint into a :class:`VisionMamba` trunk.

    Every trunk tensor must be present with the right shape; returns the conversion report.
    """
    state = load_checkpoint_file(path)
    if any(key.startswith(TRUNK_PREFIX) for key in state):  # a converted detector checkpoint
        state = _trunk_tensors(state)
    trunk, report = convert_vim_state_dict(state, expected_dim=net.embed_dim)
    trunk = _fit_to_trunk(trunk, net, f"loading {path}")
    result = net.load_state_dict(trunk, strict=False)
    if result.missing_keys:
        raise ValueError(
            f"{path} lacks {len(result.missing_keys)} trunk tensors, e.g. "
            f"{result.missing_keys[:4]}; was it saved from a shallower model?"
        )
    logger.info(
        "Loaded %d Vim trunk tensors from %s (dropped: %s)",
        len(report["kept"]),
        path,
        ", ".join(report["dropped"]) or "nothing",
    )
    return report


class VimDetCheckpointer(SafeCheckpointerMixin, DetectionCheckpointer):
    """Detectron2's checkpointer, strict about the Vim trunk.

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
            if _REQUIRED_KEYS[0] in weights and not any(
                k.startswith(TRUNK_PREFIX) for k in weights
            ):
                trunk, report = convert_vim_state_dict(weights, expected_dim=net.embed_dim)
                logger.info(
                    "MODEL.WEIGHTS is a released Vim checkpoint: converted it, dropping %s",
                    ", ".join(report["dropped"]) or "nothing",
                )
                weights = {TRUNK_PREFIX + key: value for key, value in trunk.items()}
                checkpoint["model"] = weights
            fitted = _fit_to_trunk(_trunk_tensors(weights), net, "loading MODEL.WEIGHTS")
            self.check_trunk_complete(fitted, net)
            weights.update({TRUNK_PREFIX + key: value for key, value in fitted.items()})
        return super()._load_model(checkpoint)
