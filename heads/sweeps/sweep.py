"""The sweep runner: many runs of a ``TrainConfig`` each, trained, resumed and pruned as cheaply as their
arithmetic allows. ``heads/sweeps/grid.py`` builds the runs of a grid (``axes.py``) and selects among
them; ``compare`` and ``robustness`` use the same runner; a run is a chain of jobs
(``heads/sweeps/jobs.py``); ``heads/sweeps/stacked.py`` trains stackable runs together on a GPU.

Three things keep a sweep cheap:

- The cache is loaded once. Worker processes (one per core, one thread each) get the tensors once,
  through shared memory, and never reload them; no process starts per config. One thread per worker
  rather than one process with two threads: small matmuls scale poorly over threads, and on a shared
  machine a two-thread OpenMP team whose second core is taken stalls at every barrier, while single-
  thread workers only slow down in proportion (``benchmarks/bench_grid.py`` measures both). On a GPU
  the runs share this process (and, where the method allows, one stacked trainer).
- ``prune=True`` runs successive halving: every run trains to a milestone (E/8, E/4, E/2), then the
  worse half of the configs stops there; a config's seeds are ranked by their mean best validation
  accuracy so far and kept or dropped together, so the selected config always has all its seeds. A
  stopped run is still finished (its best state evaluated on validation and test) and appears in the
  table with ``stopped_at``. About 0.29 of the epochs of the full grid are trained for 10 configs.
- Work moves between workers at epoch boundaries: a run that is not finished is a checkpoint file
  (the whole trainer minus the data), so a rung whose run count does not divide by the worker count is
  cut into pieces that keep every worker busy, and an interrupted sweep resumes from them.

Resume: each run finishes into a temporary folder renamed to ``<sweep>/<config>-seed<k>/`` at the
end, so a run folder with ``results.json`` is always whole; a rerun skips the runs whose folder holds
the same resolved config (and continues unfinished ones from their checkpoints).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path

from cache.replace import claim
from heads.blocks.data import HeadData
from heads.blocks.device import resolve_device
from heads.blocks.progress import Progress
from heads.errors import OptionError
from heads.sweeps.backends import LOCAL, Backend, RayRunner
from heads.sweeps.jobs import (Job, RunSpec, add_test_rates, advance, checkpoint_paths, csv_column, identity,
                              stored_identity, work)
from heads.sweeps.stacked import advance_stacked, can_stack, stack_key
from heads.sweeps.tracking import SweepLog
from heads.sweeps.workers import Workers, default_workers
from heads.train.config import build_model, resolve_training
from heads.train.resume import differences


def validate(specs: list[RunSpec], data: HeadData) -> None:
    """Build each distinct config's model and optimizer once, and draw each distinct missing rate's masks
    once, so a bad value or an unreachable η fails before any training. A rate is checked on the
    splits it masks: ``missing_train`` on all three, a test-only rate on the test split alone."""
    seen = set()
    everywhere = {s.cfg.missing_train for s in specs}
    test_only = ({s.cfg.missing_test for s in specs} | {r for s in specs for r in s.test_rates}) - everywhere
    checks = [(rate, (data.train, data.val, data.test)) for rate in sorted(everywhere)]
    checks += [(rate, (data.test,)) for rate in sorted(test_only)]
    for rate, splits in checks:
        for split in splits:
            try:
                split.with_missing(rate, 0)
            except ValueError as err:
                raise OptionError(str(err)) from None
    for spec in specs:
        key = json.dumps(dataclasses.asdict(replace(spec.cfg, seed=0)), sort_keys=True)
        if key not in seen:
            seen.add(key)
            build_model(spec.cfg, data.spec).configure_optimizer()


def halving_milestones(epochs: int) -> list[int]:
    """Epochs at which successive halving ranks the configs: E/8, E/4, E/2 and E (fewer for small E)."""
    return sorted({max(1, round(epochs / d)) for d in (8, 4, 2)} | {epochs})


# --- where jobs run ----------------------------------------------------------------------------
class _InProcess:
    """Jobs run here, one at a time, with torch's own thread count (and per-epoch progress)."""

    def __init__(self, data: HeadData, on_epoch):
        self.data, self.on_epoch, self.done = data, on_epoch, []

    def submit(self, tag, job: Job) -> None:
        self.done.append((tag, advance(self.data, job, self.on_epoch)))

    def wait(self):
        return self.done.pop(0)

    def close(self) -> None:
        pass


