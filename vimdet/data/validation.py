"""Checks that find bad annotations and images when a dataset is loaded, not hours into a run.

- :func:`check_coco_json` reads a COCO instances file and lists every malformed entry by image
  and annotation id: types, box shapes, negative sizes, unknown image or category ids, duplicate
  ids, and a category count that differs from the model's. Zero-size boxes (which Detectron2
  drops) are reported in a warning with their ids.
- :func:`check_dataset_dicts` does the same for boxes of datasets registered without a json.
- :func:`check_images` opens every image's header (in parallel; no pixels are decoded): missing
  or unreadable files, a size that differs from the annotation, and pixel modes ViMDet does not
  decode faithfully (16-bit grayscale or float images) are errors naming the files.
- :func:`image_mode_problem` is the same pixel-mode check for one file, used when images are read.

Images that pass the header check but fail to decode during training are skipped and counted
(see :class:`vimdet.engine.exact_resume.ResumableTrainStream`, ``DATALOADER.MAX_BAD_IMAGES``).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
from typing import Any, Dict, List, Sequence

from detectron2.structures import BoxMode
from PIL import Image, UnidentifiedImageError

from vimdet.errors import same_type_error

__all__ = [
    "DECODED_MODES",
    "annotation_files",
    "check_coco_json",
    "check_dataset_dicts",
    "check_images",
    "image_mode_problem",
]

logger = logging.getLogger(__name__)

#: PIL pixel modes that Detectron2's reader turns into 8-bit RGB/BGR faithfully. 16-bit RGB PNGs
#: open as "RGB" (Pillow keeps the high byte). 16-bit grayscale ("I;16", "I") and float ("F")
#: images would come out saturated (all white), so they are refused.
DECODED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_LISTED = 10  # problems spelled out in a message; the rest are counted
_EXIF_ORIENTATION = 0x0112


def _listing(problems: Sequence[str]) -> str:
    shown = "\n  ".join(problems[:_LISTED])
    more = f"\n  ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
    return f"\n  {shown}{more}"


def image_mode_problem(mode: str) -> str | None:
    """Why an image of PIL ``mode`` cannot be used, or None if it decodes faithfully."""
    if mode in DECODED_MODES:
        return None
    return (
        f"its pixels are {mode!r} (16-bit or float), which would decode to a saturated 8-bit "
        "image; convert it to 8-bit, e.g. cv2.imwrite(out, (img / 257).astype('uint8'))"
    )


def _header_problem(path: str, width: int | None, height: int | None) -> str | None:
    """What is wrong with the image at ``path`` (header only), or None."""
    try:
        with Image.open(path) as image:
            mode, (actual_w, actual_h) = image.mode, image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError:
        return "the file does not exist"
    except (OSError, UnidentifiedImageError, ValueError) as error:
        return f"it cannot be opened as an image ({error})"
    problem = image_mode_problem(mode)
    if problem:
        return problem
    if orientation in (5, 6, 7, 8):  # Detectron2 applies the EXIF rotation when reading
        actual_w, actual_h = actual_h, actual_w
    if width is not None and height is not None and (actual_w, actual_h) != (width, height):
        return (
            f"it is {actual_w}x{actual_h} but the annotation says {width}x{height}; fix the "
            "width and height in the annotation file"
        )
    return None


def check_images(records: Sequence[Dict[str, Any]], workers: int = 8) -> None:
    """Open the header of every record's ``file_name`` in parallel; raise OSError listing the bad.

    Checks that the file exists and opens as an image, that its pixel mode decodes faithfully and
    that its size (after EXIF rotation) is the record's ``width`` x ``height`` when given.
    """
    if not records:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(
            lambda r: _header_problem(r["file_name"], r.get("width"), r.get("height")),
            records,
        )
        problems = [
            f"{record['file_name']} (image id {record.get('image_id')}): {problem}"
            for record, problem in zip(records, found)
            if problem
        ]
    if problems:
        raise OSError(
            f"{len(problems)} of {len(records)} training images cannot be used:"
            f"{_listing(problems)}\nReplace these files, or remove their entries from the "
            "annotation file"
        )
    logger.info("Checked the headers of %d training images: all open", len(records))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _box_problem(box: Any) -> str | None:
    """Why an XYWH box is malformed ('zero' for a zero-size box), or None."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(map(_is_number, box)):
        return f"bbox {box!r} is not 4 finite numbers [x, y, width, height]"
    if box[2] < 0 or box[3] < 0:
        return f"bbox {list(box)} has a negative width or height"
    if box[2] == 0 or box[3] == 0:
        return "zero"
    return None


