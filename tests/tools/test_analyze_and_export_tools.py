"""tools/analyze_model.py and tools/export_model.py end to end on the micro detector (CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MICRO = "configs/quick_schedules/cascade_vim_micro_instant_test.yaml"


def run_tool(name, *args, datasets=None):
    command = [sys.executable, str(REPO / "tools" / name), "--config-file", MICRO, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if datasets is not None:
        env["DETECTRON2_DATASETS"] = str(datasets)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_analyze_model_counts_the_scan_and_lists_uncounted_ops():
    result = run_tool(
        "analyze_model.py", "--tasks", "flop", "parameter", "-n", "1", "--input-size", "128", "128"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Total GFLOPs" in log
    assert "'bidirectional_scan':" in log  # the scan is counted as one op
    uncounted = next(line for line in log.splitlines() if "did not count" in line)
    assert "vimdet::" not in uncounted
    assert "backbone.net" in log  # the parameter table


@pytest.mark.slow
def test_export_model_traces_the_detector_and_checks_it_on_test_images(tmp_path):
    output = tmp_path / "export" / "micro"
    args = ["--size", "128", "128", "--method", "trace", "--num-images", "2"]
    result = run_tool("export_model.py", *args, "--output", str(output), datasets=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "equals the eager one on 2 image(s)" in result.stdout + result.stderr
    assert (tmp_path / "export" / "micro.ts").stat().st_size > 0
    again = run_tool("export_model.py", *args, "--output", str(output), datasets=tmp_path)
    assert again.returncode != 0 and "never replaced" in again.stderr
    bad = run_tool("export_model.py", "--size", "100", "128", "--output", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "not a multiple" in bad.stderr