def _span(job: Job | list[Job]) -> int:
    """Epochs a job trains; a stacked group (a list, one task on Ray) trains each of its runs's."""
    return sum(j.until - j.start for j in job) if isinstance(job, list) else job.until - job.start


def _run_chains(runner, chains: list[list[Job]], slots: int, progress) -> dict[str, dict]:
    """Run each chain's jobs in order, up to ``slots`` jobs at a time, longest remaining chain first.
    A chain's element may be a stacked group of jobs (a list), whose results come back together."""
    left = [sum(_span(j) for j in chain) for chain in chains]
    position, busy, results = [0] * len(chains), set(), {}
    while busy or any(position[i] < len(c) for i, c in enumerate(chains)):
        while len(busy) < slots:
            ready = [i for i, c in enumerate(chains) if i not in busy and position[i] < len(c)]
            if not ready:
                break
            i = max(ready, key=lambda k: (left[k], -k))
            busy.add(i)
            runner.submit(i, chains[i][position[i]])
        i, result = runner.wait()
        job = chains[i][position[i]]
        busy.discard(i)
        position[i] += 1
        left[i] -= _span(job)
        if isinstance(job, list):
            results.update({j.spec.name: r for j, r in zip(job, result)})
        else:
            results[job.spec.name] = result
        progress(job)
    return results


def _chain(spec: RunSpec, folder: Path, start: int, until: int, finish: bool, pieces: int,
           milestones: list[int] | None) -> list[Job]:
    """``start → until`` cut into ``pieces`` nearly equal jobs (the last one finishes when asked)."""
    pieces = max(1, min(pieces, until - start))
    cuts = [start + round((until - start) * (k + 1) / pieces) for k in range(pieces)]
    starts = [start] + cuts[:-1]
    return [Job(spec, str(folder), s, u, finish and u == until, milestones) for s, u in zip(starts, cuts)]


# --- the sweep ---------------------------------------------------------------------------------
class _State:
    """What the sweep folder already holds for each run: a finished record, or a checkpoint epoch."""

    def __init__(self, folder: Path, specs: list[RunSpec], data: HeadData, overwrite: bool = False):
        """Read what ``folder`` holds. A finished run or checkpoint of another resolved config under a
        run's name is refused unless ``overwrite`` (then it is retrained): the same ``--name`` resumes
        the same sweep, it does not silently replace finished runs with other settings."""
        self.finished: dict[str, dict] = {}
        self.epoch: dict[str, int] = {}
        self.curve: dict[str, list[float]] = {}
        for stale in folder.glob(".*.tmp"):  # a run stopped while it was being written out
            shutil.rmtree(stale, ignore_errors=True)
        for stale in (folder / ".checkpoints").glob(".*.tmp"):  # a worker stopped while saving a checkpoint
            stale.unlink()
        conflicts, drop = [], []
        for spec in specs:
            wanted = identity(spec.cfg, data)
            run, (ckpt, sidecar) = folder / spec.name, checkpoint_paths(folder, spec.name)
            if (run / "results.json").exists() and (run / "config.json").exists():
                stored = stored_identity(run)
                if stored == wanted:
                    self.finished[spec.name] = json.loads((run / "results.json").read_text())
                    self.curve[spec.name] = csv_column(run / "epochs.csv", "val_acc")
                else:
                    conflicts.append((spec.name, differences(stored, wanted)))
            if sidecar.exists() and ckpt.exists():
                info = json.loads(sidecar.read_text())
                if info["identity"] == wanted:
                    self.epoch[spec.name], self.curve[spec.name] = info["epoch"], info["val_acc"]
                    continue
                conflicts.append((spec.name, differences(info["identity"], wanted)))
            drop.append((ckpt, sidecar))
        if conflicts and not overwrite:
            name, diff = conflicts[0]
            raise OptionError(f"{folder} holds {len(conflicts)} run(s) of another config (e.g. {name}: "
                              f"{'; '.join(diff) or 'the resolved config differs'}); the same --name resumes only "
                              f"the same config: add --overwrite to retrain them, or choose another --name")
        for ckpt, sidecar in drop:
            ckpt.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)

    def done(self, spec: RunSpec, stop: int, milestones) -> bool:
        """Finished as planned: trained all epochs, or stopped at ``stop`` under the same pruning plan."""
        record = self.finished.get(spec.name)
        if record is None:
            return False
        if record.get("stopped_at") is None and record["epochs_run"] == spec.cfg.epochs:
            return True
        return record.get("stopped_at") == stop and record.get("milestones") == milestones

    def reached(self, spec: RunSpec, epoch: int) -> bool:
        return len(self.curve.get(spec.name, [])) >= epoch

    def start(self, spec: RunSpec, until: int) -> int:
        """Where training resumes: the checkpoint's epoch, if it is not past ``until``."""
        return self.epoch.get(spec.name, 0) if self.epoch.get(spec.name, 0) <= until else 0

    def update(self, name: str, result: dict) -> None:
        self.curve[name] = result["val_acc"]
        if "record" in result:
            self.finished[name] = result["record"]
            self.epoch.pop(name, None)
        else:
            self.epoch[name] = result["epoch"]


