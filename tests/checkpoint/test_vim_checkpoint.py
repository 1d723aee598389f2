"""Released-layout Vim checkpoints convert and load with every trunk tensor matched, or fail."""

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import vimdet  # noqa: F401
from vimdet import add_vimdet_config
from vimdet.checkpoint import VimDetCheckpointer, load_checkpoint_file
from vimdet.modeling import TRUNK_PREFIX, VisionMamba, convert_vim_state_dict

REPO = Path(__file__).resolve().parents[2]

# Vim-T's width at reduced depth, as the test's stand-in for a released file.
DIM, DEPTH = 192, 2


def released_state_dict(dim=DIM, depth=DEPTH, seed=0):
    """A state dict laid out like a released Vim file: trunk + cls token in the middle + head."""
    gen = torch.Generator().manual_seed(seed)
    trunk = VisionMamba(embed_dim=dim, depth=depth, out_blocks=(depth,)).state_dict()
    state = {key: torch.randn(value.shape, generator=gen) for key, value in trunk.items()}
    grid = state.pop("pos_embed")  # (1, 196, dim) -> insert the class row at index 98
    cls_row = torch.full((1, 1, dim), 7.0)
    state["pos_embed"] = torch.cat([grid[:, :98], cls_row, grid[:, 98:]], dim=1)
    state["cls_token"] = torch.randn(1, 1, dim, generator=gen)
    state["norm_f.weight"] = torch.ones(dim)
    state["head.weight"] = torch.randn(1000, dim, generator=gen)
    state["head.bias"] = torch.zeros(1000)
    return state, grid


def detector_cfg(dim=DIM, depth=DEPTH):
    cfg = get_cfg()
    add_vimdet_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-Cascade-ViMDet.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.VIM.SIZE = "custom"
    cfg.MODEL.VIM.EMBED_DIM = dim
    cfg.MODEL.VIM.DEPTH = depth
    cfg.MODEL.VIM_FPN.IN_BLOCKS = [1, 1, 2, 2]
    cfg.MODEL.VIM_FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    return cfg


def run_converter(tmp_path, source, target, *extra):
    """Run ``tools/convert_vim_checkpoint.py --input source --output target *extra``."""
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_vim_checkpoint.py")]
        + ["--input", str(source), "--output", str(target), *extra],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def convert(tmp_path, state, *extra):
    source = tmp_path / "vim_released.pth"
    torch.save({"model": state, "args": {"model": "vim_tiny"}}, source)
    target = tmp_path / "converted.pth"
    return run_converter(tmp_path, source, target, *extra), target


def test_convert_and_load_matches_every_trunk_tensor(tmp_path):
    state, grid = released_state_dict()
    result, target = convert(tmp_path, state, "--size", "tiny")
    assert result.returncode == 0, result.stderr
    assert "dropped 5: " in result.stdout
    for dropped in (
        "head.weight",
        "head.bias",
        "norm_f.weight",
        "cls_token",
        "pos_embed[class-token row]",
    ):
        assert dropped in result.stdout

    model = build_model(detector_cfg())
    VimDetCheckpointer(model).load(str(target))
    loaded = model.backbone.net.state_dict()
    expected = {
        key: value
        for key, value in state.items()
        if not key.startswith(("head.", "norm_f.", "cls_token"))
    }
    expected["pos_embed"] = grid  # the 196 patch rows, class row removed
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)

    saved = torch.load(target, weights_only=True)["model"]
    assert all(key.startswith(TRUNK_PREFIX) for key in saved)


def test_a_detector_checkpoint_gives_its_trunk_to_a_new_detector(tmp_path):
    trained = build_model(detector_cfg())
    source = tmp_path / "model_final.pth"
    torch.save({"model": trained.state_dict(), "iteration": 9}, source)
    target = tmp_path / "trunk.pth"
    result = run_converter(tmp_path, source, target)
    assert result.returncode == 0, result.stderr
    assert "dropped 3: backbone.* (the pyramid): " in result.stdout
    assert "proposal_generator.*: " in result.stdout and "roi_heads.*: " in result.stdout

    saved = torch.load(target, weights_only=True)["model"]
    trunk = {k: v for k, v in trained.state_dict().items() if k.startswith(TRUNK_PREFIX)}
    assert set(saved) == set(trunk)
    torch.manual_seed(1)
    fresh = build_model(detector_cfg())
    head_before = fresh.roi_heads.state_dict()
    VimDetCheckpointer(fresh).load(str(target))
    for key, value in fresh.state_dict().items():
        if key.startswith(TRUNK_PREFIX):
            torch.testing.assert_close(value, trunk[key], rtol=0, atol=0, msg=key)
    # The heads keep their own initialisation.
    for key, value in fresh.roi_heads.state_dict().items():
        torch.testing.assert_close(value, head_before[key], rtol=0, atol=0, msg=key)

    # --keep-pyramid: the whole backbone (trunk and pyramid), still without RPN and ROI heads.
    backbone = tmp_path / "backbone.pth"
    result = run_converter(tmp_path, source, backbone, "--keep-pyramid")
    assert result.returncode == 0, result.stderr
    assert "dropped 2: proposal_generator.*: " in result.stdout
    saved = torch.load(backbone, weights_only=True)["model"]
    assert set(saved) == {k for k in trained.state_dict() if k.startswith("backbone.")}
    assert set(saved) > set(trunk)


