"""What ViMDet's checkpointer adds to Detectron2's for files a user can trust.

:class:`SafeCheckpointerMixin` goes before ``DetectionCheckpointer`` in a checkpointer's bases:

- every file is read with ``weights_only=True`` (:func:`vimdet.checkpoint.io.load_checkpoint`);
  a missing, empty, corrupt, planted or non-checkpoint file is an error naming the file;
- saves are atomic (temporary file, fsync, rename), and so is the ``last_checkpoint`` tag;
- ``--resume`` falls back to the newest readable ``model_*.pth`` when the latest checkpoint is
  damaged, with a warning naming both files;
- a trunk that the checkpoint covers only in part (missing or extra Vim blocks) is an error
  unless the checkpointer was built with ``allow_partial_trunk=True``
  (``MODEL.VIM.ALLOW_PARTIAL_WEIGHTS``).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import numpy as np
from torch import Tensor, nn

from vimdet.errors import same_type_error

from .io import (
    READ_ERRORS,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    load_pickled_arrays,
)

__all__ = ["SafeCheckpointerMixin", "describe_keys_by_block", "describe_trunk_mismatch"]

logger = logging.getLogger(__name__)

_PERIODIC_NAME = re.compile(r"model_(\d+)\.pth")
_BLOCK_KEY = re.compile(r"layers\.(\d+)\.")


def _ranges(numbers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    numbers = sorted(set(numbers))
    parts: List[str] = []
    start = previous = None
    for number in numbers + [None]:
        if start is not None and (number is None or number != previous + 1):
            parts.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = None
        if number is not None and start is None:
            start = number
        previous = number
    return ", ".join(parts)


def describe_keys_by_block(keys: Iterable[str]) -> str:
    """Trunk keys grouped by their name inside the block: 'mixer.qkv.weight, mixer.qkv.bias in
    blocks 20-23 (0-based)'; keys outside the blocks are listed as they are."""
    blocks_of: Dict[str, List[int]] = {}
    loose = []
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks_of.setdefault(key[match.end() :], []).append(int(match.group(1)))
        else:
            loose.append(key)
    by_blocks: Dict[str, List[str]] = {}
    for local, blocks in blocks_of.items():
        by_blocks.setdefault(_ranges(blocks), []).append(local)
    parts = [
        f"{', '.join(names)} in blocks {blocks} (0-based)" for blocks, names in by_blocks.items()
    ]
    return "; ".join(parts + sorted(loose))


def describe_trunk_mismatch(checkpoint_keys: Iterable[str], model_keys: Iterable[str]) -> str:
    """'' if the two trunk key sets are equal; otherwise what is missing and extra, by block."""
    checkpoint_keys, model_keys = set(checkpoint_keys), set(model_keys)
    missing, extra = model_keys - checkpoint_keys, checkpoint_keys - model_keys
    lines = []
    for label, keys in (("missing from the checkpoint", missing), ("extra", extra)):
        blocks = {int(m.group(1)) for m in map(_BLOCK_KEY.match, keys) if m}
        loose = sorted(key for key in keys if not _BLOCK_KEY.match(key))
        if blocks:
            lines.append(f"blocks {_ranges(blocks)} (0-based) {label}")
        if loose:
            lines.append(f"{len(loose)} tensors {label}: {', '.join(loose[:6])}")
    if lines:
        model_depth = len({m.group(1) for m in map(_BLOCK_KEY.match, model_keys) if m})
        checkpoint_depth = len({m.group(1) for m in map(_BLOCK_KEY.match, checkpoint_keys) if m})
        lines.append(
            f"the checkpoint has {checkpoint_depth} blocks, the model {model_depth} "
            f"({len(checkpoint_keys & model_keys)} of {len(model_keys)} trunk tensors match)"
        )
    return "; ".join(lines)


def _check_weights(weights: Any, path: str) -> None:
    """Raise ValueError naming ``path`` unless ``weights`` maps names to tensors or arrays."""
    if not isinstance(weights, Mapping):
        raise ValueError(
            f"checkpoint {path!r}: its 'model' entry is a {type(weights).__name__}, not a state "
            "dict; give a file saved as torch.save({'model': model.state_dict()}, path)"
        )
    wrong = [k for k, v in weights.items() if not isinstance(v, (Tensor, np.ndarray))]
    if wrong:
        raise ValueError(
            f"checkpoint {path!r} is not a state dict: {len(wrong)} entries are not tensors "
            f"(e.g. {wrong[:3]}); give a file saved as torch.save({{'model': "
            "model.state_dict()}, path)"
        )


