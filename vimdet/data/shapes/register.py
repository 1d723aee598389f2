"""Registration of shapes splits in Detectron2's catalogs; files are written on first use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .draw import SHAPES_CLASSES
from .spec import ShapesSpec, make_spec
from .write import write_split

__all__ = ["ensure_shapes_dataset", "register_builtin_shapes", "register_shapes_dataset"]

_REGISTERED: dict[str, ShapesSpec] = {}

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
    # Pretraining the demo's backbone (configs/shapes/pretrain_vim_mini_shapes.yaml): the demo's
    # image sizes, another seed, so no image of the demo's splits is among them.
    "vimdet_shapes_pretrain_train": {
        "subdir": "vimdet_shapes_pretrain",
        "split": "train",
        "num_images": 8000,
        "seed": 2,
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
    return write_split(spec)


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

    spec = make_spec(root, split, num_images, seed, min_side, max_side, max_objects)
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
