"""Bad annotations and images are found when the dataset is loaded, each named by id or file."""

import json
import logging

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from vimdet import add_vimdet_config
from vimdet.data import CheckedDatasetMapper
from vimdet.data.validation import check_coco_json, check_images
from vimdet.engine.exact_resume import ResumableTrainStream
from vimdet.engine.train_data import build_checked_train_loader


def coco(tmp_path, annotations=None, images=None, categories=None):
    """A 2-image COCO file (images written as 8-bit JPEGs) with the given overrides."""
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(tmp_path / name), np.full((20, 30, 3), 90, np.uint8))
    data = {
        "images": images
        or [
            {"id": 1, "file_name": "a.jpg", "width": 30, "height": 20},
            {"id": 2, "file_name": "b.jpg", "width": 30, "height": 20},
        ],
        "annotations": annotations
        or [
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 8, "image_id": 2, "category_id": 1, "bbox": [3, 2, 10, 5], "iscrowd": 0},
        ],
        "categories": categories or [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def box(bbox, **extra):
    return [dict({"id": 7, "image_id": 1, "category_id": 1, "bbox": bbox}, **extra)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"annotations": box([5, 5, -4, 3])},
            "annotation 7: bbox [5, 5, -4, 3] has a negative",
        ),
        ({"annotations": box([1, 2, 3])}, "image 1, annotation 7: bbox [1, 2, 3] is not 4 finite"),
        ({"annotations": box(["1", 2, 3, 4])}, "annotation 7: bbox ['1', 2, 3, 4] is not 4 finite"),
        ({"annotations": box([1, 2, 3, 4], category_id=9)}, "category_id 9 is not a category"),
        ({"annotations": box([1, 2, 3, 4], image_id=5)}, "image_id is not the id of an image"),
        ({"annotations": box([1, 2, 3, 4], id="x")}, "has no integer id"),
        ({"images": [{"id": 1, "file_name": "a.jpg", "width": 30}]}, "image 1: height None"),
        ({"categories": [{"id": 1}, {"id": 2}]}, "2 categories but the model predicts 1"),
    ],
    ids=["negative", "3-numbers", "string", "category", "image-id", "ann-id", "size", "classes"],
)
def test_malformed_annotations_are_listed_by_id(tmp_path, kwargs, message):
    path = coco(tmp_path, **kwargs)
    with pytest.raises(ValueError, match="problems") as caught:
        check_coco_json(str(path), num_classes=1, dataset_name="mine")
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_truncated_json_names_the_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match="instances.json is not complete JSON") as caught:
        check_coco_json(str(path))
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def test_zero_size_boxes_are_reported(tmp_path, caplog):
    path = coco(tmp_path, annotations=box([1, 2, 0, 4]))
    with caplog.at_level(logging.WARNING, logger="vimdet"):
        assert check_coco_json(str(path), num_classes=1) == ["image 1, annotation 7"]
    assert "1 annotations have a zero-size box and are not used for training" in caplog.text


def test_sixteen_bit_png_is_refused_by_name(tmp_path):
    path = tmp_path / "depth.png"
    cv2.imwrite(str(path), (np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    record = {"file_name": str(path), "width": 30, "height": 20, "image_id": 3}
    with pytest.raises(OSError, match=r"depth.png \(image id 3\): its pixels are 'I;16'"):
        check_images([record])
    cfg = get_cfg()
    add_vimdet_config(cfg)
    mapper = CheckedDatasetMapper(cfg, is_train=False)
    with pytest.raises(OSError, match=r"cannot read image '.*depth.png'.*16-bit"):
        mapper(dict(record, annotations=[]))


def test_image_headers_are_checked_before_training(tmp_path):
    path = coco(tmp_path)
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((25, 30, 3), np.uint8))
    name = f"vimdet_test_headers_{tmp_path.name}"
    register_coco_instances(name, {}, str(path), str(tmp_path))
    cfg = get_cfg()
    add_vimdet_config(cfg)
    cfg.DATASETS.TRAIN = (name,)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    try:
        with pytest.raises(OSError) as caught:
            build_checked_train_loader(cfg)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    message = str(caught.value)
    assert "2 of 2 training images cannot be used" in message
    assert "a.jpg (image id 1): it is 30x25 but the annotation says 30x20" in message
    assert "b.jpg (image id 2): it cannot be opened as an image" in message


def records(count):
    return [{"file_name": f"{i}.jpg", "width": 30 + i % 2 * 10, "height": 35} for i in range(count)]


def test_stream_starts_at_any_batch():
    stream = ResumableTrainStream(records(7), lambda r: r["file_name"], batch_size=2, seed=3)
    full = [next(batch) for batch in [iter(stream)] for _ in range(6)]
    stream.start_batch = 4
    resumed = iter(stream)
    assert [next(resumed), next(resumed)] == full[4:6]


def test_images_failing_mid_run_are_skipped_then_stop_the_run(caplog):
    def mapper(record):
        if record["file_name"] in ("1.jpg", "2.jpg"):
            raise OSError(f"cannot read image {record['file_name']!r}")
        return record["file_name"]

    stream = ResumableTrainStream(records(4), mapper, 2, seed=0, max_bad_images=1)
    batches = iter(stream)
    with caplog.at_level(logging.WARNING, logger="vimdet"):
        with pytest.raises(OSError, match=r"(?s)2 training images failed.*MAX_BAD_IMAGES \(1\)"):
            for _ in range(4):
                next(batches)
    assert "Skipping training image" in caplog.text and "1 of at most 1 skipped" in caplog.text
