"""Writing a shapes split to disk: images by a process pool, then its COCO json, under a lock.

Generation is idempotent (a complete json with the same parameters is left alone) and atomic (the
json, which is written last, only ever refers to images that are fully written).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from .draw import GENERATOR_VERSION, SHAPES_CLASSES, draw_image
from .spec import ShapesSpec, make_spec

__all__ = ["generate_shapes_dataset", "write_split"]

logger = logging.getLogger(__name__)

_JPEG_QUALITY = 92
# Splits at least this large are drawn by a pool of worker processes.
_PARALLEL_MIN_IMAGES = 200


def _split_key(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def _image_file_name(index: int) -> str:
    return f"{index:06d}.jpg"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _is_complete(spec: ShapesSpec) -> bool:
    """True if the json exists, records the same parameters and all its images exist."""
    try:
        with open(spec.json_path, encoding="utf-8") as f:
            data = json.load(f)
        info = data["info"]
        if any(info.get(k) != v for k, v in spec.info_params().items()):
            return False
        images = data["images"]
        if len(images) != spec.num_images:
            return False
        return all((spec.image_root / im["file_name"]).is_file() for im in images)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _prepare_dirs(spec: ShapesSpec) -> None:
    """Create the output folders, turning failures into an OSError that says what to do."""
    try:
        spec.image_root.mkdir(parents=True, exist_ok=True)
        spec.json_path.parent.mkdir(parents=True, exist_ok=True)
        probe = spec.json_path.parent / f".write_probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"Cannot write the ViMDet shapes dataset under root {spec.root!r} ({e}). "
            "Pass a writable root directory, or set the DETECTRON2_DATASETS environment "
            "variable to a writable folder for the built-in vimdet_shapes_* datasets."
        ) from e


@contextmanager
def _generation_lock(spec: ShapesSpec) -> Iterator[None]:
    """Serialise generation of one split across processes (e.g. the ranks of a DDP job).

    Uses ``fcntl.flock`` where available; elsewhere concurrent generation is still safe (the
    output is deterministic and every file is replaced atomically), only wasteful.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = spec.json_path.parent / f".instances_{spec.split}.lock"
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_split(spec: ShapesSpec) -> Path:
    """Write the split ``spec`` unless it is complete already; return its json path."""
    if _is_complete(spec):
        return spec.json_path
    _prepare_dirs(spec)
    with _generation_lock(spec):
        # Another process may have finished the same split while we waited for the lock.
        if _is_complete(spec):
            return spec.json_path
        return _generate_locked(spec)


def _render_image(spec: ShapesSpec, index: int) -> tuple[dict, list[dict]]:
    """Draw image ``index`` of a split, write its file; return its COCO record and objects."""
    image_id = index + 1
    # Per-image generator: image i depends only on (seed, split, i), not on num_images.
    rng = np.random.default_rng([spec.seed, _split_key(spec.split), index])
    img, objects = draw_image(rng, spec.min_side, spec.max_side, spec.max_objects)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:  # pragma: no cover - cv2 failure
        raise OSError(f"cv2 failed to encode image {index} of split '{spec.split}'.")
    file_name = _image_file_name(image_id)
    _atomic_write_bytes(spec.image_root / file_name, buf.tobytes())
    record = {"id": image_id, "file_name": file_name, "width": img.shape[1], "height": img.shape[0]}
    return record, objects


def _log_progress(records: Iterator, total: int) -> Iterator:
    """Pass ``records`` through, logging every 500th."""
    for done, record in enumerate(records, start=1):
        if done % 500 == 0:
            logger.info("  %d / %d images", done, total)
        yield record


def _generate_locked(spec: ShapesSpec) -> Path:
    # A stale json (other parameters, or missing images) must not survive while images are
    # being rewritten: remove it first so a crash leaves no json at all.
    if spec.json_path.exists():
        spec.json_path.unlink()
    logger.info(
        "Generating %d ViMDet shapes images for split '%s' under %s ...",
        spec.num_images,
        spec.split,
        spec.root,
    )

    images, annotations = [], []
    indices = range(spec.num_images)
    workers = min(os.cpu_count() or 1, 16) if spec.num_images >= _PARALLEL_MIN_IMAGES else 1
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            rendered = pool.map(_render_image, itertools.repeat(spec), indices, chunksize=16)
            records = list(_log_progress(rendered, spec.num_images))
    else:
        records = list(
            _log_progress(map(_render_image, itertools.repeat(spec), indices), spec.num_images)
        )
    for image, objects in records:
        images.append(image)
        for obj in objects:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image["id"], **obj, "iscrowd": 0}
            )

    coco = {
        "info": {
            "description": "ViMDet synthetic shapes detection dataset",
            "version": str(GENERATOR_VERSION),
            "year": 2024,
            "contributor": "vimdet.data.shapes",
            "url": "",
            "date_created": "",
            **spec.info_params(),
        },
        "licenses": [{"id": 1, "name": "Synthetic data, no restrictions", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPES_CLASSES)
        ],
    }
    text = json.dumps(coco, separators=(",", ":"), sort_keys=False)
    _atomic_write_bytes(spec.json_path, text.encode("utf-8"))
    logger.info("Wrote %s (%d annotations).", spec.json_path, len(annotations))
    return spec.json_path


def generate_shapes_dataset(
    root: str | os.PathLike,
    split: str,
    num_images: int,
    seed: int,
    min_side: int = 160,
    max_side: int = 320,
    max_objects: int = 6,
) -> Path:
    """Generate (if needed) a synthetic COCO-format shapes split and return its json path.

    Images go to ``<root>/<split>/NNNNNN.jpg`` and annotations to
    ``<root>/annotations/instances_<split>.json``. Image width and height are drawn
    independently from ``[min_side, max_side]``; each image holds 1 to ``max_objects`` objects.
    The output is fully determined by the arguments. If a complete json with the same
    parameters already exists, nothing is written.

    Raises:
        ValueError: for invalid arguments (non-positive ``num_images``, ``min_side > max_side``,
            ...).
        OSError: if ``root`` cannot be created or written.
    """
    spec = make_spec(root, split, num_images, seed, min_side, max_side, max_objects)
    return write_split(spec)
