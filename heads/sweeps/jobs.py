"""One run of a sweep, as a worker sees it: the run's spec, a job (train it from a checkpoint to an
epoch), and what a job leaves behind — a checkpoint to go on from, or the finished run folder put in
place whole. ``heads/sweeps/sweep.py`` plans the jobs; workers, the in-process runner and the
stacked trainer all carry them out through ``open_run`` and ``close_run``.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from heads.blocks.data import HeadData, realised_missing
from heads.sweeps import workers
from heads.train.config import TrainConfig, resolve_training
from heads.train.evaluation import evaluate
from heads.train.resume import identity
from heads.train.rundir import load_run
from heads.train.trainer import Trainer, masked_splits


@dataclass
class RunSpec:
    """One run of a sweep: its folder name, the runs it is ranked with (its seeds), the full config."""

    name: str
    group: str
    cfg: TrainConfig
    record: dict = field(default_factory=dict)  # merged into results.json (label, axis values, …)
    test_rates: tuple[float, ...] = ()  # also evaluate the selected model on test masked at these rates


@dataclass
class Job:
    spec: RunSpec
    folder: str
    start: int  # the epoch its checkpoint holds (0: a fresh trainer)
    until: int
    finish: bool
    milestones: list[int] | None  # the pruning plan the run belongs to, recorded for resume


def work(job: Job) -> dict:
    """What a worker process runs: one job, on the data it received once (``heads/sweeps/workers.py``)."""
    return advance(workers.DATA, job)


def checkpoint_paths(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / ".checkpoints" / f"{name}.pt", folder / ".checkpoints" / f"{name}.json"


def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def masked_test(model, data: HeadData, cfg: TrainConfig, rate: float) -> dict:
    """The selected model on test with each modality masked at ``rate``, and the realised mask.

    The split is the one ``--missing-test`` draws (the core builds it, so the masks are identical to
    those of a run trained with that option).
    """
    cfg = resolve_training(cfg)
    masked = masked_splits(data, replace(cfg, missing_test=rate))[2]
    device = next(model.parameters()).device  # wherever the model is (the trainer's device, or the host)
    report = evaluate(model, masked.to(device), data.spec, cfg.eval_batch_size or cfg.batch_size)
    return {**report.to_json(), **_realised(data.test, masked)}


def _realised(original, masked) -> dict:
    """Fraction of the present (sample, modality) entries that masking removed, overall and per modality
    (``missing_<m>``); samples left with none (always 0 by construction; recorded as a check)."""
    orig = torch.stack(list(original.present.values()), 1)
    now = torch.stack(list(masked.present.values()), 1)
    per = {f"missing_{m}": rate for m, rate in realised_missing(original, masked).items()}
    return {"missing": 1 - float(now.sum()) / max(float(orig.sum()), 1.0), **per,
            "empty": int((~now.any(1) & orig.any(1)).sum())}


def _mask_summary(trainer: Trainer, data: HeadData) -> dict:
    return {split: _realised(getattr(data, split), getattr(trainer, split)) for split in ("train", "val", "test")}


def stored_identity(run: Path) -> dict:
    """The resolved config a finished run folder was trained with, as ``identity`` writes it."""
    config = json.loads((run / "config.json").read_text())
    return {"train": {k: v for k, v in config["train"].items() if k not in ("threads", "device")},
            "caches": config["data"]["caches"]}


def csv_column(path: Path, column: str) -> list[float]:
    with open(path, newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def already_done(data: HeadData, job: Job) -> dict | None:
    """The job's result when an earlier attempt of it wrote its output and then died before handing
    it back (a Ray task retried after its worker was lost), else None.

    A retry starts at ``job.start`` like the first attempt, but the first may have gone on to move
    the run's checkpoint (one path for every epoch) to ``job.until``, or to finish the run folder and
    delete the checkpoint: training again from ``job.start`` would then read the wrong checkpoint or
    none. What the first attempt wrote is what this job produces (training is a function of the
    config and seed), so it is returned as is. A sweep never plans a job whose output is already
    there (``sweep._State``), so on a first attempt this is always None.
    """
    folder, name = Path(job.folder), job.spec.name
    if not job.finish:
        ckpt, sidecar = checkpoint_paths(folder, name)
        if ckpt.exists() and sidecar.exists():
            info = json.loads(sidecar.read_text())
            if info["epoch"] == job.until and info["identity"] == identity(job.spec.cfg, data):
                return {"epoch": info["epoch"], "val_acc": info["val_acc"]}
        return None
    run = folder / name
    if not ((run / "results.json").exists() and (run / "config.json").exists()):
        return None
    record = json.loads((run / "results.json").read_text())
    reached = record.get("stopped_at") if record.get("stopped_at") is not None else job.spec.cfg.epochs
    if reached != min(job.until, job.spec.cfg.epochs) or record.get("milestones") != job.milestones:
        return None  # a run of another pruning plan, which this job replaces
    if stored_identity(run) != identity(job.spec.cfg, data):
        return None  # another config under the same name (--overwrite), which this job replaces
    return {"epoch": reached, "val_acc": csv_column(run / "epochs.csv", "val_acc"), "record": record}


def advance(data: HeadData, job: Job, on_epoch=None) -> dict:
    """Train one run from its checkpoint (or from scratch) to ``job.until``; then checkpoint or finish."""
    done = already_done(data, job)
    if done is not None:
        return done
    trainer = open_run(data, job)
    trainer.run(job.until, on_epoch)
    return close_run(data, job, trainer)


def open_run(data: HeadData, job: Job) -> Trainer:
    """The job's trainer: fresh, or continued from its checkpoint."""
    trainer = Trainer(data, job.spec.cfg)
    if job.start:
        ckpt, _ = checkpoint_paths(Path(job.folder), job.spec.name)
        trainer.restore(torch.load(ckpt, map_location="cpu", weights_only=False))
    return trainer


