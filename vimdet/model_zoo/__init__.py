"""Weights shipped with ViMDet, named ``vimdet://NAME`` wherever Detectron2 takes a path.

Detectron2 resolves ``detectron2://ImageNetPretrained/...`` in ``MODEL.WEIGHTS`` through its
``PathManager``; ``import vimdet`` registers ``vimdet://`` the same way, for the files in
``vimdet/model_zoo/weights/`` (installed with the package), so that a config names them
independently of the working directory:

- ``vimdet://vim_mini_shapes_backbone.pth``: the backbone (trunk and pyramid) of the `make demo`
  detector (64 wide, 8 blocks, 8 px patches), pretrained on the built-in shapes data's own
  pretraining split by ``configs/shapes/pretrain_vim_mini_shapes.yaml``; docs/benchmarks.md has
  the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List

from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler

__all__ = ["PREFIX", "WEIGHTS_DIR", "VimDetWeightsHandler", "shipped_weights"]

#: The path prefix of shipped weights.
PREFIX = "vimdet://"
#: Where the shipped files are.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def shipped_weights() -> List[str]:
    """The ``vimdet://`` names of the shipped files."""
    return sorted(PREFIX + path.name for path in WEIGHTS_DIR.glob("*.pth"))


class VimDetWeightsHandler(PathHandler):
    """Resolves ``vimdet://NAME`` to ``vimdet/model_zoo/weights/NAME`` (read only)."""

    def _get_supported_prefixes(self) -> List[str]:
        return [PREFIX]

    def _get_local_path(self, path: str, force: bool = False, **kwargs: Any) -> str:
        self._check_kwargs(kwargs)
        name = path[len(PREFIX) :]
        local = WEIGHTS_DIR / name
        if not name or os.sep in name or not local.is_file():
            raise FileNotFoundError(
                f"{path!r} is not a file shipped with ViMDet; the shipped weights are "
                f"{shipped_weights() or 'none (is the package installed completely?)'}"
            )
        return str(local)

    def _open(self, path: str, mode: str = "rb", buffering: int = -1, **kwargs: Any) -> Any:
        if any(flag in mode for flag in "wax+"):
            raise ValueError(f"{path!r}: shipped weights are read only (mode {mode!r})")
        return open(self._get_local_path(path), mode, buffering=buffering)

    def _isfile(self, path: str, **kwargs: Any) -> bool:
        return (WEIGHTS_DIR / path[len(PREFIX) :]).is_file()

    def _exists(self, path: str, **kwargs: Any) -> bool:
        return self._isfile(path)


PathManager.register_handler(VimDetWeightsHandler())
