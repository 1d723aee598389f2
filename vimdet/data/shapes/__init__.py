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

One module per job: :mod:`.spec` checks the parameters, :mod:`.draw` draws images and their
annotations, :mod:`.write` writes a split's files (process pool, lock, atomic json) and
:mod:`.register` registers splits in Detectron2's catalogs.

Typical use::

    from vimdet.data import register_shapes_dataset
    register_shapes_dataset("my_shapes_train", "/tmp/shapes", "train", num_images=100, seed=0)
    # ... cfg.DATASETS.TRAIN = ("my_shapes_train",); files are generated on first use.
"""

from .draw import SHAPES_CLASSES
from .register import ensure_shapes_dataset, register_builtin_shapes, register_shapes_dataset
from .write import generate_shapes_dataset

__all__ = [
    "SHAPES_CLASSES",
    "generate_shapes_dataset",
    "register_shapes_dataset",
    "ensure_shapes_dataset",
    "register_builtin_shapes",
]
