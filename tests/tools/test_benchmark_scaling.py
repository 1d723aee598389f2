"""tools/benchmark_scaling.py: what it reads from the runs (its whole flow on CPU processes is
``--cpu-smoke``, a few minutes: docs/distributed.md)."""

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "benchmark_scaling.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("benchmark_scaling", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_process_it_starts_keeps_nvlink_multicast_off(tool):
    assert tool.NO_MULTICAST == {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }


def test_seconds_per_iteration_between_two_rows(tool):
    arrivals = {19: 10.0, 39: 16.0, 59: 22.5}
    assert tool.seconds_per_iteration(arrivals, 19, 59) == pytest.approx(12.5 / 40)
    assert tool.seconds_per_iteration(arrivals, 19, 79) is None  # a row never came
    assert tool.seconds_per_iteration(arrivals, 39, 39) is None


def test_copypaste_results_reads_detectron2s_bbox_lines(tool):
    console = (
        "[11/26 08:00:00 d2.evaluation.testing]: copypaste: Task: bbox\n"
        "[11/26 08:00:00 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl\n"
        "[11/26 08:00:00 d2.evaluation.testing]: copypaste: 46.0,64.0,51.2,36.1,57.7,nan\n"
    )
    results = tool.copypaste_results(console)
    assert results["AP"] == 46.0 and results["APm"] == 57.7 and results["APl"] != results["APl"]
    assert tool.copypaste_results("no evaluation here") == {}


def test_a_part_skipped_at_the_deadline_reads_as_no_console(tmp_path, tool):
    # A GPU call once ended in a FileNotFoundError here, losing every figure before the summary.
    (tmp_path / "eval_4gpu.0.console.txt").write_text("copypaste: AP,AP50\ncopypaste: 1.0,2.0\n")
    assert tool.console_text(tmp_path, "eval_1gpu") == ""
    assert tool.copypaste_results(tool.console_text(tmp_path, "eval_4gpu")) == {
        "AP": 1.0,
        "AP50": 2.0,
    }


def test_compare_detections_finds_the_largest_differences(tmp_path, tool):
    one = [
        {"image_id": 1, "category_id": 2, "score": 0.9, "bbox": [0, 0, 10, 10]},
        {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [5, 5, 10, 10]},
    ]
    other = [dict(one[1], score=0.5001), dict(one[0], bbox=[0, 0, 10, 10.25])]  # another order
    (tmp_path / "a.json").write_text(json.dumps(one))
    (tmp_path / "b.json").write_text(json.dumps(other))
    found = tool.compare_detections(tmp_path / "a.json", tmp_path / "b.json")
    assert found["same"] and found["count"] == [2, 2]
    assert found["max_score_diff"] == pytest.approx(1e-4)
    assert found["max_box_diff_px"] == pytest.approx(0.25)
    (tmp_path / "b.json").write_text(json.dumps(other[:1]))
    assert not tool.compare_detections(tmp_path / "a.json", tmp_path / "b.json")["same"]


def test_same_results_counts_nan_as_equal(tool):
    nan = float("nan")
    assert tool.same_results({"AP": 1.5, "APl": nan}, {"AP": 1.5, "APl": nan})
    assert not tool.same_results({"AP": 1.5, "APl": nan}, {"AP": 1.6, "APl": nan})
    assert not tool.same_results({}, {}) and not tool.same_results(None, {"AP": 1.0})


def test_markdown_shows_every_part(tool):
    bbox = {"AP": 12.5, "AP50": float("nan")}
    losses = [{"iteration": 19, "total_loss": [2.5, 2.5], "lr": [1e-4, 1e-4]}]
    summary = {
        "command": "python tools/benchmark_scaling.py --output out",
        "config": "configs/shapes/cascade_vim_t_shapes_gpu.yaml",
        "ims_per_gpu": 4,
        "iters": 140,
        "timed_rows": [39, 119],
        "wall_s": 400.0,
        "parts": {
            "scaling": {
                1: {
                    "status": "ok",
                    "s_per_it": 0.3,
                    "images_per_s": 13.3,
                    "efficiency": 1.0,
                    "step_medians_s": {19: 0.31, 39: 0.29},
                    "data_time_max_over_ranks": [0.004, 0.012],
                },
                4: {"status": "failed", "peak_mem_mib": {0: 30000, 1: 31000}},
            },
            "machines": {"status": "ok", "losses_vs_one_machine": losses},
            "eval": {
                1: {"status": "ok", "bbox": bbox},
                4: {"status": "ok", "bbox": bbox},
                "detections_1_vs_largest": {"compared": True, "same": True},
                "same_ap": True,
            },
            "resume": {"status": "timeout"},
            "cpu_eval": {"status": "ok", "bbox": bbox},
        },
    }
    text = tool.markdown(summary)
    assert "| 1 | ok | 0.3 | 13.3 | 1.0 |  | 19: 0.31, 39: 0.29 | 0.004, 0.012 |" in text
    assert "| 4 | failed | None | None | None | 30000, 31000 |  |  |" in text
    assert "| 19 | total_loss | 2.5 | 2.5 |" in text
    assert "**eval same_ap**: true" in text and "**resume**: timeout" in text


def test_replot_draws_the_saved_summary(tool, tmp_path, monkeypatch):
    summary = {
        "config": "configs/shapes/cascade_vim_t_shapes_gpu.yaml",
        "ims_per_gpu": 4,
        "timed_rows": [99, 279],
        "parts": {
            "scaling": {  # JSON keys: strings
                "1": {"images_per_s": 18.0, "efficiency": 1.0, "step_medians_s": {"19": 0.22}},
                "4": {"images_per_s": 65.8, "efficiency": 0.914, "step_medians_s": {"19": 0.24}},
                "2": {"status": "failed"},  # no figures: left out of the plot
            }
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "out"
    argv = [
        "benchmark_scaling.py",
        "--output",
        str(out),
        "--replot",
        str(tmp_path / "summary.json"),
    ]
    monkeypatch.setattr("sys.argv", argv)
    tool.main()
    assert (out / "scaling.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / "summary.json").exists()  # nothing run, nothing else written
