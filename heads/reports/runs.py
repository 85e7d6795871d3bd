"""``runs``: every finished run under some folders as one table (a polars frame) — single runs and the
runs inside compares, grids and robustness sweeps alike — to filter, group over seeds and save.

Read from the files the runs wrote (``config.json``, ``results.json``, ``epochs.csv``), nothing else:
a run is finished when all three are there and readable. A folder that looks like a run (it holds
one of them, or ``model.pt``) but is not whole is listed as damaged with the reason, and the scan
goes on. Hidden folders (a sweep's ``.checkpoints``, runs being written) and the trackers' folders
(``tensorboard``, ``mlruns``, ``wandb``) are not entered.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from heads.errors import OptionError

RUN_FILES = ("config.json", "results.json", "epochs.csv")
NOT_RUNS = {"tensorboard", "mlruns", "wandb"}
SETTINGS = ("lr", "batch_size", "optimizer", "weight_decay", "schedule", "hidden", "standardize", "missing_train",
            "missing_test")
# The columns printed without --group-by (the frame and --out keep every column).
SHOWN = ("run", "label", "dataset", "seed", "best_epoch", "val_acc", "test_acc", "test_f1", "test_edm", "seconds")


def _looks_like_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES + ("model.pt",))


def find_runs(paths: list[Path]) -> list[Path]:
    """Folders that look like runs: each path itself, or the folders under it at any depth."""
    found = []
    for top in paths:
        if not Path(top).is_dir():
            raise OptionError(f"no folder {top}")
        stack = [Path(top)]
        while stack:
            path = stack.pop()
            if _looks_like_run(path):
                found.append(path)
                continue
            stack += sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                             and p.name not in NOT_RUNS), reverse=True)
    return found


def _options_text(options: dict) -> str:
    """A method's resolved options as one cell, ``key=value;…`` (``;``, since ``--where`` splits at ``,``)."""
    return ";".join(f"{k}={('true' if v else 'false') if isinstance(v, bool) else v}" for k, v in options.items())


def _sweep(run: Path, record: dict) -> tuple[str, str]:
    """The sweep a run belongs to (its parent folder, when a sweep wrote it) and the sweep's kind."""
    if "run" not in record:  # close_run names every sweep's run; a single run has no such key
        return "", "run"
    parent = run.parent
    kind = "grid" if (parent / "grid.json").exists() else "robustness" if (parent / "robustness.json").exists() else "compare"
    return parent.name, kind


def run_row(run: Path) -> dict:
    """One finished run as a row; raises ``ValueError`` with the reason when the folder is not whole."""
    missing = [name for name in RUN_FILES if not (run / name).is_file()]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    try:
        config = json.loads((run / "config.json").read_text())
        record = json.loads((run / "results.json").read_text())
        train, data, modalities = config["train"], config["data"], config["spec"]["modalities"]
        sweep, kind = _sweep(run, record)
        row = {"run": str(run), "sweep": sweep, "kind": kind, "label": str(record.get("label", record["method"])),
               "method": record["method"], "options": _options_text(train.get("options", {})),
               "caches": ",".join(map(str, data.get("caches", []))), "dataset": data.get("dataset"),
               "backbone": ",".join(str(b) for b in data.get("backbones", [])), "seed": int(record["seed"]),
               "device": record.get("device"), "precision": record.get("precision"), "epochs": train["epochs"],
               "epochs_run": record["epochs_run"], "best_epoch": record["best_epoch"],
               "stopped_at": record.get("stopped_at")}
        row.update({k: train.get(k) for k in SETTINGS})
        for split in ("val", "test"):
            report = record[split]
            row.update({f"{split}_{k}": float(report[k]) for k in ("acc", "f1", "edm")})
            row.update({f"{split}_acc_{m}": float(report[f"acc_{m}"]) for m in modalities})
        row["seconds"] = float(record["seconds"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from None
    return row


def scan(paths: list[Path]):
    """``(frame, damaged)``: every finished run under ``paths`` as a polars frame (sorted by folder;
    a run's modalities add their own ``*_acc_<m>`` columns, null elsewhere) and ``[(folder, reason)]``."""
    import polars as pl

    rows, damaged = [], []
    for run in find_runs(paths):
        try:
            rows.append(run_row(run))
        except ValueError as err:
            damaged.append((run, str(err)))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    rows.sort(key=lambda r: r["run"])
    frame = pl.DataFrame([{c: r.get(c) for c in columns} for r in rows], infer_schema_length=None)
    return frame, damaged


def where(frame, text: str | None):
    """Rows whose columns equal the given values: ``method=edm,dataset=cremad`` (compared as text)."""
    import polars as pl

    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"--where takes column=value pairs separated by ',', got {item!r}")
        if key not in frame.columns:
            raise OptionError(f"--where: no column {key!r}; columns: {', '.join(frame.columns)}")
        frame = frame.filter(pl.col(key).cast(pl.String) == value.strip())
    return frame


def metric_columns(frame) -> list[str]:
    return [c for c in frame.columns if c.startswith(("val_", "test_")) or c in ("seconds", "best_epoch")]


def group(frame, by: str):
    """Mean and std (sample std, 0 for one run) of every metric over the runs of each group, in the
    order groups first appear; ``seeds`` counts the runs of a group."""
    import polars as pl

    keys = [k.strip() for k in by.split(",") if k.strip()]
    unknown = [k for k in keys if k not in frame.columns]
    if not keys or unknown:
        raise OptionError(f"--group-by: no column {', '.join(unknown) or repr(by)}; columns: {', '.join(frame.columns)}")
    groups: dict[tuple, list[dict]] = {}
    for row in frame.iter_rows(named=True):
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for values, members in groups.items():
        row = {**dict(zip(keys, values)), "seeds": len(members)}
        for column in metric_columns(frame):
            numbers = [r[column] for r in members if r[column] is not None]
            row[column] = statistics.mean(numbers) if numbers else None
            row[f"{column}_std"] = (statistics.stdev(numbers) if len(numbers) > 1 else 0.0) if numbers else None
        out.append(row)
    return pl.DataFrame(out, infer_schema_length=None)


def _cell(value, std=None, seeds: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f} ± {std:.2f}" if std is not None and seeds > 1 else f"{value:.2f}"
    return str(value)


def markdown(frame, grouped: bool = False) -> str:
    """The table to print: without grouping ``SHOWN``; grouped, the keys, ``seeds`` and ``mean ± std``
    of each metric (two decimals, as the compare table writes them)."""
    if grouped:
        metrics = metric_columns(frame.select([c for c in frame.columns if not c.endswith("_std")]))
        keys = frame.columns[:frame.columns.index("seeds") + 1]
        head = keys + metrics
        body = [[_cell(r[k]) for k in keys] + [_cell(r[m], r[f"{m}_std"], r["seeds"]) for m in metrics]
                for r in frame.iter_rows(named=True)]
    else:
        head = [c for c in SHOWN if c in frame.columns]
        body = [[_cell(r[c]) for c in head] for r in frame.iter_rows(named=True)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def write_frame(frame, out: Path, grouped: bool = False) -> Path:
    """``.parquet`` / ``.csv`` (every column) or ``.md`` (the printed table), whole or not at all."""
    out = Path(out)
    writers = {".parquet": frame.write_parquet, ".csv": frame.write_csv,
               ".md": lambda p: Path(p).write_text(markdown(frame, grouped))}
    if out.suffix not in writers:
        raise OptionError(f"--out must end in .parquet, .csv or .md, got {out.name!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writers[out.suffix](tmp)
    os.replace(tmp, out)
    return out