STACK_MODES = ("auto", "on", "off")


def run_sweep(data: HeadData, specs: list[RunSpec], folder: Path, workers: int = 0, prune: bool = False,
              progress: bool = True, label: str = "grid", stack: str = "auto", overwrite: bool = False,
              track: SweepLog | None = None, backend: Backend = LOCAL) -> list[dict]:
    """Run (or resume) every spec into ``folder``; return their results records in spec order.

    ``workers``: processes with one thread each (0 = one per core); 1 runs in this process.
    ``prune``: successive halving over the specs' groups (see the module docstring).
    ``label``: what the progress bar calls the sweep (grid, compare, robustness).
    ``stack``: train runs that differ only in seed, lr, weight decay and their method's
    ``stack_options`` together (``heads/sweeps/stacked.py``, ``can_stack``): ``auto`` does on a GPU, ``on``
    everywhere, ``off`` never. On a GPU
    the other runs train one at a time in this process (``workers`` applies to the CPU).
    ``overwrite``: retrain runs the folder holds under the same name with another config (else refused).
    The folder is claimed for the sweep (``cache.replace.claim``): a second sweep into it gets one line.
    ``track``: log each run to the trackers when it finishes (``heads/sweeps/tracking.py``).
    ``backend``: where jobs run (``heads/sweeps/backends.py``): ``LOCAL``, or Ray tasks, as many at once
    as the cluster's resources allow (``workers`` is then ignored), with the same plan and folders.

    Everything that can be checked without training is checked before ``folder`` is made, and a
    folder this call made is removed again if it is still empty when the sweep fails or is stopped:
    a failed command leaves nothing behind, a stopped one keeps its finished runs and checkpoints.
    """
    # Each run's settings resolved now (its method's epoch count among them): the plan and the pruning
    # milestones read them.
    specs = [replace(s, cfg=resolve_training(s.cfg)) for s in specs]
    if workers < 0:
        raise OptionError(f"--workers must be 0 (one per core) or positive, got {workers}")
    if stack not in STACK_MODES:
        raise OptionError(f"--stack must be one of {', '.join(STACK_MODES)}, got {stack!r}")
    repeated = sorted(name for name, count in Counter(s.name for s in specs).items() if count > 1)
    if repeated:
        raise OptionError(f"runs given twice (a repeated seed or value?): {', '.join(repeated)}")
    validate(specs, data)
    epochs = {s.cfg.epochs for s in specs}
    if prune and len(epochs) != 1:
        raise OptionError("pruning needs one epoch budget for every run")
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with claim(folder, "--name"):
            return _sweep(data, specs, folder, workers, prune, progress, label, stack, overwrite, track, backend)
    except BaseException:
        for path in made:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


