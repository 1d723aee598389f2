"""Multi-process training around Detectron2's ``launch``: checks first, clear failures after.

Detectron2's ``launch`` starts one process per GPU on each machine (``torch.multiprocessing``)
and joins them into one ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs). Left
alone, a bad set-up ends in a bare ``AssertionError``, an ``EADDRINUSE`` traceback from inside a
worker, or a wait of up to 30 minutes (the process group's timeout). ViMDet adds:

- :func:`check_launch`, run before any process starts: the machine rank within range, the GPU
  count, a ``--dist-url`` port that machine 0 can listen on (free, and an address of its own);
- :func:`launch_training`: Detectron2's ``launch`` with the machine's cores shared out among its
  processes (:func:`threads_per_process`) and a failed process reported by its global rank (the
  others of that machine are stopped at once by ``torch.multiprocessing``);
- :class:`RankWatchdog`: a thread per training process that meets every other process at a gloo
  ``monitored_barrier`` every few seconds. When a process dies or stops answering (on another
  machine, where nothing else would notice it before the process group's timeout), the others
  stop within ``timeout`` seconds with a message naming the missing rank.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

__all__ = [
    "LOST_RANK_EXIT_CODE",
    "LaunchError",
    "RankWatchdog",
    "check_launch",
    "check_port_free",
    "launch_training",
    "threads_per_process",
]

logger = logging.getLogger(__name__)

#: Seconds between two meetings of the training processes' watchdogs.
WATCHDOG_PERIOD_S = 5.0
#: Exit code of a training process that its watchdog ended because another rank was lost.
LOST_RANK_EXIT_CODE = 3


class LaunchError(RuntimeError):
    """A multi-process launch that cannot work, found before (or while) starting it."""


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`LaunchError` unless this machine can listen on ``host:port``.

    Machine rank 0 hosts the rendezvous (a ``TCPStore``) at ``--dist-url``; the test binds the
    address as the store will (``SO_REUSEADDR``) and releases it at once.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as error:
            raise LaunchError(
                f"--dist-url host {host!r} does not resolve ({error}); give machine 0's address "
                "as tcp://IP:PORT"
            ) from error
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise LaunchError(
                    f"--dist-url port {port} on {host} is in use (another training run or "
                    "program listens there). Choose a free port in --dist-url tcp://HOST:PORT, or "
                    "on one machine use --dist-url auto"
                ) from error
            if error.errno == errno.EADDRNOTAVAIL:
                raise LaunchError(
                    f"--dist-url host {host} is not an address of this machine, but machine rank "
                    "0 hosts the rendezvous there: give machine 0's own address in --dist-url on "
                    "every machine (or start this machine with its right --machine-rank)"
                ) from error
            raise LaunchError(f"cannot listen on --dist-url {host}:{port}: {error}") from error


def check_launch(
    num_processes: int,
    num_machines: int,
    machine_rank: int,
    dist_url: str,
    device: str,
    gpu_count: int,
    cpu_count: int,
) -> None:
    """Raise :class:`LaunchError` for a launch that cannot work; return if it can start.

    Args:
        num_processes: processes per machine (``--num-gpus``).
        num_machines: machines in the run (``--num-machines``).
        machine_rank: this machine's rank (``--machine-rank``), 0 on the machine at ``dist_url``.
        dist_url: the rendezvous address (``--dist-url``): ``tcp://HOST:PORT``, ``auto`` or
            another ``init_method`` of ``torch.distributed``.
        device: ``MODEL.DEVICE`` of the config.
        gpu_count: GPUs this process sees (``torch.cuda.device_count()``).
        cpu_count: CPU cores this process may use.
    """
    if num_processes < 1 or num_machines < 1:
        raise LaunchError(
            f"--num-gpus ({num_processes}) and --num-machines ({num_machines}) must be at least 1"
        )
    if not 0 <= machine_rank < num_machines:
        raise LaunchError(
            f"--machine-rank {machine_rank} is out of range for --num-machines {num_machines}: "
            f"machine ranks are 0..{num_machines - 1}, 0 on the machine whose address is in "
            "--dist-url"
        )
    world_size = num_processes * num_machines
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    if device.startswith("cuda"):
        if gpu_count == 0:
            raise LaunchError(
                f"MODEL.DEVICE is {device!r} but torch sees no GPU{seen}. Add MODEL.DEVICE cpu "
                "to train on the CPU, or check the CUDA installation (torch.cuda.is_available())"
            )
        if num_processes > gpu_count:
            raise LaunchError(
                f"--num-gpus {num_processes} asks for more GPUs than this machine has: torch sees "
                f"{gpu_count}{seen}. Use --num-gpus {gpu_count} (SOLVER.IMS_PER_BATCH is the "
                "batch of all GPUs together, see docs/distributed.md)"
            )
    elif world_size > 1:
        if gpu_count > 0:
            raise LaunchError(
                f"MODEL.DEVICE is {device!r} with {world_size} processes on a machine with GPUs: "
                "Detectron2's launch would join them with NCCL, which needs GPU tensors. Hide "
                "the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU processes over gloo, or use "
                "MODEL.DEVICE cuda"
            )
        if num_processes > cpu_count:
            raise LaunchError(
                f"--num-gpus {num_processes} with MODEL.DEVICE {device!r} starts {num_processes} "
                f"CPU training processes, but this machine gives {cpu_count} cores to this one: "
                f"use --num-gpus {cpu_count} or fewer"
            )
    if world_size == 1:
        return  # no process group, dist_url unused
    if dist_url == "auto":
        if num_machines > 1:
            raise LaunchError(
                "--dist-url auto picks a port on this machine only; with --num-machines "
                f"{num_machines} give machine 0's address on every machine: tcp://IP:PORT"
            )
        return
    url = urlparse(dist_url)
    if url.scheme != "tcp":
        return  # file:// or env:// rendezvous: nothing to check here
    if url.hostname is None or url.port is None:
        raise LaunchError(f"--dist-url {dist_url!r} must be tcp://HOST:PORT")
    if machine_rank == 0:
        check_port_free(url.hostname, url.port)


def _failed_process(error: mp.ProcessRaisedException | mp.ProcessExitedException) -> str:
    """How a training process ended, from torch.multiprocessing's exception."""
    if isinstance(error, mp.ProcessExitedException):
        if error.signal_name:
            return f"was killed by {error.signal_name}"
        if error.exit_code == LOST_RANK_EXIT_CODE:
            return "was stopped by its rank watchdog, which lost another rank (named above)"
        return f"exited with code {error.exit_code}"
    return "raised an exception (its traceback is above)"


