#!/usr/bin/env python3
"""Benchmark the selective-scan backends: forward and forward+backward time, peak memory.

    python tools/benchmark_scan.py --device cuda                 # Vim-T/S/B shapes, every backend
    python tools/benchmark_scan.py --device cuda --bidirectional # Vim's two directions, as a mixer
    python tools/benchmark_scan.py --device cpu --channels 384 --lengths 4096 --batches 1

``--bidirectional`` times :func:`vimdet.ops.bidirectional_selective_scan` on the token-major,
direction-stacked tensors the Vim mixer produces: ``triton`` does both directions in one launch per
phase and reads them in place; ``cuda`` is what the model needs from mamba-ssm for the same work,
two ``selective_scan_fn`` calls plus the flips and transposes they require.

Shapes are one scan direction of a Vim mixer: channels = the inner width (384/768/1536 for
Vim-T/S/B), state 16, lengths 4096 (1024^2 input), 4200 and 7056 (800x1333-ish grids). The
reference backend (a per-step loop) is timed only at ``--reference-shape``. Each row also gives the
ratio to the fastest backend at that shape. GPU memory is the peak allocated by the call beyond
its inputs; CPU memory is the growth of the peak RSS of a fresh process running that one case.
"""

import argparse
import multiprocessing
import resource

import torch

from vimdet.engine.timing import median_seconds
from vimdet.ops import (
    bidirectional_selective_scan,
    cuda_kernel_available,
    selective_scan,
    triton_available,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(batch, channels, length, dtype, device, state=16):
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    a = -torch.arange(1, state + 1, device=device, dtype=torch.float32).repeat(channels, 1)
    inputs = dict(
        u=randn(batch, channels, length),
        delta=randn(batch, channels, length, scale=0.5),
        A=a,
        B=randn(batch, state, length),
        C=randn(batch, state, length),
        D=torch.ones(channels, device=device),
        z=randn(batch, channels, length),
        delta_bias=torch.full((channels,), -3.0, device=device),
    )
    for value in inputs.values():
        value.requires_grad_()
    return inputs


def make_bidirectional_inputs(batch, channels, length, dtype, device, state=16):
    """The mixer's tensors: u, delta (2, B, L, E); A (2, E, N); B, C (2, B, L, N) as slices of
    one projection; D, delta_bias (2, E); z (B, L, E) as half of in_proj's output."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    rank = channels // 32
    projected = randn(2, batch, length, rank + 2 * state).requires_grad_()
    xz = randn(batch, length, 2 * channels).requires_grad_()
    inputs = dict(
        u=randn(2, batch, length, channels),
        delta=randn(2, batch, length, channels, scale=0.5),
        A=-torch.arange(1, state + 1, device=device, dtype=torch.float32).repeat(2, channels, 1),
        D=torch.ones(2, channels, device=device),
        delta_bias=torch.full((2, channels), -3.0, device=device),
    )
    for value in inputs.values():
        value.requires_grad_()
    inputs["B"], inputs["C"] = projected[..., rank : rank + state], projected[..., rank + state :]
    inputs["z"] = xz[..., channels:]
    return inputs


def time_case(backend, inputs, device, repeats, bidirectional=False):
    """Median seconds of forward and of forward+backward."""
    scan = bidirectional_selective_scan if bidirectional else selective_scan
    leaves = [value for value in inputs.values() if value.requires_grad]

    def forward():
        return scan(**inputs, delta_softplus=True, backend=backend)

    def forward_backward():
        out = forward()
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    if device == "cuda":  # CUDA events around many repeats, L2 flushed between them
        import triton

        return [
            triton.testing.do_bench(step, warmup=50, rep=200, return_mode="median") / 1e3
            for step in (forward, forward_backward)
        ]
    return [median_seconds(step, device, repeats, warmup=1) for step in (forward, forward_backward)]


def run_case(args):
    """(forward s, forward+backward s, peak MiB) of one backend at one shape."""
    backend, batch, channels, length, dtype, device, repeats, bidirectional = args
    if backend == "reference":  # seconds per call: a few repeats tell enough
        repeats = min(repeats, 3)
    make = make_bidirectional_inputs if bidirectional else make_inputs
    inputs = make(batch, channels, length, DTYPES[dtype], device)
    if device == "cuda":
        forward, both = time_case(backend, inputs, device, repeats, bidirectional)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = (bidirectional_selective_scan if bidirectional else selective_scan)(
            **inputs, delta_softplus=True, backend=backend
        )
        out.float().sum().backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        forward, both = time_case(backend, inputs, device, repeats, bidirectional)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return forward, both, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--channels", type=int, nargs="+", default=[384, 768, 1536])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 4200, 7056])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="default: triton and cuda (where available), chunked, reference; with "
        "--bidirectional: triton and cuda",
    )
    parser.add_argument(
        "--bidirectional",
        action="store_true",
        help="time both directions as the Vim mixer runs them (token-major, stacked)",
    )
    parser.add_argument(
        "--reference-shape",
        type=int,
        nargs=3,
        default=[384, 4096, 1],
        metavar=("CHANNELS", "LENGTH", "BATCH"),
        help="the one shape at which the slow reference is timed",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="default: 20 GPU, 10 CPU; the reference: at most 3",
    )
    args = parser.parse_args()

    device = args.device
    repeats = args.repeats or (20 if device == "cuda" else 10)
    on_gpu = device == "cuda"
    gpu_backends = ["triton"] * (on_gpu and triton_available()) + ["cuda"] * (
        on_gpu and cuda_kernel_available()
    )
    backends = args.backends or (
        gpu_backends if args.bidirectional else gpu_backends + ["chunked", "reference"]
    )
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    what = "both directions (token-major, as the mixer)" if args.bidirectional else "one direction"
    print(
        f"# selective scan, {what}, {device} ({name}"
        f", {torch.get_num_threads()} threads), {args.dtype} inputs, state 16, torch "
        f"{torch.__version__}, median of {repeats} (of 3 for the reference)"
    )
    print(
        "| channels | length | batch | backend | fwd ms | fwd+bwd ms | peak MiB | fwd x fastest "
        "| fwd+bwd x fastest |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    context = multiprocessing.get_context("spawn")
    for channels in args.channels:
        for length in args.lengths:
            for batch in args.batches:
                rows = {}
                for backend in backends:
                    if backend == "reference" and [channels, length, batch] != args.reference_shape:
                        continue
                    case = (
                        backend,
                        batch,
                        channels,
                        length,
                        args.dtype,
                        device,
                        repeats,
                        args.bidirectional,
                    )
                    if device == "cuda":
                        rows[backend] = run_case(case)
                        torch.cuda.empty_cache()
                    else:  # a fresh process per case, so its peak RSS is its own
                        with context.Pool(1) as pool:
                            rows[backend] = pool.apply(run_case, (case,))
                if not rows:
                    continue
                best_fwd = min(r[0] for r in rows.values())
                best_both = min(r[1] for r in rows.values())
                for backend, (fwd, both, peak) in rows.items():
                    print(
                        f"| {channels} | {length} | {batch} | {backend} | {fwd * 1e3:.2f} | "
                        f"{both * 1e3:.2f} | {peak:.0f} | {fwd / best_fwd:.1f} | "
                        f"{both / best_both:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