class SafeCheckpointerMixin:
    """Safe loading, atomic saving, resume fallback and a complete-trunk check (see module)."""

    def __init__(self, *args: Any, allow_partial_trunk: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_partial_trunk = allow_partial_trunk
        self._verified: Tuple[str, Any] | None = None

    # ----------------------------------------------------------------------------- loading
    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        if path and "://" not in path and not os.path.isfile(path):
            load_checkpoint(path)  # raises FileNotFoundError/IsADirectoryError naming the path
        try:
            return super().load(path, *args, **kwargs)
        except ValueError as error:  # a content problem found after reading: name the file
            if path in str(error):
                raise
            raise same_type_error(error, f"loading {path}: {error}") from error

    def _torch_load(self, f: str) -> Dict[str, Any]:
        if self._verified is not None and self._verified[0] == f:
            content, self._verified = self._verified[1], None
        else:
            content = load_checkpoint(f)
        if not isinstance(content, Mapping):
            raise ValueError(
                f"checkpoint {f!r} holds a {type(content).__name__}, not a dict of tensors; give "
                "a file saved as torch.save({'model': model.state_dict()}, path)"
            )
        return dict(content)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if not filename.endswith(".pkl"):
            loaded = super()._load_file(filename)
            _check_weights(loaded["model"], filename)
            return loaded
        # Detectron2 reads .pkl files with pickle.load, which runs whatever the file asks for.
        data = load_pickled_arrays(filename)
        if not isinstance(data, Mapping):
            raise ValueError(f"{filename!r} holds a {type(data).__name__}, not a dict of arrays")
        if "model" in data and "__author__" in data:
            return dict(data)
        data = data.get("blobs", data)
        weights = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        _check_weights(weights, filename)
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}

    def check_trunk_complete(
        self,
        trunk_state: Mapping[str, Tensor],
        net: nn.Module,
        newly_initialised: Iterable[str] = (),
    ) -> None:
        """Raise ValueError if ``trunk_state`` lacks trunk tensors or has extra blocks.

        ``newly_initialised`` names trunk tensors that no checkpoint of this kind holds (the
        attention blocks' weights of docs/trunk_options.md): they may be missing. With
        ``allow_partial_trunk`` the same finding is logged as a warning instead.
        """
        expected = set(net.state_dict()) - set(newly_initialised)
        mismatch = describe_trunk_mismatch(trunk_state, expected)
        if not mismatch:
            return
        if self.allow_partial_trunk:
            logger.warning(
                "Loading part of the Vim trunk (MODEL.VIM.ALLOW_PARTIAL_WEIGHTS): %s", mismatch
            )
            return
        raise ValueError(
            f"the checkpoint does not fit the Vim trunk: {mismatch}. Set MODEL.VIM.SIZE (or "
            "EMBED_DIM and DEPTH) to the checkpoint's model; to load part of the trunk on "
            "purpose, add MODEL.VIM.ALLOW_PARTIAL_WEIGHTS True"
        )

    # ------------------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, checkpointable in self.checkpointables.items():
            data[key] = checkpointable.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_save(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # ---------------------------------------------------------------------------- resuming
    def _resume_candidates(self) -> List[str]:
        """The tagged latest checkpoint, then the periodic ones from newest to oldest."""
        latest = self.get_checkpoint_file()
        periodic = [
            path
            for path in self.get_all_checkpoint_files()
            if _PERIODIC_NAME.fullmatch(os.path.basename(path))
        ]
        periodic.sort(key=lambda p: int(_PERIODIC_NAME.fullmatch(os.path.basename(p)).group(1)))
        return [latest] + [path for path in reversed(periodic) if path != latest]

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        damaged: List[Tuple[str, BaseException]] = []
        for candidate in self._resume_candidates():
            try:
                content = load_checkpoint(candidate)
            except READ_ERRORS as error:
                damaged.append((candidate, error))
                continue
            if damaged:
                logger.warning(
                    "--resume: the latest checkpoint %s cannot be read (%s); resuming from the "
                    "previous good checkpoint %s instead",
                    damaged[0][0],
                    damaged[0][1],
                    candidate,
                )
            self._verified = (candidate, content)
            return self.load(candidate)
        first = damaged[0][1]
        listing = "\n  ".join(f"{path}: {error}" for path, error in damaged)
        raise same_type_error(
            first,
            f"--resume: no checkpoint in {self.save_dir} can be read:\n  {listing}\nStart "
            "without --resume (or with another OUTPUT_DIR), or restore a good checkpoint",
        ) from first
