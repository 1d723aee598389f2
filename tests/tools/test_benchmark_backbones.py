"""tools/benchmark_backbones.py: its SDPA ViTDet attention computes Detectron2's attention, and the
tool runs end to end (tiny sizes, CPU)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.modeling.backbone.vit import Attention

TOOL = Path(__file__).resolve().parents[2] / "tools" / "benchmark_backbones.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_backbones", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdpa_attention_equals_detectron2s():
    torch.manual_seed(0)
    attention = Attention(48, num_heads=4, use_rel_pos=True, input_size=(6, 5))
    with torch.no_grad():  # non-zero relative positions, or the bias would test nothing
        attention.rel_pos_h.normal_()
        attention.rel_pos_w.normal_()
    x = torch.randn(2, 6, 5, 48)
    expected = attention(x)
    actual = load_tool().sdpa_attention_forward(attention, x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_graphs_rows_build_the_backbone_with_cuda_graphs():
    tool = load_tool()
    assert tool.build("vim_t_graphs", 64, "cpu").graphs.max_graphs == 2
    assert tool.build("vim_t", 64, "cpu").graphs is None


@pytest.mark.slow
def test_tool_runs_and_writes_rows(tmp_path):
    rows_path, plot_path = tmp_path / "rows.json", tmp_path / "plot.png"
    command = [
        sys.executable, str(TOOL), "--device", "cpu", "--models", "vitdet_b_sdpa", "vim_t",
        "--sizes", "64x128", "--batch", "1", "--repeats", "1",
        "--json", str(rows_path), "--plot", str(plot_path), "--profile", "--profile-rows", "5",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(rows_path.read_text())
    assert {(row["model"], row["size"]) for row in rows} == {
        ("vitdet_b_sdpa", "64x128"),
        ("vim_t", "64x128"),
    }
    assert all(row["train_ms_per_img"] > 0 and row["infer_ms_per_img"] > 0 for row in rows)
    assert plot_path.stat().st_size > 0
    # --profile: the step's largest ops by their own time, shares of one total.
    for row in rows:
        kernels = row["profile"]["kernels"]
        shares = [kernel["share"] for kernel in kernels]
        assert row["profile"]["ms_per_step"] > 0 and 0 < sum(shares) <= 1 + 1e-9
        assert shares == sorted(shares, reverse=True)
        assert all(kernel["calls_per_step"] > 0 for kernel in kernels) and len(kernels) == 5
        profiled = row["profile"]
        assert 0 < profiled["small_launches_per_step"] <= profiled["launches_per_step"]
        assert 0 <= profiled["small_ms_per_step"] <= profiled["ms_per_step"]
    assert "| share | calls a step | CPU op |" in result.stdout
