"""Where a sweep's jobs run: here and in local worker processes (``--backend local``, ``sweep.py`` and
``workers.py``), or as tasks of a Ray cluster (``--backend ray``, this file) spread over many machines.

The sweep's semantics do not move with the backend: ``heads/sweeps/sweep.py`` still plans every rung,
orders the jobs (``_run_chains``), prunes and resumes; a backend only carries jobs out. ``RayRunner``
has the local pool's ``submit``/``wait``/``close`` and is driven the same way, so the run folders,
the skipped finished runs on a rerun and the numbers for a seed are those of ``--backend local``.

Ray's own machinery does the rest, rather than a scheduler of ours: each job is a task asking for
``num_cpus``/``num_gpus`` (``--cpus-per-run``, ``--gpus-per-run``: 0.25 lets four runs share a
GPU), Ray places it where those resources are free, and ``max_retries`` runs it again when its
worker process dies (a node lost, the out-of-memory killer). A retried job starts from the checkpoint
its first attempt started from; ``jobs.already_done`` makes that safe when the first attempt died
after writing its output. The data goes into the object store once (``ray.put``) and each worker
process deserialises it once (``_DATA``), as the local workers receive it once.

Tasks write the run folders and checkpoints themselves, so ``--out`` must be a filesystem every node
sees at the same path (NFS, Lustre), and so must the cache and the checkout (docs/grids.md,
"Several machines"). Ray is imported only here and only when ``--backend ray`` is asked for.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from heads.errors import OptionError
from heads.sweeps import workers
from heads.sweeps.jobs import advance, already_done
from heads.sweeps.stacked import advance_stacked

BACKENDS = ("local", "ray")
RETRIES = 3  # attempts after the first when a task's worker process dies (Ray's max_retries)
# Test-only: ``{"<sweep folder>/<run>": "epoch" | "checkpoint" | "finished"}`` (JSON) makes a task of that
# run kill its own worker process once: after an epoch it trained, or after it wrote the run's checkpoint
# or its finished folder, so tests can watch Ray retry it. A marker file ``<run path>.killed`` keeps the
# retry alive.
KILL_ENV = "MODALITY_BALANCE_KILL_ONCE"
INSTALL = "pip install -e '.[distributed]'"


@dataclass(frozen=True)
class Backend:
    """What ``--backend``, ``--ray-address``, ``--cpus-per-run`` and ``--gpus-per-run`` asked for."""

    name: str = "local"
    address: str | None = None  # None: start a local Ray instance; "auto": join the running cluster
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0

    @property
    def distributed(self) -> bool:
        return self.name == "ray"


LOCAL = Backend()


def parse_backend(name: str, address: str | None = None, cpus_per_run: float = 1.0,
                  gpus_per_run: float = 0.0) -> Backend:
    """The options as a ``Backend``, refused in one line when they cannot work. The Ray options are
    refused with ``--backend local`` rather than ignored: a user who typed ``--gpus-per-run`` expects it
    to do something."""
    if name not in BACKENDS:
        raise OptionError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if not cpus_per_run > 0:
        raise OptionError(f"--cpus-per-run must be positive, got {cpus_per_run:g}")
    if not gpus_per_run >= 0:
        raise OptionError(f"--gpus-per-run must be 0 or positive (e.g. 0.25: four runs per GPU), got {gpus_per_run:g}")
    if name == "local":
        given = [flag for flag, value, default in (("--ray-address", address, None), ("--cpus-per-run", cpus_per_run, 1.0),
                                                   ("--gpus-per-run", gpus_per_run, 0.0)) if value != default]
        if given:
            raise OptionError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to --backend ray; "
                              f"add --backend ray or drop {'them' if len(given) > 1 else 'it'}")
        return LOCAL
    import_ray()  # refused before the cache loads
    return Backend(name, address or None, float(cpus_per_run), float(gpus_per_run))


def import_ray():
    """``ray``, or one line saying how to install it (it is an optional extra: a 100 MB wheel)."""
    try:
        import ray
    except ImportError:
        raise OptionError(f"--backend ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(backend: Backend):
    """Ray, initialised: the instance already running in this process if there is one (a test's, an
    earlier sweep's: a compare that runs grids first starts Ray once), else the cluster at
    ``--ray-address`` (``auto``: the one ``ray start`` runs on this node), else a new local one."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=backend.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


def slots(ray, backend: Backend) -> int:
    """Runs the cluster can train at once: its CPUs per ``--cpus-per-run`` (and GPUs per
    ``--gpus-per-run`` when runs take a GPU share). More jobs in flight would only queue in Ray;
    fewer would leave resources idle. ``_run_chains`` keeps this many jobs submitted."""
    total = ray.cluster_resources()
    count = int(total.get("CPU", 0) / backend.cpus_per_run + 1e-9)
    if backend.gpus_per_run > 0:
        if not total.get("GPU"):
            raise OptionError(f"--gpus-per-run {backend.gpus_per_run:g}: the Ray cluster has no GPU")
        count = min(count, int(total["GPU"] / backend.gpus_per_run + 1e-9))
    if count < 1:
        raise OptionError(f"the Ray cluster ({total.get('CPU', 0):g} CPUs) cannot give one run "
                          f"--cpus-per-run {backend.cpus_per_run:g}")
    return count


# --- inside a Ray worker process ------------------------------------------------------------------
_DATA: dict[str, object] = {}  # the deserialised HeadData, by its object's id: one copy per worker process


def _data(box: list):
    """The sweep's data in this worker process, fetched from the object store on its first task only.
    ``box`` is a one-element list so that Ray passes the reference instead of resolving it per task."""
    (ref,) = box
    key = ref.hex()
    if key not in _DATA:
        import ray

        _DATA.clear()  # another sweep's data is no longer needed
        _DATA[key] = ray.get(ref)
    return _DATA[key]


def _kill_once(job, when: str) -> None:
    """The test hook of ``KILL_ENV``: end this worker process now, as a lost node would."""
    plan = os.environ.get(KILL_ENV)
    if not plan:
        return
    path = str(Path(job.folder) / job.spec.name)
    marker = Path(f"{path}.killed")
    if json.loads(plan).get(path) == when and not marker.exists():
        marker.touch()
        os._exit(1)


def run_task(box: list, job, threads: int):
    """One task: a job (``jobs.advance``) or a stacked group of jobs (``stacked.advance_stacked``)."""
    torch.set_num_threads(threads)
    data = workers.DATA = _data(box)  # what ``jobs.work`` and the local workers read
    stacked = isinstance(job, list)
    jobs = job if stacked else [job]
    if stacked:  # a retried group trains only the runs its first attempt did not close (``advance`` checks alone)
        results = [already_done(data, one) for one in jobs]
        todo = [one for one, result in zip(jobs, results) if result is None]
        fresh = iter(advance_stacked(data, todo) if todo else [])
        results = [next(fresh) if result is None else result for result in results]
    else:
        results = [advance(data, job, lambda *_: _kill_once(job, "epoch"))]
    for one, result in zip(jobs, results):
        _kill_once(one, "finished" if "record" in result else "checkpoint")
    return results if stacked else results[0]


# --- in the sweep's process -----------------------------------------------------------------------
class RayRunner:
    """The sweep runner's view of a Ray cluster: ``submit(tag, job)``, ``wait() -> (tag, result)``,
    ``close()``, as ``workers.Workers``. A job may be a list of jobs: a stacked group, one task."""

    def __init__(self, data, backend: Backend):
        self.ray = ray = connect(backend)
        self.slots = slots(ray, backend)
        self.threads = max(1, int(backend.cpus_per_run))
        self.task = ray.remote(run_task).options(num_cpus=backend.cpus_per_run, num_gpus=backend.gpus_per_run,
                                                 max_retries=RETRIES, retry_exceptions=False)
        self.box = [ray.put(data)]
        self.pending: dict[object, tuple] = {}  # a task's result → (its tag, its job)

    def submit(self, tag, job) -> None:
        self.pending[self.task.remote(self.box, job, self.threads)] = (tag, job)

    def wait(self):
        """The next job to end, and its result. The job's own error is raised as itself (so a bad
        value is still one line); a task whose worker died on every attempt becomes one line too:
        ``MemoryError`` when Ray's memory monitor killed it, else ``OSError``, naming the run."""
        (ref,), _ = self.ray.wait(list(self.pending), num_returns=1)
        tag, job = self.pending.pop(ref)
        errors = self.ray.exceptions
        try:
            return tag, self.ray.get(ref)
        except errors.RayTaskError as err:
            raise (err.cause if isinstance(err.cause, BaseException) else err) from None
        except errors.RayError as err:
            run = ", ".join(j.spec.name for j in (job if isinstance(job, list) else [job]))
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            kind = MemoryError if isinstance(err, getattr(errors, "OutOfMemoryError", ())) else OSError
            raise kind(f"run {run} failed on Ray (retried up to {RETRIES} times): {first}; finished runs are kept, "
                       "rerun the same command to resume") from None

    def close(self) -> None:
        """After an error or Ctrl-C: cancel the jobs still in flight (their checkpoints stay). Ray
        itself is left running for the next sweep of this process; it ends with the process."""
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()
