"""Grids: every config of one method over seeds, selected on validation, as cheap as their arithmetic.

A grid is a list of runs (``RunSpec``: a resolved ``TrainConfig`` plus a folder name). Three things
keep it cheap:

- The cache is loaded once. Worker processes (one per core, one thread each) get the tensors once,
  through shared memory, and never reload them; no process starts per config. One thread per worker
  rather than one process with two threads: small matmuls scale poorly over threads, and on a shared
  machine a two-thread OpenMP team whose second core is taken stalls at every barrier, while single-
  thread workers only slow down in proportion (``benchmarks/bench_grid.py`` measures both).
- ``prune=True`` runs successive halving: every run trains to a milestone (E/8, E/4, E/2), then the
  worse half of the configs stops there; a config's seeds are ranked by their mean best validation
  accuracy so far and kept or dropped together, so the selected config always has all its seeds. A
  stopped run is still finished (its best state evaluated on validation and test) and appears in the
  table with ``stopped_at``. About 0.29 of the epochs of the full grid are trained for 10 configs.
- Work moves between workers at epoch boundaries: a run that is not finished is a checkpoint file
  (the whole trainer minus the data), so a rung whose run count does not divide by the worker count is
  cut into pieces that keep every worker busy, and an interrupted grid resumes from them.

Resume: each run finishes into a temporary folder renamed to ``<grid>/<config>-seed<k>/`` at the
end, so a run folder with ``results.json`` is always whole; a rerun skips the runs whose folder holds
the same resolved config (and continues unfinished ones from their checkpoints).

Selection never reads test: the selected config is the argmax of the mean over seeds of the
best-epoch validation accuracy among configs that trained all their epochs; its test accuracy is
reported as mean ± std over the seeds.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
import typing
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from heads.core import (OptionError, Trainer, TrainConfig, build_model, evaluate, load_run, method_class,
                        resolve_options, resolve_training)
from heads.data import HeadData
from heads.standardize import MODES as STANDARDIZE_MODES
from heads.training import OPTIMIZERS, parse_schedule

# Training settings that can be grid axes besides the method's own options. Epochs are not an axis:
# the pruning milestones are fractions of one epoch budget.
CORE_AXES = ("lr", "batch_size", "hidden", "weight_decay", "optimizer", "schedule", "standardize", "eval_batch_size",
             "missing_train", "missing_test")
# The CCAT paper's protocol: tune the LoRA rank first (β at its default), then β at the best rank.
CCAT_STAGES = ("rank", "beta")
CCAT_DEFAULTS = {"rank": [1, 2, 4, 8, 16], "beta": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]}
# A grid that cannot end is refused before anything is built: no axis and no grid may exceed MAX_RUNS
# (a range's length is computed from its ends, never by listing it), and a grid of more than
# CONFIRM_RUNS runs starts only with ``--yes`` (a typo such as 1:10000:1 should cost a line, not a week).
MAX_RUNS = 100_000
CONFIRM_RUNS = 200


# --- axes --------------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def axis_kinds(method: str) -> dict[str, type]:
    """Every name that can be an axis for ``method``, with its declared type (a Literal stays one)."""
    core = typing.get_type_hints(TrainConfig)
    # ``int | None`` (a setting left to the method's paper default) is an int axis.
    kinds = {name: next(a for a in typing.get_args(core[name]) if a is not type(None)) if typing.get_args(core[name])
             else core[name] for name in CORE_AXES}
    kinds.update(typing.get_type_hints(method_class(method).Options))
    return kinds


def _number(kind: type, raw: str, name: str):
    try:
        value = kind(raw)
    except ValueError:
        raise OptionError(f"{_flag(name)} expects {kind.__name__} values, got {raw!r}") from None
    return float(f"{value:.12g}") if kind is float else value


def _expand_range(kind: type, text: str, name: str) -> list:
    """``a:b:step`` inclusive of b, robust to float error (0.0:0.9:0.1 gives ten values, 0.3 not 0.30000000000000004)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise OptionError(f"{_flag(name)}: a range is start:stop:step, got {text!r}")
    start, stop, step = (_number(kind, p, name) for p in parts)
    if step <= 0 or stop < start:
        raise OptionError(f"{_flag(name)}: range {text!r} needs step > 0 and stop ≥ start")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_RUNS:  # counted from the ends, before a single value is made
        raise OptionError(f"{_flag(name)}: range {text!r} has {count:,} values, more than the {MAX_RUNS:,} "
                          "a grid may have; use a larger step")
    return [_number(kind, str(start + i * step), name) for i in range(count)]


