"""Prediction pictures: a model's boxes beside the ground truth, with Detectron2's Visualizer."""

from __future__ import annotations

import os
from typing import Dict, List

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer

__all__ = ["predict_image", "draw_predictions", "to_rgb", "write_prediction_pngs"]


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


def draw_predictions(
    image_rgb: np.ndarray,
    instances: Instances,
    metadata,
    score_thresh: float,
    ground_truth: Dict | None = None,
) -> np.ndarray:
    """Draw boxes scoring at least ``score_thresh``; with ``ground_truth`` (a dataset dict), put
    the ground truth on the left and the predictions on the right. Returns RGB uint8."""
    kept = instances[instances.scores >= score_thresh]
    predicted = Visualizer(image_rgb, metadata).draw_instance_predictions(kept).get_image()
    if ground_truth is None:
        return predicted
    truth = Visualizer(image_rgb, metadata).draw_dataset_dict(ground_truth).get_image()
    divider = np.full((truth.shape[0], 8, 3), 255, dtype=np.uint8)
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
