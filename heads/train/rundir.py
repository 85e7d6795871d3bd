"""A run folder on disk: naming it safely inside ``--out``, putting it in place whole, writing what a
finished run produced (``config.json`` resolved, ``epochs.csv``, ``results.json``, ``table.md``,
``model.pt``) and loading a trained model back from it.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cache import code_version
from heads.blocks.data import DataSpec, HeadData
from heads.blocks.device import resolve_device
from heads.errors import OptionError
from heads.reports.convergence import diagnose
from heads.reports.tables import results_table
from heads.train.config import TrainConfig, build_model
from heads.train.evaluation import Report
from heads.train.options import resolve_options


@dataclass
class FitResult:
    """What a finished run produced: the selected model, its per-epoch rows and its two reports."""

    model: torch.nn.Module
    config: TrainConfig
    epochs: list[dict]
    best_epoch: int
    val: Report
    test: Report
    seconds: float
    epochs_run: int  # fewer than config.epochs when a grid pruned the run
    device: str = "cpu"  # where it trained (the config keeps what was asked, e.g. auto)
    precision: str = "fp32"  # the precision it trained in


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_folder(out: Path, name: str) -> Path:
    """``out/name``, refusing a ``--name`` that is not one folder name inside ``--out``.

    A name is a folder name, not a path: separators, ``.`` and ``..`` are refused outright (so
    ``--name ../../escape`` cannot write outside ``--out``), and the resolved folder must lie in
    the resolved ``--out`` (a symlink inside ``--out`` may not lead out of it either).
    """
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file, not a folder")
    bad = not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
    folder = out / name
    if bad or not folder.resolve().is_relative_to(out.resolve()) or folder.resolve() == out.resolve():
        raise OptionError(f"--name {name!r} must be a plain folder name inside --out (no '/', '\\' or '..')")
    return folder


def write_whole(final: Path, write):
    """``write(folder)`` into a temporary folder beside ``final``, then put it in place whole.

    Used to replace a run (``train-head --overwrite``): the old folder is moved aside and deleted
    only once the new one is complete, so the new run never mixes with the old run's files (an edm
    run's report and figures beside a concat run), and a failure or Ctrl-C while training leaves the
    old run as it was. Returns what ``write`` returns.
    """
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = write(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return result


def run_config(cfg: TrainConfig, data: HeadData, device: str, precision: str) -> dict:
    """What ``config.json`` holds: the resolved training config, the data it read, the code version
    and where it ran. The trackers log the same dict as the run's hyperparameters."""
    train = dataclasses.asdict(cfg)
    train["options"] = resolve_options(cfg.method, cfg.options)
    return {"train": train, "data": data.meta, "spec": dataclasses.asdict(data.spec), "code_version": code_version(),
            "used": {"device": device, "precision": precision}}


def results_record(result: FitResult) -> dict:
    """What ``results.json`` holds: the selected epoch, how it trained, its validation and test reports,
    and its convergence diagnostics (``heads/reports/convergence.py``)."""
    c = result.config
    role = getattr(result.model, "trained_with", str)()  # what the method's options decide that a reader must see (FiLM's condition)
    training = (f"{c.optimizer} lr {c.lr:g} wd {c.weight_decay:g} {c.schedule} batch {c.batch_size} {c.epochs} epoch{'s' if c.epochs != 1 else ''}"
                f"{'' if c.standardize == 'feature' else f' standardize {c.standardize}'}{f' · {role}' if role else ''}")
    return {"method": result.config.method, "seed": result.config.seed, "training": training, "device": result.device,
            "precision": result.precision, "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "seconds": result.seconds, "val": result.val.to_json(), "test": result.test.to_json(),
            "convergence": diagnose(result.epochs, result.best_epoch)}


def write_run(run_dir: Path, result: FitResult, data: HeadData) -> None:
    """``config.json`` (resolved), ``epochs.csv``, ``results.json``, ``table.md``, ``model.pt``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(result.config, data, result.device, result.precision)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    with open(run_dir / "epochs.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in result.epochs for k in r))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result.epochs)
    results = results_record(result)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "table.md").write_text(results_table([results], data.spec.modalities))
    torch.save({"config": config, "state": result.model.state_dict()}, run_dir / "model.pt")


def load_run(run_dir: str | Path, device: str = "cpu"):
    """Rebuild a trained model from a run folder (its config + selected state), on ``device`` (any
    device, whichever the run trained on: the state is saved from the host's view)."""
    saved = torch.load(Path(run_dir) / "model.pt", map_location="cpu", weights_only=False)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved["config"]["train"].items() if k in fields})
    model = build_model(cfg, DataSpec(**saved["config"]["spec"]))
    model.load_state_dict(saved["state"])
    model.precision = saved["config"].get("used", {}).get("precision", "fp32")  # as it was trained and selected
    model.to(resolve_device(device))
    model.eval()
    return model, cfg