def check_setting(name: str, value):
    """One training setting (a ``TrainConfig`` field) checked; the CLI's options and grid axes share it."""
    if name in ("batch_size", "hidden") and value < 1:
        raise OptionError(f"{_flag(name)} must be positive, got {value}")
    if name == "eval_batch_size" and value < 0:
        raise OptionError(f"{_flag(name)} must be 0 (same as batch size) or positive, got {value}")
    if name == "optimizer" and value not in OPTIMIZERS:
        raise OptionError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {value!r}")
    if name == "schedule":
        try:
            parse_schedule(value)
        except ValueError as err:
            raise OptionError(str(err)) from None
    if name == "standardize" and value not in STANDARDIZE_MODES:
        raise OptionError(f"--standardize must be one of {', '.join(STANDARDIZE_MODES)}, got {value!r}")
    if name == "lr" and not value > 0:
        raise OptionError(f"--lr must be positive, got {value}")
    if name == "weight_decay" and value < 0:
        raise OptionError(f"--weight-decay must be 0 or positive, got {value}")
    if name in ("missing_train", "missing_test") and not 0 <= value < 1:
        raise OptionError(f"{_flag(name)} must lie in [0, 1), got {value}")
    return value


def parse_values(method: str, name: str, text: str) -> list:
    """One axis: ``0.0:0.9:0.1`` (inclusive range), ``0.1,0.5``, ``weak-to-strong,fixed``, ``true,false``.

    Values that contain commas are separated with ``|`` instead. Duplicates are dropped.
    """
    kind = axis_kinds(method)[name]
    sep = "|" if "|" in text else ","
    raw = []
    for item in (s.strip() for s in text.split(sep)):
        if not item:
            continue
        if kind in (int, float) and ":" in item:
            raw += _expand_range(kind, item, name)
        else:
            raw.append(_number(kind, item, name) if kind in (int, float) else item)
    # Range ends and single values go through the same checks, so 0:1:0.5 on a rate fails here.
    values = []
    for value in raw:
        if name in CORE_AXES:
            values.append(check_setting(name, value))
        else:
            value = resolve_options(method, {name: value})[name]
            values.append(float(f"{value:.12g}") if isinstance(value, float) else value)
    if not values:
        raise OptionError(f"{_flag(name)} has no values")
    return list(dict.fromkeys(values))


def parse_axis_args(method: str, args: list[str]) -> dict[str, list]:
    """Extra CLI words (``--tau 0.0:0.9:0.1 --order fixed,random --no-align``) → ``{axis: values}``.

    An axis with one value is simply a fixed setting. Bool options also take the switch forms
    ``--align`` and ``--no-align``.
    """
    kinds = axis_kinds(method)
    axes: dict[str, list] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--"):
            raise OptionError(f"unexpected argument {word!r}")
        name, eq, text = word[2:].partition("=")
        key = name.replace("-", "_")
        if not eq:
            alone = i + 1 == len(args) or args[i + 1].startswith("--")
            if key.startswith("no_") and kinds.get(key[3:]) is bool and alone:
                key, text = key[3:], "false"
            elif kinds.get(key) is bool and alone:
                text = "true"
            elif alone:
                raise OptionError(f"option {word} needs a value")
            else:
                text = args[i + 1]
                i += 1
        if key not in kinds:
            raise OptionError(f"{_flag(key)} is neither an option of method {method!r} nor a training setting; "
                              f"axes: {', '.join(_flag(k) for k in kinds)}")
        if key in axes:
            raise OptionError(f"{_flag(key)} given twice")
        axes[key] = parse_values(method, key, text)
        i += 1
    return axes


