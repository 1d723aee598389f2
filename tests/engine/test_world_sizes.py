"""A checkpoint crosses world sizes, and evaluation on N processes scores as on one (CPU, gloo).

A 2-process run (as ``--num-gpus 2``) writes checkpoints; one process resumes its iteration-3
checkpoint with ``--resume`` (the same total batch, the same schedule), refuses it for another
total batch, and evaluates it on 1 and on 2 processes with identical detections and AP.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quick_schedules" / "cascade_vim_micro_instant_test.yaml"
# Six iterations of 2 images; the learning rate steps down 10x after iteration 4.
SCHEDULE = ["SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "(4,)", "SOLVER.CHECKPOINT_PERIOD", "2"]
NO_TEST = ["DATASETS.TEST", "()"]  # training runs: no evaluation after the last iteration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_net(root, output, *args, processes=1):
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=str(root / "datasets"),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )
    launch = ["--num-gpus", str(processes), "--dist-url", f"tcp://127.0.0.1:{free_port()}"]
    command = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file"]
    command += [str(CONFIG), *launch, *args, *SCHEDULE, "SEED", "3", "DATALOADER.NUM_WORKERS"]
    command += ["0", "TEST.VIS_NUM_IMAGES", "0", "OUTPUT_DIR", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    return result, result.stdout + result.stderr


def trainer_state(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    trainer = state["trainer"]
    steps = {int(s["step"]) for s in trainer["_trainer"]["optimizer"]["state"].values()}
    return state["iteration"], steps, trainer["hooks"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("world_sizes")
    result, log = train_net(root, root / "two", *NO_TEST, processes=2)
    assert result.returncode == 0, log[-4000:]
    return root, root / "two"


def interrupted_copy(run, folder, checkpoint):
    """``run``'s folder as if the run had stopped after ``checkpoint``."""
    shutil.copytree(run, folder)
    for later in ("model_0000005.pth", "model_final.pth"):
        (folder / later).unlink()
    (folder / "last_checkpoint").write_text(checkpoint)
    (folder / "metrics.json").unlink()
    return folder


def test_a_two_process_checkpoint_resumes_on_one_process(two_process_run):
    root, run = two_process_run
    iteration, steps, hooks = trainer_state(run / "model_0000003.pth")
    assert (iteration, steps) == (3, {4})
    assert hooks["ExactResumeHook"] == {"seed": 3, "ims_per_batch": 2, "world_size": 2}
    resumed = interrupted_copy(run, root / "resumed", "model_0000003.pth")
    result, log = train_net(root, resumed, "--resume", *NO_TEST)
    assert result.returncode == 0, log[-4000:]
    assert "Resuming a checkpoint of 2 processes on 1: the same 2 images per iteration" in log
    assert "Starting training from iteration 4" in log
    # Iterations 4 and 5 ran on one process: six Adam steps in all, the schedule's last lr.
    iteration, steps, hooks = trainer_state(resumed / "model_final.pth")
    assert (iteration, steps, hooks["ExactResumeHook"]["world_size"]) == (5, {6}, 1)
    final = [json.loads(line) for line in (resumed / "metrics.json").read_text().splitlines()]
    uninterrupted = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    assert final[-1]["iteration"] == uninterrupted[-1]["iteration"] == 5
    assert final[-1]["lr"] == pytest.approx(uninterrupted[-1]["lr"], rel=1e-9)
    assert final[-1]["lr"] == pytest.approx(0.1 * 0.0005, rel=1e-9)  # after the step at 4


def test_another_total_batch_is_refused_with_the_rule(two_process_run):
    root, run = two_process_run
    resumed = interrupted_copy(run, root / "refused", "model_0000003.pth")
    result, log = train_net(root, resumed, "--resume", *NO_TEST, "SOLVER.IMS_PER_BATCH", "1")
    assert result.returncode != 0
    assert "the checkpoint was trained with SOLVER.IMS_PER_BATCH 2 (all 2 processes" in log
    assert "Resume with SOLVER.IMS_PER_BATCH 2 SOLVER.REFERENCE_WORLD_SIZE 0" in log
    assert "Starting training" not in log


def test_evaluation_on_two_processes_scores_as_on_one(two_process_run):
    root, run = two_process_run
    weights = ["MODEL.WEIGHTS", str(run / "model_0000003.pth")]
    detections, ap = {}, {}
    for processes in (1, 2):
        output = root / f"eval{processes}"
        result, log = train_net(root, output, "--eval-only", *weights, processes=processes)
        assert result.returncode == 0, log[-4000:]
        ap[processes] = (
            log[log.index("copypaste: AP,AP50") :].splitlines()[1].split("copypaste:")[1]
        )
        found = json.loads(
            (output / "inference" / "vimdet_shapes_val" / "coco_instances_results.json").read_text()
        )
        detections[processes] = sorted(found, key=lambda d: (d["image_id"], -d["score"]))
    assert len(detections[1]) > 0  # the model detects something to compare
    assert ap[1] == ap[2]
    assert [d["image_id"] for d in detections[1]] == [d["image_id"] for d in detections[2]]
    for one, two in zip(detections[1], detections[2]):
        assert one["category_id"] == two["category_id"]
        assert one["score"] == pytest.approx(two["score"], abs=1e-5)
        assert one["bbox"] == pytest.approx(two["bbox"], abs=1e-3)
