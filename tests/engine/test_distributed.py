"""Two training processes on the CPU (gloo) through Detectron2's launch, as --num-gpus 2 does."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quick_schedules" / "cascade_vim_micro_instant_test.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_cpu_training(tmp_path):
    output = tmp_path / "output"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_net.py"),
            "--config-file",
            str(CONFIG),
            "--num-gpus",
            "2",
            "--dist-url",
            f"tcp://127.0.0.1:{free_port()}",
            "MODEL.DEVICE",
            "cpu",
            "SOLVER.MAX_ITER",
            "4",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "DATALOADER.NUM_WORKERS",
            "0",
            "OUTPUT_DIR",
            str(output),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for log in ("log.txt", "log.txt.rank1"):  # both ranks trained to the end
        text = (output / log).read_text()
        assert "Starting training from iteration 0" in text, log
        assert "Overall training speed: " in text, log
    assert "world size: 2" in (output / "log.txt").read_text().lower()
    state = torch.load(output / "model_final.pth", map_location="cpu", weights_only=False)
    assert state["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # The checkpoint rank 0 wrote holds plain (not DDP-prefixed) names and loads into a model.
    assert not any(key.startswith("module.") for key in state["model"])