def planned_runs(axes: dict[str, list], seeds: list[int], protocol: str = "joint") -> int:
    """How many runs a grid trains, from the axis lengths alone (the ``ccat`` protocol: at most
    |rank| + |β| configs, one of them shared by its two stages)."""
    if protocol == "ccat":
        configs = sum(len(axes.get(k, CCAT_DEFAULTS[k])) for k in CCAT_STAGES)
    else:
        configs = math.prod(len(v) for v in axes.values())
    return configs * len(seeds)


def check_size(axes: dict[str, list], seeds: list[int], protocol: str = "joint", yes: bool = False) -> int:
    """Refuse a grid too large to be meant before anything loads or trains; return its run count.

    Above ``MAX_RUNS`` always; above ``CONFIRM_RUNS`` unless the user confirmed with ``--yes``.
    """
    runs = planned_runs(axes, seeds, protocol)
    shape = f"{runs:,} runs ({runs // len(seeds):,} config(s) × {len(seeds)} seed(s))"
    if runs > MAX_RUNS:
        raise OptionError(f"the grid has {shape}, more than the {MAX_RUNS:,} allowed; use fewer values or seeds")
    if runs > CONFIRM_RUNS and not yes:
        raise OptionError(f"the grid has {shape}; add --yes to start it, or use fewer values or seeds")
    return runs


# --- runs --------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One run of a sweep: its folder name, the runs it is ranked with (its seeds), the full config."""

    name: str
    group: str
    cfg: TrainConfig
    record: dict = field(default_factory=dict)  # merged into results.json (label, axis values, …)
    test_rates: tuple[float, ...] = ()  # also evaluate the selected model on test masked at these rates


def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def config_slug(values: dict) -> str:
    """``{"tau": 0.3, "order": "fixed"}`` → ``tau=0.3_order=fixed`` (a folder name; ``default`` if empty)."""
    slug = "_".join(f"{k.replace('_', '-')}={_text(v)}" for k, v in values.items()) or "default"
    return re.sub(r"[^A-Za-z0-9.=+_-]+", "-", slug)


def expand(method: str, axes: dict[str, list], base: TrainConfig, seeds: list[int],
           named: list[str] | None = None) -> list[RunSpec]:
    """The cartesian product of the axes (first axis outermost), seeds innermost.

    ``named`` are the axes that name the folders (default: those with several values); the staged
    protocol names both of its axes in every stage so a config shared by two stages is one run.
    """
    named = [k for k, v in axes.items() if len(v) > 1] if named is None else named
    specs = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        cfg = _config(method, values, base)
        shown = {k: values[k] for k in named}
        slug = config_slug(shown)
        for seed in seeds:
            specs.append(RunSpec(f"{slug}-seed{seed}", slug, replace(cfg, seed=seed), {"label": slug, "values": shown}))
    return specs


def _config(method: str, values: dict, base: TrainConfig) -> TrainConfig:
    """``base`` with one combination of axis values applied (training settings and method options)."""
    core = {k: v for k, v in values.items() if k in CORE_AXES}
    opts = resolve_options(method, {**base.options, **{k: v for k, v in values.items() if k not in CORE_AXES}})
    return replace(base, method=method, options=opts, **core)


def validate_axes(method: str, axes: dict[str, list], base: TrainConfig, data: HeadData) -> None:
    """Build one model per axis value, the other axes at their first value, before the full product.

    A value out of range (``--tau 0:1000:1``) then fails after a handful of builds instead of after
    building every config before it. Each config checked here is one of the grid's own, so nothing
    valid is refused; ``validate`` still checks every combination afterwards.
    """
    first = {k: v[0] for k, v in axes.items()}
    build_model(_config(method, first, base), data.spec).configure_optimizer()
    for name, values in axes.items():
        for value in values[1:]:
            build_model(_config(method, {**first, name: value}, base), data.spec).configure_optimizer()


