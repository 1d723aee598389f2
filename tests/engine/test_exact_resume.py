"""A run killed with SIGKILL and resumed repeats the uninterrupted run's losses exactly (CPU)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here trains in a subprocess
RUNNER = Path(__file__).with_name("resume_run.py")
SETTINGS = ["SEED", "7", "SOLVER.MAX_ITER", "5", "DATASETS.TEST", "()"]


def run(root, output, losses, kill_after, *extra, resume=False, workers=0):
    env = dict(os.environ, DETECTRON2_DATASETS=str(root / "datasets"), PYTHONUNBUFFERED="1")
    command = [sys.executable, str(RUNNER), str(losses), str(kill_after)]
    command += ["--resume"] if resume else []
    command += [*SETTINGS, "OUTPUT_DIR", str(output), "DATALOADER.NUM_WORKERS", str(workers)]
    return subprocess.run(command + list(extra), capture_output=True, text=True, env=env, cwd=root)


def read_losses(path):
    return {row["iteration"]: row["total_loss"] for row in map(json.loads, open(path))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact_resume")
    result = run(root, root / "full", root / "full.jsonl", -1)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = read_losses(root / "full.jsonl")
    assert sorted(losses) == list(range(5))
    return root, losses


@pytest.fixture(scope="module")
def killed(uninterrupted):
    """A run SIGKILLed after the checkpoint of iteration 3, and a copy of its output."""
    root, _ = uninterrupted
    output = root / "killed"
    result = run(root, output, root / "killed.jsonl", 3)
    assert result.returncode == -9, result.stderr[-3000:]
    assert (output / "model_0000003.pth").exists()
    shutil.copytree(output, root / "damaged")
    shutil.copy(root / "killed.jsonl", root / "damaged.jsonl")
    return root


def test_killed_run_resumes_with_the_same_losses(uninterrupted, killed):
    root, expected = uninterrupted
    # Resumed with a data-loading worker, where the killed run had none: same batches.
    resumed = run(root, root / "killed", root / "killed.jsonl", -1, resume=True, workers=1)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "Starting training from iteration 4" in log
    assert read_losses(root / "killed.jsonl") == expected


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(uninterrupted, killed):
    root, expected = uninterrupted
    output = root / "damaged"
    latest = output / "model_0000003.pth"
    latest.write_bytes(latest.read_bytes()[:1000])  # as a kill mid-copy would leave it
    resumed = run(root, output, root / "damaged.jsonl", -1, resume=True)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert f"the latest checkpoint {latest} cannot be read" in log
    assert f"resuming from the previous good checkpoint {output / 'model_0000001.pth'}" in log
    assert "Starting training from iteration 2" in log
    # Iterations 2 and 3 run (and are logged) again, with the same losses.
    assert read_losses(root / "damaged.jsonl") == expected
