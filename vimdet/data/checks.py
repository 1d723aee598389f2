"""Data loading with errors that name the bad file and say what to do."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from detectron2.data import DatasetMapper, MetadataCatalog

__all__ = ["CheckedDatasetMapper", "explain_dataset_errors"]

T = TypeVar("T")


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper; an unreadable image raises an error naming its file."""

    def __call__(self, dataset_dict: dict) -> dict:
        try:
            return super().__call__(dataset_dict)
        except OSError as error:  # missing file, or one PIL cannot decode
            raise OSError(
                f"cannot read image {dataset_dict.get('file_name')!r} ({error}). Replace the file, "
                "or remove its entry from the dataset's annotation json"
            ) from error


def explain_dataset_errors(names: Sequence[str], build: Callable[[], T]) -> T:
    """Run ``build`` (which loads datasets ``names``); re-raise loading errors with the json."""
    try:
        return build()
    except (OSError, ValueError, KeyError, AssertionError) as error:  # json errors are ValueError
        sources = [
            f"{name} ({MetadataCatalog.get(name).get('json_file', 'no json_file registered')})"
            for name in names
        ]
        raise ValueError(
            f"could not load dataset(s) {', '.join(sources)}: {type(error).__name__}: {error}. "
            "Check that the annotation json exists, is complete COCO json (images, annotations, "
            "categories) and has at least one image with a box; see datasets/README.md"
        ) from error
