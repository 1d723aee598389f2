#!/usr/bin/env python3
"""ViMDet-T/S/B against Detectron2's ViTDet-B in one run: backbone speed and memory by resolution.

    python tools/benchmark_backbones.py                              # GPU, every model and size
    python tools/benchmark_backbones.py --models vitdet_b_sdpa vim_b --sizes 1024x1024 \\
        --json out.json --plot docs/backbones.png
    python tools/benchmark_backbones.py --detector --models vitdet_b_sdpa vim_b --batch 2

Backbone = trunk + pyramid, fed a (batch, 3, H, W) bf16-autocast tensor. Rows:

- ``vitdet_b``: Detectron2's ``ViT`` + ``SimpleFeaturePyramid`` with ViTDet-B's settings (embed 768,
  depth 12, 12 heads, 14x14 windows, global blocks 2/5/8/11, decomposed relative positions, LN
  eps 1e-6; scales 4, 2, 1, 0.5 and a max-pooled p6), as shipped.
- ``vitdet_b_sdpa``: the same weights, attention through ``scaled_dot_product_attention`` with the
  relative positions as an additive bias (what a careful user runs).
- ``vitdet_b_sdpa_compiled``: that model under ``torch.compile`` (the strongest ViT baseline).
- ``vim_t``/``vim_s``/``vim_b``: ViMDet's backbone from ``configs/cascade_vim_{t,s,b}.yaml``.
- ``vim_t_compiled``/``vim_b_compiled``: those under ``torch.compile(dynamic=True)`` (ViMDet's
  Triton ops are single ops to the compiler; one graph serves every input size).
- ``vim_t_graphs``/``vim_s_graphs``/``vim_b_graphs``: those with ``MODEL.VIM_FPN.CUDA_GRAPHS 2``:
  the backbone's forward and backward replayed as CUDA graphs (one for training, one for
  inference), which takes the host's launch time out of the step.
- ``vim_t_row_column``/``vim_t_cross``/``vim_t_attention`` (by name only): ViMDet-T with a trunk
  option, from ``configs/trunk_options/`` (docs/trunk_options.md).

Per model and size: inference ms/img (no grad), training step ms/img (forward + backward of a
scalar of the pyramid's outputs, the gradients set to None first, as Detectron2's trainer does with
``optimizer.zero_grad()``) and the training step's peak memory beyond the weights. Times are
medians over ``--repeats`` after warm-up, synchronised on the GPU.

``--detector``: the whole Cascade detector of ``configs/cascade_vim_b.yaml`` (80 classes, RPN,
three Cascade stages) with each model's backbone in place of ViMDet's, the same heads for all:
the training step (losses on 10 random boxes an image, bf16 autocast) per image and its peak
memory, and inference per image.

``--profile``: after each row, where the training step's time goes: the ``--profile-rows``
kernels with the largest share of three steps' GPU time (on the CPU, the ops' own CPU time), from
``torch.profiler``; and how many kernels (ops) a step launches, and how much of its time goes to
those that average under 8 µs a call (on the GPU each also costs a gap of about a microsecond,
even replayed from a CUDA graph).
"""

from __future__ import annotations

import argparse
import json
import os
import types

import torch
import torch.nn.functional as F
from detectron2.modeling import ViT, build_model
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.utils import get_rel_pos
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch.profiler import ProfilerActivity, profile

from vimdet.config import build_cfg
from vimdet.engine.timing import median_seconds
from vimdet.modeling import build_vim_fpn_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIM_CONFIGS = {
    "vim_t": "cascade_vim_t.yaml",
    "vim_s": "cascade_vim_s.yaml",
    "vim_b": "cascade_vim_b.yaml",
    # ViMDet-T with a trunk option (docs/trunk_options.md); asked for by name only.
    "vim_t_row_column": "trunk_options/cascade_vim_t_row_column.yaml",
    "vim_t_cross": "trunk_options/cascade_vim_t_cross.yaml",
    "vim_t_attention": "trunk_options/cascade_vim_t_attention.yaml",
}
MODELS = (
    "vitdet_b",
    "vitdet_b_sdpa",
    "vitdet_b_sdpa_compiled",
    "vim_t",
    "vim_s",
    "vim_b",
    "vim_t_compiled",
    "vim_b_compiled",
    "vim_t_graphs",
    "vim_s_graphs",
    "vim_b_graphs",
)
OPTION_MODELS = ("vim_t_row_column", "vim_t_cross", "vim_t_attention")
COMPILED = "_compiled"
GRAPHED = "_graphs"
DETECTOR_CONFIG = "cascade_vim_b.yaml"


def vitdet_b(image_size: int) -> torch.nn.Module:
    """Detectron2's ViTDet-B backbone (projects/ViTDet's COCO config), built for ``image_size``."""
    net = ViT(
        img_size=image_size,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_size=14,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=1e-6),
        window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10],
        residual_block_indexes=[],
        use_rel_pos=True,
        out_feature="last_feat",
    )
    return SimpleFeaturePyramid(
        net,
        in_feature="last_feat",
        out_channels=256,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=LastLevelMaxPool(),
        norm="LN",
        square_pad=0,
    )