def validate(specs: list[RunSpec], data: HeadData) -> None:
    """Build each distinct config's model and optimizer once, and draw each distinct missing rate's masks
    once, so a bad value or an unreachable η fails before any training."""
    seen = set()
    for rate in sorted({s.cfg.missing_train for s in specs} | {s.cfg.missing_test for s in specs} |
                       {r for s in specs for r in s.test_rates}):
        for split in (data.train, data.val, data.test):
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


# --- what a worker does --------------------------------------------------------------------------
@dataclass
class _Job:
    spec: RunSpec
    folder: str
    start: int  # the epoch its checkpoint holds (0: a fresh trainer)
    until: int
    finish: bool
    milestones: list[int] | None  # the pruning plan the run belongs to, recorded for resume


_DATA: HeadData | None = None


def _init_worker(data: HeadData, threads: int, parent: int) -> None:
    global _DATA
    _die_with_parent(parent)
    _DATA = data
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


def _work(job: _Job) -> dict:
    return advance(_DATA, job)


def _checkpoint(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / ".checkpoints" / f"{name}.pt", folder / ".checkpoints" / f"{name}.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _identity(cfg: TrainConfig, data: HeadData) -> dict:
    """What a run's results depend on; a stored run is reused only when this matches (threads aside)."""
    train = dataclasses.asdict(resolve_training(cfg))
    train.pop("threads")
    train["options"] = resolve_options(cfg.method, cfg.options)
    return {"train": json.loads(json.dumps(train)), "caches": list(data.meta["caches"])}


def masked_test(model, data: HeadData, cfg: TrainConfig, rate: float) -> dict:
    """The selected model on test with each modality masked at ``rate``, and the realised mask.

    The split is the one ``--missing-test`` draws (the core builds it, so the masks are identical to
    those of a run trained with that option).
    """
    cfg = resolve_training(cfg)
    masked = Trainer(data, replace(cfg, missing_test=rate), model=model).test
    report = evaluate(model, masked, data.spec, cfg.eval_batch_size or cfg.batch_size)
    return {**report.to_json(), **_realised(data.test, masked)}


def _realised(original, masked) -> dict:
    """Fraction of the present (sample, modality) entries that masking removed, overall and per modality
    (``missing_<m>``); samples left with none (always 0 by construction; recorded as a check)."""
    from heads.data import realised_missing

    orig = torch.stack(list(original.present.values()), 1)
    now = torch.stack(list(masked.present.values()), 1)
    per = {f"missing_{m}": rate for m, rate in realised_missing(original, masked).items()}
    return {"missing": 1 - float(now.sum()) / max(float(orig.sum()), 1.0), **per,
            "empty": int((~now.any(1) & orig.any(1)).sum())}


def _mask_summary(trainer: Trainer, data: HeadData) -> dict:
    return {split: _realised(getattr(data, split), getattr(trainer, split)) for split in ("train", "val", "test")}


def advance(data: HeadData, job: _Job, on_epoch=None) -> dict:
    """Train one run from its checkpoint (or from scratch) to ``job.until``; then checkpoint or finish."""
    spec, folder = job.spec, Path(job.folder)
    ckpt, sidecar = _checkpoint(folder, spec.name)
    trainer = Trainer(data, spec.cfg)
    if job.start:
        trainer.__dict__.update(torch.load(ckpt, map_location="cpu", weights_only=False))
    trainer.run(job.until, on_epoch)
    curve = [row["val_acc"] for row in trainer.rows]
    if not job.finish:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in trainer.__dict__.items() if k not in ("data", "train", "val", "test")}
        _atomic_write(ckpt, lambda p: torch.save(state, p))
        info = {"epoch": trainer.epoch, "val_acc": curve, "identity": _identity(spec.cfg, data)}
        _atomic_write(sidecar, lambda p: p.write_text(json.dumps(info)))
        return {"epoch": trainer.epoch, "val_acc": curve}
    tmp = folder / f".{spec.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.finish(tmp)
    record = json.loads((tmp / "results.json").read_text())
    record.update(spec.record)
    record.update(run=spec.name, stopped_at=trainer.epoch if trainer.epoch < spec.cfg.epochs else None, milestones=job.milestones,
                  threads=torch.get_num_threads(), masks=_mask_summary(trainer, data))
    if spec.test_rates:
        record["missing_test"] = {str(r): masked_test(trainer.model, data, spec.cfg, r) for r in spec.test_rates}
    (tmp / "results.json").write_text(json.dumps(record, indent=2))
    final = folder / spec.name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ckpt.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    return {"epoch": trainer.epoch, "val_acc": curve, "record": record}


