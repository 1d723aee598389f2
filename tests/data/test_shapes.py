"""Tests for the synthetic COCO-format shapes dataset (vimdet.data.shapes: spec, draw, write,
register)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import cv2
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

import vimdet.data  # noqa: F401  (registers the built-in names)
from vimdet.data import (
    SHAPES_CLASSES,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    register_builtin_shapes,
    register_shapes_dataset,
)
from vimdet.data.shapes import register as shapes_register

SMALL = {"num_images": 6, "min_side": 64, "max_side": 128}


def _gen(root: Path, seed: int = 0, split: str = "train", **overrides) -> Path:
    kwargs = {**SMALL, **overrides}
    return generate_shapes_dataset(root, split, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes")
    json_path = _gen(root)
    with open(json_path) as f:
        return root, json.load(f)


def test_json_location_and_coco_api(small):
    root, data = small
    json_path = root / "annotations" / "instances_train.json"
    assert json_path.is_file()
    coco = COCO(str(json_path))
    assert len(coco.getImgIds()) == SMALL["num_images"]
    assert len(coco.getAnnIds()) > 0
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == list(range(1, len(SHAPES_CLASSES) + 1))
    assert tuple(c["name"] for c in cats) == SHAPES_CLASSES
    assert all("supercategory" in c for c in cats)
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
    assert data["info"]["num_images"] == SMALL["num_images"]
    assert data["info"]["seed"] == 0


def test_images_exist_with_recorded_size(small):
    root, data = small
    for im in data["images"]:
        assert set(im) >= {"id", "file_name", "width", "height"}
        path = root / "train" / im["file_name"]
        assert path.is_file()
        img = cv2.imread(str(path))
        assert img is not None, path
        assert img.shape[:2] == (im["height"], im["width"])
        assert SMALL["min_side"] <= im["width"] <= SMALL["max_side"]
        assert SMALL["min_side"] <= im["height"] <= SMALL["max_side"]


def test_images_not_all_square(small):
    _, data = small
    assert any(im["width"] != im["height"] for im in data["images"])


def test_annotations_valid(small):
    _, data = small
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    for ann in data["annotations"]:
        width, height = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert all(isinstance(v, float) for v in ann["bbox"])
        assert w >= 4 and h >= 4
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert ann["iscrowd"] == 0
        assert 1 <= ann["category_id"] <= len(SHAPES_CLASSES)
        assert 0 < ann["area"] <= w * h
        assert ann["segmentation"] and all(
            len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"]
        )


def test_polygons_agree_with_boxes(small):
    _, data = small
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for ann in data["annotations"]:
        width, height = sizes[ann["image_id"]]
        rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], height, width))
        mx, my, mw, mh = mask_util.toBbox(rle)
        x, y, w, h = ann["bbox"]
        assert abs(mx - x) <= 1 and abs(my - y) <= 1
        assert abs(mw - w) <= 1.5 and abs(mh - h) <= 1.5
        assert abs(float(mask_util.area(rle)) - ann["area"]) <= 0.1 * ann["area"] + 4


def test_several_classes_and_per_image_objects(small):
    _, data = small
    assert len({a["category_id"] for a in data["annotations"]}) >= 2
    assert {a["image_id"] for a in data["annotations"]} == {im["id"] for im in data["images"]}


def test_same_seed_identical_different_seed_differs(tmp_path):
    a = _gen(tmp_path / "a", seed=3)
    b = _gen(tmp_path / "b", seed=3)
    c = _gen(tmp_path / "c", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    for name in sorted(os.listdir(tmp_path / "a" / "train")):
        assert (tmp_path / "a" / "train" / name).read_bytes() == (
            tmp_path / "b" / "train" / name
        ).read_bytes()


def test_splits_differ_for_same_seed(tmp_path):
    train = json.loads(_gen(tmp_path, seed=0, split="train").read_text())
    val = json.loads(_gen(tmp_path, seed=0, split="val").read_text())
    assert (tmp_path / "val").is_dir()
    assert train["images"] != val["images"] or train["annotations"] != val["annotations"]


def test_second_call_does_not_rewrite(tmp_path):
    json_path = _gen(tmp_path)
    files = [json_path, *sorted((tmp_path / "train").iterdir())]
    old = {p: p.stat().st_mtime_ns for p in files}
    os.utime(json_path, ns=(1, 1))  # make any rewrite detectable regardless of clock resolution
    old[json_path] = 1
    assert _gen(tmp_path) == json_path
    assert {p: p.stat().st_mtime_ns for p in files} == old


def test_changed_parameters_regenerate(tmp_path):
    _gen(tmp_path)
    json_path = _gen(tmp_path, num_images=3)
    data = json.loads(json_path.read_text())
    assert len(data["images"]) == 3
    assert data["info"]["num_images"] == 3


def test_interrupted_generation_leaves_no_json(tmp_path, monkeypatch):
    json_path = _gen(tmp_path)  # a complete, older generation
    real_imencode = cv2.imencode
    calls = {"n": 0}

    def flaky_imencode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_imencode(*args, **kwargs)

    monkeypatch.setattr(cv2, "imencode", flaky_imencode)
    with pytest.raises(KeyboardInterrupt):
        _gen(tmp_path, seed=5)
    # The stale json (seed 0) must not survive next to half-rewritten images.
    assert not json_path.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(cv2, "imencode", real_imencode)
    assert json.loads(_gen(tmp_path, seed=5).read_text())["info"]["seed"] == 5


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="num_images must be a positive integer"):
        generate_shapes_dataset(tmp_path, "train", num_images=0, seed=0)
    with pytest.raises(ValueError, match="num_images must be a positive integer"):
        generate_shapes_dataset(tmp_path, "train", num_images=-3, seed=0)
    with pytest.raises(ValueError, match=r"min_side \(200\) must not be greater than max_side"):
        generate_shapes_dataset(tmp_path, "train", 2, 0, min_side=200, max_side=100)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        generate_shapes_dataset(tmp_path, "train", 2, seed=-1)
    with pytest.raises(ValueError, match="split must be"):
        generate_shapes_dataset(tmp_path, "../escape", 2, seed=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="Cannot write the ViMDet shapes dataset under root"):
        generate_shapes_dataset(blocker / "shapes", "train", 2, seed=0, **_sides())
    with pytest.raises(KeyError, match="not a registered ViMDet shapes dataset"):
        ensure_shapes_dataset("no_such_shapes_dataset")


def _sides() -> dict:
    return {"min_side": SMALL["min_side"], "max_side": SMALL["max_side"]}


@pytest.fixture
def temp_name():
    name = f"vimdet_shapes_test_{uuid.uuid4().hex[:8]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    shapes_register._REGISTERED.pop(name, None)


def test_register_generates_on_first_use(tmp_path, temp_name):
    root = tmp_path / "reg"
    register_shapes_dataset(temp_name, root, "val", num_images=4, seed=7, **_sides())
    json_path = root / "annotations" / "instances_val.json"
    assert not json_path.exists(), "registration must not generate anything"

    meta = MetadataCatalog.get(temp_name)
    assert meta.thing_classes == list(SHAPES_CLASSES)
    assert meta.evaluator_type == "coco"
    assert Path(meta.json_file) == json_path
    assert Path(meta.image_root) == root / "val"

    dicts = DatasetCatalog.get(temp_name)
    assert json_path.is_file()
    assert len(dicts) == 4
    for d in dicts:
        assert Path(d["file_name"]).is_file()
        assert d["annotations"]
        for ann in d["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= ann["category_id"] < len(SHAPES_CLASSES)
            assert ann["segmentation"]
    assert ensure_shapes_dataset(temp_name) == json_path

    # Same parameters again: harmless. Different parameters under the same name: clear error.
    register_shapes_dataset(temp_name, root, "val", num_images=4, seed=7, **_sides())
    with pytest.raises(ValueError, match="already registered"):
        register_shapes_dataset(temp_name, root, "val", num_images=5, seed=7, **_sides())


def test_builtin_names_registered_without_generation():
    names = [
        "vimdet_shapes_train",
        "vimdet_shapes_val",
        "vimdet_shapes_large_train",
        "vimdet_shapes_large_val",
        "vimdet_shapes_demo_train",
        "vimdet_shapes_demo_val",
        "vimdet_shapes_pretrain_train",
    ]
    registered = DatasetCatalog.list()
    for name in names:
        assert name in registered
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == list(SHAPES_CLASSES)
        assert meta.json_file.endswith(
            os.path.join("annotations", "instances_" + name.split("_")[-1] + ".json")
        )
    register_builtin_shapes()  # registering twice is harmless
    assert all(name in DatasetCatalog.list() for name in names)
