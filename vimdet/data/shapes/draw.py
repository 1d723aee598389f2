"""Drawing of the shapes dataset: cluttered backgrounds, textured objects, their COCO polygons.

Everything is a pure function of the random generator: the same generator state always gives the
same image and annotations.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

__all__ = ["GENERATOR_VERSION", "SHAPES_CLASSES", "draw_image"]

#: Class names, in category-id order (COCO category id = index + 1).
SHAPES_CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle", "ellipse", "star")

# Bump when the drawing code changes so that previously generated data is regenerated.
GENERATOR_VERSION = 2
_MIN_OBJECT_SIZE = 12.0  # px, extent of the smallest objects
_MIN_BOX_SIDE = 4  # px, every box is at least this wide and tall
_MIN_VISIBLE_FRACTION = 0.5  # each object keeps at least this much of its area visible
_MIN_COMPONENT_AREA = 20  # px, no tiny visible fragments (they would make degenerate polygons)
_MIN_CONTRAST = 60.0  # Euclidean RGB distance between an object colour and what lies under it


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


def draw_image(
    rng: np.random.Generator, min_side: int, max_side: int, max_objects: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image; return it (uint8 BGR) and its objects (category_id, bbox, area, segm).

    Width and height are drawn independently from [min_side, max_side]; the image holds 1 to
    ``max_objects`` objects, each at least half visible.
    """
    width = int(rng.integers(min_side, max_side + 1))
    height = int(rng.integers(min_side, max_side + 1))
    img = _draw_background(rng, height, width)

    labels = np.zeros((height, width), np.int32)  # 0 = background, k = k-th placed object
    full_areas: list[float] = []
    classes: list[int] = []
    max_size = 0.5 * min(width, height)
    min_size = min(_MIN_OBJECT_SIZE, max_size)
    n_target = int(rng.integers(1, max_objects + 1))

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