# --- where jobs run ----------------------------------------------------------------------------
def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _InProcess:
    """Jobs run here, one at a time, with torch's own thread count (and per-epoch progress)."""

    def __init__(self, data: HeadData, on_epoch):
        self.data, self.on_epoch, self.done = data, on_epoch, []

    def submit(self, tag, job: _Job) -> None:
        self.done.append((tag, advance(self.data, job, self.on_epoch)))

    def wait(self):
        return self.done.pop(0)

    def close(self) -> None:
        pass


class _Workers:
    """Worker processes (spawned, so no OpenMP state crosses a fork) that receive the data once.

    A ``ProcessPoolExecutor`` rather than ``multiprocessing.Pool``: when a worker dies or cannot start
    (an import error in the child), the executor fails the pending jobs, while a ``Pool`` respawns the
    worker forever and the grid would wait for ever.
    """

    def __init__(self, data: HeadData, count: int, threads: int):
        import torch.multiprocessing as tmp  # registers the reductions that pass tensors through shared memory

        self.pool = futures.ProcessPoolExecutor(count, tmp.get_context("spawn"), _init_worker, (data, threads, os.getpid()))
        self.pending: dict[futures.Future, object] = {}

    def submit(self, tag, job: _Job) -> None:
        self.pending[self.pool.submit(_work, job)] = tag

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


def _run_chains(runner, chains: list[list[_Job]], slots: int, progress) -> dict[str, dict]:
    """Run each chain's jobs in order, up to ``slots`` jobs at a time, longest remaining chain first."""
    left = [sum(j.until - j.start for j in chain) for chain in chains]
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
        left[i] -= job.until - job.start
        results[job.spec.name] = result
        progress(job)
    return results


def _chain(spec: RunSpec, folder: Path, start: int, until: int, finish: bool, pieces: int,
           milestones: list[int] | None) -> list[_Job]:
    """``start → until`` cut into ``pieces`` nearly equal jobs (the last one finishes when asked)."""
    pieces = max(1, min(pieces, until - start))
    cuts = [start + round((until - start) * (k + 1) / pieces) for k in range(pieces)]
    starts = [start] + cuts[:-1]
    return [_Job(spec, str(folder), s, u, finish and u == until, milestones) for s, u in zip(starts, cuts)]


# --- the sweep ---------------------------------------------------------------------------------
class _State:
    """What the sweep folder already holds for each run: a finished record, or a checkpoint epoch."""

    def __init__(self, folder: Path, specs: list[RunSpec], data: HeadData):
        self.finished: dict[str, dict] = {}
        self.epoch: dict[str, int] = {}
        self.curve: dict[str, list[float]] = {}
        for stale in folder.glob(".*.tmp"):  # a run stopped while it was being written out
            shutil.rmtree(stale, ignore_errors=True)
        for stale in (folder / ".checkpoints").glob(".*.tmp"):  # a worker stopped while saving a checkpoint
            stale.unlink()
        for spec in specs:
            identity = _identity(spec.cfg, data)
            run, (ckpt, sidecar) = folder / spec.name, _checkpoint(folder, spec.name)
            if (run / "results.json").exists() and (run / "config.json").exists():
                config = json.loads((run / "config.json").read_text())
                stored = {"train": {k: v for k, v in config["train"].items() if k != "threads"},
                          "caches": config["data"]["caches"]}
                if stored == identity:
                    self.finished[spec.name] = json.loads((run / "results.json").read_text())
                    self.curve[spec.name] = _csv_column(run / "epochs.csv", "val_acc")
            if sidecar.exists() and ckpt.exists():
                info = json.loads(sidecar.read_text())
                if info["identity"] == identity:
                    self.epoch[spec.name], self.curve[spec.name] = info["epoch"], info["val_acc"]
                    continue
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


