#!/usr/bin/env python3
"""The Vim block's element-wise ops three ways: eager PyTorch, ``torch.compile``, ViMDet's Triton.

    python tools/benchmark_fused_ops.py --dims 192 768 --tokens 4096 4368 5120

For the residual add + RMSNorm (:func:`vimdet.ops.add_rms_norm`) and the depthwise convs of both
directions + SiLU (:func:`vimdet.ops.conv_both_directions`), at Vim-T/S/B widths: the forward +
backward time of the PyTorch formula run eagerly, the same formula under
``torch.compile(dynamic=True)`` (one graph for every token count, as multi-scale training needs),
and the Triton kernel; batch 2, under bf16 autocast as in a training step. Times are the GPU's
kernel time per step from the profiler (at these sizes a synchronised wall clock measures the
launch overhead, which a full training step hides behind the GEMMs); it also prints how many
graphs the compiler built over all the token counts (1 means no per-size recompilation).
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable, Dict, List

import torch
from torch._dynamo.utils import counters

from vimdet.ops import add_rms_norm, add_rms_norm_reference, conv_both_directions


def kernel_ms(step: Callable[[], None], repeats: int) -> float:
    """The GPU kernel time of one ``step``, averaged over ``repeats`` after warm-up."""
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    total_us = sum(event.self_device_time_total for event in profile.key_averages())
    return total_us / repeats / 1e3


def norm_inputs(dim: int, tokens: int) -> List[torch.Tensor]:
    """hidden (bf16, a GEMM's output), the fp32 stream, the weight, a drop-path scale."""
    hidden = torch.randn(2, tokens, dim, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(2, tokens, dim, device="cuda")
    weight = torch.rand(dim, device="cuda") + 0.5
    return [t.requires_grad_() for t in (hidden, residual, weight)] + [
        torch.tensor([0.0, 2.0], device="cuda")
    ]


def conv_inputs(dim: int, tokens: int) -> List[torch.Tensor]:
    """x (bf16, half of in_proj's output), both directions' taps (2, E, 4) and biases (2, E)."""
    x = torch.randn(2, tokens, 4 * dim, device="cuda", dtype=torch.bfloat16)[..., : 2 * dim]
    params = [torch.randn(2, 2 * dim, 4, device="cuda"), torch.randn(2, 2 * dim, device="cuda")]
    return [x.detach().requires_grad_()] + [p.requires_grad_() for p in params]


def norm_step(function: Callable) -> Callable:
    def step(hidden, residual, weight, scale):
        normed, stream = function(hidden, residual, weight, 1e-5, scale, torch.bfloat16)
        return normed.float().sum() + stream.sum()

    return step


def conv_step(backend: str) -> Callable:
    def step(x, weight, bias):
        return conv_both_directions(x, weight, bias, backend=backend).sum()

    return step


def train_step(loss: Callable, inputs: List[torch.Tensor]) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = loss(*inputs)
    value.backward()


def variants() -> Dict[str, Dict[str, Callable]]:
    """Per op: eager formula, compiled formula, Triton kernel (losses whose backward is timed)."""
    return {
        "add_rms_norm": {
            "eager": norm_step(add_rms_norm_reference),
            "compiled": torch.compile(norm_step(add_rms_norm_reference), dynamic=True),
            "triton": norm_step(functools.partial(add_rms_norm, backend="triton")),
        },
        "conv_both_directions": {
            "eager": conv_step("chunked"),  # the F.conv1d path
            "compiled": torch.compile(conv_step("chunked"), dynamic=True),
            "triton": conv_step("triton"),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", nargs="+", type=int, default=[192, 768], help="Vim widths")
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 4368, 5120])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    device = torch.cuda.get_device_name(0)
    print(f"# {device}, torch {torch.__version__}, batch 2, fwd+bwd GPU kernel ms")
    print("| op | width | tokens | eager | compiled | triton | compiled / triton |")
    print("|---|---|---|---|---|---|---|")
    ops = variants()
    make_inputs = {"add_rms_norm": norm_inputs, "conv_both_directions": conv_inputs}
    for op, functions in ops.items():
        counters.clear()
        for dim in args.dims:
            for tokens in args.tokens:
                inputs = make_inputs[op](dim, tokens)
                times = {
                    name: kernel_ms(lambda f=function, x=inputs: train_step(f, x), args.repeats)
                    for name, function in functions.items()
                }
                print(
                    f"| {op} | {dim} | {tokens} | {times['eager']:.3f} | {times['compiled']:.3f} "
                    f"| {times['triton']:.3f} | {times['compiled'] / times['triton']:.2f} |",
                    flush=True,
                )
        print(f"# {op}: the compiler built {counters['stats']['unique_graphs']} graph(s)")


if __name__ == "__main__":
    main()
