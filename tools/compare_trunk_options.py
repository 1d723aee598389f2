#!/usr/bin/env python3
"""ViMDet-T's trunk options trained the same way, side by side: box AP and the backbone step.

    python tools/compare_trunk_options.py --output-dir output/trunk_options     # one GPU, ~5 min
    python tools/compare_trunk_options.py --tiny --output-dir /tmp/trunk_options  # CPU check

Options (docs/trunk_options.md): ``row`` (Vim), ``row_column``, ``cross`` (MODEL.VIM.SCAN_ROUTES)
and ``attention`` (MODEL.VIM.ATTENTION_BLOCKS: the last four blocks). Each is trained from scratch
by ``tools/train_net.py`` on ``configs/shapes/cascade_vim_t_shapes_gpu.yaml`` (the built-in large
shapes split, bf16) for ``--iters`` iterations with the same seed; the four trainings run at once,
as separate processes spread over the GPUs present (sharing one GPU, or one GPU each on a 4-GPU
host), so their s/it are not comparable (the step time comes from
``tools/benchmark_backbones.py``, run alone afterwards at ``--bench-size``). Each run's val
detections are scored with pycocotools: box AP, AP50, AP per class, and AP over ground-truth
subsets by box shape (tall: height >= 2 x width; wide: width >= 2 x height; compact: the rest),
scored like COCO's size ranges (objects of other shapes and detections matched to none of them
and of other shapes are ignored). Writes ``trunk_options.json`` and ``trunk_options.md`` to
``--output-dir``; ``--tiny`` runs a 4-block, 32-wide trunk for a few iterations on the small
split on the CPU, to check the pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import vimdet  # noqa: F401  (registers the built-in datasets)
from vimdet.data.shapes.register import ensure_shapes_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = ("row", "row_column", "cross", "attention")
# Box shapes by height / width, scored as COCO scores its size ranges.
SHAPE_RANGES = {"all": (0.0, 1e9), "wide": (0.0, 0.5), "compact": (0.5, 2.0), "tall": (2.0, 1e9)}


def option_overrides(option: str, depth: int) -> List[str]:
    """Config overrides of one option for a trunk ``depth`` blocks deep."""
    if option == "attention":  # the last four blocks (MambaVision's late attention)
        blocks = list(range(depth - min(4, depth // 2) + 1, depth + 1))
        return ["MODEL.VIM.ATTENTION_BLOCKS", str(blocks)]
    return ["MODEL.VIM.SCAN_ROUTES", option]


def run_settings(args: argparse.Namespace) -> Dict:
    """Config file, shared overrides, datasets and trunk depth of the GPU or the tiny run."""
    iters = args.iters
    steps = sorted({max(1, int(iters * 0.8)), max(1, int(iters * 0.93))} - {iters})
    schedule = [
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({', '.join(map(str, steps))},)",
        "SOLVER.WARMUP_ITERS", str(min(100, iters // 3)), "SOLVER.CHECKPOINT_PERIOD", "1000000",
        "TEST.VIS_NUM_IMAGES", "0", "TEST.EVAL_UNTRAINED", "False", "SEED", "0",
    ]  # fmt: skip
    if not args.tiny:
        return {
            "config": "configs/shapes/cascade_vim_t_shapes_gpu.yaml",
            "overrides": schedule + ["DATALOADER.NUM_WORKERS", str(args.workers)],
            "datasets": ("vimdet_shapes_large_train", "vimdet_shapes_large_val"),
            "depth": 24,
        }
    tiny = [
        "MODEL.VIM.SIZE", "custom", "MODEL.VIM.EMBED_DIM", "32", "MODEL.VIM.DEPTH", "4",
        "MODEL.VIM.D_STATE", "4", "MODEL.VIM_FPN.IN_BLOCKS", "[1, 2, 3, 4]",
        "MODEL.VIM_FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "INPUT.MIN_SIZE_TRAIN", "(160,)",
        "INPUT.MIN_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip
    return {
        "config": "configs/shapes/Base-Shapes.yaml",
        "overrides": schedule + tiny,
        "datasets": ("vimdet_shapes_train", "vimdet_shapes_val"),
        "depth": 4,
    }


def train_all(args: argparse.Namespace, settings: Dict) -> Dict[str, float]:
    """Train every option at once, one process each; return each run's wall time in seconds."""
    for name in settings["datasets"]:  # generate once, before the processes race for the lock
        ensure_shapes_dataset(name)
    train, val = settings["datasets"]
    processes, started = {}, time.perf_counter()
    gpus = torch.cuda.device_count()
    for index, option in enumerate(args.options):
        out = os.path.join(args.output_dir, option)
        os.makedirs(out, exist_ok=True)
        command = [
            sys.executable, os.path.join(REPO, "tools", "train_net.py"),
            "--config-file", os.path.join(REPO, settings["config"]),
            *settings["overrides"], *option_overrides(option, settings["depth"]),
            "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)", "OUTPUT_DIR", out,
        ]  # fmt: skip
        log = open(os.path.join(out, "stdout.log"), "w")
        env = dict(os.environ)
        if gpus > 1:  # spread the runs over the GPUs present
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        processes[option] = (process, log)
        print(f"started {option}: {' '.join(command)}", flush=True)
    wall = {}
    for option, (process, log) in processes.items():
        code = process.wait()
        log.close()
        wall[option] = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(
                f"training {option!r} failed (exit {code}); see "
                f"{os.path.join(args.output_dir, option, 'stdout.log')}"
            )
        print(f"{option}: trained in {wall[option]:.0f} s", flush=True)
    return wall


def score(results_json: str, dataset: str) -> Dict:
    """Box AP, AP50, AP per class and AP by box shape of one run's COCO-format detections."""
    gt = COCO_quiet(MetadataCatalog.get(dataset).json_file)
    with open(results_json) as f:
        detections = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections) if detections else COCO()
    # COCO scores its size ranges by the 'area' field: give it height / width instead.
    for coco in (gt, dt):
        for ann in coco.anns.values():
            ann["area"] = ann["bbox"][3] / max(ann["bbox"][2], 1e-6)
    evaluator = COCOeval(gt, dt, "bbox")
    evaluator.params.areaRng = list(SHAPE_RANGES.values())
    evaluator.params.areaRngLbl = list(SHAPE_RANGES)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"]  # (iou, recall, class, shape range, max dets)

    def ap(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean() * 100) if valid.size else float("nan")

    classes = [gt.cats[c]["name"] for c in evaluator.params.catIds]
    counts = dict.fromkeys(SHAPE_RANGES, 0)
    for ann in gt.anns.values():
        for label, (low, high) in SHAPE_RANGES.items():
            counts[label] += int(low <= ann["area"] <= high)
    shapes = list(SHAPE_RANGES)
    return {
        "AP": ap(precision[:, :, :, 0, -1]),
        "AP50": ap(precision[0, :, :, 0, -1]),
        "AP_by_class": {name: ap(precision[:, :, k, 0, -1]) for k, name in enumerate(classes)},
        "AP_by_shape": {label: ap(precision[:, :, :, a, -1]) for a, label in enumerate(shapes)},
        "objects_by_shape": counts,
    }


def COCO_quiet(path: str) -> COCO:  # noqa: N802 (pycocotools' class name)
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def benchmark(args: argparse.Namespace) -> Dict[str, Dict]:
    """The backbone's training step (ms/img, peak GiB) per option, one model at a time."""
    names = {"row": "vim_t", **{o: f"vim_t_{o}" for o in OPTIONS if o != "row"}}
    path = os.path.join(args.output_dir, "benchmark.json")
    command = [
        sys.executable, os.path.join(REPO, "tools", "benchmark_backbones.py"),
        "--models", *[names[o] for o in args.options], "--sizes", args.bench_size,
        "--batch", str(args.bench_batch), "--repeats", str(args.repeats), "--json", path,
    ]  # fmt: skip
    print("benchmark:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    with open(path) as f:
        rows = {row["model"]: row for row in json.load(f)}
    return {option: rows[names[option]] for option in args.options}


def table(report: Dict) -> str:
    """The markdown table of a report."""
    shapes = report["objects_by_shape"]
    lines = [
        f"| option | box AP | AP50 | AP tall ({shapes['tall']}) | AP wide ({shapes['wide']}) | "
        f"AP compact ({shapes['compact']}) | train step ms/img at {report['bench_size']} | "
        "train step peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for option, row in report["options"].items():
        step = row.get("benchmark", {})
        lines.append(
            f"| {option} | {row['AP']:.2f} | {row['AP50']:.2f} | {row['AP_by_shape']['tall']:.2f} "
            f"| {row['AP_by_shape']['wide']:.2f} | {row['AP_by_shape']['compact']:.2f} "
            f"| {step.get('train_ms_per_img', float('nan')):.1f} "
            f"| {step.get('train_peak_gib', float('nan')):.2f} |"
        )
    classes = list(next(iter(report["options"].values()))["AP_by_class"])
    lines += ["", "| option | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for option, row in report["options"].items():
        values = " | ".join(f"{row['AP_by_class'][c]:.2f}" for c in classes)
        lines.append(f"| {option} | {values} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, help="one folder per option, and the tables")
    parser.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS))
    parser.add_argument("--iters", type=int, default=300, help="training iterations per option")
    parser.add_argument("--workers", type=int, default=3, help="data-loader workers per training")
    parser.add_argument("--bench-size", default="1024x1024")
    parser.add_argument("--bench-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU check of the pipeline, tiny model")
    args = parser.parse_args()
    if args.tiny:
        args.iters = min(args.iters, 4)
        args.bench_size, args.bench_batch, args.repeats = "128x128", 1, 1
    if os.path.exists(os.path.join(args.output_dir, "trunk_options.json")):
        raise SystemExit(
            f"{args.output_dir} already holds trunk_options.json; give another --output-dir (or "
            "move that one away) so that no earlier result is overwritten"
        )
    settings = run_settings(args)
    wall = train_all(args, settings)
    val = settings["datasets"][1]
    options = {}
    for option in args.options:
        results = os.path.join(
            args.output_dir, option, "inference", val, "coco_instances_results.json"
        )
        options[option] = {**score(results, val), "train_wall_s": wall[option]}
    steps = benchmark(args)
    for option, row in steps.items():
        options[option]["benchmark"] = row
    first = next(iter(options.values()))
    report = {
        "iters": args.iters,
        "config": settings["config"],
        "val": val,
        "bench_size": args.bench_size,
        "objects_by_shape": first["objects_by_shape"],
        "options": options,
    }
    with open(os.path.join(args.output_dir, "trunk_options.json"), "w") as f:
        json.dump(report, f, indent=2)
    markdown = table(report)
    with open(os.path.join(args.output_dir, "trunk_options.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
