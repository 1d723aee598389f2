"""Every shipped config loads (with its _BASE_ chain) and builds a model; bad files are named."""

from pathlib import Path

import pytest
from detectron2.modeling import build_model

import vimdet  # noqa: F401
from vimdet.config import build_cfg

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))
DEMO_CONFIG = (
    Path(__file__).resolve().parents[2] / "configs" / "shapes" / "cascade_vim_mini_shapes.yaml"
)


def test_configs_are_found():
    names = {path.name for path in CONFIGS}
    assert {
        "cascade_vim_t.yaml",
        "cascade_vim_s.yaml",
        "cascade_vim_b.yaml",
        "cascade_mask_vim_b.yaml",
        "cascade_vim_mini_shapes.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_builds(path):
    cfg = build_cfg(str(path), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert model.backbone.__class__.__name__ == "VimFeaturePyramid"
    assert model.roi_heads.__class__.__name__ == "CascadeROIHeads"
    assert len(model.roi_heads.box_predictor) == 3
    assert model.roi_heads.mask_on == cfg.MODEL.MASK_ON


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/cascade_vim_t.yaml"):
        build_cfg(str(tmp_path / "nope.yaml"))


def test_demo_config_uses_registered_splits_with_a_large_val_split():
    from detectron2.data import DatasetCatalog

    from vimdet.data.shapes.register import _BUILTIN_SPECS

    cfg = build_cfg(str(DEMO_CONFIG))
    names = cfg.DATASETS.TRAIN + cfg.DATASETS.TEST
    assert set(names) <= set(DatasetCatalog.list())
    assert cfg.SEED >= 0  # repeatable: seeded model init, data order and augmentation
    assert _BUILTIN_SPECS[cfg.DATASETS.TEST[0]]["num_images"] >= 200
    assert cfg.TEST.EVAL_UNTRAINED
