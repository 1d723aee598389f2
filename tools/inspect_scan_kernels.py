#!/usr/bin/env python
"""Compile the Triton scan's kernels for a GPU on any machine and count what limits them.

The scan's launches are recorded from the real wrapper (``vimdet.ops.scan_triton``, forward and
backward) on CPU tensors of the asked shape, specialised as Triton would specialise them on a GPU
(integers equal to 1 or divisible by 16, 16-byte aligned pointers), and compiled for an NVIDIA
architecture with the ``ptxas`` that Triton ships. No GPU is needed. For each kernel it prints the
registers and spill bytes a thread needs, and static counts of the PTX instructions that decided
this scan's speed: warp shuffles (``shfl.sync``), global and shared memory accesses and ``ex2``
(a loop's body counts once). Example, Vim-B at 1024x1024 (docs/benchmarks.md)::

    python tools/inspect_scan_kernels.py --channels 1536 --length 4096 --batch 2

Triton lays registers out by its own rules, which change between versions: compare kernels with
the Triton that the GPU machine runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vimdet.ops import scan_triton
from vimdet.ops.scan_triton import column_major_walk, row_major_walk

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
COUNTED = ("shfl.sync", "ld.global", "st.global", "ld.shared", "st.shared", "ex2.approx")
VECTOR_COUNTED = ("ld.global", "st.global")


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, kernel: triton.JITFunction, launches: List[tuple]):
        self.kernel = kernel
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))

        return launch


def record_launches(inputs: Dict[str, torch.Tensor], walk: List[int]) -> List[tuple]:
    """The kernel launches of one forward and one backward pass of ``scan_walk``."""
    launches: List[tuple] = []
    kernels = scan_triton.kernels
    names = [name for name in dir(kernels) if name.endswith("_kernel")]
    originals = {name: getattr(kernels, name) for name in names}
    try:
        for name, kernel in originals.items():
            setattr(kernels, name, LaunchRecorder(kernel, launches))
        args = [inputs[key] for key in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        scan_triton._scan_walk_forward(*args, True, walk)
        scan_triton._scan_walk_backward(torch.empty_like(inputs["z"]), *args, True, walk)
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)
    return launches


def specialise(kernel: triton.JITFunction, args: tuple, kwargs: dict) -> Tuple[dict, dict, dict]:
    """Triton's signature, constants and divisibility attributes for this call on a GPU."""
    signature, constants, attrs = {}, {}, {}
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
    for param in kernel.params:
        name, value = param.name, values[param.name]
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0 and not param.do_not_specialize_on_alignment:
                attrs[(param.num,)] = [["tt.divisibility", 16]]
        elif value == 1 and not param.do_not_specialize:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(param.num,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def count_instructions(ptx: str) -> collections.Counter:
    counts = collections.Counter()
    for line in ptx.splitlines():
        match = re.match(r"\s*(?:@!?%p\d+\s+)?([a-z0-9]+(?:\.[a-z0-9]+)*)", line)
        if match is None:
            continue
        op = match.group(1)
        for prefix in COUNTED:
            if op.startswith(prefix):
                counts[prefix] += 1
                if prefix in VECTOR_COUNTED and (".v2" in op or ".v4" in op):
                    counts[prefix + " vector"] += 1
    return counts


def registers_and_spills(ptx: str, arch: int) -> Tuple[int, int]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        report = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}a", source.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores", report)
    return registers, int(spills.group(1)) if spills else 0


def inspect(launches: List[tuple], arch: int) -> List[dict]:
    rows, seen = [], set()
    for kernel, args, kwargs in launches:
        signature, constants, attrs = specialise(kernel, args, kwargs)
        key = (kernel.__name__, repr(sorted(signature.items())), repr(sorted(constants.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(
            ASTSource(kernel, signature, constants, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": kwargs.get("num_warps", 4)},
        )
        ptx = compiled.asm["ptx"]
        registers, spills = registers_and_spills(ptx, arch)
        variant = ", ".join(
            f"{name}={constants[name]}" for name in ("REVERSE", "DIR0_DOWN") if name in constants
        )
        rows.append(
            {"kernel": kernel.__name__, "variant": variant, "registers": registers}
            | {"spill bytes": spills}
            | count_instructions(ptx)
        )
    return rows


def vim_inputs(batch: int, length: int, channels: int, state: int, dtype: torch.dtype) -> dict:
    """What the Vim mixer passes: token-major, direction-stacked, B and C slices of a projection."""
    projected = torch.randn(2, batch, length, 48 + 2 * state, dtype=dtype)
    return {
        "u": torch.randn(2, batch, length, channels, dtype=dtype),
        "delta": torch.randn(2, batch, length, channels, dtype=dtype),
        "A": -torch.rand(2, channels, state),
        "B": projected[..., 48 : 48 + state],
        "C": projected[..., 48 + state :],
        "D": torch.randn(2, channels),
        "z": torch.randn(batch, length, 2 * channels, dtype=dtype)[..., channels:],
        "delta_bias": torch.randn(2, channels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=1536, help="Vim's inner width")
    parser.add_argument("--length", type=int, default=4096, help="tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--grid", type=int, nargs=2, metavar=("H", "W"), help="a column walk")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, 90 = Hopper")
    args = parser.parse_args()
    if scan_triton.interpreting():
        parser.error(
            "TRITON_INTERPRET=1 gives the interpreter's kernels, not compilable ones: unset it"
        )
    if args.grid and args.grid[0] * args.grid[1] != args.length:
        parser.error(f"--grid {args.grid[0]} {args.grid[1]} does not hold --length {args.length}")
    walk = column_major_walk(*args.grid) if args.grid else row_major_walk(args.length)
    inputs = vim_inputs(args.batch, args.length, args.channels, args.state, DTYPES[args.dtype])
    rows = inspect(record_launches(inputs, walk), args.arch)
    columns = ["kernel", "variant", "registers", "spill bytes"]
    columns += [
        c for name in COUNTED for c in [name] + [name + " vector"] * (name in VECTOR_COUNTED)
    ]
    print(
        f"# Triton {triton.__version__}, sm_{args.arch}a, channels {args.channels}, length "
        f"{args.length}, batch {args.batch}, {args.dtype}, {'columns' if args.grid else 'rows'}"
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, 0)) for c in columns) + " |")


if __name__ == "__main__":
    main()
