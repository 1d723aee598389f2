"""Reading and writing checkpoint files: nothing executed on load, nothing half-written on save.

Every checkpoint ViMDet reads goes through :func:`load_checkpoint`: ``torch.load`` with
``weights_only=True``, allowing only ``argparse.Namespace`` beyond tensors and containers (the
released Vim files pickle their training arguments in one). A file that refers to any other
Python object is refused by name and nothing in it runs. Missing, empty, truncated and
non-checkpoint files get a message that names the file and says what to do; the error keeps the
type ``torch.load`` gave it and chains it as the cause.

Every checkpoint ViMDet writes goes through :func:`atomic_save`: a temporary file in the same
folder, flushed to disk, then renamed over the target, so a kill mid-save leaves the previous file
(or none), never a truncated one.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import struct
import tempfile
from typing import Any, Callable, Dict, Mapping

import torch

from vimdet.errors import same_type_error

__all__ = [
    "ALLOWED_GLOBALS",
    "READ_ERRORS",
    "atomic_save",
    "atomic_write_text",
    "load_checkpoint",
    "load_pickled_arrays",
    "state_dict_of",
]

#: The only Python classes a checkpoint may contain besides tensors and plain containers: the
#: released Vim files store their training arguments as an ``argparse.Namespace``.
ALLOWED_GLOBALS = (argparse.Namespace,)

# Classes a Detectron2 model-zoo .pkl (a dict of numpy arrays) needs, as (module, name).
_PICKLE_ARRAY_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}
#: What ``torch.load`` raises for damaged or foreign files (found by feeding it truncated
#: checkpoints and random bytes); :func:`load_checkpoint` re-raises each with the same type.
READ_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    IndexError,
    KeyError,
    struct.error,
)
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_TRUST_HINT = (
    "ViMDet refused to load it, because unpickling it could run code from the file. A checkpoint "
    "needs only tensors: if you made this file yourself and trust it, re-save its weights with "
    "torch.save({'model': model.state_dict()}, path)"
)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} does not exist; check the path (MODEL.WEIGHTS, --input)"
        )
    if not os.path.isfile(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a folder; give the path of a .pth file")
    if os.path.getsize(path) == 0:
        raise EOFError(
            f"checkpoint {path!r} is empty (0 bytes): it was not written or copied completely. "
            "Copy it again, or use another checkpoint"
        )


def _explain_load_error(path: str, error: Exception) -> BaseException:
    """The error to raise for ``torch.load(path)`` failing with ``error``, same type."""
    if isinstance(error, pickle.UnpicklingError):
        planted = _UNSUPPORTED_GLOBAL.search(str(error))
        if planted:
            return same_type_error(
                error,
                f"checkpoint {path!r} contains the Python object {planted.group(1)}, which a "
                f"weights file does not need. {_TRUST_HINT}",
            )
        return same_type_error(
            error,
            f"{path!r} is not a PyTorch checkpoint (torch.load with weights_only=True could not "
            "read it). Give a .pth file written by torch.save (a released Vim file, a "
            "tools/convert_vim_checkpoint.py output or a ViMDet training checkpoint)",
        )
    return same_type_error(
        error,
        f"checkpoint {path!r} is truncated or corrupt ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else 'unexpected end of file'}). Copy it "
        "again; for a training run's checkpoint, --resume falls back to the previous one",
    )


def load_checkpoint(path: str) -> Any:
    """``torch.load(path)`` on the CPU with ``weights_only=True`` (and ``argparse.Namespace``).

    Raises FileNotFoundError, IsADirectoryError or EOFError (empty file) naming the file;
    ``pickle.UnpicklingError`` for a file that is not a checkpoint or that refers to a Python
    object other than tensors (naming the object); and the type torch gave (one of
    :data:`READ_ERRORS`) for a truncated or corrupt file.
    """
    _check_file(path)
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as error:
        raise _explain_load_error(path, error) from error


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays, dtypes and ordered dicts."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


def load_pickled_arrays(path: str) -> Any:
    """Read a Detectron2 model-zoo ``.pkl`` (numpy arrays in dicts) without running its code."""
    _check_file(path)
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except READ_ERRORS as error:
        raise _explain_load_error(path, error) from error


def state_dict_of(content: Any, path: str) -> Dict[str, torch.Tensor]:
    """The state dict in a loaded checkpoint: its ``model`` entry, or the checkpoint itself."""
    if isinstance(content, Mapping) and isinstance(content.get("model"), Mapping):
        content = content["model"]
    if not isinstance(content, Mapping) or not content:
        what = "an empty dict" if isinstance(content, Mapping) else f"a {type(content).__name__}"
        raise ValueError(
            f"checkpoint {path!r} holds {what}, not a state dict of tensors. Give a file "
            "saved as torch.save({'model': model.state_dict()}, path)"
        )
    not_tensors = [key for key, value in content.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"checkpoint {path!r} is not a state dict: {len(not_tensors)} entries are not tensors "
            f"(e.g. {not_tensors[:3]}). Give a file saved as "
            "torch.save({'model': model.state_dict()}, path)"
        )
    return dict(content)


def _fsync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _atomic_write(path: str, write: Callable[[Any], None], mode: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder
    )
    replaced = False
    try:
        with os.fdopen(descriptor, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        replaced = True
    finally:
        if not replaced:
            os.unlink(temporary)
    _fsync_folder(folder)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partly written ``path`` behind."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    _atomic_write(path, lambda f: f.write(text), "w")
