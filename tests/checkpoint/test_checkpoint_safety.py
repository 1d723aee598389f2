"""Checkpoint files a user can trust: nothing executed, nothing half-written, nothing partial.

Every entry point that reads a checkpoint is given a planted file (a pickled ``open`` call):
each refuses it by name and the call never runs. Damaged and foreign files get a message that
names the file; a partial trunk is an error unless asked for; saves are atomic.
"""

import argparse
import logging
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from test_vim_checkpoint import DEPTH, REPO, detector_cfg, released_state_dict

from vimdet.checkpoint import VimDetCheckpointer, load_checkpoint_file
from vimdet.checkpoint import io as checkpoint_io

CONVERTER = REPO / "tools" / "convert_vim_checkpoint.py"


class Planted:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def planted(tmp_path):
    """A released-looking checkpoint carrying a Planted object, and the marker it would create."""
    state, _ = released_state_dict()
    marker = tmp_path / "code_ran"
    torch.save({"model": state, "args": Planted(marker)}, tmp_path / "planted.pth")
    with open(tmp_path / "planted.pkl", "wb") as f:
        pickle.dump({"model": {"w": Planted(marker)}, "__author__": "x"}, f)
    return tmp_path / "planted.pth", marker


def converter(*args):
    command = [sys.executable, str(CONVERTER), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True)


REFUSED = "contains the Python object io.open, which a weights file does not need"


def test_planted_file_is_refused_by_every_entry_point(planted, tmp_path):
    path, marker = planted
    model = build_model(detector_cfg())
    with pytest.raises(pickle.UnpicklingError, match=REFUSED):  # MODEL.WEIGHTS
        VimDetCheckpointer(model).load(str(path))
    with pytest.raises(pickle.UnpicklingError, match="io.open"):  # Detectron2 reads .pkl raw
        VimDetCheckpointer(model).load(str(tmp_path / "planted.pkl"))
    with pytest.raises(pickle.UnpicklingError, match=REFUSED):  # what the converter reads with
        load_checkpoint_file(str(path))
    assert not marker.exists()


@pytest.mark.slow  # runs the converter in a subprocess
def test_planted_file_is_refused_by_the_converter(planted, tmp_path):
    path, marker = planted
    result = converter("--input", path, "--output", tmp_path / "out.pth")
    assert result.returncode == 1 and REFUSED in result.stderr and str(path) in result.stderr
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_released_file_with_training_arguments_loads_as_model_weights(tmp_path):
    state, grid = released_state_dict()
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="vim_tiny", lr=5e-4)}, path)
    model = build_model(detector_cfg())
    VimDetCheckpointer(model).load(str(path))
    torch.testing.assert_close(model.backbone.net.pos_embed.data, grid)


@pytest.mark.parametrize(
    "content, error, message",
    [
        (b"", EOFError, "is empty (0 bytes)"),
        (b"not a torch file at all", pickle.UnpicklingError, "is not a PyTorch checkpoint"),
        ("truncated", (RuntimeError, OSError), "is truncated or corrupt"),
        ("list", ValueError, "holds a list, not a dict of tensors"),
        ("ints", ValueError, "is not a state dict: 1 entries are not tensors (e.g. ['epoch'])"),
        (None, FileNotFoundError, "does not exist"),
    ],
    ids=["empty", "not-torch", "truncated", "not-a-dict", "not-tensors", "missing"],
)
def test_bad_files_name_the_file(tmp_path, content, error, message):
    path = tmp_path / "weights.pth"
    if content == "truncated":
        torch.save({"model": released_state_dict()[0]}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "ints":
        torch.save({"epoch": 3}, path)
    elif content is not None:
        path.write_bytes(content)
    model = build_model(detector_cfg())
    with pytest.raises(error, match=re.escape(message)) as caught:
        VimDetCheckpointer(model).load(str(path))
    assert str(path) in str(caught.value)
    if content in (b"not a torch file at all", "truncated"):
        assert caught.value.__cause__ is not None  # torch's own error stays chained


@pytest.mark.parametrize(
    "depth, found",
    [
        (1, r"blocks 1 \(0-based\) missing from the checkpoint.*has 1 blocks, the model 2"),
        (4, r"blocks 2-3 \(0-based\) extra.*has 4 blocks, the model 2"),
    ],
    ids=["shallower", "deeper"],
)
def test_partial_trunk_is_an_error_unless_asked_for(tmp_path, caplog, depth, found):
    state, _ = released_state_dict(depth=depth)
    path = tmp_path / "vim.pth"
    torch.save({"model": state}, path)
    model = build_model(detector_cfg())
    with pytest.raises(ValueError, match=rf"(?s){found}.*ALLOW_PARTIAL_WEIGHTS True"):
        VimDetCheckpointer(model).load(str(path))
    with caplog.at_level(logging.WARNING, logger="vimdet"):
        VimDetCheckpointer(model, allow_partial_trunk=True).load(str(path))
    assert "Loading part of the Vim trunk" in caplog.text


def test_classifier_only_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "head.pth"
    torch.save({"model": {"head.weight": torch.zeros(1000, 192)}}, path)
    model = build_model(detector_cfg())
    with pytest.raises(ValueError, match=rf"blocks 0-{DEPTH - 1} \(0-based\) missing"):
        VimDetCheckpointer(model).load(str(path))


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = build_model(detector_cfg())
    checkpointer = VimDetCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()

    def killed_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as a kill or Ctrl-C during torch.save

    monkeypatch.setattr(checkpoint_io.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000001")
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]


@pytest.mark.slow  # runs the converter in a subprocess, three times
def test_converter_refuses_to_overwrite_its_input(tmp_path):
    state, _ = released_state_dict()
    source = tmp_path / "vim_t.pth"
    torch.save({"model": state}, source)
    original = source.read_bytes()
    (tmp_path / "link.pth").symlink_to(source)
    for output in (source, tmp_path / "link.pth", tmp_path / "." / "vim_t.pth"):
        result = converter("--input", source, "--output", output)
        assert result.returncode == 1
        assert "is the --input file; writing it would destroy" in result.stderr
    assert source.read_bytes() == original
