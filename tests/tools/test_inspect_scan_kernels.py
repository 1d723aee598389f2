"""tools/inspect_scan_kernels.py: the scan's kernels compiled for Hopper on the CPU, and the
register layout that made them fast (a lane owns a channel and its chunk's tokens, so scans and
sums over a chunk need no warp shuffles; docs/benchmarks.md, fourth round)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "inspect_scan_kernels.py"
# B and C to state-major, and the backward's partial sums added up
LAYOUT_KERNELS = {"state_major_kernel", "token_major_sums_kernel", "channel_sums_kernel"}
KERNELS = {
    "chunk_state_kernel",
    "chunk_carry_kernel",
    "scan_output_kernel",
    "chunk_adjoint_kernel",
    "scan_backward_kernel",
} | LAYOUT_KERNELS


def run_tool(*args):
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]
    ]


@pytest.mark.slow
def test_chunk_kernels_scan_in_registers():
    rows = run_tool("--channels", "64", "--length", "48", "--batch", "1")
    assert {row["kernel"] for row in rows} == KERNELS
    for row in rows:
        if row["kernel"] in LAYOUT_KERNELS:
            assert int(row["spill bytes"]) == 0, row
        if row["kernel"] in ("chunk_state_kernel", "scan_output_kernel", "chunk_adjoint_kernel"):
            assert int(row["shfl.sync"]) == 0, row
            assert int(row["spill bytes"]) == 0, row
            # B and C, state-major along a row-major walk, are read as vectors.
            assert int(row["ld.global vector"]) >= 2, row
        # The backward's only shuffles are the sums of dB and dC over a program's 32 channels, by
        # a butterfly: 2 * (8 + 4 + 2 + 1) + 1 exchanges a state (tl.sum would take 2 * 16 * 5).
        if row["kernel"] == "scan_backward_kernel":
            assert int(row["shfl.sync"]) <= 31, row


def test_interpreter_kernels_are_refused():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(TOOL), "--channels", "8", "--length", "16"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2 and "unset it" in result.stderr


def test_grid_that_does_not_hold_the_length_is_refused():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, str(TOOL), "--length", "16", "--grid", "3", "5"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    assert "--grid 3 5 does not hold --length 16" in result.stderr
