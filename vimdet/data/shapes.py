"""A small, deterministic, COCO-format synthetic detection dataset ("ViMDet shapes").

The generator draws geometric objects of several classes (circles, rectangles, triangles,
ellipses and stars) onto cluttered, non-square backgrounds and writes

* JPEG images to ``<root>/<split>/``, and
* a COCO instances json to ``<root>/annotations/instances_<split>.json``

with boxes (``XYWH``, clipped to the image) and polygon segmentations of the *visible* part of
each object, so both box-only and mask variants of a detector can be trained and evaluated with
Detectron2's standard COCO tooling.

Everything is a pure function of ``(split, num_images, seed, min_side, max_side, max_objects)``:
the same arguments always give byte-identical files. Generation is idempotent (a complete json
with the same parameters is left alone) and atomic (the json, which is written last, only ever
refers to images that are fully written).

Typical use::

    from vimdet.data import register_shapes_dataset
    register_shapes_dataset("my_shapes_train", "/tmp/shapes", "train", num_images=100, seed=0)
    # ... cfg.DATASETS.TRAIN = ("my_shapes_train",); files are generated on first use.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = [
    "SHAPES_CLASSES",
    "generate_shapes_dataset",
    "register_shapes_dataset",
    "ensure_shapes_dataset",
    "register_builtin_shapes",
]

logger = logging.getLogger(__name__)

#: Class names, in category-id order (COCO category id = index + 1).
SHAPES_CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle", "ellipse", "star")

# Bump when the drawing code changes so that previously generated data is regenerated.
_GENERATOR_VERSION = 2
_MIN_SIDE_LIMIT = 32  # smallest image side we can place objects on
_MAX_SIDE_LIMIT = 8192
_MIN_OBJECT_SIZE = 12.0  # px, extent of the smallest objects
_MIN_BOX_SIDE = 4  # px, every box is at least this wide and tall
_MIN_VISIBLE_FRACTION = 0.5  # each object keeps at least this much of its area visible
_MIN_COMPONENT_AREA = 20  # px, no tiny visible fragments (they would make degenerate polygons)
_MIN_CONTRAST = 60.0  # Euclidean RGB distance between an object colour and what lies under it
_JPEG_QUALITY = 92
# Splits at least this large are drawn by a pool of worker processes.
_PARALLEL_MIN_IMAGES = 200
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------
# Parameter handling
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ShapesSpec:
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
            "generator_version": _GENERATOR_VERSION,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _make_spec(
    root: str | os.PathLike,
    split: str,
    num_images: int,
    seed: int,
    min_side: int,
    max_side: int,
    max_objects: int,
) -> _ShapesSpec:
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
    return _ShapesSpec(
        root=root_str,
        split=split,
        num_images=int(num_images),
        seed=int(seed),
        min_side=int(min_side),
        max_side=int(max_side),
        max_objects=int(max_objects),
    )


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3)


def _draw_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A cluttered float32 background: gradient, low-frequency noise, lines, soft blobs."""
    # Linear gradient between two random colours in a random direction.
    c0 = _random_color(rng).astype(np.float32)
    c1 = _random_color(rng).astype(np.float32)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.cos(theta))
    ys = np.arange(height, dtype=np.float32)[:, None] * np.float32(math.sin(theta))
    t = xs + ys
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + t[..., None] * (c1 - c0)

    # Low-frequency colour noise (smooth blotches).
    grid_shape = (int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3)
    grid = rng.normal(0.0, rng.uniform(8.0, 30.0), size=grid_shape)
    img += cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)

    # Soft, blurred blobs (no sharp edges, so they do not look like objects). They are drawn
    # at 1/4 resolution and upsampled: large Gaussian blurs at full resolution are slow.
    f = 4
    low_h, low_w = -(-height // f), -(-width // f)
    blob_layer = np.zeros((low_h, low_w, 3), np.float32)
    blob_alpha = np.zeros((low_h, low_w), np.float32)
    for _ in range(int(rng.integers(1, 7))):
        center = (int(rng.integers(0, width)) // f, int(rng.integers(0, height)) // f)
        axes = (int(rng.integers(4, max(5, width // 4))), int(rng.integers(4, max(5, height // 4))))
        alpha = np.zeros((low_h, low_w), np.float32)
        low_axes = (max(1, axes[0] // f), max(1, axes[1] // f))
        cv2.ellipse(alpha, center, low_axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        sigma = max(max(axes) * rng.uniform(0.3, 0.6) / f, 0.5)
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=sigma) * rng.uniform(0.2, 0.5)
        blob_layer += alpha[..., None] * _random_color(rng).astype(np.float32)
        blob_alpha += alpha
    blob_alpha = np.clip(blob_alpha, 0.0, 1.0)
    blob_layer = cv2.resize(blob_layer, (width, height), interpolation=cv2.INTER_LINEAR)
    blob_alpha = cv2.resize(blob_alpha, (width, height), interpolation=cv2.INTER_LINEAR)
    img = img * (1.0 - blob_alpha[..., None]) + blob_layer

    # Thin random lines and polylines (clutter that is not an object).
    for _ in range(int(rng.integers(3, 14))):
        color = tuple(float(c) for c in _random_color(rng))
        n_pts = int(rng.integers(2, 4))
        pts = np.stack(
            [rng.integers(-10, width + 10, n_pts), rng.integers(-10, height + 10, n_pts)], axis=1
        ).astype(np.int32)
        cv2.polylines(img, [pts], False, color, int(rng.integers(1, 3)), cv2.LINE_AA)

    # Fine per-pixel (luminance) noise.
    noise = rng.standard_normal((height, width, 1), dtype=np.float32)
    img += noise * np.float32(rng.uniform(2.0, 10.0))
    return img


def _shape_polygon(rng: np.random.Generator, cls: str, size: float) -> np.ndarray:
    """A polygon (N, 2) for class ``cls`` with extent ~``size``, centred on the origin."""
    r = size / 2.0
    if cls == "circle":
        ang = np.linspace(0.0, 2.0 * math.pi, 64, endpoint=False)
        pts = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
    elif cls == "ellipse":
        ang = np.linspace(0.0, 2.0 * math.pi, 64, endpoint=False)
        b = r * rng.uniform(0.3, 0.65)
        pts = np.stack([r * np.cos(ang), b * np.sin(ang)], axis=1)
    elif cls == "rectangle":
        h = r * rng.uniform(0.25, 1.0)
        pts = np.array([[-r, -h], [r, -h], [r, h], [-r, h]], dtype=np.float64)
    elif cls == "triangle":
        ang = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-25.0, 25.0, size=3))
        rad = r * rng.uniform(0.75, 1.0, size=3)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        pts[:, 1] *= rng.uniform(0.6, 1.0)
    elif cls == "star":
        n_tips = 5
        ang = np.linspace(0.0, 2.0 * math.pi, 2 * n_tips, endpoint=False) - math.pi / 2
        rad = np.where(np.arange(2 * n_tips) % 2 == 0, r, r * rng.uniform(0.38, 0.55))
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        pts[:, 1] *= rng.uniform(0.75, 1.0)
    else:  # pragma: no cover - internal error
        raise ValueError(f"unknown shape class {cls!r}")

    # Rotation (rectangles are often axis aligned, as in many real scenes).
    if cls == "rectangle" and rng.random() < 0.4:
        angle = float(rng.choice([0.0, math.pi / 2]))
    else:
        angle = rng.uniform(0.0, 2.0 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T


def _mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (exclusive ends) of the set pixels of ``mask``, or None if empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    if len(cols) == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _rasterize(poly: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fill ``poly`` (float pixel coordinates) into a uint8 {0, 1} mask."""
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(poly * 16.0).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask


def _mask_ok(mask: np.ndarray) -> bool:
    """True if a visible mask is annotatable: big enough box, no holes, no tiny fragments."""
    bounds = _mask_bounds(mask)
    if bounds is None:
        return False
    x0, y0, x1, y1 = bounds
    if x1 - x0 < _MIN_BOX_SIDE or y1 - y0 < _MIN_BOX_SIDE:
        return False
    crop = np.ascontiguousarray(mask[y0:y1, x0:x1])
    n, _, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    if n < 2 or stats[1:, cv2.CC_STAT_AREA].min() < _MIN_COMPONENT_AREA:
        return False
    # Holes cannot be expressed by COCO polygons: reject masks whose contours have children.
    padded = cv2.copyMakeBorder(crop, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    _, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is None or bool(np.all(hierarchy[0][:, 3] == -1))


def _mask_to_annotation(mask: np.ndarray) -> tuple[list[float], float, list[list[float]]]:
    """Box (XYWH, pixel-edge coordinates), area and COCO polygons of a binary mask.

    Contours are traced on a 4x upsampled mask so that the polygons follow pixel edges and
    round-trip through ``pycocotools`` rasterisation almost exactly.
    """
    bounds = _mask_bounds(mask)
    assert bounds is not None
    x0, y0, x1, y1 = bounds
    bbox = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    crop = np.ascontiguousarray(mask[y0:y1, x0:x1])
    scale = 4
    up = cv2.resize(
        crop, (crop.shape[1] * scale, crop.shape[0] * scale), interpolation=cv2.INTER_NEAREST
    )
    up = cv2.copyMakeBorder(up, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        contour = cv2.approxPolyDP(contour, 2.0, True).reshape(-1, 2).astype(np.float64)
        if len(contour) < 3:
            continue
        pts = (contour - 1.0 + 0.5) / scale + np.array([x0, y0], dtype=np.float64)
        pts[:, 0] = np.clip(pts[:, 0], 0.0, mask.shape[1])
        pts[:, 1] = np.clip(pts[:, 1], 0.0, mask.shape[0])
        polygons.append([round(float(v), 2) for v in pts.ravel()])
    return bbox, float(mask.sum()), polygons


def _texture(
    rng: np.random.Generator, height: int, width: int, colors: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """A (height, width, 3) float32 texture: solid, striped or noisy, with mild shading."""
    primary, secondary = colors
    kind = rng.choice(["solid", "striped", "noisy"], p=[0.45, 0.3, 0.25])
    tex = np.empty((height, width, 3), np.float32)
    tex[:] = primary
    if kind == "striped":
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        theta = rng.uniform(0.0, math.pi)
        period = rng.uniform(3.0, 12.0)
        phase = (xs * math.cos(theta) + ys * math.sin(theta)) / period
        stripe = (phase - np.floor(phase)) < rng.uniform(0.3, 0.7)
        tex[stripe] = secondary
    elif kind == "noisy":
        sigma = rng.uniform(12.0, 35.0)
        if rng.random() < 0.5:  # per-pixel grain
            tex += rng.standard_normal(tex.shape, dtype=np.float32) * sigma
        else:  # blotchy noise
            small = rng.normal(0.0, sigma, size=(max(2, height // 4), max(2, width // 4), 3))
            tex += cv2.resize(small.astype(np.float32), (width, height), cv2.INTER_LINEAR)
    # Mild linear shading across the object.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gx, gy = rng.uniform(-1.0, 1.0, size=2) * rng.uniform(0.0, 40.0)
    shade = gx * xs / max(width, 1) + gy * ys / max(height, 1)
    tex += (shade - shade.mean())[..., None]
    tex += rng.standard_normal(tex.shape, dtype=np.float32) * 3.0
    return tex


def _pick_colors(rng: np.random.Generator, under: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two object colours that contrast with the mean colour ``under`` the object."""
    best, best_dist = _random_color(rng), -1.0
    for _ in range(12):
        color = _random_color(rng)
        dist = float(np.linalg.norm(color - under))
        if dist > best_dist:
            best, best_dist = color, dist
        if dist >= _MIN_CONTRAST:
            break
    if rng.random() < 0.5:
        secondary = np.clip(best * rng.uniform(0.35, 0.7), 0.0, 255.0)
    else:
        secondary = np.clip(best + rng.uniform(-90.0, 90.0, size=3), 0.0, 255.0)
    return best, secondary


def _paint(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> None:
    """Paint a textured object into ``img`` (in place) where ``mask`` is set."""
    bounds = _mask_bounds(mask)
    assert bounds is not None
    x0, y0, x1, y1 = bounds
    sel = mask[y0:y1, x0:x1].astype(bool)
    region = img[y0:y1, x0:x1]
    colors = _pick_colors(rng, region[sel].mean(axis=0))
    tex = _texture(rng, y1 - y0, x1 - x0, colors)
    if rng.random() < 0.3:  # a darker or lighter outline, kept inside the mask
        crop = np.ascontiguousarray(mask[y0:y1, x0:x1])
        inner = cv2.erode(crop, np.ones((3, 3), np.uint8), iterations=int(rng.integers(1, 3)))
        ring = (crop > 0) & (inner == 0)
        tex[ring] = colors[0] * rng.choice([0.3, 1.6])
    region[sel] = tex[sel]


def _generate_image(
    rng: np.random.Generator, spec: _ShapesSpec
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image; return it (uint8 BGR) and its objects (category_id, bbox, area, segm)."""
    width = int(rng.integers(spec.min_side, spec.max_side + 1))
    height = int(rng.integers(spec.min_side, spec.max_side + 1))
    img = _draw_background(rng, height, width)

    labels = np.zeros((height, width), np.int32)  # 0 = background, k = k-th placed object
    full_areas: list[float] = []
    classes: list[int] = []
    max_size = 0.5 * min(width, height)
    min_size = min(_MIN_OBJECT_SIZE, max_size)
    n_target = int(rng.integers(1, spec.max_objects + 1))

    attempts = 0
    while len(classes) < n_target and attempts < 30 * n_target:
        attempts += 1
        cls_idx = int(rng.integers(len(SHAPES_CLASSES)))
        size = math.exp(rng.uniform(math.log(min_size), math.log(max_size)))
        poly = _shape_polygon(rng, SHAPES_CLASSES[cls_idx], size)
        if classes and rng.random() < 0.35:
            # Encourage overlaps: put the new object next to an existing one.
            ys, xs = np.nonzero(labels == int(rng.integers(1, len(classes) + 1)))
            if len(xs):
                j = int(rng.integers(len(xs)))
                center = np.array([xs[j], ys[j]], np.float64) + rng.normal(0, size / 3, 2)
            else:
                center = rng.uniform([0, 0], [width, height])
        else:
            center = rng.uniform([0, 0], [width, height])
        mask = _rasterize(poly + center, height, width)
        full_area = max(float(cv2.contourArea(poly.astype(np.float32))), 1.0)
        vis = int(mask.sum())
        if vis < _MIN_VISIBLE_FRACTION * full_area or not _mask_ok(mask):
            continue  # mostly outside the image or degenerate

        # Objects drawn earlier must stay mostly visible and annotatable.
        occluded = np.bincount(labels[mask > 0], minlength=len(classes) + 1)
        current = np.bincount(labels.ravel(), minlength=len(classes) + 1)
        ok = True
        for k in np.nonzero(occluded[1:])[0] + 1:
            if current[k] - occluded[k] < _MIN_VISIBLE_FRACTION * full_areas[k - 1]:
                ok = False
                break
            if not _mask_ok(((labels == k) & (mask == 0)).astype(np.uint8)):
                ok = False
                break
        if not ok:
            continue

        _paint(rng, img, mask)
        labels[mask > 0] = len(classes) + 1
        full_areas.append(full_area)
        classes.append(cls_idx)

    if not classes:  # practically unreachable; guarantees at least one object per image
        poly = _shape_polygon(rng, "rectangle", max_size)
        mask = _rasterize(poly + np.array([width / 2, height / 2]), height, width)
        _paint(rng, img, mask)
        labels[mask > 0] = 1
        classes.append(1)

    # Global camera-like degradation: slight blur and sensor noise.
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.4, 1.0))
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(1.0, 5.0)
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)

    objects = []
    for k, cls_idx in enumerate(classes, start=1):
        bbox, area, polygons = _mask_to_annotation((labels == k).astype(np.uint8))
        if not polygons:  # pragma: no cover - excluded by _mask_ok
            continue
        objects.append(
            {"category_id": cls_idx + 1, "bbox": bbox, "area": area, "segmentation": polygons}
        )
    return out, objects


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


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


def _is_complete(spec: _ShapesSpec) -> bool:
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


def _prepare_dirs(spec: _ShapesSpec) -> None:
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
def _generation_lock(spec: _ShapesSpec) -> Iterator[None]:
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


def _generate(spec: _ShapesSpec) -> Path:
    if _is_complete(spec):
        return spec.json_path
    _prepare_dirs(spec)
    with _generation_lock(spec):
        # Another process may have finished the same split while we waited for the lock.
        if _is_complete(spec):
            return spec.json_path
        return _generate_locked(spec)


def _render_image(spec: _ShapesSpec, index: int) -> tuple[dict, list[dict]]:
    """Draw image ``index`` of a split, write its file; return its COCO record and objects."""
    image_id = index + 1
    # Per-image generator: image i depends only on (seed, split, i), not on num_images.
    rng = np.random.default_rng([spec.seed, _split_key(spec.split), index])
    img, objects = _generate_image(rng, spec)
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


def _generate_locked(spec: _ShapesSpec) -> Path:
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
            "version": str(_GENERATOR_VERSION),
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
    spec = _make_spec(root, split, num_images, seed, min_side, max_side, max_objects)
    return _generate(spec)


# ---------------------------------------------------------------------------------------------
# Detectron2 registration
# ---------------------------------------------------------------------------------------------

_REGISTERED: dict[str, _ShapesSpec] = {}

_BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    "vimdet_shapes_train": {
        "subdir": "vimdet_shapes",
        "split": "train",
        "num_images": 160,
        "seed": 0,
    },
    "vimdet_shapes_val": {
        "subdir": "vimdet_shapes",
        "split": "val",
        "num_images": 48,
        "seed": 1,
    },
    # The CPU demo (`make demo`): the small images, a larger training split and a val split
    # of 200 images, so that its AP is not a matter of a few lucky boxes.
    "vimdet_shapes_demo_train": {
        "subdir": "vimdet_shapes_demo",
        "split": "train",
        "num_images": 2000,
        "seed": 0,
    },
    "vimdet_shapes_demo_val": {
        "subdir": "vimdet_shapes_demo",
        "split": "val",
        "num_images": 200,
        "seed": 1,
    },
    "vimdet_shapes_large_train": {
        "subdir": "vimdet_shapes_large",
        "split": "train",
        "num_images": 4000,
        "seed": 0,
        "min_side": 480,
        "max_side": 800,
    },
    "vimdet_shapes_large_val": {
        "subdir": "vimdet_shapes_large",
        "split": "val",
        "num_images": 300,
        "seed": 1,
        "min_side": 480,
        "max_side": 800,
    },
}


def ensure_shapes_dataset(name: str) -> Path:
    """Generate the files of the registered shapes dataset ``name`` if needed; return its json.

    Call this before constructing a ``COCOEvaluator`` for a shapes dataset whose data may not
    have been loaded yet (the evaluator opens ``metadata.json_file`` in its constructor).
    """
    spec = _REGISTERED.get(name)
    if spec is None:
        raise KeyError(
            f"{name!r} is not a registered ViMDet shapes dataset. Registered shapes datasets: "
            f"{sorted(_REGISTERED)}; register it first with register_shapes_dataset()."
        )
    return _generate(spec)


def _load_shapes(name: str) -> list[dict]:
    from detectron2.data.datasets import load_coco_json

    json_path = ensure_shapes_dataset(name)
    return load_coco_json(str(json_path), str(_REGISTERED[name].image_root), name)


def register_shapes_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    num_images: int,
    seed: int,
    *,
    min_side: int = 160,
    max_side: int = 320,
    max_objects: int = 6,
) -> None:
    """Register ``name`` in Detectron2's ``DatasetCatalog``/``MetadataCatalog``.

    Nothing is generated here: the registered loader generates the files on first use and then
    returns ``load_coco_json(json, image_root, name)`` (boxes in ``BoxMode.XYWH_ABS``).
    Registering the same name again with identical parameters is a no-op; with different
    parameters it raises ``ValueError``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    spec = _make_spec(root, split, num_images, seed, min_side, max_side, max_objects)
    if name in DatasetCatalog.list():
        if _REGISTERED.get(name) == spec:
            return
        raise ValueError(
            f"Dataset {name!r} is already registered (with a different loader or parameters); "
            "choose another name or DatasetCatalog.remove() / MetadataCatalog.remove() it first."
        )
    _REGISTERED[name] = spec
    DatasetCatalog.register(name, lambda: _load_shapes(name))
    MetadataCatalog.get(name).set(
        thing_classes=list(SHAPES_CLASSES),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
        json_file=str(spec.json_path),
        image_root=str(spec.image_root),
        evaluator_type="coco",
    )


def register_builtin_shapes(root: str | None = None) -> None:
    """Register the built-in ``vimdet_shapes_*`` datasets (cheap: nothing is generated).

    ``root`` is the datasets folder (default: ``$DETECTRON2_DATASETS`` or ``"datasets"``); the
    small datasets live in ``<root>/vimdet_shapes`` and the large ones in
    ``<root>/vimdet_shapes_large``. Names that are already registered are skipped.
    """
    from detectron2.data import DatasetCatalog

    if root is None:
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
    registered = set(DatasetCatalog.list())
    for name, kwargs in _BUILTIN_SPECS.items():
        if name in registered:
            continue
        kwargs = dict(kwargs)
        subdir = kwargs.pop("subdir")
        register_shapes_dataset(name, os.path.join(root, subdir), **kwargs)