def _sweep(data: HeadData, specs: list[RunSpec], folder: Path, workers: int, prune: bool, progress: bool,
           label: str, stack: str = "auto", overwrite: bool = False,
           track: SweepLog | None = None, backend: Backend = LOCAL) -> list[dict]:
    ray = backend.distributed
    if ray:  # a task's device is the GPU share Ray gives it (none without --gpus-per-run), not this process's
        on_gpu = backend.gpus_per_run > 0
        if not on_gpu and any(str(s.cfg.device).startswith("cuda") for s in specs):
            raise OptionError("--device cuda with --backend ray needs --gpus-per-run (e.g. 1, or 0.25: four runs per GPU)")
    else:
        on_gpu = any(resolve_device(s.cfg.device).type == "cuda" for s in specs)
    if on_gpu and not ray:
        workers = 1  # one process owns the device; stacking is how a GPU sweep runs runs in parallel
    streamed = bool(data.meta.get("streamed"))  # stacked runs gather whole tensors, which streaming does not hold
    if streamed and stack == "on":
        raise OptionError("--stack on trains configs as batched whole-split tensors, which a split streamed from "
                          "the shards does not hold; use --in-memory yes or --stack off")
    stacking = (stack == "on" or (stack == "auto" and on_gpu)) and not streamed
    stacked = {s.name for s in specs if stacking and can_stack(s.cfg)}
    epochs = {s.cfg.epochs for s in specs}
    total = max(epochs)
    milestones = halving_milestones(total) if prune else None
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.group, []).append(spec)
    state = _State(folder, specs, data, overwrite)

    def update(name: str, result: dict) -> None:
        state.update(name, result)
        if track is not None and "record" in result:
            track.log(folder, name)
    workers = min(workers or default_workers(), len(specs))
    threads = max(1, default_workers() // workers)

    with Progress(label, enabled=progress) as bar:

        def tick(job: Job) -> None:
            if workers > 1 or ray:
                bar.update(advance=_span(job))

        runner = _InProcess(data, lambda *_: bar.update(advance=1)) if workers == 1 and not ray else None
        try:
            if ray:
                runner = RayRunner(data, backend)
                workers = min(runner.slots, len(specs))
            alive, dropped = list(groups), []  # dropped: (spec, the epoch it stops at)
            for milestone in (milestones or [total]):
                final = milestone == total or len(alive) == 1
                target = total if final else milestone
                plan = [(s, stop, True) for s, stop in dropped if not state.done(s, stop, milestones)]
                for g in alive:
                    for s in groups[g]:
                        if final and not state.done(s, total, milestones):
                            plan.append((s, total, True))
                        elif not final and not state.reached(s, target):
                            plan.append((s, target, False))
                together = [entry for entry in plan if entry[0].name in stacked]
                plan = [entry for entry in plan if entry[0].name not in stacked]
                training = sum(until > state.start(s, until) for s, until, _ in plan)
                pieces = workers if training > workers and training % workers else 1
                chains = [_chain(s, folder, state.start(s, until), until, finish, pieces, milestones)
                          for s, until, finish in plan]
                stacks = _stacks(together, state, folder, milestones)
                bar.update(total=sum(j.until - j.start for c in chains + stacks for j in c), completed=0,
                           description=f"{label if not prune else f'{label} rung ≤ epoch {target}'}: "
                                       f"{len(plan) + len(together)} run(s)")
                if ray:  # each stacked group is one task, beside the other chains
                    chains, stacks = chains + [[jobs] for jobs in stacks], []
                for jobs in stacks:
                    for job, result in zip(jobs, advance_stacked(data, jobs)):
                        update(job.spec.name, result)
                        bar.update(advance=job.until - job.start)
                if chains:
                    if runner is None:
                        runner = Workers(data, workers, threads, work)
                    for name, result in _run_chains(runner, chains, workers, tick).items():
                        update(name, result)
                if final:
                    break
                score = {g: statistics.mean(max(state.curve[s.name][:target]) for s in groups[g]) for g in alive}
                ranked = sorted(alive, key=lambda g: (-score[g], alive.index(g)))
                keep = max(1, len(alive) // 2)
                dropped = [(s, target) for g in ranked[keep:] for s in groups[g]]
                alive = [g for g in alive if g in ranked[:keep]]
        finally:
            if runner is not None:
                runner.close()
    checkpoints = folder / ".checkpoints"
    if checkpoints.exists() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    records = []
    for spec in specs:
        record = state.finished[spec.name]
        if spec.test_rates and not all(str(r) in record.get("missing_test", {}) for r in spec.test_rates):
            record = add_test_rates(folder / spec.name, data, spec)
        if track is not None:  # runs an earlier call finished (those logged already are skipped)
            track.log(folder, spec.name)
        records.append(record)
    return records


def _stacks(plan: list, state: _State, folder: Path, milestones) -> list[list[Job]]:
    """The stackable part of a rung as groups of jobs that train together: same settings but seed, lr
    and weight decay (``stack_key``), same span and the same end (checkpoint or finish)."""
    groups: dict[tuple, list[Job]] = {}
    for spec, until, finish in plan:
        start = state.start(spec, until)
        job = Job(spec, str(folder), start, until, finish, milestones)
        groups.setdefault((stack_key(spec.cfg), start, until, finish), []).append(job)
    return list(groups.values())


