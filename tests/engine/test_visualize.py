"""Prediction pictures: ground truth | predictions, titled, small images enlarged."""

import numpy as np
import torch
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, BoxMode, Instances

from vimdet.engine.visualize import MIN_DRAWN_SIDE, draw_predictions, merge_same_boxes

METADATA = Metadata(name="test_shapes", thing_classes=["circle", "rectangle"])


def instances(height, width):
    result = Instances((height, width))
    result.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 90.0, 90.0]]))
    result.scores = torch.tensor([0.9, 0.1])
    result.pred_classes = torch.tensor([1, 0])
    return result


def test_small_image_is_enlarged_and_drawn_beside_its_ground_truth():
    image = np.full((128, 160, 3), 100, dtype=np.uint8)
    truth = {
        "annotations": [{"bbox": [10, 10, 50, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1}]
    }
    picture = draw_predictions(image, instances(128, 160), METADATA, 0.5, ground_truth=truth)
    scale = MIN_DRAWN_SIDE / 128
    panel_width = round(160 * scale)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert picture.shape[0] > MIN_DRAWN_SIDE  # the image plus a title strip
    assert picture.shape[1] > 2 * panel_width  # two panels and a divider
    # Both panels carry drawings (boxes, labels, titles), not just the grey image.
    left, right = picture[:, :panel_width], picture[:, -panel_width:]
    assert (left != 100).any(axis=2).mean() > 0.05
    assert (right != 100).any(axis=2).mean() > 0.05


def test_large_image_keeps_its_size_and_single_panel():
    side = MIN_DRAWN_SIDE + 64
    image = np.zeros((side, side + 32, 3), dtype=np.uint8)
    picture = draw_predictions(image, instances(side, side + 32), METADATA, 0.5)
    assert picture.shape[1] == side + 32 and picture.shape[0] > side


def test_one_box_under_several_classes_is_drawn_once_with_every_score():
    names = ["circle", "rectangle", "star"].__getitem__
    boxes = torch.tensor(
        [
            [10.0, 10.0, 60.0, 50.0],  # star 16%
            [80.0, 80.0, 120.0, 120.0],  # another object: circle 50%
            [10.5, 10.0, 60.0, 50.5],  # the first box again: rectangle 20%
            [10.0, 10.0, 30.0, 30.0],  # overlapping the first, IoU 0.2: its own box
        ]
    )
    merged, classes, labels = merge_same_boxes(
        boxes, torch.tensor([2, 0, 1, 0]), torch.tensor([0.16, 0.5, 0.2, 0.3]), names
    )
    assert labels == ["circle 50%", "circle 30%", "rectangle 20% (star 16%)"]
    assert classes == [0, 0, 1]
    np.testing.assert_array_equal(merged, boxes[[1, 3, 2]].numpy())
    empty = merge_same_boxes(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), names)
    assert empty[0].shape == (0, 4) and empty[1:] == ([], [])