def threads_per_process(num_processes: int, cores: int) -> int:
    """CPU threads for each of a machine's ``num_processes`` training processes: cores shared."""
    return max(1, cores // num_processes)


@contextmanager
def _cores_shared_out(num_processes: int, cores: int) -> Iterator[None]:
    """Set ``OMP_NUM_THREADS`` for the processes that ``launch`` spawns, unless the user has.

    Left alone, every process sizes its thread pools (PyTorch's intra-op pool, OpenMP and BLAS,
    also in its data-loading workers) to all the machine's cores, so N processes run N times as
    many threads as there are cores and slow each other's host work (kernel launches, the eager
    heads). ``torchrun`` sets ``OMP_NUM_THREADS=1`` for the same reason; ViMDet shares the cores
    out instead, so that CPU work in a process (evaluation, a CPU run) keeps its share.
    """
    if num_processes == 1 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    threads = threads_per_process(num_processes, cores)
    print(
        f"ViMDet: {num_processes} training processes share this machine's {cores} cores: "
        f"OMP_NUM_THREADS={threads} for each (set OMP_NUM_THREADS to choose otherwise)",
        flush=True,
    )
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


def launch_training(
    main_func: Callable[..., Any],
    num_processes: int,
    num_machines: int,
    machine_rank: int,
    dist_url: str,
    args: Sequence[Any],
    device: str,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Check the set-up, then run ``main_func(*args)`` in every process of this machine.

    Several processes share the machine's cores (``OMP_NUM_THREADS``, unless set). Raises
    :class:`LaunchError` before starting anything for a set-up that cannot work, and
    ``SystemExit(1)`` with a message naming the global rank when a training process fails
    (``torch.multiprocessing`` has stopped the other processes of this machine by then).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    check_launch(
        num_processes,
        num_machines,
        machine_rank,
        dist_url,
        device,
        torch.cuda.device_count(),
        cores or 1,
    )
    try:
        with _cores_shared_out(num_processes, cores or 1):
            launch(
                main_func,
                num_processes,
                num_machines=num_machines,
                machine_rank=machine_rank,
                dist_url=dist_url,
                args=tuple(args),
                timeout=timeout,
            )
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        rank = machine_rank * num_processes + error.error_index
        print(error, file=sys.stderr)
        print(
            f"ViMDet: training process rank {rank} (process {error.error_index} of machine "
            f"{machine_rank}, pid {error.error_pid}) {_failed_process(error)}; the other "
            f"processes of this machine were stopped. Processes on other machines stop within "
            "--rank-timeout seconds (docs/distributed.md).",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


class RankWatchdog:
    """Meets the other training processes every ``period`` s; ends this one if a rank is lost.

    A daemon thread calls gloo's ``monitored_barrier`` on a process group of its own: rank 0
    waits for every rank and names those that did not arrive within ``timeout`` seconds; the
    other ranks fail when rank 0 does. A failure is logged with the ranks named and the process
    ends with exit code 1, so that ``launch`` stops the rest of its machine. :meth:`stop`, called
    by every rank at the end, ends the meetings for all ranks at once (a rank that stopped
    meeting on its own would look lost to the others).

    Args:
        timeout: seconds a rank may miss a meeting before it counts as lost.
        period: seconds between meetings.
    """

    def __init__(self, timeout: float, period: float = WATCHDOG_PERIOD_S) -> None:
        self.timeout = timeout
        self.period = period
        self.rank = comm.get_rank()
        # Every rank creates the group in the same order (a collective of the default group).
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vimdet-rank-watchdog", daemon=True)
        self._thread.start()

    def _meet(self) -> bool:
        """One meeting: every rank present; True when every rank has asked to stop."""
        dist.monitored_barrier(
            group=self.group, timeout=timedelta(seconds=self.timeout), wait_all_ranks=True
        )
        stop = torch.tensor([1 if self._stopping.is_set() else 0], dtype=torch.int64)
        dist.all_reduce(stop, group=self.group)
        return int(stop.item()) == dist.get_world_size(self.group)

    def _run(self) -> None:
        try:
            while not self._meet():
                self._stopping.wait(self.period)
        except RuntimeError as error:  # gloo's errors (DistBackendError...): a rank is lost
            message = (
                f"Rank watchdog of rank {self.rank}: a training process did not answer within "
                f"{self.timeout:.0f} s (--rank-timeout); it died or hangs. "
                f"{type(error).__name__}: {error}. Stopping rank {self.rank}."
            )
            logger.error(message)  # the log file of this rank
            for handler in logging.getLogger("vimdet").handlers:
                handler.flush()
            print(message, file=sys.stderr, flush=True)  # the console, whatever the rank
            os._exit(LOST_RANK_EXIT_CODE)

    def stop(self) -> None:
        """Ask to stop; returns once every rank has asked (or the watchdog ended the process)."""
        self._stopping.set()
        self._thread.join()
