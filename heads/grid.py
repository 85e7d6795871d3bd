"""Grids: every config of one method over seeds, selected on validation.

This file is the grid's own logic: which values an axis takes (``--tau 0.0:0.9:0.1``), the runs a grid
expands to, and selection among them. The runs are trained by the sweep runner (``heads/sweep.py``:
worker processes, pruning, resume) or, on a GPU and for a stackable method, together as batched
tensors (``heads/stacked.py``).

Selection never reads test: the selected config is the argmax of the mean over seeds of the
best-epoch validation accuracy among configs that trained all their epochs; its test accuracy is
reported as mean ± std over the seeds.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import statistics
import time
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

from heads.core import OptionError, TrainConfig, build_model, method_class, resolve_options
from heads.data import HeadData
from heads.sweep import RunSpec, identity, run_sweep
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
             yes: bool = False, keep_models: bool = False, stack: str = "auto") -> GridOutcome:
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
        records = run_sweep(data, expand(method, axes, base, seeds), folder, workers, prune, progress, stack=stack)
    else:
        records = _run_staged(data, method, axes, seeds, base, folder, prune, workers, progress, stack)
    selection = select(records if protocol == "joint" else [r for r in records if r["stage"] == 2])
    seconds = time.perf_counter() - start
    from heads import plots
    from heads.report import grid_markdown

    write_table(grid_rows(records, data.spec.modalities, selection.config), folder / "grid")
    configs = summarize(records)
    info = {"method": method, "protocol": protocol, "prune": prune, "seeds": seeds, "axes": axes,
            "base": identity(replace(base, method=method), data), "runs": [r["run"] for r in records],
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


def _run_staged(data, method, axes, seeds, base, folder, prune, workers, progress, stack="auto") -> list[dict]:
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
    stage1 = run_sweep(data, expand(method, first, base, seeds, list(CCAT_STAGES)), folder, workers, prune, progress,
                       stack=stack)
    best_rank = select(stage1).values["rank"]
    second = {**fixed, "rank": [best_rank], "beta": values["beta"]}
    stage2 = run_sweep(data, expand(method, second, base, seeds, list(CCAT_STAGES)), folder, workers, prune, progress,
                       stack=stack)
    for stage, recs in ((1, stage1), (2, stage2)):
        records += [{**r, "stage": stage} for r in recs]
    return records
