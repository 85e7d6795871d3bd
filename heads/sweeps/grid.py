"""Grids: every config of one method over seeds, selected on validation, and the grid's own files.

The axes and the runs they expand to are ``heads/sweeps/axes.py``; selection and its tie rule are
here; the runs are trained by the sweep runner (``heads/sweeps/sweep.py``:
worker processes, pruning, resume) or, on a GPU and for a stackable method, together as batched
tensors (``heads/sweeps/stacked.py``). This file runs a grid (joint, or CCAT's staged protocol) and
writes ``grid.json``, ``grid.parquet``/``.csv``, ``grid.md`` and ``grid.png``.

Selection never reads test: the selected config is the argmax of the mean over seeds of the
best-epoch validation accuracy among configs that trained all their epochs; its test accuracy is
reported as mean ± std over the seeds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from heads.blocks.data import HeadData
from heads.errors import OptionError
from heads.reports import figures
from heads.reports.tables import grid_markdown
from heads.sweeps.axes import CCAT_DEFAULTS, CCAT_STAGES, axis_kinds, check_size, expand, validate_axes
from heads.sweeps.backends import LOCAL, Backend
from heads.sweeps.jobs import identity
from heads.sweeps.sweep import run_sweep
from heads.sweeps.tracking import SweepLog
from heads.train.config import TrainConfig, flag
from heads.train.options import resolve_options


# --- selection, on validation only ----------------------------------------------------------------
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


# Small validation splits tie often; what decides then (``select``), written into grid.json for the reports.
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


# --- the grid and its files -----------------------------------------------------------------------
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
             yes: bool = False, keep_models: bool = False, stack: str = "auto", overwrite: bool = False,
             track: SweepLog | None = None, backend: Backend = LOCAL) -> GridOutcome:
    """Run the grid (joint: the full product; ``ccat``: rank first, then β at the best rank), select on
    validation, and write ``grid.json``, ``grid.parquet``/``grid.csv``, ``grid.md`` and ``grid.png``.

    ``yes`` confirms a grid of more than ``CONFIRM_RUNS`` runs. Only the selected config's runs keep
    their ``model.pt`` unless ``keep_models`` (a model is as large as its projections: 291 MB per run
    for the CCAT protocol on Ola-7B features); the other runs keep everything else, and resuming
    recognises a finished run by its ``results.json`` and ``config.json``, not by its model.
    ``backend``: where the runs train (``heads/sweeps/backends.py``; the same runs and numbers).
    """
    start = time.perf_counter()
    if protocol not in ("joint", "ccat"):
        raise OptionError(f"--protocol must be joint or ccat, got {protocol!r}")
    check_size(axes, seeds, protocol, yes)
    if protocol == "joint":
        validate_axes(method, axes, base, data)
        records = run_sweep(data, expand(method, axes, base, seeds), folder, workers, prune, progress, stack=stack,
                            overwrite=overwrite, track=track, backend=backend)
    else:
        records = _run_staged(data, method, axes, seeds, base, folder, prune, workers, progress, stack, overwrite, track,
                              backend)
    selection = select(records if protocol == "joint" else [r for r in records if r["stage"] == 2])
    seconds = time.perf_counter() - start
    write_table(grid_rows(records, data.spec.modalities, selection.config), folder / "grid")
    configs = summarize(records)
    info = {"method": method, "protocol": protocol, "prune": prune, "seeds": seeds, "axes": axes, "tie_rule": TIE_RULE,
            "base": identity(replace(base, method=method), data), "runs": [r["run"] for r in records],
            "selected": dataclasses.asdict(selection), "summary": configs, "wall_seconds": seconds,
            "run_seconds": sum(r["seconds"] for r in records), "epochs_trained": sum(r["epochs_run"] for r in records)}
    (folder / "grid.json").write_text(json.dumps(info, indent=2))
    (folder / "grid.md").write_text(grid_markdown(info, configs))
    figures.grid_curves(configs, selection.config, folder / "grid.png", f"{method} grid")
    if not keep_models:
        for r in records:
            if r["label"] != selection.config:
                (folder / r["run"] / "model.pt").unlink(missing_ok=True)
    return GridOutcome(records, selection, folder, seconds)


def _run_staged(data, method, axes, seeds, base, folder, prune, workers, progress, stack="auto",
                overwrite=False, track=None, backend=LOCAL) -> list[dict]:
    """CCAT's protocol: sweep ``rank`` with β fixed, then ``beta`` at the rank validation picked."""
    if not set(CCAT_STAGES) <= set(axis_kinds(method)):
        raise OptionError(f"--protocol ccat tunes --rank then --beta, which method {method!r} does not have; use --method ccat")
    others = [k for k, v in axes.items() if len(v) > 1 and k not in CCAT_STAGES]
    if others:
        raise OptionError(f"--protocol ccat sweeps only --rank then --beta; give {', '.join(map(flag, others))} one value")
    values = {k: axes.get(k, CCAT_DEFAULTS[k]) for k in CCAT_STAGES}
    fixed = {k: v for k, v in axes.items() if k not in CCAT_STAGES}
    beta_default = resolve_options(method, {})["beta"] if len(values["beta"]) > 1 else values["beta"][0]
    records = []
    first = {**fixed, "rank": values["rank"], "beta": [beta_default]}
    stage1 = run_sweep(data, expand(method, first, base, seeds, list(CCAT_STAGES)), folder, workers, prune, progress,
                       stack=stack, overwrite=overwrite, track=track, backend=backend)
    best_rank = select(stage1).values["rank"]
    second = {**fixed, "rank": [best_rank], "beta": values["beta"]}
    stage2 = run_sweep(data, expand(method, second, base, seeds, list(CCAT_STAGES)), folder, workers, prune, progress,
                       stack=stack, overwrite=overwrite, track=track, backend=backend)
    for stage, recs in ((1, stage1), (2, stage2)):
        records += [{**r, "stage": stage} for r in recs]
    return records
