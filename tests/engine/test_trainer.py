"""VimDetTrainer's pieces: ViMDet's checkpointer everywhere, the exact-resume hook first."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import hooks

from vimdet.checkpoint import VimDetCheckpointer
from vimdet.config import build_cfg
from vimdet.engine import VimDetTrainer
from vimdet.engine.exact_resume import ExactResumeHook

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quick_schedules" / "cascade_vim_micro_instant_test.yaml"


@pytest.fixture
def tiny_dataset(tmp_path):
    """A registered 2-image COCO dataset in tmp_path (no shapes files to generate)."""
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(tmp_path / name), np.full((40, 60, 3), 90, np.uint8))
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 60, "height": 40},
            {"id": 2, "file_name": "b.jpg", "width": 60, "height": 40},
        ],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 20, 10], "iscrowd": 0},
            {"id": 8, "image_id": 2, "category_id": 1, "bbox": [3, 2, 20, 10], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    name = f"vimdet_test_trainer_{tmp_path.name}"
    register_coco_instances(name, {}, str(tmp_path / "instances.json"), str(tmp_path))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.mark.parametrize("allow_partial", [False, True])
def test_periodic_saves_go_through_vimdet_checkpointer(tmp_path, tiny_dataset, allow_partial):
    opts = ["MODEL.DEVICE", "cpu", "DATASETS.TRAIN", f"('{tiny_dataset}',)", "DATASETS.TEST"]
    opts += ["()", "MODEL.ROI_HEADS.NUM_CLASSES", "1", "DATALOADER.NUM_WORKERS", "0"]
    opts += ["OUTPUT_DIR", str(tmp_path / "out"), "MODEL.VIM.ALLOW_PARTIAL_WEIGHTS"]
    trainer = VimDetTrainer(build_cfg(str(CONFIG), opts + [str(allow_partial)]))
    assert isinstance(trainer.checkpointer, VimDetCheckpointer)
    assert trainer.checkpointer.allow_partial_trunk is allow_partial
    # DefaultTrainer.build_hooks gives its PeriodicCheckpointer self.checkpointer: the periodic
    # saves must be ViMDet's atomic ones, not a plain DetectionCheckpointer's.
    periodic = [hook for hook in trainer._hooks if isinstance(hook, hooks.PeriodicCheckpointer)]
    assert len(periodic) == 1 and periodic[0].checkpointer is trainer.checkpointer
    assert isinstance(trainer._hooks[0], ExactResumeHook)
