#!/usr/bin/env python3
"""Training on several GPUs, measured and checked through tools/train_net.py (docs/distributed.md).

    python tools/benchmark_scaling.py --output OUT          # one host of 4 GPUs, ~7 minutes
    python tools/benchmark_scaling.py --output OUT --cpu-smoke   # the same logic on 2 CPU processes

Every part runs ``tools/train_net.py`` as a user would, in processes of its own:

1. scaling: ``--num-gpus N`` for N in ``--gpus`` (1, 2, 4) with the same images per GPU, bf16, the
   same SEED: seconds per iteration (wall clock between two rows of metrics.json, after a
   warm-up and before any checkpoint), images per second, peak memory per GPU (nvidia-smi) and
   the scaling efficiency t(1) / t(N);
2. machines: the largest N as two "machines" of N/2 GPUs on this host (two launches with
   ``--num-machines 2 --machine-rank R --dist-url tcp://127.0.0.1:PORT``, each seeing its own GPUs),
   its losses beside the one-machine run's at the same iterations;
3. evaluation: ``--eval-only`` of the largest run's final weights on 1 and on N GPUs: COCO AP and
   the detections compared;
4. resume: the largest run's last periodic checkpoint continued with ``--resume`` on 1 GPU (the
   same total batch), the iteration, learning rate and losses compared;
5. cpu-eval: the same final weights evaluated on the CPU (small test images, so that it is quick).

A part that fails or passes its time limit is recorded as such and the others still run; parts
that would start after ``--deadline`` seconds are skipped. NVLink multicast stays off in every
process (NCCL_NVLS_ENABLE=0 and its PyTorch and NVSHMEM equivalents). OUT receives summary.json,
summary.md, scaling.png (images per second against GPUs beside the linear ideal, and the step
medians per metrics row) and logs.tar.gz (every part's console, log.txt and metrics.json);
checkpoints stay in ``--workdir``. ``--replot SUMMARY.json`` draws scaling.png again from a saved
summary, with ``--title`` naming the host.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "tools" / "train_net.py"
#: NVLink multicast off in NCCL, PyTorch and NVSHMEM: on shared hosts it can take GPUs down.
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
#: Detectron2's PeriodicWriter writes a metrics.json row every 20 iterations.
WRITER_PERIOD = 20
LOSS_KEYS = ("total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls_stage0", "loss_box_reg_stage0")


def setups(cpu_smoke: bool) -> Dict[str, Any]:
    """The config and sizes: Vim-T on the large shapes split on GPUs, or the micro model on CPUs."""
    if cpu_smoke:
        return dict(
            config="configs/quick_schedules/cascade_vim_micro_instant_test.yaml",
            train_set="vimdet_shapes_train",
            test_set="vimdet_shapes_val",
            opts=[
                "MODEL.DEVICE",
                "cpu",
                "DATALOADER.NUM_WORKERS",
                "0",
                "SOLVER.AMP.ENABLED",
                "False",
            ],
            cpu_eval_opts=[],
        )
    return dict(
        config="configs/shapes/cascade_vim_t_shapes_gpu.yaml",
        train_set="vimdet_shapes_large_train",
        test_set="vimdet_shapes_large_val",
        # bf16 AMP and the default scan ("auto": ViMDet's Triton scan on a GPU).
        opts=["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16"],
        # The CPU check evaluates the small-image val split at a small size: seconds, not minutes.
        cpu_eval_opts=[
            "DATASETS.TEST",
            "('vimdet_shapes_val',)",
            "INPUT.MIN_SIZE_TEST",
            "320",
            "INPUT.MAX_SIZE_TEST",
            "512",
        ],
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MetricsWatcher(threading.Thread):
    """Notes the wall-clock time at which each metrics.json row appears."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.arrivals, self.done = path, {}, threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.done.wait(0.02):
            if not self.path.exists():
                continue
            lines = self.path.read_text().splitlines()
            now = time.perf_counter()
            for line in lines[seen:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a row half written: read it next time
                    break
                self.arrivals.setdefault(row.get("iteration"), now)
                seen += 1


class MemoryWatcher(threading.Thread):
    """The highest memory.used per GPU (MiB) that nvidia-smi shows while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: Dict[int, int] = {}
        self.done = threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
        while self.available and not self.done.wait(0.5):
            try:
                text = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            except subprocess.TimeoutExpired:
                continue
            for line in text.strip().splitlines():
                index, used = (int(v) for v in line.split(","))
                self.peak[index] = max(self.peak.get(index, 0), used)


def run_part(
    name: str,
    commands: Sequence[Sequence[str]],
    envs: Sequence[Dict[str, str]],
    logs: Path,
    timeout: float,
    metrics: Path | None = None,
) -> Dict[str, Any]:
    """Run ``commands`` at once (one per "machine"), wait for all; never raises."""
    logs.mkdir(parents=True, exist_ok=True)
    watcher = MetricsWatcher(metrics) if metrics is not None else None
    memory = MemoryWatcher()
    for thread in (watcher, memory):
        if thread is not None:
            thread.start()
    started = time.perf_counter()
    processes = []
    for index, (command, env) in enumerate(zip(commands, envs)):
        with open(logs / f"{name}.{index}.console.txt", "w") as console:
            console.write("$ " + " ".join(command) + "\n")
            console.flush()
            processes.append(
                subprocess.Popen(
                    list(command),
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=REPO,
                    start_new_session=True,  # its own process group, to end it whole on timeout
                )
            )
    status = "ok"
    for process in processes:
        remaining = timeout - (time.perf_counter() - started)
        try:
            process.wait(timeout=max(remaining, 0.1))
        except subprocess.TimeoutExpired:
            status = "timeout"
            break
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    wall = time.perf_counter() - started
    for thread in (watcher, memory):
        if thread is not None:
            thread.done.set()
            thread.join()
    codes = [process.returncode for process in processes]
    if status == "ok" and any(codes):
        status = "failed"
    tails = [(logs / f"{name}.{i}.console.txt").read_text()[-1500:] for i in range(len(processes))]
    print(f"[{name}] {status} in {wall:.0f} s (exit codes {codes})", flush=True)
    return dict(
        status=status,
        exit_codes=codes,
        wall_s=round(wall, 1),
        arrivals=watcher.arrivals if watcher is not None else {},
        peak_mem_mib=memory.peak,
        console_tail=None if status == "ok" else tails,
    )


def read_rows(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_rows(path: Path) -> Dict[int, Dict[str, Any]]:
    """metrics.json's training rows by iteration (evaluation rows have no total_loss)."""
    return {row["iteration"]: row for row in read_rows(path) if "total_loss" in row}


def seconds_per_iteration(arrivals: Dict[int, float], first: int, last: int) -> float | None:
    """Wall-clock seconds per iteration between the metrics rows of iterations first and last."""
    if first not in arrivals or last not in arrivals or last <= first:
        return None
    return (arrivals[last] - arrivals[first]) / (last - first)


def console_text(logs: Path, name: str) -> str:
    """Rank 0's console of part ``name``; empty for a part that never ran (skipped)."""
    path = logs / f"{name}.0.console.txt"
    return path.read_text() if path.exists() else ""


def copypaste_results(console: str) -> Dict[str, float]:
    """The bbox AP line that Detectron2 prints as ``copypaste: AP,AP50,...`` then the values."""
    lines = console.splitlines()
    for index, line in enumerate(lines):
        if "copypaste: AP,AP50" in line and index + 1 < len(lines):
            names = line.split("copypaste: ")[1].split(",")
            values = lines[index + 1].split("copypaste: ")[1].split(",")
            return {k: float(v) for k, v in zip(names, values)}
    return {}


def compare_detections(one: Path, other: Path) -> Dict[str, Any]:
    """How far two coco_instances_results.json files are apart."""
    if not one.exists() or not other.exists():
        return {"compared": False}
    a, b = (
        sorted(json.loads(p.read_text()), key=lambda d: (d["image_id"], -d["score"]))
        for p in (one, other)
    )
    same_layout = [(d["image_id"], d["category_id"]) for d in a] == [
        (d["image_id"], d["category_id"]) for d in b
    ]
    result: Dict[str, Any] = {"compared": True, "count": [len(a), len(b)], "same": same_layout}
    if same_layout:
        result["max_score_diff"] = max(
            (abs(x["score"] - y["score"]) for x, y in zip(a, b)), default=0
        )
        result["max_box_diff_px"] = max(
            (max(abs(u - v) for u, v in zip(x["bbox"], y["bbox"])) for x, y in zip(a, b)), default=0
        )
    return result


def same_results(one: Dict[str, float] | None, other: Dict[str, float] | None) -> bool:
    """The same metrics with the same values (NaN, an AP without ground truth, equals NaN)."""
    if not one or not other or one.keys() != other.keys():
        return False
    return all(one[k] == other[k] or (math.isnan(one[k]) and math.isnan(other[k])) for k in one)


def compare_losses(
    rows: Dict[int, Dict[str, Any]], reference: Dict[int, Dict[str, Any]]
) -> List[Dict[str, Any]]:
    """The losses and lr of both runs at the iterations both logged."""
    table = []
    for iteration in sorted(set(rows) & set(reference)):
        entry: Dict[str, Any] = {"iteration": iteration}
        for key in LOSS_KEYS + ("lr",):
            if key in rows[iteration] and key in reference[iteration]:
                entry[key] = [rows[iteration][key], reference[iteration][key]]
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="summary.json/.md, logs.tar.gz")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vimdet_scaling"))
    parser.add_argument("--datasets", type=Path, default=None, help="default $DETECTRON2_DATASETS")
    parser.add_argument("--gpus", default=None, help="process counts to scale over (1,2,4)")
    parser.add_argument("--ims-per-gpu", type=int, default=None, help="4 (1 with --cpu-smoke)")
    parser.add_argument("--iters", type=int, default=None, help="per scaling run: 140 (50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations: 40 (20)")
    parser.add_argument("--resume-iters", type=int, default=None, help="resumed on 1: 10 (5)")
    parser.add_argument("--machines-iters", type=int, default=40, help="iterations, 2 machines")
    parser.add_argument("--part-timeout", type=float, default=150.0, help="seconds per part")
    parser.add_argument(
        "--cpu-eval-timeout",
        type=float,
        default=300.0,
        help="seconds for the CPU evaluation (about 2 s an image of the Cascade Vim-T at 320 px)",
    )
    parser.add_argument("--deadline", type=float, default=420.0, help="no part starts after it")
    parser.add_argument("--parts", default="scaling,machines,eval,resume,cpu-eval")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU processes over gloo")
    parser.add_argument("--replot", type=Path, help="only draw OUT/scaling.png from this summary")
    parser.add_argument("--title", default=None, help="the plot's title (e.g. the host)")
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config KEY VALUE pairs added to every training run (e.g. a variant to compare)",
    )
    args = parser.parse_args()
    if args.replot:
        args.output.mkdir(parents=True, exist_ok=True)
        plot(json.loads(args.replot.read_text()), args.output / "scaling.png", args.title)
        return
    smoke = args.cpu_smoke
    args.gpus = args.gpus or ("1,2" if smoke else "1,2,4")
    args.ims_per_gpu = args.ims_per_gpu or (1 if smoke else 4)
    args.iters = args.iters or (50 if smoke else 140)
    args.resume_iters = args.resume_iters or (5 if smoke else 10)
    args.warmup = args.warmup or (20 if smoke else 40)
    started = time.perf_counter()
    setup = setups(args.cpu_smoke)
    gpus = [int(n) for n in args.gpus.split(",")]
    largest = max(gpus)
    parts = set(args.parts.split(","))
    datasets = args.datasets or Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).resolve()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    logs = args.workdir / "logs"
    args.output.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), PYTHONUNBUFFERED="1")
    base_env.update(NO_MULTICAST)
    if args.cpu_smoke:
        base_env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    python = sys.executable
    # A checkpoint at (iters - resume_iters) for the resume part; the timed rows end before it.
    checkpoint_at = args.iters - args.resume_iters
    first_row = WRITER_PERIOD * -(-args.warmup // WRITER_PERIOD) - 1  # first row after warm-up
    last_row = WRITER_PERIOD * ((checkpoint_at - 1) // WRITER_PERIOD) - 1  # last before a save
    common = [
        *setup["opts"],
        "SEED",
        "0",
        "SOLVER.WARMUP_ITERS",
        str(WRITER_PERIOD),  # the lr ramp does not depend on MAX_ITER past this
        "SOLVER.STEPS",
        "()",
        "SOLVER.CHECKPOINT_PERIOD",
        str(checkpoint_at),
        "TEST.EVAL_PERIOD",
        "0",
        "TEST.VIS_NUM_IMAGES",
        "0",
        "DATASETS.TEST",
        "()",
        *args.opts,
    ]
    summary: Dict[str, Any] = {
        "command": " ".join([python, *sys.argv]),
        "config": setup["config"],
        "ims_per_gpu": args.ims_per_gpu,
        "iters": args.iters,
        "timed_rows": [first_row, last_row],
        "parts": {},
    }

    def launch(processes: int) -> List[str]:
        """tools/train_net.py with the config on ``processes`` processes and a free port."""
        return [
            python,
            str(TRAIN_NET),
            "--config-file",
            setup["config"],
            "--num-gpus",
            str(processes),
            "--dist-url",
            f"tcp://127.0.0.1:{free_port()}",
        ]

    def train_command(processes: int, output: Path, iters: int, *extra: str) -> List[str]:
        return [
            *launch(processes),
            "--rank-timeout",
            "60",
            *extra,
            *common,
            "SOLVER.IMS_PER_BATCH",
            str(
                args.ims_per_gpu * largest if "--resume" in extra else args.ims_per_gpu * processes
            ),
            "SOLVER.MAX_ITER",
            str(iters),
            "OUTPUT_DIR",
            str(output),
        ]

    def eval_command(processes: int, output: Path, weights: Path, *extra: str) -> List[str]:
        return [
            *launch(processes),
            "--eval-only",
            *setup["opts"],
            "TEST.VIS_NUM_IMAGES",
            "0",
            "DATASETS.TEST",
            f"('{setup['test_set']}',)",
            *extra,
            "MODEL.WEIGHTS",
            str(weights),
            "OUTPUT_DIR",
            str(output),
        ]

    def part(name: str, commands, envs=None, metrics=None, timeout=None) -> Dict[str, Any]:
        if time.perf_counter() - started > args.deadline:
            print(f"[{name}] skipped: past --deadline", flush=True)
            return {"status": "skipped (deadline)"}
        envs = envs or [base_env] * len(commands)
        return run_part(name, commands, envs, logs, timeout or args.part_timeout, metrics)

    # 0. The datasets, generated once before any timing.
    generate = (
        "import sys, vimdet.data.shapes as s; [s.ensure_shapes_dataset(n) for n in sys.argv[1:]]"
    )
    summary["parts"]["datasets"] = part(
        "datasets",
        [[python, "-c", generate, setup["train_set"], setup["test_set"], "vimdet_shapes_val"]],
    )
    runs = {n: args.workdir / f"train_{n}gpu" for n in gpus}

    if "scaling" in parts:
        scaling = {}
        for n in gpus:
            result = part(
                f"train_{n}gpu",
                [train_command(n, runs[n], args.iters)],
                metrics=runs[n] / "metrics.json",
            )
            seconds = seconds_per_iteration(result.pop("arrivals", {}), first_row, last_row)
            result["s_per_it"] = None if seconds is None else round(seconds, 4)
            result["images_per_s"] = (
                None if seconds is None else round(n * args.ims_per_gpu / seconds, 2)
            )
            rows = training_rows(runs[n] / "metrics.json")
            result["max_mem_rank0_mib"] = max(
                (r.get("max_mem", 0) for r in rows.values()), default=None
            )
            result["data_time_max_over_ranks"] = [
                round(rows[i]["data_time"], 4) for i in sorted(rows) if "data_time" in rows[i]
            ]
            # Detectron2's 20-iteration medians of the step: a warm-up longer on N GPUs than on
            # one shows as a drift here (docs/distributed.md, the seventh round's second run).
            result["step_medians_s"] = {
                i: round(rows[i]["time"], 4) for i in sorted(rows) if "time" in rows[i]
            }
            result["peak_mem_mib"] = {g: m for g, m in result["peak_mem_mib"].items() if g < n}
            scaling[n] = result
        base = scaling.get(1, {}).get("s_per_it")
        for result in scaling.values():
            if base and result.get("s_per_it"):
                result["efficiency"] = round(base / result["s_per_it"], 3)
        summary["parts"]["scaling"] = scaling

    if "machines" in parts and largest >= 2 and largest % 2 == 0:
        output, port, half = args.workdir / "machines_2x", free_port(), largest // 2
        commands, envs = [], []
        for rank in (0, 1):
            command = train_command(half, output, args.machines_iters)
            command[command.index("--dist-url") + 1] = f"tcp://127.0.0.1:{port}"
            command[command.index("--num-gpus") + 2 : command.index("--num-gpus") + 2] = [
                "--num-machines",
                "2",
                "--machine-rank",
                str(rank),
            ]
            command[command.index("SOLVER.IMS_PER_BATCH") + 1] = str(args.ims_per_gpu * largest)
            commands.append(command)
            env = dict(base_env)
            if not args.cpu_smoke:  # each "machine" sees its own GPUs, as two hosts would
                env["CUDA_VISIBLE_DEVICES"] = ",".join(
                    str(g) for g in range(rank * half, (rank + 1) * half)
                )
            envs.append(env)
        result = part(f"machines_2x{half}", commands, envs, metrics=output / "metrics.json")
        result.pop("arrivals", None)
        result["losses_vs_one_machine"] = compare_losses(
            training_rows(output / "metrics.json"), training_rows(runs[largest] / "metrics.json")
        )
        summary["parts"]["machines"] = result

    final = runs[largest] / "model_final.pth"
    if "eval" in parts:
        evaluation = {}
        for n in sorted({1, largest}):
            result = part(f"eval_{n}gpu", [eval_command(n, args.workdir / f"eval_{n}gpu", final)])
            result.pop("arrivals", None)
            console = console_text(logs, f"eval_{n}gpu")
            result["bbox"] = copypaste_results(console)
            evaluation[n] = result
        detections = [
            args.workdir
            / f"eval_{n}gpu"
            / "inference"
            / setup["test_set"]
            / "coco_instances_results.json"
            for n in (1, largest)
        ]
        evaluation["detections_1_vs_largest"] = compare_detections(*detections)
        evaluation["same_ap"] = same_results(
            evaluation[1].get("bbox"), evaluation[largest].get("bbox")
        )
        summary["parts"]["eval"] = evaluation

    if "resume" in parts:
        output = args.workdir / "resume_on_1"
        checkpoint = f"model_{checkpoint_at - 1:07d}.pth"
        result: Dict[str, Any] = {"checkpoint": checkpoint}
        if (runs[largest] / checkpoint).exists():
            output.mkdir(parents=True)
            shutil.copy(runs[largest] / checkpoint, output / checkpoint)
            (output / "last_checkpoint").write_text(checkpoint)
            result.update(part("resume_on_1", [train_command(1, output, args.iters, "--resume")]))
            result.pop("arrivals", None)
            console = console_text(logs, "resume_on_1")
            result["started_at"] = f"Starting training from iteration {checkpoint_at}" in console
            result["cross_world_size_logged"] = "Resuming a checkpoint of" in console
            result["losses_vs_uninterrupted"] = compare_losses(
                training_rows(output / "metrics.json"),
                training_rows(runs[largest] / "metrics.json"),
            )
        else:
            result["status"] = f"skipped: no {checkpoint} from the {largest}-process run"
        summary["parts"]["resume"] = result

    if "cpu-eval" in parts:
        cpu_env = dict(base_env, CUDA_VISIBLE_DEVICES="")
        result = part(
            "cpu_eval",
            [
                eval_command(
                    1,
                    args.workdir / "cpu_eval",
                    final,
                    *setup["cpu_eval_opts"],
                    "MODEL.DEVICE",
                    "cpu",
                )
            ],
            envs=[cpu_env],
            timeout=args.cpu_eval_timeout,
        )
        result.pop("arrivals", None)
        result["bbox"] = copypaste_results(console_text(logs, "cpu_eval"))
        summary["parts"]["cpu_eval"] = result

    summary["wall_s"] = round(time.perf_counter() - started, 1)
    (args.output / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    with tarfile.open(args.output / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
        for folder in sorted(args.workdir.iterdir()):
            for name in ("log.txt", "metrics.json"):
                if (folder / name).exists():
                    tar.add(folder / name, arcname=f"{folder.name}/{name}")
    (args.output / "summary.md").write_text(markdown(summary))
    if summary["parts"].get("scaling"):
        plot(summary, args.output / "scaling.png", args.title)
    print((args.output / "summary.md").read_text())


def plot(summary: Dict[str, Any], path: Path, title: str | None = None) -> None:
    """Images per second against GPUs beside the linear ideal; the step medians per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {int(n): r for n, r in summary["parts"]["scaling"].items() if r.get("images_per_s")}
    figure, (throughput, steps) = plt.subplots(1, 2, figsize=(11, 4))
    gpus = sorted(runs)
    if 1 in runs:
        throughput.plot(
            gpus, [n * runs[1]["images_per_s"] for n in gpus], "--", color="gray", label="linear"
        )
    throughput.plot(gpus, [runs[n]["images_per_s"] for n in gpus], marker="o", label="measured")
    for n in gpus:
        if runs[n].get("efficiency") is not None:
            throughput.annotate(
                f"{runs[n]['efficiency']:.1%}",
                (n, runs[n]["images_per_s"]),
                textcoords="offset points",
                xytext=(6, -12),
            )
    throughput.set(xlabel="GPUs", ylabel="training images / s", xticks=gpus)
    for n in gpus:
        medians = {int(i): t for i, t in runs[n].get("step_medians_s", {}).items()}
        rows = sorted(medians)
        steps.plot(rows, [medians[i] for i in rows], marker=".", label=f"{n} GPU" + "s" * (n > 1))
    steps.axvspan(*summary["timed_rows"], color="gray", alpha=0.1, label="timed")
    steps.set(xlabel="iteration (metrics row)", ylabel="step, 20-iteration median (s)")
    for axis in (throughput, steps):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title or f"{summary['config']}, {summary['ims_per_gpu']} images per GPU")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(summary: Dict[str, Any]) -> str:
    """The summary as tables for docs/benchmarks.md."""
    parts = summary["parts"]
    lines = [f"Command: `{summary['command']}`", ""]
    lines += [f"Config `{summary['config']}`, {summary['ims_per_gpu']} images per GPU, "]
    lines += [
        f"{summary['iters']} iterations, timed between metrics rows {summary['timed_rows']}.",
        "",
    ]
    if "scaling" in parts:
        lines += [
            "| GPUs | status | s/it | images/s | efficiency | peak MiB per GPU (nvidia-smi) "
            "| step medians by metrics row (s) | data_time, max over ranks (s) |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for n, r in parts["scaling"].items():
            peaks = ", ".join(f"{v}" for _, v in sorted(r.get("peak_mem_mib", {}).items()))
            medians = ", ".join(f"{i}: {t}" for i, t in r.get("step_medians_s", {}).items())
            waits = ", ".join(f"{t}" for t in r.get("data_time_max_over_ranks", []))
            lines.append(
                f"| {n} | {r['status']} | {r.get('s_per_it')} | {r.get('images_per_s')} | "
                f"{r.get('efficiency')} | {peaks} | {medians} | {waits} |"
            )
        lines.append("")
    for name in ("machines", "resume"):
        if name in parts:
            r = parts[name]
            lines += [f"**{name}**: {r.get('status')}", ""]
            table = r.get("losses_vs_one_machine") or r.get("losses_vs_uninterrupted") or []
            if table:
                lines += ["| iteration | key | this run | reference run |", "|---|---|---|---|"]
                for entry in table:
                    for key, (mine, ref) in ((k, v) for k, v in entry.items() if k != "iteration"):
                        lines.append(f"| {entry['iteration']} | {key} | {mine:.6g} | {ref:.6g} |")
                lines.append("")
    if "eval" in parts:
        for n, r in parts["eval"].items():
            shown = (r.get("status"), r.get("bbox")) if str(n).isdigit() else r
            lines.append(f"**eval {n}**: {json.dumps(shown)}")
        lines.append("")
    if "cpu_eval" in parts:
        lines += [
            f"**cpu eval**: {parts['cpu_eval'].get('status')} {parts['cpu_eval'].get('bbox')}"
        ]
    lines += ["", f"Wall time: {summary['wall_s']} s"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