def close_run(data: HeadData, job: Job, trainer: Trainer) -> dict:
    """After training to ``job.until``: a checkpoint (the run goes on later), or the finished run folder."""
    spec, folder = job.spec, Path(job.folder)
    ckpt, sidecar = checkpoint_paths(folder, spec.name)
    curve = [row["val_acc"] for row in trainer.rows]
    if not job.finish:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        state = trainer.checkpoint()
        atomic_write(ckpt, lambda p: torch.save(state, p))
        info = {"epoch": trainer.epoch, "val_acc": curve, "identity": identity(spec.cfg, data)}
        atomic_write(sidecar, lambda p: p.write_text(json.dumps(info)))
        return {"epoch": trainer.epoch, "val_acc": curve}
    tmp = folder / f".{spec.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.finish(tmp)
    record = json.loads((tmp / "results.json").read_text())
    record.update(spec.record)
    record.update(run=spec.name, stopped_at=trainer.epoch if trainer.epoch < spec.cfg.epochs else None, milestones=job.milestones,
                  threads=torch.get_num_threads(), masks=_mask_summary(trainer, data))
    if getattr(trainer, "stacked_with", 0):
        record["stacked_with"] = trainer.stacked_with  # how many runs trained together (seconds are a share)
    if spec.test_rates:
        record["missing_test"] = {str(r): masked_test(trainer.model, data, spec.cfg, r) for r in spec.test_rates}
    (tmp / "results.json").write_text(json.dumps(record, indent=2))
    final = folder / spec.name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ckpt.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    return {"epoch": trainer.epoch, "val_acc": curve, "record": record}


def add_test_rates(run_dir: Path, data: HeadData, spec: RunSpec) -> dict:
    """A finished run asked for more masked-test rates: evaluate its saved model, no retraining."""
    record = json.loads((run_dir / "results.json").read_text())
    model, cfg = load_run(run_dir)
    rows = record.setdefault("missing_test", {})
    for rate in spec.test_rates:
        if str(rate) not in rows:
            rows[str(rate)] = masked_test(model, data, cfg, rate)
    atomic_write(run_dir / "results.json", lambda p: p.write_text(json.dumps(record, indent=2)))
    return record
