"""Released Vim files loaded into trunks with the options of docs/trunk_options.md: the cross
route's column tensors come from the row routes' (logged), the attention blocks' weights are
reported as newly initialised, and everything else is as strict as for Vim's own trunk."""

import logging

import pytest
import torch
from detectron2.modeling import build_model
from test_vim_checkpoint import DEPTH, detector_cfg, released_state_dict

import vimdet  # noqa: F401
from vimdet.checkpoint import VimDetCheckpointer

LOGGER = "vimdet.checkpoint.vim_checkpoint"


def model_with(*overrides):
    cfg = detector_cfg()
    cfg.merge_from_list(list(overrides))
    return build_model(cfg)


def save_released(tmp_path, state):
    path = tmp_path / "vim_released.pth"
    torch.save({"model": state}, path)
    return str(path)


def test_cross_fills_column_routes_from_row_routes(tmp_path, caplog):
    state, _ = released_state_dict()
    model = model_with("MODEL.VIM.SCAN_ROUTES", "cross")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        VimDetCheckpointer(model).load(save_released(tmp_path, state))
    loaded = model.backbone.net.state_dict()
    for key, value in state.items():
        if key in loaded and key != "pos_embed":
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    twins = {"conv1d_c.": "conv1d.", "conv1d_cb.": "conv1d_b.", "x_proj_c.": "x_proj.",
             "x_proj_cb.": "x_proj_b.", "dt_proj_c.": "dt_proj.", "dt_proj_cb.": "dt_proj_b.",
             "A_c_log": "A_log", "A_cb_log": "A_b_log", "D_c": "D", "D_cb": "D_b"}  # fmt: skip
    column_keys = [key for key in loaded if key not in state]
    assert len(column_keys) == DEPTH * 2 * 7  # conv1d (2), x_proj (1), dt_proj (2), A, D
    for key in column_keys:
        block, local = key.split(".mixer.")
        column = next(c for c in twins if local.startswith(c) and (c.endswith(".") or local == c))
        source = f"{block}.mixer.{twins[column]}{local[len(column) :]}"
        torch.testing.assert_close(loaded[key], state[source], rtol=0, atol=0, msg=key)
    assert "filled" in caplog.text and "conv1d_cb.weight <- conv1d_b.weight" in caplog.text
    assert "blocks 0-1 (0-based)" in caplog.text


def test_row_column_loads_strictly_with_nothing_filled(tmp_path, caplog):
    state, _ = released_state_dict()
    model = model_with("MODEL.VIM.SCAN_ROUTES", "row_column")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        VimDetCheckpointer(model).load(save_released(tmp_path, state))
    assert "filled" not in caplog.text and "newly initialised" not in caplog.text
    torch.testing.assert_close(
        model.backbone.net.layers[1].mixer.A_b_log.data, state["layers.1.mixer.A_b_log"]
    )


def test_attention_blocks_are_reported_as_new_and_the_rest_loads(tmp_path, caplog):
    state, _ = released_state_dict()
    model = model_with("MODEL.VIM.ATTENTION_BLOCKS", "[2]", "MODEL.VIM.ATTENTION_HEADS", "3")
    init = {k: v.clone() for k, v in model.backbone.net.layers[1].mixer.state_dict().items()}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        VimDetCheckpointer(model).load(save_released(tmp_path, state))
    assert (
        "newly initialised (MODEL.VIM.ATTENTION_BLOCKS): mixer.qkv.weight, mixer.qkv.bias, "
        "mixer.proj.weight, mixer.proj.bias in blocks 1 (0-based)" in caplog.text
    )
    assert "dropped the Mamba mixer tensors" in caplog.text
    for name, value in model.backbone.net.layers[1].mixer.state_dict().items():
        torch.testing.assert_close(value, init[name], rtol=0, atol=0, msg=name)  # untouched
    loaded = model.backbone.net.state_dict()
    for key in ("layers.1.norm.weight", "layers.0.mixer.in_proj.weight", "layers.0.mixer.D_b"):
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "overrides",
    [
        ("MODEL.VIM.SCAN_ROUTES", "cross"),
        ("MODEL.VIM.ATTENTION_BLOCKS", "[2]", "MODEL.VIM.ATTENTION_HEADS", "3"),
    ],
    ids=["cross", "attention"],
)
def test_strict_about_everything_else(tmp_path, overrides):
    # A released file lacking a tensor of a Mamba block is still an error naming it.
    state, _ = released_state_dict()
    del state["layers.0.mixer.x_proj_b.weight"]
    model = model_with(*overrides)
    with pytest.raises(ValueError, match=r"blocks 0 \(0-based\) missing from the checkpoint"):
        VimDetCheckpointer(model).load(save_released(tmp_path, state))


def test_a_cross_checkpoint_missing_a_column_tensor_is_an_error(tmp_path):
    # A checkpoint made with the option is not filled in: it is checked like any other.
    model = model_with("MODEL.VIM.SCAN_ROUTES", "cross")
    weights = model.state_dict()
    del weights["backbone.net.layers.1.mixer.D_cb"]
    path = tmp_path / "cross.pth"
    torch.save({"model": weights}, path)
    with pytest.raises(ValueError, match=r"blocks 1 \(0-based\) missing from the checkpoint"):
        VimDetCheckpointer(model_with("MODEL.VIM.SCAN_ROUTES", "cross")).load(str(path))