def sdpa_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Detectron2's ``vit.Attention.forward`` with ``scaled_dot_product_attention``; the
    decomposed relative positions (MViTv2) enter as an additive (H*W, H*W) bias per query."""
    batch, height, width, _ = x.shape
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (batch, heads, H*W, head_dim)
    bias = None
    if self.use_rel_pos:
        rel_h = get_rel_pos(height, height, self.rel_pos_h)
        rel_w = get_rel_pos(width, width, self.rel_pos_w)
        grid_q = q.reshape(batch, self.num_heads, height, width, -1)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w)
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(
            batch, self.num_heads, height * width, height * width
        )
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return self.proj(out.reshape(batch, height, width, -1))


def use_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """Route every ViT attention block of ``model`` through :func:`sdpa_attention_forward`."""
    for block in model.net.blocks:
        block.attn.forward = types.MethodType(sdpa_attention_forward, block.attn)
    return model


def build(name: str, image_size: int, device: str) -> torch.nn.Module:
    """The backbone (trunk + pyramid) ``name`` for ``image_size`` inputs, on ``device``."""
    base = name.removesuffix(COMPILED).removesuffix(GRAPHED)
    if base.startswith("vitdet_b"):
        model = vitdet_b(image_size)
        if "sdpa" in base:
            model = use_sdpa(model)
    else:
        config = os.path.join(REPO, "configs", VIM_CONFIGS[base])
        graphs = ["MODEL.VIM_FPN.CUDA_GRAPHS", "2"] if name.endswith(GRAPHED) else []
        model = build_vim_fpn_backbone(build_cfg(config, ["MODEL.DEVICE", device, *graphs]))
    model = model.to(device)
    if name.endswith(COMPILED):
        model = torch.compile(model, dynamic=base.startswith("vim"))
    return model


def build_detector(name: str, image_size: int, device: str) -> torch.nn.Module:
    """The Cascade detector of :data:`DETECTOR_CONFIG` with backbone ``name``."""
    cfg = build_cfg(os.path.join(REPO, "configs", DETECTOR_CONFIG), ["MODEL.DEVICE", device])
    model = build_model(cfg)
    model.backbone = build(name, image_size, device)
    return model


def detector_inputs(batch: int, height: int, width: int, device: str) -> list:
    """Detectron2's inputs: uint8 images with 10 random ground-truth boxes each."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        corners = torch.rand(10, 2, 2, generator=generator) * torch.tensor([width, height])
        boxes = torch.cat([corners.min(1).values, corners.max(1).values + 16], dim=1)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes.to(device))
        instances.gt_classes = torch.randint(80, (10,), generator=generator).to(device)
        image = torch.randint(256, (3, height, width), dtype=torch.uint8, generator=generator)
        inputs.append({"image": image.to(device), "instances": instances})
    return inputs


SMALL_KERNEL_US = 8.0  # --profile: kernels averaging less than this a call count as small


def step_profile(step, device: str, steps: int = 3, top: int = 20) -> dict:
    """The ``top`` kernels (CPU ops on the CPU; 0: all) of ``steps`` calls of ``step`` by their
    own time: name, share of the total and calls per step; the total in ms per step; launches per
    step, and the launches and ms per step of those averaging under ``SMALL_KERNEL_US``."""
    on_gpu = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize()

    def own_time(event) -> float:
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    events = sorted((e for e in prof.key_averages() if own_time(e) > 0), key=own_time)[::-1]
    total = sum(own_time(e) for e in events)
    kernels = [
        {"name": e.key, "share": own_time(e) / total, "calls_per_step": e.count / steps}
        for e in events[: top or None]
    ]
    small = [e for e in events if own_time(e) / e.count < SMALL_KERNEL_US]
    return {
        "ms_per_step": total / steps / 1e3,
        "kernels": kernels,
        "launches_per_step": sum(e.count for e in events) / steps,
        "small_launches_per_step": sum(e.count for e in small) / steps,
        "small_ms_per_step": sum(own_time(e) for e in small) / steps / 1e3,
    }


