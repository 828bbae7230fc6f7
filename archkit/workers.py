"""Local worker processes, shared by the search's Optuna backend and ``archkit experiment``:
how many cores are free, running one function in several processes, and claiming a piece
of work so that two processes never do it at once.

Workers run in their own process group: a Ctrl-C in the terminal reaches the parent
alone, which passes it on to every worker still running, once per Ctrl-C, so each stops
after its current step with a checkpoint (a second Ctrl-C stops them at once).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout


def free_cores(sample_s: float = 0.5) -> int:
    """Cores this process may use, less those busy over the next ``sample_s`` seconds (at
    least one). Busy time comes from ``/proc/stat``; elsewhere every core counts as free."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    try:
        before = _cpu_times()
        time.sleep(sample_s)
        after = _cpu_times()
    except (OSError, ValueError):
        return cores
    idle, total = (a - b for a, b in zip(after, before, strict=True))
    busy = (1 - idle / max(1, total)) * (os.cpu_count() or cores)
    return max(1, cores - math.floor(busy + 0.5))


def _cpu_times() -> tuple[int, int]:
    """Idle (with I/O wait) and total jiffies of all cores, from the first line of
    ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def _in_own_group(target: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.setpgrp()  # Ctrl-C comes through the parent, once (module docstring)
    target(*args)


def run_in_processes(target: Callable[..., None], args_per_worker: Sequence[tuple[Any, ...]]
                     ) -> None:
    """Run ``target(*args)`` in a fresh (spawned) process per entry of
    ``args_per_worker`` and wait for all of them; a Ctrl-C meanwhile is passed on to the
    workers, and raised here once they have stopped."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_in_own_group, args=(target, args))
                 for args in args_per_worker]
    for process in processes:
        process.start()
    interrupted = False
    while any(process.is_alive() for process in processes):
        try:
            for process in processes:
                process.join()
        except KeyboardInterrupt:
            interrupted = True
            for process in processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGINT)
    if interrupted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def claim(lock: Path, wait: bool) -> Iterator[bool]:
    """Hold ``lock`` for the block: yields True once held (``wait``: blocking until the
    holder lets go or dies), or False at once when another process holds it. The kernel
    releases the lock of a process that dies, so a claim never outlives its worker."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(lock, timeout=-1 if wait else 0)
    try:
        file_lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        file_lock.release()
