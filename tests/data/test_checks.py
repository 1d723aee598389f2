"""Bad data gets an error that names the file: corrupt images, missing and malformed json."""

import json

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data.datasets import register_coco_instances

from vimdet import add_vimdet_config
from vimdet.data import CheckedDatasetMapper, explain_dataset_errors


def mapper_cfg():
    cfg = get_cfg()
    add_vimdet_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    return cfg


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    mapper = CheckedDatasetMapper(mapper_cfg(), is_train=True)
    record = {"file_name": str(bad), "height": 10, "width": 10, "image_id": 1, "annotations": []}
    with pytest.raises(OSError, match=r"cannot read image '.*broken.jpg'.*annotation json"):
        mapper(record)
    record["file_name"] = str(tmp_path / "missing.jpg")
    with pytest.raises(OSError, match="missing.jpg"):
        mapper(record)


@pytest.mark.parametrize(
    "content, error, kind, hint",
    [
        ("", "JSONDecodeError", ValueError, "not complete JSON"),
        ('{"images": [', "JSONDecodeError", ValueError, "not complete JSON"),
        (
            json.dumps({"images": [], "annotations": [], "categories": []}),
            "ValueError",
            ValueError,
            "",
        ),
        (
            json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}),
            "AssertionError",
            AssertionError,
            "",
        ),
        (None, "FileNotFoundError", FileNotFoundError, "see datasets/README.md"),
    ],
    ids=["empty", "truncated", "no-categories", "no-images", "missing"],
)
def test_bad_annotation_files_name_the_json(tmp_path, content, error, kind, hint):
    """The error keeps its type and cause; a hint comes only for a cause that is certain."""
    path = tmp_path / "instances.json"
    if content is not None:
        path.write_text(content)
    name = f"vimdet_test_bad_json_{tmp_path.name}"
    register_coco_instances(name, {}, str(path), str(tmp_path))
    cfg = mapper_cfg()
    cfg.DATASETS.TRAIN = (name,)
    try:
        with pytest.raises(kind, match=rf"{name} \(.*instances.json\): {error}") as caught:
            explain_dataset_errors([name], lambda: build_detection_train_loader(cfg))
        assert type(caught.value.__cause__).__name__ == error
        assert hint in str(caught.value)
        if not hint:
            assert "README" not in str(caught.value) and "JSON" not in str(caught.value)
    finally:
        DatasetCatalog.remove(name)
