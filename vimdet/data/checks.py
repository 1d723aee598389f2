"""Data loading with errors that name the bad file and say what to do."""

from __future__ import annotations

import json
from typing import Callable, Sequence, TypeVar

from detectron2.data import DatasetMapper, MetadataCatalog
from PIL import Image

from vimdet.errors import same_type_error

from .validation import image_mode_problem

__all__ = ["CheckedDatasetMapper", "explain_dataset_errors"]

T = TypeVar("T")


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper; an unreadable image raises an OSError naming its file.

    Images whose pixels Detectron2 would not decode faithfully (16-bit grayscale, float) are
    refused the same way (see :func:`vimdet.data.validation.image_mode_problem`).
    """

    def __call__(self, dataset_dict: dict) -> dict:
        try:
            with Image.open(dataset_dict["file_name"]) as image:
                problem = image_mode_problem(image.mode)
            if problem:
                raise OSError(problem)
            return super().__call__(dataset_dict)
        except OSError as error:  # missing file, one PIL cannot decode, or a refused mode
            raise same_type_error(
                error,
                f"cannot read image {dataset_dict.get('file_name')!r} ({error}). Replace the "
                "file, or remove its entry from the dataset's annotation json",
            ) from error


def _hint(error: BaseException) -> str:
    """What to do, for the causes this is sure of; '' otherwise."""
    if isinstance(error, FileNotFoundError):
        return (
            " The file does not exist: see datasets/README.md for where Detectron2 expects "
            "datasets (the DETECTRON2_DATASETS environment variable sets the folder)"
        )
    if isinstance(error, json.JSONDecodeError):
        return " The annotation file is not complete JSON: download or generate it again"
    return ""


def explain_dataset_errors(names: Sequence[str], build: Callable[[], T]) -> T:
    """Run ``build`` (which loads datasets ``names``); re-raise loading errors with the json.

    The error keeps its type (``json.JSONDecodeError`` becomes its base ``ValueError``) and its
    cause; a hint is added only for a missing file or broken JSON.
    """
    try:
        return build()
    except (OSError, ValueError, KeyError, AssertionError) as error:  # json errors are ValueError
        sources = [
            f"{name} ({MetadataCatalog.get(name).get('json_file', 'no json_file registered')})"
            for name in names
        ]
        raise same_type_error(
            error,
            f"could not load dataset(s) {', '.join(sources)}: {type(error).__name__}: "
            f"{error}.{_hint(error)}",
        ) from error
