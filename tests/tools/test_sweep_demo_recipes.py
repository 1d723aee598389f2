"""tools/sweep_demo_recipes.py: its variants parse into valid configs, its schedules and metrics
reading are right, and bad variant files fail with a clear message. (The sweep itself trains
detectors on a GPU; it is run by hand, see docs/benchmarks.md.)"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vimdet.config import build_cfg

TOOL = Path(__file__).resolve().parents[2] / "tools" / "sweep_demo_recipes.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("sweep_demo_recipes", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_builtin_variants_are_valid_demo_configs(tool):
    variants = tool.load_variants(None, None)
    assert variants[0]["name"] == "demo" and variants[0]["opts"] == []
    for variant in variants:
        opts = tool.schedule_opts(round(540 / variant["cpu_s_per_it"])) + variant["opts"]
        cfg = build_cfg(str(tool.DEMO_CONFIG), opts)  # raises on a bad key or value
        assert cfg.SOLVER.STEPS[-1] < cfg.SOLVER.MAX_ITER, variant["name"]


def test_schedule_drops_at_80_and_94_percent(tool):
    assert tool.schedule_opts(500) == ["SOLVER.MAX_ITER", "500", "SOLVER.STEPS", "(400,470)"]
    # Tiny test runs keep strictly increasing steps inside the run.
    assert tool.schedule_opts(2) == ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)"]


def test_read_metrics_takes_last_losses_and_evaluation(tool, tmp_path):
    records = [
        {"iteration": 19, "total_loss": 3.0, "stage0/fast_rcnn/fg_cls_accuracy": 0.0},
        {"iteration": 39, "total_loss": 2.0, "stage0/fast_rcnn/fg_cls_accuracy": 0.25},
        {"iteration": 39, "bbox/AP": 12.5, "bbox/AP50": 30.0},
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n{")
    metrics = tool._read_metrics(tmp_path)
    assert metrics == {
        "iterations_done": 40,
        "total_loss": 2.0,
        "fg_cls_accuracy": 0.25,
        "bbox/AP": 12.5,
        "bbox/AP50": 30.0,
    }


@pytest.mark.parametrize(
    "variants, message",
    [
        ({"name": "x"}, "expected a JSON list"),
        ([{"name": "x", "opts": []}], "give one of 'cpu_s_per_it' or 'iters'"),
        ([{"name": "x", "iters": 5, "opts": ["SOLVER.BASE_LR"]}], "KEY VALUE pairs"),
        ([{"name": "x", "iters": 5, "opts": []}] * 2, "appears twice"),
    ],
)
def test_bad_variant_files(tool, tmp_path, variants, message):
    path = tmp_path / "variants.json"
    path.write_text(json.dumps(variants))
    with pytest.raises(ValueError, match=message):
        tool.load_variants(str(path), None)


def test_only_names_unknown_variants(tool):
    with pytest.raises(ValueError, match=r"no variants named \['nope'\]"):
        tool.load_variants(None, ["demo", "nope"])
