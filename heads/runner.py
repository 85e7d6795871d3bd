"""Runs made of several fits: method specs like ``edm[order=strong-to-weak]``, comparisons over seeds."""
from __future__ import annotations

import csv
import datetime as _dt
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

from heads.core import OptionError, TrainConfig, resolve_options
from heads.data import HeadData
from heads.grid import MAX_RUNS
from heads.sweep import RunSpec, run_sweep
from heads.report import results_table

_SPEC = re.compile(r"^([a-z][a-z0-9_-]*)(?:\[(.*)\])?$")


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``"edm[tau=0.3,order=fixed]"`` → ``("edm", {"tau": 0.3, "order": "fixed"})`` (validated)."""
    match = _SPEC.match(spec.strip())
    if not match:
        raise OptionError(f"cannot read method spec {spec!r}: use NAME or NAME[key=value,...]")
    name, body = match.group(1), match.group(2)
    given = {}
    for item in filter(None, re.split(r"[;,]", body or "")):
        if "=" not in item:
            raise OptionError(f"method spec {spec!r}: {item!r} is not key=value")
        key, value = item.split("=", 1)
        given[key.strip()] = value.strip()
    resolved = resolve_options(name, given)
    return name, {k: resolved[k.replace("-", "_")] for k in given}


def split_specs(text: str) -> list[str]:
    """Split ``"concat,edm[tau=0.3,order=fixed]"`` at the commas outside brackets."""
    specs, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            specs.append(current)
            current = ""
        else:
            current += ch
    specs.append(current)
    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise OptionError("--methods is empty")
    return specs


def parse_seeds(text: str) -> list[int]:
    """``"3"`` → seeds 0, 1, 2; ``"0,5,9"`` → exactly those."""
    text = text.strip()
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        count = int(text)
    except ValueError:
        raise OptionError(f"--seeds takes a count (3) or a list (0,5,9), got {text!r}") from None
    if count < 1:
        raise OptionError("--seeds N is a count of seeds (3 → 0,1,2) and must be at least 1; "
                          "for one given seed write a list, e.g. --seeds 0,")
    if count > MAX_RUNS:
        raise OptionError(f"--seeds {count:,} is more seeds than the {MAX_RUNS:,} runs a sweep may have")
    return list(range(count))


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_folder(out: Path, name: str) -> Path:
    """``out/name``, refusing a ``--name`` that is not one folder name inside ``--out``.

    A name is a folder name, not a path: separators, ``.`` and ``..`` are refused outright (so
    ``--name ../../escape`` cannot write outside ``--out``), and the resolved folder must lie in
    the resolved ``--out`` (a symlink inside ``--out`` may not lead out of it either).
    """
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


def compare(data: HeadData, specs: list[str], seeds: list[int], base: TrainConfig, out: Path,
            progress: bool = True, workers: int = 0) -> tuple[str, list[dict]]:
    """Fit every method spec with every seed; write each run, the results CSV and the table.

    The runs go through the grid's sweep runner: one worker process per core (``workers``; 1 trains
    here), the cache loaded once, and a rerun of the same command skips the runs already finished.
    """
    runs = []
    for spec in specs:
        name, options = parse_method_spec(spec)
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)
        runs += [RunSpec(f"{slug}-seed{seed}", slug, replace(base, method=name, seed=seed, options=options),
                         {"label": spec}) for seed in seeds]
    results = run_sweep(data, runs, out, workers, progress=progress, label="compare")
    table = results_table(results, data.spec.modalities)
    (out / "table.md").write_text(table)
    with open(out / "results.csv", "w", newline="") as f:
        rows = [{"label": r["label"], "method": r["method"], "seed": r["seed"], "best_epoch": r["best_epoch"],
                 "seconds": round(r["seconds"], 3), **{k: v for k, v in r["test"].items() if k != "v"}} for r in results]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table, results