def _check_entries(data: Any) -> tuple:
    """Problems with the top level, categories and images; returns (problems, image ids, cats)."""
    problems: List[str] = []
    if not isinstance(data, dict):
        return [f"the top level is a {type(data).__name__}, not an object"], set(), set()
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problems.append(f'"{key}" is missing or not a list')
    if problems:
        return problems, set(), set()
    category_ids, image_ids = set(), set()
    for category in data["categories"]:
        if not isinstance(category, dict) or not _is_id(category.get("id")):
            problems.append(f"category {category!r} has no integer id")
        elif category["id"] in category_ids:
            problems.append(f"category id {category['id']} appears twice")
        else:
            category_ids.add(category["id"])
    for image in data["images"]:
        if not isinstance(image, dict) or not _is_id(image.get("id")):
            problems.append(f"image {str(image)[:80]} has no integer id")
            continue
        where = f"image {image['id']}"
        if image["id"] in image_ids:
            problems.append(f"{where}: the id appears twice")
        image_ids.add(image["id"])
        if not isinstance(image.get("file_name"), str) or not image.get("file_name"):
            problems.append(f"{where}: file_name is missing or not a string")
        for side in ("width", "height"):
            if not _is_id(image.get(side)) or image[side] <= 0:
                problems.append(f"{where}: {side} {image.get(side)!r} is not a positive integer")
    return problems, image_ids, category_ids


def check_coco_json(path: str, num_classes: int | None = None, dataset_name: str = "") -> List[str]:
    """Check a COCO instances file; raise ValueError listing every problem by id.

    Returns the ids of zero-size boxes (which Detectron2 drops) after logging them in a warning.
    ``num_classes`` is ``MODEL.ROI_HEADS.NUM_CLASSES``: a different category count is an error.
    """
    where = f"annotation file {path}" + (f" (dataset {dataset_name})" if dataset_name else "")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise same_type_error(
            error, f"{where} is not complete JSON ({error}); download or generate it again"
        ) from error
    problems, image_ids, category_ids = _check_entries(data)
    zero_size: List[str] = []
    annotation_ids: set = set()
    for annotation in data.get("annotations", []) if not problems else []:
        if not isinstance(annotation, dict) or not _is_id(annotation.get("id")):
            problems.append(f"annotation {str(annotation)[:80]} has no integer id")
            continue
        label = f"image {annotation.get('image_id')!r}, annotation {annotation['id']}"
        if annotation["id"] in annotation_ids:
            problems.append(f"{label}: the annotation id appears twice")
        annotation_ids.add(annotation["id"])
        if annotation.get("image_id") not in image_ids:
            problems.append(f"{label}: image_id is not the id of an image in the file")
        if annotation.get("category_id") not in category_ids:
            problems.append(
                f"{label}: category_id {annotation.get('category_id')!r} is not a category"
            )
        if annotation.get("iscrowd", 0) not in (0, 1):
            problems.append(f"{label}: iscrowd {annotation['iscrowd']!r} is not 0 or 1")
        box_problem = _box_problem(annotation.get("bbox"))
        if box_problem == "zero":
            zero_size.append(label)
        elif box_problem:
            problems.append(f"{label}: {box_problem}")
    if num_classes is not None and not problems and len(category_ids) != num_classes:
        problems.append(
            f"it has {len(category_ids)} categories but the model predicts {num_classes} "
            f"classes; set MODEL.ROI_HEADS.NUM_CLASSES {len(category_ids)}"
        )
    if problems:
        raise ValueError(
            f"{where} has {len(problems)} problems:{_listing(problems)}\nFix or remove these "
            "entries; the format is described in datasets/README.md"
        )
    if zero_size:
        logger.warning(
            "%s: %d annotations have a zero-size box and are not used for training:%s",
            where,
            len(zero_size),
            _listing(zero_size),
        )
    return zero_size


def check_dataset_dicts(records: Sequence[Dict[str, Any]], dataset_names: Sequence[str]) -> None:
    """Check the boxes of loaded dataset dicts (any source); raise ValueError listing the bad."""
    problems = []
    for record in records:
        for index, annotation in enumerate(record.get("annotations", [])):
            box = annotation.get("bbox")
            mode = annotation.get("bbox_mode", BoxMode.XYWH_ABS)
            if isinstance(box, (list, tuple)) and len(box) == 4 and mode == BoxMode.XYXY_ABS:
                box = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            problem = _box_problem(box)
            if problem and problem != "zero":
                problems.append(
                    f"{record.get('file_name')} (image id {record.get('image_id')}), "
                    f"annotation #{index}: {problem}"
                )
    if problems:
        raise ValueError(
            f"dataset(s) {', '.join(dataset_names)}: {len(problems)} malformed boxes:"
            f"{_listing(problems)}\nFix or remove these annotations"
        )


def annotation_files(dataset_names: Sequence[str]) -> Dict[str, str]:
    """The COCO json registered for each dataset name that has one and where it exists."""
    from detectron2.data import MetadataCatalog

    files = {}
    for name in dataset_names:
        json_file = MetadataCatalog.get(name).get("json_file", None)
        if json_file and os.path.isfile(json_file):
            files[name] = json_file
    return files