def _csv_column(path: Path, column: str) -> list[float]:
    import csv

    with open(path, newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def run_sweep(data: HeadData, specs: list[RunSpec], folder: Path, workers: int = 0, prune: bool = False,
              progress: bool = True, label: str = "grid") -> list[dict]:
    """Run (or resume) every spec into ``folder``; return their results records in spec order.

    ``workers``: processes with one thread each (0 = one per core); 1 runs in this process.
    ``prune``: successive halving over the specs' groups (see the module docstring).
    ``label``: what the progress bar calls the sweep (grid, compare, robustness).

    Everything that can be checked without training is checked before ``folder`` is made, and a
    folder this call made is removed again if it is still empty when the sweep fails or is stopped:
    a failed command leaves nothing behind, a stopped one keeps its finished runs and checkpoints.
    """
    if workers < 0:
        raise OptionError(f"--workers must be 0 (one per core) or positive, got {workers}")
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
        return _sweep(data, specs, folder, workers, prune, progress, label)
    except BaseException:
        for path in made:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


def _sweep(data: HeadData, specs: list[RunSpec], folder: Path, workers: int, prune: bool, progress: bool,
           label: str) -> list[dict]:
    epochs = {s.cfg.epochs for s in specs}
    total = max(epochs)
    milestones = halving_milestones(total) if prune else None
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.group, []).append(spec)
    state = _State(folder, specs, data)
    workers = min(workers or default_workers(), len(specs))
    threads = max(1, default_workers() // workers)

    with _progress_bar(progress) as bar:
        task = bar.add_task(label, total=None)

        def tick(job: _Job) -> None:
            if workers > 1:
                bar.advance(task, job.until - job.start)

        runner = _InProcess(data, lambda *_: bar.advance(task, 1)) if workers == 1 else None
        try:
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
                training = sum(until > state.start(s, until) for s, until, _ in plan)
                pieces = workers if training > workers and training % workers else 1
                chains = [_chain(s, folder, state.start(s, until), until, finish, pieces, milestones)
                          for s, until, finish in plan]
                bar.update(task, total=sum(j.until - j.start for c in chains for j in c), completed=0,
                           description=f"{label if not prune else f'{label} rung ≤ epoch {target}'}: {len(plan)} run(s)")
                if chains:
                    if runner is None:
                        runner = _Workers(data, workers, threads)
                    for name, result in _run_chains(runner, chains, workers, tick).items():
                        state.update(name, result)
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
            record = _add_test_rates(folder / spec.name, data, spec)
        records.append(record)
    return records


def _add_test_rates(run_dir: Path, data: HeadData, spec: RunSpec) -> dict:
    """A finished run asked for more masked-test rates: evaluate its saved model, no retraining."""
    record = json.loads((run_dir / "results.json").read_text())
    model, cfg = load_run(run_dir)
    rows = record.setdefault("missing_test", {})
    for rate in spec.test_rates:
        if str(rate) not in rows:
            rows[str(rate)] = masked_test(model, data, cfg, rate)
    _atomic_write(run_dir / "results.json", lambda p: p.write_text(json.dumps(record, indent=2)))
    return record


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                    TimeElapsedColumn(), disable=not enabled, transient=True)


