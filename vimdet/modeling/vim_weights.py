"""What ViMDet knows about Vim weights: released-checkpoint filtering, the trunk's place in the
detector and the layer id of each parameter (for layer-wise learning-rate decay).

Like timm's ``checkpoint_filter_fn`` and Detectron2's ``get_vit_lr_decay_rate``, this lives beside
the model; the checkpointer, the converter and the optimizer import it from here.

A released Vim classification file holds ``{"model": state_dict}`` with 415 tensors (for 24
blocks): the trunk, ``cls_token``, ``pos_embed`` with the class row in the middle of the sequence
(row M // 2 of M + 1), ``norm_f`` and the classifier ``head``. The detector keeps the trunk,
drops the class token, its position row, ``norm_f`` and ``head``, and keeps the position grid
(resized to each input's token grid at run time).

A trunk built with the options of docs/trunk_options.md has tensors no released file holds:
:func:`adapt_trunk_to_options` fills the ``cross`` route's column parameters from the row
routes' and leaves the attention blocks' weights to their init.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import Tensor

from .vim import VisionMamba, resize_pos_embed

__all__ = [
    "TRUNK_PREFIX",
    "adapt_trunk_to_options",
    "convert_vim_state_dict",
    "fit_trunk_state",
    "is_released_vim_state",
    "released_layout_problems",
    "trunk_tensors",
    "vim_layer_id",
    "vim_lr_decay_rate",
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


def is_released_vim_state(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` has a Vim trunk under the released names (no detector prefix)."""
    return _REQUIRED_KEYS[0] in state_dict and not any(
        k.startswith(TRUNK_PREFIX) for k in state_dict
    )


def released_layout_problems(state_dict: Mapping[str, Any]) -> List[str]:
    """What is wrong with the shapes of a Vim state dict's patch embedding and position grid."""
    weight, grid = state_dict["patch_embed.proj.weight"], state_dict["pos_embed"]
    problems = []
    if weight.dim() != 4 or weight.shape[0] == 0 or weight.shape[1] != 3:
        problems.append(f"patch_embed.proj.weight is {tuple(weight.shape)}, not (width, 3, P, P)")
    elif grid.dim() != 3 or grid.shape[0] != 1 or grid.shape[1] == 0:
        problems.append(f"pos_embed is {tuple(grid.shape)}, not (1, tokens, width)")
    elif grid.shape[2] != weight.shape[0]:
        problems.append(f"pos_embed is {grid.shape[2]} wide but patch_embed {weight.shape[0]} wide")
    return problems


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


# Each direction's parameters, by suffix: the column routes' ("_c" down, "_cb" up) start from the
# row routes' ("" forward, "_b" backward) when a Vim trunk is loaded into a "cross" trunk.
_DIRECTION_TENSORS = ("conv1d{}.", "x_proj{}.", "dt_proj{}.", "A{}_log", "D{}")
_COLUMN_SOURCES = {"_c": "", "_cb": "_b"}
_BLOCK_MIXER = re.compile(r"layers\.(\d+)\.mixer\.(.+)")


def _row_source(local: str) -> str | None:
    """The row-route name that column-route tensor ``local`` (e.g. ``conv1d_cb.weight``) starts
    from (``conv1d_b.weight``); None for a tensor of no column route."""
    for template in _DIRECTION_TENSORS:
        for column, row in _COLUMN_SOURCES.items():
            name = template.format(column)
            if local == name or (name.endswith(".") and local.startswith(name)):
                return template.format(row) + local[len(name) :]
    return None


def adapt_trunk_to_options(
    trunk_state: Mapping[str, Tensor], net: VisionMamba
) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Fit a Vim trunk's tensors (row routes, Mamba mixers everywhere: a released file, a
    converted one, a row-route detector) to ``net``'s scan routes and attention blocks.

    - ``cross`` blocks: each column-route tensor (``*_c``, ``*_cb``) is a copy of its row-route
      twin (``conv1d_c.weight`` <- ``conv1d.weight``, ``A_cb_log`` <- ``A_b_log``, ...);
    - attention blocks: the checkpoint's Mamba mixer tensors are dropped and the attention
      mixer's are left to their init.

    A state that already has any of these tensors is returned as is (the checkpointer then checks
    it strictly). Returns ``(state, report)``, report with ``filled`` ({key: source key}),
    ``dropped`` and ``new`` (trunk keys without the detector's prefix).
    """
    own = net.state_dict()
    state = dict(trunk_state)
    report: Dict[str, Any] = {"filled": {}, "dropped": [], "new": []}
    option_keys = {key for key in own if _is_option_tensor(key, net)}
    if not option_keys or option_keys & set(state):  # no options, or a checkpoint made with them
        return state, report
    attention = {block - 1 for block in net.attention_blocks}
    for key in sorted(state):
        match = _BLOCK_MIXER.match(key)
        if match and int(match.group(1)) in attention:
            report["dropped"].append(key)
            del state[key]
    for key in own:
        match = _BLOCK_MIXER.match(key)
        if not match or key in state:
            continue
        if int(match.group(1)) in attention:
            report["new"].append(key)
            continue
        source = _row_source(match.group(2))
        source_key = f"layers.{match.group(1)}.mixer.{source}" if source else None
        if source_key in state:
            state[key] = state[source_key].clone()
            report["filled"][key] = source_key
    return state, report


def _is_option_tensor(key: str, net: VisionMamba) -> bool:
    """Whether trunk ``key`` belongs to an attention block's mixer or a column route."""
    match = _BLOCK_MIXER.match(key)
    if not match:
        return False
    return (
        int(match.group(1)) + 1 in net.attention_blocks or _row_source(match.group(2)) is not None
    )


def trunk_tensors(detector_state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The ``backbone.net.*`` entries of a detector state dict, with the trunk's own names."""
    return {
        key[len(TRUNK_PREFIX) :]: value
        for key, value in detector_state.items()
        if key.startswith(TRUNK_PREFIX)
    }


def fit_trunk_state(
    trunk_state: Mapping[str, Tensor], net: VisionMamba, where: str
) -> Dict[str, Tensor]:
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


def vim_layer_id(name: str, depth: int, prefix: str = TRUNK_PREFIX) -> int:
    """0 for the trunk's stem, i + 1 for ``layers.{i}``, depth + 1 for everything else."""
    if not name.startswith(prefix):
        return depth + 1
    local = name[len(prefix) :]
    if local.startswith(("patch_embed.", "pos_embed")):
        return 0
    if local.startswith("layers."):
        return int(local.split(".")[1]) + 1
    return depth + 1


def vim_lr_decay_rate(
    name: str, depth: int, layer_decay: float, prefix: str = TRUNK_PREFIX
) -> float:
    """Learning-rate factor of parameter ``name`` (Clark et al. 2020; ViTDet, arXiv 2203.16527).

    The stem gets ``layer_decay ** (depth + 1)``, block i (0-based) ``layer_decay ** (depth -
    i)``, everything outside the trunk 1.
    """
    return layer_decay ** (depth + 1 - vim_layer_id(name, depth, prefix))