def test_what_a_detector_conversion_refuses(tmp_path):
    state, _ = released_state_dict()
    result, target = convert(tmp_path, state, "--keep-pyramid")
    assert result.returncode == 1 and not target.exists()
    assert "is a released Vim file, which has no pyramid; give a ViMDet detector" in result.stderr

    partial = tmp_path / "partial.pth"
    torch.save({"model": {TRUNK_PREFIX + "layers.0.norm.weight": torch.ones(4)}}, partial)
    result = run_converter(tmp_path, partial, tmp_path / "out.pth")
    assert result.returncode == 1 and not (tmp_path / "out.pth").exists()
    assert "but no backbone.net.patch_embed: it is not a ViMDet detector's" in result.stderr


def test_pretrained_key_is_an_error_naming_model_weights(tmp_path):
    # Weights have one way in, the checkpointer; the builder refuses the old key.
    cfg = detector_cfg()
    cfg.MODEL.VIM.PRETRAINED = str(tmp_path / "vim_released.pth")
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS .*vim_released.pth"):
        build_model(cfg)


def test_position_grid_of_another_size_is_resized(tmp_path):
    state, grid = released_state_dict()
    path = tmp_path / "vim_released.pth"
    torch.save({"model": state}, path)
    cfg = detector_cfg()
    cfg.MODEL.VIM.PRETRAIN_IMG_SIZE = 320
    model = build_model(cfg)
    VimDetCheckpointer(model).load(str(path))
    pos_embed = model.backbone.net.pos_embed.data
    assert pos_embed.shape == (1, 20 * 20, DIM)
    expected = torch.nn.functional.interpolate(
        grid.reshape(1, 14, 14, DIM).permute(0, 3, 1, 2), size=(20, 20), mode="bicubic"
    )
    torch.testing.assert_close(pos_embed, expected.permute(0, 2, 3, 1).reshape(1, 400, DIM))


def test_wrong_width_is_refused_by_the_converter(tmp_path):
    state, _ = released_state_dict()
    result, target = convert(tmp_path, state, "--size", "small")
    assert result.returncode == 1
    assert "the checkpoint is 192 wide but the model is 384 wide" in result.stderr
    assert not target.exists()


def test_wrong_width_checkpoint_is_an_error_when_loading(tmp_path):
    state, _ = released_state_dict()
    _, target = convert(tmp_path, state)
    model = build_model(detector_cfg(dim=96))
    with pytest.raises(ValueError, match=r"(?s)trunk tensors have the wrong shape.*MODEL.VIM.SIZE"):
        VimDetCheckpointer(model).load(str(target))


def test_not_a_vim_checkpoint(tmp_path):
    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}
    result, _ = convert(tmp_path, resnet_like)
    assert result.returncode == 1
    assert "not a Vim checkpoint" in result.stderr and "conv1.weight" in result.stderr


@pytest.mark.parametrize(
    "key, shape, message",
    [
        ("pos_embed", (1, 0, DIM), f"pos_embed is (1, 0, {DIM}), not (1, tokens, width)"),
        ("patch_embed.proj.weight", (), "patch_embed.proj.weight is (), not (width, 3, P, P)"),
    ],
    ids=["empty-grid", "0-dim-patch"],
)
def test_malformed_released_layout_is_named(tmp_path, key, shape, message):
    state, _ = released_state_dict()
    state[key] = torch.zeros(shape)
    path = tmp_path / "vim.pth"
    torch.save({"model": state}, path)
    model = build_model(detector_cfg())
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        VimDetCheckpointer(model).load(str(path))
    assert str(path) in str(caught.value)
    with pytest.raises(ValueError, match="not a Vim checkpoint ViMDet can load"):
        convert_vim_state_dict(state)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(str(tmp_path / "nowhere.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a torch file at all")
    with pytest.raises(pickle.UnpicklingError, match="is not a PyTorch checkpoint"):
        load_checkpoint_file(str(broken))


def test_released_file_as_model_weights_is_converted_on_the_fly(tmp_path):
    state, grid = released_state_dict()
    path = tmp_path / "vim_released.pth"
    torch.save({"model": state}, path)
    model = build_model(detector_cfg())
    VimDetCheckpointer(model).load(str(path))
    torch.testing.assert_close(model.backbone.net.pos_embed.data, grid)
    torch.testing.assert_close(
        model.backbone.net.layers[0].mixer.in_proj.weight.data,
        state["layers.0.mixer.in_proj.weight"],
    )


def test_ddp_prefixed_checkpoint_is_shape_checked(tmp_path):
    state, _ = released_state_dict()
    _, target = convert(tmp_path, state)
    saved = torch.load(target, weights_only=True)
    saved["model"] = {"module." + key: value for key, value in saved["model"].items()}
    torch.save(saved, tmp_path / "ddp.pth")
    model = build_model(detector_cfg(dim=96))
    with pytest.raises(ValueError, match="trunk tensors have the wrong shape"):
        VimDetCheckpointer(model).load(str(tmp_path / "ddp.pth"))