# --- selection and the grid's own files ----------------------------------------------------------
@dataclass
class Selection:
    config: str
    values: dict
    seeds: int
    val_mean: float
    val_std: float
    test_mean: float
    test_std: float
    tied: list[str] = field(default_factory=list)  # configs tied with it on validation accuracy


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict]) -> list[dict]:
    """One row per config (in grid order): mean ± std over its seeds of validation and test metrics."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("stage"), r["label"]), []).append(r)
    rows = []
    for (_, label), runs in groups.items():
        val, val_sd = _mean_std([r["val"]["acc"] for r in runs])
        test, test_sd = _mean_std([r["test"]["acc"] for r in runs])
        edm, edm_sd = _mean_std([r["test"]["edm"] for r in runs])
        stops = [r["stopped_at"] for r in runs if r.get("stopped_at") is not None]
        rows.append({"config": label, "values": runs[0].get("values", {}), "seeds": len(runs),
                     "val_acc": val, "val_acc_std": val_sd, "val_loss": _mean_loss(runs),
                     "val_f1": statistics.mean(r["val"]["f1"] for r in runs),
                     "test_acc": test, "test_acc_std": test_sd,
                     "test_edm": edm, "test_edm_std": edm_sd, "stage": runs[0].get("stage"),
                     "stopped_at": max(stops, default=None)})
    return rows


def _mean_loss(runs: list[dict]) -> float:
    losses = [r["val"].get("loss", float("nan")) for r in runs]
    return statistics.mean(losses) if all(math.isfinite(x) for x in losses) else float("inf")


TIE_RULE = "higher mean validation accuracy, then lower mean validation loss, then higher mean validation macro-F1, then the config listed first"


def select(records: list[dict]) -> Selection:
    """The config with the best mean validation accuracy over its seeds; test is only reported.

    Small validation splits tie often (60 samples: accuracy moves in steps of 1.67 points), and
    "the first config listed" would then decide silently. Ties on validation accuracy (equal to
    1e-9) are broken by lower mean validation loss, then higher mean validation macro-F1, then grid
    order (``TIE_RULE``); ``Selection.tied`` names the configs that tied on accuracy, and the grid's
    report prints them. Configs stopped early by pruning compete only when no config trained all
    its epochs.
    """
    rows = summarize(records)
    complete = [r for r in rows if r["stopped_at"] is None] or rows
    top = max(r["val_acc"] for r in complete)
    tied = [r for r in complete if abs(r["val_acc"] - top) <= 1e-9]
    best = min(tied, key=lambda r: (r["val_loss"], -r["val_f1"], rows.index(r)))
    return Selection(best["config"], best["values"], best["seeds"], best["val_acc"], best["val_acc_std"],
                     best["test_acc"], best["test_acc_std"], [r["config"] for r in tied] if len(tied) > 1 else [])


def grid_rows(records: list[dict], modalities: list[str], selected: str) -> list[dict]:
    """The whole grid, one row per run: axis values, seed, where it stopped, validation and test metrics."""
    rows = []
    for r in records:
        row = {"config": r["label"], **r.get("values", {}), "seed": r["seed"]}
        if r.get("stage") is not None:
            row["stage"] = r["stage"]
        row.update(stopped_at=r.get("stopped_at"), epochs_run=r["epochs_run"], best_epoch=r["best_epoch"])
        for split in ("val", "test"):
            row.update({f"{split}_{k}": r[split][k] for k in ("acc", "f1", "edm")})
        for m in modalities:
            row[f"test_acc_{m}"] = r["test"][f"acc_{m}"]
            row[f"test_delta_{m}"] = r["test"][f"delta_{m}"]
        row.update(seconds=r["seconds"], selected=r["label"] == selected)
        rows.append(row)
    return rows


def write_table(rows: list[dict], stem: Path) -> None:
    """``<stem>.parquet`` and ``<stem>.csv`` (polars keeps the axis columns' types in parquet)."""
    import polars as pl

    frame = pl.DataFrame(rows, infer_schema_length=None)
    frame.write_parquet(stem.with_suffix(".parquet"))
    frame.write_csv(stem.with_suffix(".csv"))


@dataclass
class GridOutcome:
    records: list[dict]
    selection: Selection
    folder: Path
    seconds: float


def run_grid(data: HeadData, method: str, axes: dict[str, list], seeds: list[int], base: TrainConfig, folder: Path,
             prune: bool = False, protocol: str = "joint", workers: int = 0, progress: bool = True,
             yes: bool = False, keep_models: bool = False) -> GridOutcome:
    """Run the grid (joint: the full product; ``ccat``: rank first, then β at the best rank), select on
    validation, and write ``grid.json``, ``grid.parquet``/``grid.csv``, ``grid.md`` and ``grid.png``.

    ``yes`` confirms a grid of more than ``CONFIRM_RUNS`` runs. Only the selected config's runs keep
    their ``model.pt`` unless ``keep_models`` (a model is as large as its projections: 291 MB per run
    for the CCAT protocol on Ola-7B features); the other runs keep everything else, and resuming
    recognises a finished run by its ``results.json`` and ``config.json``, not by its model.
    """
    start = time.perf_counter()
    if protocol not in ("joint", "ccat"):
        raise OptionError(f"--protocol must be joint or ccat, got {protocol!r}")
    check_size(axes, seeds, protocol, yes)
    if protocol == "joint":
        validate_axes(method, axes, base, data)
        records = run_sweep(data, expand(method, axes, base, seeds), folder, workers, prune, progress)
    else:
        records = _run_staged(data, method, axes, seeds, base, folder, prune, workers, progress)
    selection = select(records if protocol == "joint" else [r for r in records if r["stage"] == 2])
    seconds = time.perf_counter() - start
    from heads import plots
    from heads.report import grid_markdown

    write_table(grid_rows(records, data.spec.modalities, selection.config), folder / "grid")
    configs = summarize(records)
    info = {"method": method, "protocol": protocol, "prune": prune, "seeds": seeds, "axes": axes,
            "base": _identity(replace(base, method=method), data), "runs": [r["run"] for r in records],
            "selected": dataclasses.asdict(selection), "summary": configs, "wall_seconds": seconds,
            "run_seconds": sum(r["seconds"] for r in records), "epochs_trained": sum(r["epochs_run"] for r in records)}
    (folder / "grid.json").write_text(json.dumps(info, indent=2))
    (folder / "grid.md").write_text(grid_markdown(info, configs))
    plots.grid_curves(configs, selection.config, folder / "grid.png", f"{method} grid")
    if not keep_models:
        for r in records:
            if r["label"] != selection.config:
                (folder / r["run"] / "model.pt").unlink(missing_ok=True)
    return GridOutcome(records, selection, folder, seconds)


def _run_staged(data, method, axes, seeds, base, folder, prune, workers, progress) -> list[dict]:
    """CCAT's protocol: sweep ``rank`` with β fixed, then ``beta`` at the rank validation picked."""
    if not set(CCAT_STAGES) <= set(axis_kinds(method)):
        raise OptionError(f"--protocol ccat tunes --rank then --beta, which method {method!r} does not have; use --method ccat")
    others = [k for k, v in axes.items() if len(v) > 1 and k not in CCAT_STAGES]
    if others:
        raise OptionError(f"--protocol ccat sweeps only --rank then --beta; give {', '.join(map(_flag, others))} one value")
    values = {k: axes.get(k, CCAT_DEFAULTS[k]) for k in CCAT_STAGES}
    fixed = {k: v for k, v in axes.items() if k not in CCAT_STAGES}
    beta_default = resolve_options(method, {})["beta"] if len(values["beta"]) > 1 else values["beta"][0]
    records = []
    first = {**fixed, "rank": values["rank"], "beta": [beta_default]}
    stage1 = run_sweep(data, expand(method, first, base, seeds, list(CCAT_STAGES)), folder, workers, prune, progress)
    best_rank = select(stage1).values["rank"]
    second = {**fixed, "rank": [best_rank], "beta": values["beta"]}
    stage2 = run_sweep(data, expand(method, second, base, seeds, list(CCAT_STAGES)), folder, workers, prune, progress)
    for stage, recs in ((1, stage1), (2, stage2)):
        records += [{**r, "stage": stage} for r in recs]
    return records
