"""A single run (``train-head``) that survives Ctrl-C, SIGTERM and kill -9: epoch checkpoints kept
under its name, and what a run's results depend on (``identity``), so a rerun continues only the
same run.

Where: ``OUT/.NAME.resume/`` (``checkpoint.pt`` and ``identity.json``) beside the run folder it will
become. Why under the name: a rerun must find it again, so a run started without ``--name`` gets
its generated name told at the start and on interruption, with the exact way to resume (the same
command plus ``--name NAME``). When: after epoch 1 and then at most every ``EVERY`` seconds (choice:
a checkpoint per epoch would rewrite the model hundreds of times a minute on a small head; a kill
loses at most that much work). A checkpoint is the trainer at the end of an epoch — never mid-epoch,
so a resumed run draws exactly the batches and masks an uninterrupted one does and writes the same
``results.json`` (timings aside). The checkpoint is removed once the run folder is in place.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from heads.blocks.data import HeadData
from heads.errors import OptionError
from heads.train.config import TrainConfig, resolve_training
from heads.train.options import resolve_options
from heads.train.trainer import Trainer

EVERY = 5.0  # seconds between epoch checkpoints of a single run


def identity(cfg: TrainConfig, data: HeadData) -> dict:
    """What a run's results depend on; a stored run or checkpoint is reused only when this matches."""
    train = dataclasses.asdict(resolve_training(cfg))
    for where in ("threads", "device"):  # how fast, not what: a run may resume on another device
        train.pop(where, None)
    train["options"] = resolve_options(cfg.method, cfg.options)
    return {"train": json.loads(json.dumps(train)), "caches": list(data.meta["caches"])}


def differences(stored: dict, wanted: dict) -> list[str]:
    """``["--epochs 3 → 5", "--cache a → b"]``: the settings two identities disagree on."""
    out = []
    flat = lambda ident: {**{k: v for k, v in ident["train"].items() if k not in ("options", "training_source")},
                          **{f"{k}": v for k, v in ident["train"].get("options", {}).items()},
                          "cache": ",".join(ident.get("caches", []))}
    a, b = flat(stored), flat(wanted)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"--{key.replace('_', '-')} {a.get(key)} → {b.get(key)}")
    return out


def resume_dir(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.resume")


def _save(trainer: Trainer, folder: Path, ident: dict) -> None:
    """The trainer at the end of its last epoch, written atomically (a kill mid-write keeps the old one)."""
    trainer.rng_state = torch.get_rng_state()  # the stream as it stands now, not as the run began
    if trainer.cuda_rng_state is not None:
        trainer.cuda_rng_state = torch.cuda.get_rng_state(trainer.device)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".checkpoint.{os.getpid()}.tmp"
    torch.save(trainer.checkpoint(), tmp)
    os.replace(tmp, folder / "checkpoint.pt")
    side = folder / f".identity.{os.getpid()}.tmp"
    side.write_text(json.dumps({"epoch": trainer.epoch, "identity": ident}))
    os.replace(side, folder / "identity.json")


def resumable_trainer(data: HeadData, cfg: TrainConfig, run_dir: Path, overwrite: bool) -> Trainer:
    """A fresh trainer, or one continued from ``run_dir``'s checkpoint when it holds the same run.

    A checkpoint of another config is refused, naming the settings that differ, unless ``overwrite``
    (then it is dropped and the run starts over).
    """
    folder, ident = resume_dir(run_dir), identity(cfg, data)
    trainer = Trainer(data, cfg)
    ckpt, side = folder / "checkpoint.pt", folder / "identity.json"
    if not (ckpt.exists() and side.exists()):
        return trainer
    stored = json.loads(side.read_text())
    if stored["identity"] != ident:
        if not overwrite:
            diff = "; ".join(differences(stored["identity"], ident)) or "the resolved config"
            raise OptionError(f"{run_dir} holds an unfinished run of another config ({diff}); rerun with its "
                              f"settings to resume it, or add --overwrite to start over")
        return trainer
    trainer.restore(torch.load(ckpt, map_location="cpu", weights_only=False))
    return trainer


def checkpointer(run_dir: Path, cfg: TrainConfig, data: HeadData):
    """``on_epoch`` for ``fit``: a checkpoint after epoch 1 and then at most every ``EVERY`` seconds."""
    folder, ident, last = resume_dir(run_dir), identity(cfg, data), [0.0]

    def on_epoch(trainer: Trainer, report) -> None:
        now = time.monotonic()
        if trainer.epoch < trainer.cfg.epochs and (not last[0] or now - last[0] >= EVERY):
            _save(trainer, folder, ident)
            last[0] = now
    return on_epoch


def drop(run_dir: Path) -> None:
    """The run is in place: its checkpoint is no longer needed."""
    folder = resume_dir(run_dir)
    for name in ("checkpoint.pt", "identity.json"):
        (folder / name).unlink(missing_ok=True)
    for stale in [*folder.glob(".checkpoint.*.tmp"), *folder.glob(".identity.*.tmp")]:
        stale.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
