"""Bad multi-process set-ups fail with a clear message before any process starts, and a lost
training process stops the others (tools/train_net.py over gloo on the CPU)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vimdet.engine.launch import (
    LaunchError,
    check_launch,
    check_port_free,
    launch_training,
    threads_per_process,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quick_schedules" / "cascade_vim_micro_instant_test.yaml"
TRAIN_NET = REPO / "tools" / "train_net.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(**overrides):
    launch = dict(
        num_processes=2,
        num_machines=1,
        machine_rank=0,
        dist_url=f"tcp://127.0.0.1:{free_port()}",
        device="cpu",
        gpu_count=0,
        cpu_count=4,
    )
    launch.update(overrides)
    check_launch(**launch)


def test_a_launch_that_can_work_passes():
    check()
    check(device="cuda", gpu_count=4, num_processes=4)
    check(num_machines=2, machine_rank=1, dist_url="tcp://192.0.2.1:29500")  # not ours: not bound
    check(num_processes=1, dist_url="tcp://192.0.2.1:1")  # one process: no rendezvous at all


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_machines=2, machine_rank=2), "--machine-rank 2 is out of range"),
        (dict(machine_rank=-1), "machine ranks are 0..0"),
        (dict(device="cuda", gpu_count=2, num_processes=4), "torch sees 2"),
        (dict(device="cuda", gpu_count=0, num_processes=1), "torch sees no GPU"),
        (dict(num_processes=8, cpu_count=2), "this machine gives 2 cores"),
        (dict(gpu_count=1), "Hide the GPUs (CUDA_VISIBLE_DEVICES=)"),
        (dict(num_machines=2, dist_url="auto"), "--dist-url auto picks a port on this machine"),
        (dict(dist_url="tcp://127.0.0.1"), "must be tcp://HOST:PORT"),
        (dict(num_machines=2, dist_url="tcp://192.0.2.1:29500"), "not an address of this"),
        (dict(num_processes=0), "must be at least 1"),
    ],
)
def test_a_launch_that_cannot_work_is_named(overrides, message):
    with pytest.raises(LaunchError) as error:
        check(**overrides)
    assert message in str(error.value)


def test_a_port_in_use_is_named():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(LaunchError, match="is in use"):
            check(dist_url=f"tcp://127.0.0.1:{port}")
    check_port_free("127.0.0.1", port)  # released: free again


def train_net(tmp_path, *args, console="console.txt"):
    """tools/train_net.py in the background on CPU processes; its console goes to a file."""
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=str(tmp_path / "datasets"),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIG), *args]
    with open(tmp_path / console, "w") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )


@pytest.mark.slow
def test_train_net_refuses_a_busy_port_before_starting_processes(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        process = train_net(tmp_path, "--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{port}")
        process.wait(timeout=120)
    output = (tmp_path / "console.txt").read_text()
    assert process.returncode != 0
    assert f"LaunchError: --dist-url port {port} on 127.0.0.1 is in use" in output
    assert "Starting training" not in output
    assert time.monotonic() - started < 60


def child_pids(pid: int) -> list:
    """The processes ``pid`` started (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def training_processes(pid: int) -> list:
    """The training processes that Detectron2's launch in process ``pid`` spawned."""
    return [
        child
        for child in child_pids(pid)
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


@pytest.mark.distributed
def test_a_hung_rank_on_another_machine_stops_the_others_naming_it(tmp_path):
    """Two "machines" of one CPU process each; machine 1's process freezes (SIGSTOP) mid-run.

    Nothing reaches machine 0 then (its gloo all-reduce would wait the process group's 30
    minutes); its rank watchdog names rank 1 within --rank-timeout (5 s) plus a meeting period.
    """
    url = f"tcp://127.0.0.1:{free_port()}"
    common = ["--num-machines", "2", "--dist-url", url, "--rank-timeout", "5"]
    opts = ["SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "100000"]
    opts += ["DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "output")]
    machines = [
        train_net(tmp_path, *common, "--machine-rank", str(rank), *opts, console=f"m{rank}.txt")
        for rank in (0, 1)
    ]
    try:
        log = tmp_path / "output" / "log.txt.rank1"
        deadline = time.monotonic() + 120
        while "Starting training" not in (log.read_text() if log.exists() else ""):
            assert machines[0].poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(3)  # a few iterations in
        (frozen,) = training_processes(machines[1].pid)  # rank 1
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        machines[0].wait(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        for process in machines:
            for pid in child_pids(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait()
    output = (tmp_path / "m0.txt").read_text()
    assert machines[0].returncode == 1, output[-3000:]
    assert "Rank watchdog of rank 0" in output and "Ranks 1 failed to pass" in output, output[
        -3000:
    ]
    assert "rank 0 (process 0 of machine 0" in output and "lost another rank" in output
    assert waited < 5 + 5 + 10  # --rank-timeout + a meeting period + slack


@pytest.mark.distributed
def test_a_killed_process_stops_its_machine_naming_its_rank(tmp_path):
    """Two CPU processes on one machine; one is killed (SIGKILL) mid-run."""
    opts = ["SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "100000"]
    opts += ["DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "output")]
    url = f"tcp://127.0.0.1:{free_port()}"
    machine = train_net(tmp_path, "--num-gpus", "2", "--dist-url", url, *opts)
    try:
        log = tmp_path / "output" / "log.txt.rank1"
        deadline = time.monotonic() + 120
        while "Starting training" not in (log.read_text() if log.exists() else ""):
            assert machine.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        killed = training_processes(machine.pid)[-1]
        os.kill(killed, signal.SIGKILL)
        stopped = time.monotonic()
        machine.wait(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        for pid in child_pids(machine.pid):
            os.kill(pid, signal.SIGKILL)
        machine.kill()
        machine.wait()
    output = (tmp_path / "console.txt").read_text()
    assert machine.returncode == 1, output[-3000:]
    assert f"of machine 0, pid {killed}) was killed by SIGKILL" in output, output[-3000:]
    assert waited < 15


def report_threads(path: str) -> None:
    """A training process's main function: its OMP_NUM_THREADS and PyTorch's intra-op threads."""
    from detectron2.utils import comm

    Path(path, f"rank{comm.get_rank()}.txt").write_text(
        f"{os.environ.get('OMP_NUM_THREADS')} {torch.get_num_threads()}"
    )


@pytest.mark.parametrize(
    "processes, cores, threads", [(4, 64, 16), (2, 2, 1), (8, 6, 1), (3, 8, 2)]
)
def test_threads_per_process_share_the_cores(processes, cores, threads):
    assert threads_per_process(processes, cores) == threads


@pytest.mark.slow
@pytest.mark.parametrize("user_threads", [None, "2"])
def test_launched_processes_share_the_cores_unless_the_user_chose(
    tmp_path, monkeypatch, user_threads
):
    if user_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user_threads)
    launch_training(
        report_threads,
        2,
        num_machines=1,
        machine_rank=0,
        dist_url=f"tcp://127.0.0.1:{free_port()}",
        args=(str(tmp_path),),
        device="cpu",
    )
    threads = user_threads or str(threads_per_process(2, len(os.sched_getaffinity(0))))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [f"{threads} {threads}"] * 2
    # Only the launched processes: the launching process's environment is as it was.
    assert os.environ.get("OMP_NUM_THREADS") == user_threads
