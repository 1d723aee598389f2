"""Test-session set-up shared by every test folder."""

import os

import torch

# Without a GPU, Triton kernels run through Triton's CPU interpreter (tests/ops/test_scan_triton.py
# at tiny shapes). The variable must be set before vimdet's kernels are decorated, that is, before
# any test module imports vimdet; on a GPU machine the kernels compile (tests/gpu).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
