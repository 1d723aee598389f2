#!/usr/bin/env python3
"""Benchmark Vim-T/S/B: backbone training step and whole-detector inference at 800x1333.

    python tools/benchmark_model.py --sizes tiny small base --backends cuda chunked

For each size and scan backend: the backbone's (trunk + pyramid) forward+backward per image under
bf16 autocast at batch ``--batch`` with its peak GPU memory, and the Cascade detector's
(configs/cascade_vim_*.yaml, 80 classes) inference time per image on an 800x1333 input.
"""

import argparse
import os

import torch
from detectron2.modeling import build_model

import vimdet  # noqa: F401
from vimdet.config import build_cfg
from vimdet.engine.timing import median_seconds

CONFIGS = {
    "tiny": "cascade_vim_t.yaml",
    "small": "cascade_vim_s.yaml",
    "base": "cascade_vim_b.yaml",
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(size, backend, batch, repeats):
    """(backbone fwd+bwd ms per image, its peak GiB, detector inference ms per image)."""
    cfg = build_cfg(
        os.path.join(REPO, "configs", CONFIGS[size]),
        ["MODEL.VIM.SCAN_BACKEND", backend, "MODEL.VIM.DROP_PATH_RATE", "0.0"],
    )
    model = build_model(cfg)
    images = torch.randn(batch, 3, 832, 1344, device="cuda")

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            features = model.backbone(images)
        sum(f.float().mean() for f in features.values()).backward()

    torch.cuda.reset_peak_memory_stats()
    train_ms = median_seconds(train_step, "cuda", repeats) / batch * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30
    model.zero_grad(set_to_none=True)
    model.eval()
    image = torch.randint(0, 255, (3, 800, 1333), dtype=torch.uint8)
    inputs = [{"image": image, "height": 800, "width": 1333}]

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(inputs)

    return train_ms, peak, median_seconds(infer, "cuda", repeats) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--backends", nargs="+", default=["cuda", "chunked"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(
        f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16 autocast, "
        f"backbone batch {args.batch}, 800x1333 input (padded to 832x1344), median of "
        f"{args.repeats}"
    )
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    print("| model | scan | backbone fwd+bwd ms/img | backbone peak GiB | detector infer ms/img |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        for backend in args.backends:
            name = f"Vim-{size[0].upper()}"
            try:
                train_ms, peak, infer_ms = measure(size, backend, args.batch, args.repeats)
            except torch.OutOfMemoryError:
                print(f"| {name} | {backend} | out of memory | > {total_gib:.0f} | - |", flush=True)
            else:
                print(
                    f"| {name} | {backend} | {train_ms:.1f} | {peak:.2f} | {infer_ms:.1f} |",
                    flush=True,
                )
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
