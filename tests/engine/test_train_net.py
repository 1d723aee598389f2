"""tools/train_net.py end to end on the CPU: train, resume, evaluate, and bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quick_schedules" / "cascade_vim_micro_instant_test.yaml"
pytestmark = pytest.mark.slow  # every test here runs a tool in a subprocess
TRAIN_NET = REPO / "tools" / "train_net.py"


def train_net(output_dir, datasets_dir, *args, check=True):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN_NET),
            "--config-file",
            str(CONFIG),
            *args,
            "OUTPUT_DIR",
            str(output_dir),
            "DATALOADER.NUM_WORKERS",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=output_dir.parent,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def adam_steps(checkpoint_path):
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    optimizer = state["trainer"]["_trainer"]["optimizer"]
    return state["iteration"], {int(s["step"]) for s in optimizer["state"].values()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    output = root / "output"
    result = train_net(output, root / "datasets", "TEST.EVAL_UNTRAINED", "True")
    return root, output, result


def test_training_writes_checkpoints_logs_and_pictures(trained):
    _, output, result = trained
    log = result.stdout + result.stderr
    assert "Starting training from iteration 0" in log
    assert "eta:" in log  # Detectron2's iteration log
    assert (output / "model_final.pth").exists() and (output / "last_checkpoint").exists()
    assert adam_steps(output / "model_final.pth") == (4, {5})
    assert list(output.glob("events.out.tfevents.*"))  # TensorBoard
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in metrics if "total_loss" in m)
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log  # COCOEvaluator ran after training
    assert len(list((output / "predictions").glob("*.png"))) == 1
    # The untrained baseline, then the summary a person reads at the end.
    assert "Evaluating the untrained model on vimdet_shapes_val" in log
    assert (output / "inference_untrained" / "vimdet_shapes_val").is_dir()
    summary = result.stdout[result.stdout.index("ViMDet summary") :]
    assert "box AP on vimdet_shapes_val (48 images): AP " in summary
    assert "the same model untrained:  AP " in summary
    assert "MODEL.WEIGHTS output/model_final.pth" in summary  # relative to the run's folder


def test_resume_continues_with_iteration_and_optimizer_state(trained):
    root, output, _ = trained
    result = train_net(output, root / "datasets", "--resume", "SOLVER.MAX_ITER", "7")
    log = result.stdout + result.stderr
    assert "Starting training from iteration 5" in log
    # AdamW's step counters continue from the checkpoint: 5 restored + 2 new.
    assert adam_steps(output / "model_final.pth") == (6, {7})


def test_eval_only_returns_coco_results(trained, monkeypatch):
    root, output, _ = trained
    spec = importlib.util.spec_from_file_location("train_net_under_test", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.default_argument_parser().parse_args(
        [
            "--config-file",
            str(CONFIG),
            "--eval-only",
            "MODEL.WEIGHTS",
            str(output / "model_final.pth"),
            "OUTPUT_DIR",
            str(root / "eval"),
            "DATALOADER.NUM_WORKERS",
            "0",
        ]
    )
    # vimdet.data registered the built-in datasets under ./datasets at import: run from root,
    # where the training runs above generated them.
    monkeypatch.chdir(root)
    results = module.main(args)
    bbox = results["bbox"]  # one test set: Detectron2 returns its results unnested
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(bbox)
    assert (
        root / "eval" / "inference" / "vimdet_shapes_val" / "coco_instances_results.json"
    ).exists()


def test_demo_draws_pngs(trained):
    root, output, _ = trained
    images = sorted((root / "datasets" / "vimdet_shapes" / "val").glob("*.jpg"))[:2]
    command = [
        sys.executable,
        str(REPO / "tools" / "demo.py"),
        "--config-file",
        str(CONFIG),
        "--input",
        *map(str, images),
        "--output",
        str(root / "pictures"),
        "MODEL.WEIGHTS",
        str(output / "model_final.pth"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    pictures = sorted((root / "pictures").glob("*.png"))
    assert [p.stem for p in pictures] == [p.stem for p in images]
    missing = command[:5] + [str(root / "nowhere.jpg"), "--output", str(root / "pictures")]
    result = subprocess.run(missing, capture_output=True, text=True, cwd=root)
    assert result.returncode != 0 and "is neither an image file nor a folder" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["MODEL.VIM.EMBED_DIMS", "64"], "Did you mean MODEL.VIM.EMBED_DIM?"),
        (["MODEL.DEVICE", "cuda"], "add `MODEL.DEVICE cpu` to the command line"),
        (["DATASETS.TRAIN", "('no_such_dataset',)"], "no_such_dataset"),
        (["MODEL.DEVICE", "cpu", "--resume"], "'--resume' comes after the KEY VALUE config"),
        (["--eval-only"], "--eval-only needs trained weights, and MODEL.WEIGHTS is empty"),
    ],
    ids=["misspelled-key", "cuda", "dataset", "flag-after-overrides", "eval-without-weights"],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda case needs a machine without GPU")
def test_bad_input_is_reported(tmp_path, args, message):
    result = train_net(tmp_path / "output", tmp_path / "datasets", *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr
