#!/usr/bin/env python3
"""Train recipe variants of the `make demo` config side by side on one GPU; table their box AP.

    python tools/sweep_demo_recipes.py --output-dir output/recipe_sweep
    python tools/sweep_demo_recipes.py --variants my_variants.json --jobs 4 --output-dir ...

Each variant is a list of config overrides of the demo config (``KEY VALUE ...`` as on
``tools/train_net.py``'s command line) and a CPU step time measured on the demo's 2-core machine.
It trains for the iterations that step time buys in ``--cpu-train-seconds`` (the demo's training
budget), with the learning rate dropped 10x at 80% and 94% of them, so the AP it reaches on the
GPU estimates the AP the same recipe would reach in ``make demo`` (the GPU's scan and
convolutions round differently, so the two are not equal). Runs are separate
``tools/train_net.py`` processes (``--jobs`` at a time) on ``--device``, in fp32 (AMP off, as on
the CPU), each evaluated on the demo's val split at its end. The dataset is generated once first.

Writes into ``--output-dir``: one folder per variant (Detectron2's log, metrics.json, weights),
``results.json`` and ``results.md`` (variants ranked by AP). A variant that fails or is still
running at ``--time-limit`` is listed with its state instead of an AP.

Variants file (JSON): a list of ``{"name": str, "cpu_s_per_it": float, "opts": [str, ...]}``;
``"iters": int`` instead of ``cpu_s_per_it`` fixes the iteration count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from detectron2.data import DatasetCatalog

import vimdet  # noqa: F401  (registers the built-in shapes datasets)
from vimdet.config import build_cfg
from vimdet.data.shapes import ensure_shapes_dataset

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "shapes" / "cascade_vim_mini_shapes.yaml"
TRAIN_NET = REPO / "tools" / "train_net.py"

# The built-in variants: the demo config and changes to it. cpu_s_per_it: CPU seconds per
# training iteration on one thread of the 2-core machine (docs/benchmarks.md, "Step-time
# variants"); "est." marks a figure scaled from the demo's by the ratio measured for the same
# change to the patch-16 recipe at batch 4.
BUILTIN_VARIANTS = [
    {"name": "demo", "cpu_s_per_it": 0.74, "opts": []},
    {
        # The demo before the patch-8 recipe: patch 16, expand 2, taps 2/4/6/8, batch 4, inputs
        # 224-288.
        "name": "patch16_demo",
        "cpu_s_per_it": 1.22,
        "opts": [
            "MODEL.VIM.PATCH_SIZE",
            "16",
            "MODEL.VIM.EXPAND",
            "2",
            "MODEL.VIM_FPN.IN_BLOCKS",
            "[2,4,6,8]",
            "SOLVER.IMS_PER_BATCH",
            "4",
            "INPUT.MIN_SIZE_TRAIN",
            "(224,256,288)",
            "INPUT.MAX_SIZE_TRAIN",
            "448",
            "INPUT.MIN_SIZE_TEST",
            "256",
            "INPUT.MAX_SIZE_TEST",
            "448",
        ],
    },
    {"name": "taps2468", "cpu_s_per_it": 0.74, "opts": ["MODEL.VIM_FPN.IN_BLOCKS", "[2,4,6,8]"]},
    {"name": "expand2", "cpu_s_per_it": 1.03, "opts": ["MODEL.VIM.EXPAND", "2"]},
    {
        "name": "batch4",
        "cpu_s_per_it": 1.26,
        "opts": ["SOLVER.IMS_PER_BATCH", "4"],
    },
    {"name": "lr2e-4", "cpu_s_per_it": 0.74, "opts": ["SOLVER.BASE_LR", "0.0002"]},
    {"name": "lr1e-3", "cpu_s_per_it": 0.74, "opts": ["SOLVER.BASE_LR", "0.001"]},
    {
        "name": "sigmoid_ce",
        "cpu_s_per_it": 0.74,
        "opts": ["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True"],
    },
    {
        "name": "roi16_pos50",
        "cpu_s_per_it": 0.69,  # est.
        "opts": [
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "16",
            "MODEL.ROI_HEADS.POSITIVE_FRACTION",
            "0.5",
        ],
    },
    {
        "name": "inputs128",
        "cpu_s_per_it": 0.57,  # est.
        "opts": [
            "INPUT.MIN_SIZE_TRAIN",
            "(128,160,192)",
            "INPUT.MAX_SIZE_TRAIN",
            "320",
            "INPUT.MIN_SIZE_TEST",
            "160",
            "INPUT.MAX_SIZE_TEST",
            "320",
        ],
    },
]


@dataclass
class Run:
    """One variant: its name, overrides, iteration count and (once started) its process."""

    name: str
    opts: list
    iters: int
    folder: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    state: str = "waiting"
    metrics: dict = field(default_factory=dict)


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=str(DEMO_CONFIG), help="the recipe's base config")
    parser.add_argument("--variants", help="JSON file of variants (default: the built-in list)")
    parser.add_argument("--only", nargs="+", help="run only the variants of these names")
    parser.add_argument("--output-dir", required=True, help="new or empty folder for the results")
    parser.add_argument("--device", default="cuda", help="MODEL.DEVICE of every run")
    parser.add_argument("--jobs", type=int, default=10, help="runs at the same time")
    parser.add_argument(
        "--cpu-train-seconds",
        type=float,
        default=540.0,
        help="the CPU training time a variant's iterations correspond to (9 minutes)",
    )
    parser.add_argument(
        "--max-iter", type=int, default=0, help="cap every run at this many iterations (tests)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=360.0, help="stop runs still going after this (s)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def load_variants(path: str | None, only: list | None) -> list:
    """The variants to run: the file's (checked) or the built-in list, filtered by ``only``."""
    variants = BUILTIN_VARIANTS
    if path:
        with open(path) as f:
            variants = json.load(f)
        if not isinstance(variants, list):
            raise ValueError(f"{path}: expected a JSON list of variants, got {type(variants)}")
    names = set()
    for variant in variants:
        if not isinstance(variant, dict) or "name" not in variant or "opts" not in variant:
            raise ValueError(
                f"variant {variant!r} needs a 'name', 'opts' (list of KEY VALUE strings) and "
                "'cpu_s_per_it' or 'iters'"
            )
        if ("cpu_s_per_it" in variant) == ("iters" in variant):
            raise ValueError(f"variant {variant['name']!r}: give one of 'cpu_s_per_it' or 'iters'")
        if len(variant["opts"]) % 2:
            raise ValueError(f"variant {variant['name']!r}: opts must be KEY VALUE pairs")
        if variant["name"] in names:
            raise ValueError(f"variant name {variant['name']!r} appears twice")
        names.add(variant["name"])
    if only:
        unknown = set(only) - names
        if unknown:
            raise ValueError(f"--only: no variants named {sorted(unknown)}; known: {sorted(names)}")
        variants = [v for v in variants if v["name"] in only]
    return variants


