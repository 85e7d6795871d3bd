"""Worker processes for sweeps on the CPU: spawned once, given the data once, one thread each, and
never outliving the sweep that started them. ``heads/sweeps/sweep.py`` decides what they run.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent import futures

import torch

from heads.blocks.data import HeadData


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


DATA: HeadData | None = None


def init_worker(data: HeadData, threads: int, parent: int) -> None:
    global DATA
    _die_with_parent(parent)
    DATA = data
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _die_with_parent(parent: int) -> None:
    """End this worker as soon as the sweep process ``parent`` is gone, whatever ended it.

    A worker that outlives its sweep (``kill -9``, the out-of-memory killer, a scheduler's SIGTERM
    escalated to SIGKILL) keeps its ≈400 MB, finishes its runs into a folder nobody reads and then
    idles under PID 1 for ever. Two mechanisms, because neither is enough alone:

    - Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the instant its parent
      dies, even by SIGKILL. It is Linux only, it is armed after the worker has started (a parent
      that died in between is missed: hence the ``getppid`` check right after), and it fires when
      the *thread* that spawned the worker ends, not the process. Our workers are spawned by
      ``submit`` in the sweep's own thread, which outlives the pool (``run_sweep`` closes it before
      returning); a pool that respawned workers from a helper thread would lose them when that
      thread ended, so the signal is SIGKILL-on-parent-thread and must not be the only safeguard.
    - A daemon thread polling ``os.getppid()`` against the original parent and calling ``os._exit``
      (no cleanup to run: an unfinished run is a checkpoint or nothing): portable (macOS, where there
      is no PDEATHSIG) and independent of threads, at the cost of up to half a second.
    """
    if sys.platform.startswith("linux"):  # elsewhere the watchdog alone
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (AttributeError, OSError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class Workers:
    """Worker processes (spawned, so no OpenMP state crosses a fork) that receive the data once.

    A ``ProcessPoolExecutor`` rather than ``multiprocessing.Pool``: when a worker dies or cannot start
    (an import error in the child), the executor fails the pending jobs, while a ``Pool`` respawns the
    worker forever and the grid would wait for ever.
    """

    def __init__(self, data: HeadData, count: int, threads: int, work):
        import torch.multiprocessing as tmp  # registers the reductions that pass tensors through shared memory

        self.work = work  # a top-level function of a job (picklable): what each job runs in a worker
        self.pool = futures.ProcessPoolExecutor(count, tmp.get_context("spawn"), init_worker, (data, threads, os.getpid()))
        self.pending: dict[futures.Future, object] = {}

    def submit(self, tag, job) -> None:
        self.pending[self.pool.submit(self.work, job)] = tag

    def wait(self):
        done, _ = futures.wait(self.pending, return_when=futures.FIRST_COMPLETED)
        future = done.pop()
        return self.pending.pop(future), future.result()

    def close(self) -> None:
        """Stop at once: after an error or Ctrl-C the running jobs are abandoned (their checkpoints stay)."""
        processes = list((self.pool._processes or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()


