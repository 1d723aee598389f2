"""``vimdet://`` weights: resolved through Detectron2's PathManager, read only, and the demo's
pretrained backbone loads completely into the demo's detector, leaving RPN and heads new."""

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from vimdet.checkpoint import VimDetCheckpointer, load_checkpoint_file
from vimdet.config import build_cfg
from vimdet.data.shapes.register import _BUILTIN_SPECS
from vimdet.modeling import TRUNK_PREFIX

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "shapes" / "cascade_vim_mini_shapes.yaml"
PRETRAIN_CONFIG = REPO / "configs" / "shapes" / "pretrain_vim_mini_shapes.yaml"
BACKBONE = "vimdet://vim_mini_shapes_backbone.pth"


def test_an_unknown_name_lists_the_shipped_weights():
    shipped = r"not a file shipped.*vim_mini_shapes_backbone\.pth"
    with pytest.raises(FileNotFoundError, match=shipped):
        PathManager.get_local_path("vimdet://vim_b_coco.pth")
    with pytest.raises(FileNotFoundError, match="not a file shipped"):
        PathManager.get_local_path("vimdet://../model_zoo/__init__.py")


def test_shipped_weights_are_read_only():
    with pytest.raises(ValueError, match="read only"):
        PathManager.open(BACKBONE, "wb")
    with PathManager.open(BACKBONE, "rb") as f:
        assert f.read(2) == b"PK"  # a torch.save zip archive


def test_the_demo_starts_from_the_whole_shipped_backbone_with_new_heads():
    cfg = build_cfg(str(DEMO_CONFIG))
    assert cfg.MODEL.WEIGHTS == BACKBONE
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    VimDetCheckpointer(model).load(cfg.MODEL.WEIGHTS)  # refuses an incomplete or misshapen trunk
    shipped = load_checkpoint_file(PathManager.get_local_path(BACKBONE))
    backbone_keys = {key for key in before if key.startswith("backbone.")}
    assert set(shipped) == backbone_keys  # the trunk and the pyramid, nothing else
    assert any(key.startswith(TRUNK_PREFIX) for key in shipped)
    assert any(not key.startswith(TRUNK_PREFIX) for key in shipped)
    for key, value in model.state_dict().items():
        expected = shipped[key] if key in backbone_keys else before[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(before[key], shipped[key]) for key in backbone_keys)


def test_the_backbone_was_pretrained_on_none_of_the_demo_images():
    pretrain = build_cfg(str(PRETRAIN_CONFIG))
    demo = build_cfg(str(DEMO_CONFIG))
    assert pretrain.MODEL.WEIGHTS == ""  # from scratch
    (source,) = pretrain.DATASETS.TRAIN
    # Image i of a split is drawn from (seed, split, i) alone (vimdet/data/shapes/write.py).
    drawn_from = {(_BUILTIN_SPECS[n]["seed"], _BUILTIN_SPECS[n]["split"]) for n in [source]}
    demo_splits = demo.DATASETS.TRAIN + demo.DATASETS.TEST
    demo_draws = {(_BUILTIN_SPECS[n]["seed"], _BUILTIN_SPECS[n]["split"]) for n in demo_splits}
    assert not drawn_from & demo_draws