def schedule_opts(iters: int) -> list:
    """MAX_ITER and the demo's steps (10x drops at 80% and 94%), kept strictly increasing."""
    steps = sorted({s for s in (int(iters * 0.8), int(iters * 0.94)) if 0 < s < iters})
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(tuple(steps)).replace(" ", "")]


def _read_metrics(folder: Path) -> dict:
    """Last iteration, the last evaluation's bbox metrics and the last logged losses."""
    path = folder / "metrics.json"
    result: dict = {}
    if not path.is_file():
        return result
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "bbox/AP" in record:
            result.update({k: v for k, v in record.items() if k.startswith("bbox/")})
        if "total_loss" in record:
            result["iterations_done"] = record["iteration"] + 1  # 0-based in Detectron2
            result["total_loss"] = record["total_loss"]
            result["fg_cls_accuracy"] = record.get("stage0/fast_rcnn/fg_cls_accuracy")
    return result


def _start(run: Run, config_file: str, device: str) -> None:
    run.folder.mkdir(parents=True)
    command = [
        sys.executable,
        str(TRAIN_NET),
        "--config-file",
        config_file,
        "MODEL.DEVICE",
        device,
        "SOLVER.AMP.ENABLED",
        "False",
        "TEST.EVAL_UNTRAINED",
        "False",
        "TEST.VIS_NUM_IMAGES",
        "0",
        "SOLVER.CHECKPOINT_PERIOD",
        str(10 * run.iters),
        *schedule_opts(run.iters),
        *run.opts,
        "OUTPUT_DIR",
        str(run.folder),
    ]
    (run.folder / "command.txt").write_text(" ".join(command) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(run.folder / "stdout.txt", "w") as log:
        run.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    run.started = time.perf_counter()
    run.state = "running"
    print(f"[sweep] started {run.name}: {run.iters} iterations, {' '.join(run.opts) or '-'}")


def _number(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.2f}"


def _table(runs: list) -> str:
    """A markdown table of the runs, the highest box AP first."""
    ranked = sorted(runs, key=lambda r: -(r.metrics.get("bbox/AP") or -1.0))
    lines = [
        "| variant | iterations | state | box AP | AP50 | AP75 | last stage-0 fg acc | minutes "
        "| overrides |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in ranked:
        numbers = " | ".join(
            _number(run.metrics, key)
            for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "fg_cls_accuracy")
        )
        lines.append(
            f"| {run.name} | {run.iters} | {run.state} | {numbers} | {run.seconds / 60:.1f} | "
            f"`{' '.join(run.opts) or '-'}` |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse_args(argv)
    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()):
        raise SystemExit(
            f"--output-dir {output} is not empty; choose a new folder (results are never "
            "overwritten)"
        )
    variants = load_variants(args.variants, args.only)
    cfg = build_cfg(args.config_file)
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        print(f"[sweep] dataset {name}: preparing (generated on first use)", flush=True)
        ensure_shapes_dataset(name)
        print(f"[sweep] dataset {name}: {len(DatasetCatalog.get(name))} images", flush=True)

    runs = []
    for variant in variants:
        iters = variant.get("iters") or round(args.cpu_train_seconds / variant["cpu_s_per_it"])
        if args.max_iter:
            iters = min(iters, args.max_iter)
        runs.append(Run(variant["name"], list(variant["opts"]), iters, output / variant["name"]))

    began = time.perf_counter()
    last_report = began
    while any(run.state in ("waiting", "running") for run in runs):
        for run in runs:
            if run.state == "running" and run.process.poll() is not None:
                run.seconds = time.perf_counter() - run.started
                run.metrics = _read_metrics(run.folder)
                failed = run.process.returncode != 0 or "bbox/AP" not in run.metrics
                run.state = f"failed (exit {run.process.returncode})" if failed else "done"
                ap = run.metrics.get("bbox/AP")
                print(
                    f"[sweep] {run.name}: {run.state} in {run.seconds / 60:.1f} min, box AP "
                    f"{'-' if ap is None else f'{ap:.2f}'} (log: {run.folder / 'stdout.txt'})",
                    flush=True,
                )
        running = sum(run.state == "running" for run in runs)
        for run in runs:
            if run.state == "waiting" and running < args.jobs:
                _start(run, args.config_file, args.device)
                running += 1
        now = time.perf_counter()
        if now - began > args.time_limit:
            for run in runs:
                if run.state == "running":
                    run.process.terminate()
                    run.process.wait()
                    run.seconds = now - run.started
                    run.metrics = _read_metrics(run.folder)
                    run.state = f"stopped at {args.time_limit:.0f} s"
                elif run.state == "waiting":
                    run.state = "not started (time limit)"
            break
        if now - last_report > 30:
            last_report = now
            progress = ", ".join(
                f"{run.name} {_read_metrics(run.folder).get('iterations_done', 0)}/{run.iters}"
                for run in runs
                if run.state == "running"
            )
            print(f"[sweep] {(now - began) / 60:.1f} min: {progress}", flush=True)
        time.sleep(2)

    table = _table(runs)
    (output / "results.md").write_text(table + "\n")
    records = [
        {"name": r.name, "iters": r.iters, "state": r.state, "opts": r.opts, **r.metrics}
        for r in runs
    ]
    (output / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    print(table)
    print(f"[sweep] wrote {output / 'results.md'} and {output / 'results.json'}")
    return 0 if all(run.state == "done" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
