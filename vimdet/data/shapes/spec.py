"""The parameters that determine a generated shapes split, checked before anything is written."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .draw import GENERATOR_VERSION

__all__ = ["ShapesSpec", "make_spec"]

_MIN_SIDE_LIMIT = 32  # smallest image side objects can be placed on
_MAX_SIDE_LIMIT = 8192
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """All parameters that determine a generated split."""

    root: str
    split: str
    num_images: int
    seed: int
    min_side: int = 160
    max_side: int = 320
    max_objects: int = 6

    @property
    def json_path(self) -> Path:
        return Path(self.root) / "annotations" / f"instances_{self.split}.json"

    @property
    def image_root(self) -> Path:
        return Path(self.root) / self.split

    def info_params(self) -> dict[str, Any]:
        """The parameters recorded in the json's ``info`` (used for the completeness check)."""
        return {
            "split": self.split,
            "num_images": self.num_images,
            "seed": self.seed,
            "min_side": self.min_side,
            "max_side": self.max_side,
            "max_objects": self.max_objects,
            "generator_version": GENERATOR_VERSION,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def make_spec(
    root: str | os.PathLike,
    split: str,
    num_images: int,
    seed: int,
    min_side: int,
    max_side: int,
    max_objects: int,
) -> ShapesSpec:
    """Validate arguments (raising ValueError with a hint) and bundle them."""
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(
            f"split must be a non-empty name of letters, digits, '_', '-' or '.' (it is used as "
            f"a folder and file name), got {split!r}; use e.g. 'train' or 'val'."
        )
    if not _is_int(num_images) or num_images <= 0:
        raise ValueError(
            f"num_images must be a positive integer, got {num_images!r}; "
            "pass the number of images to generate (e.g. 100)."
        )
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    for arg, value in (("min_side", min_side), ("max_side", max_side)):
        if not _is_int(value) or not _MIN_SIDE_LIMIT <= value <= _MAX_SIDE_LIMIT:
            raise ValueError(
                f"{arg} must be an integer in [{_MIN_SIDE_LIMIT}, {_MAX_SIDE_LIMIT}] pixels, "
                f"got {value!r}."
            )
    if min_side > max_side:
        raise ValueError(
            f"min_side ({min_side}) must not be greater than max_side ({max_side}); "
            "swap them or make them equal."
        )
    if not _is_int(max_objects) or max_objects <= 0:
        raise ValueError(f"max_objects must be a positive integer, got {max_objects!r}.")
    root_str = os.path.expanduser(os.fspath(root))
    if not root_str:
        raise ValueError("root must be a non-empty path to the folder the dataset is written to.")
    return ShapesSpec(
        root=root_str,
        split=split,
        num_images=int(num_images),
        seed=int(seed),
        min_side=int(min_side),
        max_side=int(max_side),
        max_objects=int(max_objects),
    )