def measure(
    name: str,
    height: int,
    width: int,
    batch: int,
    device: str,
    repeats: int,
    detector: bool,
    profile_rows: int | None = None,
) -> dict:
    """ms/img of inference and of a training step, the step's peak memory in GiB, and with
    ``profile_rows`` not None the step's kernels, that many (:func:`step_profile`)."""
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    if detector:
        model = build_detector(name, max(height, width), device)
        inputs = detector_inputs(batch, height, width, device)

        def forward():
            if not model.training:
                return model.inference(inputs)
            with EventStorage():  # the heads log training statistics
                return model(inputs)

        def loss(losses):
            return sum(losses.values())

    else:
        model = build(name, max(height, width), device)
        inputs = torch.randn(batch, 3, height, width, device=device)

        def forward():
            return model(inputs)

        def loss(outputs):
            # The mean of squares, its gradient in each output's own memory layout, as a conv
            # head's backward pass hands it: ``.mean()``'s backward materialises a contiguous
            # (NCHW) gradient whatever the output's layout, which charged a channels-last
            # pyramid (ViMDet's) strided multiplies and layout copies (docs/benchmarks.md).
            return sum(out.float().square().sum() / out.numel() for out in outputs.values())

    def infer():
        with torch.no_grad(), autocast:
            forward()

    params = [param for param in model.parameters() if param.requires_grad]

    def train():
        # As Detectron2's trainer does before each step with ``optimizer.zero_grad()``, over the
        # optimizer's list of parameters: autograd then hands each parameter its gradient instead
        # of adding it to the last step's (a kernel a parameter).
        for param in params:
            param.grad = None
        with autocast:
            outputs = forward()
        loss(outputs).backward()

    model.eval()
    infer_s = median_seconds(infer, device, repeats)
    model.train()
    peak = float("nan")
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    train_s = median_seconds(train, device, repeats)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    row = {
        "model": f"cascade_{name}" if detector else name,
        "size": f"{height}x{width}",
        "batch": batch,
        "infer_ms_per_img": infer_s * 1e3 / batch,
        "train_ms_per_img": train_s * 1e3 / batch,
        "train_peak_gib": peak,
    }
    if profile_rows is not None:
        row["profile"] = step_profile(train, device, top=profile_rows)
    return row


def print_profile(row: dict, device: str) -> None:
    where = "GPU kernel" if device == "cuda" else "CPU op"
    profiled = row["profile"]
    print(
        f"\n{row['model']} {row['size']}, batch {row['batch']}: "
        f"{profiled['ms_per_step']:.1f} ms of {where} time a training step, "
        f"{profiled['launches_per_step']:.0f} launches; those averaging under "
        f"{SMALL_KERNEL_US:g} µs: {profiled['small_launches_per_step']:.0f} launches, "
        f"{profiled['small_ms_per_step']:.2f} ms\n"
    )
    print(f"| share | calls a step | {where} |\n|---|---|---|")
    for kernel in profiled["kernels"]:
        name = kernel["name"].replace("|", "/")[:110]
        print(f"| {100 * kernel['share']:.1f}% | {kernel['calls_per_step']:g} | `{name}` |")
    print(flush=True)


def _pixels(size: str) -> int:
    height, width = (int(v) for v in size.split("x"))
    return height * width


def plot(rows: list, path: str) -> None:
    """Training step time and peak memory against resolution, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    sizes = sorted({row["size"] for row in rows}, key=_pixels)
    for name in dict.fromkeys(row["model"] for row in rows):
        points = {row["size"]: row for row in rows if row["model"] == name}
        xs = [s for s in sizes if s in points]
        axes[0].plot(xs, [points[s]["train_ms_per_img"] for s in xs], marker="o", label=name)
        axes[1].plot(xs, [points[s]["train_peak_gib"] for s in xs], marker="o", label=name)
    axes[0].set_ylabel("training step, ms / image")
    axes[1].set_ylabel("training peak memory, GiB")
    for axis in axes:
        axis.set_xlabel("input size")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=MODELS + OPTION_MODELS, default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=["1024x1024", "832x1344", "2048x2048"])
    parser.add_argument("--batch", type=int, default=2, help="batch (1 at 2048x2048)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write a PNG of time and memory against size here")
    parser.add_argument(
        "--detector", action="store_true", help="the whole Cascade detector, not the backbone"
    )
    parser.add_argument(
        "--profile", action="store_true", help="after each row, the training step's top kernels"
    )
    parser.add_argument(
        "--profile-rows", type=int, default=20, help="kernels --profile lists (0: all of them)"
    )
    args = parser.parse_args()

    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, bf16 autocast, median of {args.repeats}")
    print("| model | size | batch | infer ms/img | train ms/img | train peak GiB |")
    print("|---|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        height, width = (int(v) for v in size.split("x"))
        batch = 1 if height * width >= 2048 * 2048 and not args.detector else args.batch
        for model in args.models:
            try:
                row = measure(
                    model,
                    height,
                    width,
                    batch,
                    args.device,
                    args.repeats,
                    args.detector,
                    args.profile_rows if args.profile else None,
                )
            except torch.OutOfMemoryError:
                row = {"model": model, "size": size, "batch": batch, "error": "out of memory"}
                print(f"| {model} | {size} | {batch} | out of memory | | |", flush=True)
            else:
                print(
                    f"| {model} | {size} | {batch} | {row['infer_ms_per_img']:.1f} | "
                    f"{row['train_ms_per_img']:.1f} | {row['train_peak_gib']:.2f} |",
                    flush=True,
                )
                if args.profile:
                    print_profile(row, args.device)
            rows.append(row)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    if args.plot:
        plot([row for row in rows if "error" not in row], args.plot)


if __name__ == "__main__":
    main()
