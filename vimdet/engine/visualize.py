"""Prediction pictures: a model's boxes beside the ground truth, with Detectron2's Visualizer."""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, BoxMode, Instances, pairwise_iou
from detectron2.utils.visualizer import Visualizer

__all__ = [
    "draw_predictions",
    "merge_same_boxes",
    "predict_image",
    "to_rgb",
    "write_prediction_pngs",
]

#: Detections whose boxes overlap this much are drawn as one box with several class scores.
SAME_BOX_IOU = 0.7


@torch.no_grad()
def predict_image(model: torch.nn.Module, image: np.ndarray, cfg: CfgNode) -> Instances:
    """Run ``model`` (eval mode) on one image in ``cfg.INPUT.FORMAT``, (H, W, 3) uint8.

    Resizes like the test loader (shortest edge MIN_SIZE_TEST, at most MAX_SIZE_TEST) and returns
    the instances in the image's own coordinates, on the CPU.
    """
    height, width = image.shape[:2]
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    resized = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    was_training = model.training
    model.eval()
    try:
        outputs = model([{"image": tensor, "height": height, "width": width}])[0]
    finally:
        model.train(was_training)
    return outputs["instances"].to("cpu")


def to_rgb(image: np.ndarray, image_format: str) -> np.ndarray:
    """An image read in ``image_format`` (RGB or BGR) as RGB."""
    return image[:, :, ::-1] if image_format == "BGR" else image


#: Small images are enlarged to this shorter side (px) before drawing, so that the boxes and
#: their labels stay legible on the 160-320 px shapes images.
MIN_DRAWN_SIDE = 512
# Label text size relative to the Visualizer's default (about 10 px at these sizes).
_FONT_SCALE = 1.6
# Height (px) of the white strip above each panel that holds its title.
_TITLE_HEIGHT = 34
# One colour per class (RGB in [0, 1]), the same in both panels: a box's colour names its class.
_CLASS_COLORS = (
    (0.12, 0.47, 0.71),
    (1.00, 0.50, 0.05),
    (0.17, 0.63, 0.17),
    (0.84, 0.15, 0.16),
    (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29),
    (0.89, 0.47, 0.76),
    (0.50, 0.50, 0.50),
)


def merge_same_boxes(
    boxes: torch.Tensor,
    classes: torch.Tensor,
    scores: torch.Tensor,
    name: Callable[[int], str],
    same_iou: float = SAME_BOX_IOU,
) -> Tuple[np.ndarray, List[int], List[str]]:
    """One box per object for the picture: detections whose boxes overlap the best-scoring one
    by IoU >= ``same_iou`` are taken as the same object under other classes (Cascade R-CNN's
    boxes are class-agnostic, so one proposal gives the same box for every class), drawn once
    as "best 20% (second 16%, ...)" in the best class's colour.

    Args: ``boxes`` (N, 4) XYXY, ``classes`` (N,), ``scores`` (N,); ``name`` maps a class id to
    its label. Returns the boxes (M, 4), their classes and their labels, best first.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    iou = pairwise_iou(Boxes(boxes[order]), Boxes(boxes[order]))
    taken = torch.zeros(len(order), dtype=torch.bool)
    kept_boxes, kept_classes, labels = [], [], []
    for i in range(len(order)):
        if taken[i]:
            continue
        group = torch.nonzero((iou[i] >= same_iou) & ~taken).flatten()
        taken[group] = True
        members = [(int(classes[order[j]]), float(scores[order[j]])) for j in group]
        text = [f"{name(c)} {s:.0%}" for c, s in members]
        labels.append(text[0] + (f" ({', '.join(text[1:])})" if len(text) > 1 else ""))
        kept_boxes.append(boxes[order[i]].numpy())
        kept_classes.append(members[0][0])
    return np.array(kept_boxes, dtype=np.float32).reshape(-1, 4), kept_classes, labels


def _draw_boxes(
    image_rgb: np.ndarray, boxes: np.ndarray, classes: List[int], labels: List[str]
) -> np.ndarray:
    """``boxes`` (N, 4) XYXY in ``image_rgb``'s pixels, drawn with their labels in class colours."""
    colors = [_CLASS_COLORS[c % len(_CLASS_COLORS)] for c in classes]
    visualizer = Visualizer(image_rgb, font_size_scale=_FONT_SCALE)
    return visualizer.overlay_instances(
        boxes=boxes, labels=labels, assigned_colors=colors
    ).get_image()


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """``panel`` under a white strip that holds ``title``."""
    strip = np.full((_TITLE_HEIGHT, panel.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(strip, title, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2, cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


def draw_predictions(
    image_rgb: np.ndarray,
    instances: Instances,
    metadata,
    score_thresh: float,
    ground_truth: Dict | None = None,
) -> np.ndarray:
    """Draw the boxes scoring at least ``score_thresh`` ("class score%"), under a title; with
    ``ground_truth`` (a dataset dict), put the ground truth on the left and the predictions on
    the right. Images whose shorter side is below ``MIN_DRAWN_SIDE`` are enlarged first.
    Returns RGB uint8."""
    names = metadata.get("thing_classes", None) or []
    scale = max(1.0, MIN_DRAWN_SIDE / min(image_rgb.shape[:2]))
    if scale > 1.0:
        size = (round(image_rgb.shape[1] * scale), round(image_rgb.shape[0] * scale))
        image_rgb = cv2.resize(image_rgb, size, interpolation=cv2.INTER_CUBIC)

    def name(class_id: int) -> str:
        return names[class_id] if class_id < len(names) else str(class_id)

    kept = instances[instances.scores >= score_thresh]
    boxes, classes, labels = merge_same_boxes(
        kept.pred_boxes.tensor, kept.pred_classes, kept.scores, name
    )
    boxes = boxes * scale
    title = f"predictions (score >= {score_thresh:g})" + ("" if len(kept) else ": none")
    predicted = _titled(_draw_boxes(image_rgb, boxes, classes, labels), title)
    if ground_truth is None:
        return predicted
    annotations = ground_truth.get("annotations", [])
    boxes = np.array(
        [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations],
        dtype=np.float32,
    ).reshape(-1, 4)
    classes = [a["category_id"] for a in annotations]
    truth = _titled(
        _draw_boxes(image_rgb, boxes * scale, classes, [name(c) for c in classes]),
        "ground truth",
    )
    divider = np.full((truth.shape[0], 12, 3), 255, dtype=np.uint8)
    return np.concatenate([truth, divider, predicted], axis=1)


def write_prediction_pngs(
    cfg: CfgNode,
    model: torch.nn.Module,
    dataset_name: str,
    output_dir: str,
    num_images: int,
    score_thresh: float,
) -> List[str]:
    """Write ``num_images`` PNGs (ground truth | predictions) of ``dataset_name``; return paths."""
    os.makedirs(output_dir, exist_ok=True)
    metadata = MetadataCatalog.get(dataset_name)
    paths: List[str] = []
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        instances = predict_image(model, image, cfg)
        picture = draw_predictions(
            to_rgb(image, cfg.INPUT.FORMAT), instances, metadata, score_thresh, ground_truth=record
        )
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = os.path.join(output_dir, f"{stem}.png")
        if path in paths:  # two images share a file name (in different folders)
            path = os.path.join(output_dir, f"{stem}_id{record['image_id']}.png")
        if not cv2.imwrite(path, picture[:, :, ::-1]):
            raise OSError(f"could not write {path!r}; is the folder writable and not full?")
        paths.append(path)
    return paths
