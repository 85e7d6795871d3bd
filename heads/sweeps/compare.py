"""``compare``: several method specs over several seeds through the sweep runner, and their table; with
a paper's name, the rows of that paper's main table that this tool implements, its numbers beside ours.
A row whose paper selected its options on validation (CCAT's r and β) gets them the same way here:
the paper's staged grid, on validation, then the selected setting in the table.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from pathlib import Path

from heads.blocks.data import HeadData
from heads.errors import OptionError
from heads.methods import METHODS
from heads.reports import papers
from heads.reports.convergence import summary_line
from heads.reports.tables import paper_report, results_table, run_groups
from heads.sweeps.backends import LOCAL, Backend
from heads.sweeps.grid import TIE_RULE, run_grid
from heads.sweeps.jobs import RunSpec
from heads.sweeps.specs import parse_method_spec
from heads.sweeps.sweep import run_sweep
from heads.sweeps.tune import compare_tuned, parse_tune
from heads.sweeps.tracking import SweepLog
from heads.train.config import TrainConfig


def compare(data: HeadData, specs: list[str], seeds: list[int], base: TrainConfig, out: Path,
            progress: bool = True, workers: int = 0, overwrite: bool = False,
            track: SweepLog | None = None, backend: Backend = LOCAL) -> tuple[str, list[dict]]:
    """Fit every method spec with every seed; write each run, the results CSV and the table.

    The runs go through the grid's sweep runner: one worker process per core (``workers``; 1 trains
    here), the cache loaded once, and a rerun of the same command skips the runs already finished;
    ``backend`` sends them to a Ray cluster instead (``heads/sweeps/backends.py``).
    """
    runs = []
    for spec in specs:
        name, options = parse_method_spec(spec)
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)
        runs += [RunSpec(f"{slug}-seed{seed}", slug, replace(base, method=name, seed=seed, options=options),
                         {"label": spec}) for seed in seeds]
    results = run_sweep(data, runs, out, workers, progress=progress, label="compare", overwrite=overwrite, track=track,
                        backend=backend)
    return write_outputs(results, data, out), results


def write_outputs(results: list[dict], data: HeadData, out: Path) -> str:
    """``table.md`` (returned) and ``results.csv`` of a comparison's runs, one row per run."""
    table = results_table(results, data.spec.modalities)
    (out / "table.md").write_text(table)
    with open(out / "results.csv", "w", newline="") as f:
        rows = [{"label": r["label"], "method": r["method"], "seed": r["seed"], "best_epoch": r["best_epoch"],
                 "seconds": round(r["seconds"], 3), **{k: v for k, v in r["test"].items() if k != "v"},
                 **{f"conv_{k}": v for k, v in r.get("convergence", {}).items()}} for r in results]
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return table


def compare_tune(data: HeadData, specs: list[str], seeds: list[int], base: TrainConfig, out: Path, tune: str,
                 prune: bool = False, progress: bool = True, workers: int = 0,
                 backend: Backend = LOCAL) -> tuple[str, list[dict], dict]:
    """``compare --tune``: each spec at its best validated setting (``heads/sweeps/tune.py``); the table
    holds the selected settings' runs only, and ``tuned.json`` every spec's grid and selection."""
    results, selections = compare_tuned(data, specs, seeds, base, out, parse_tune(tune), prune, progress, workers, backend)
    (out / "tuned.json").write_text(json.dumps({"tune": tune, "tie_rule": TIE_RULE, "selected": selections}, indent=2))
    return write_outputs(results, data, out), results, selections


def paper_table(paper: str) -> tuple[dict, str]:
    """``--paper``'s table, and the first of its methods this tool implements (the base config's method)."""
    printed = papers.paper_table(paper)
    first = next((row["ours"] for row in printed["rows"] if row["ours"] in METHODS), None)
    if first is None:
        raise OptionError(f"none of the methods of the {paper} table is registered yet")
    return printed, first


def compare_paper(data: HeadData, paper: str, printed: dict, seeds: list[int], base: TrainConfig, out: Path,
                  summary: str, progress: bool = True, workers: int = 0, echo=print, overwrite: bool = False,
                  track: SweepLog | None = None, backend: Backend = LOCAL) -> str:
    """The rows of ``paper``'s table that we implement, each with its paper's settings, and the paper's
    number for the cache's dataset beside ours. ``echo`` shows the plan before training starts; the
    report (returned) is also written to ``out/paper.md``."""
    columns = papers.match_columns(printed, data.meta["dataset"], data.meta["backbones"])
    rows = papers.plan(printed, METHODS, columns, data.spec.modalities)
    head = papers.plan_lines(paper, printed, rows)
    echo(head)
    selected = []
    for i, row in enumerate(rows):
        if row.spec and row.row.get("select_by"):
            rows[i], line = select_staged(data, row, seeds, base, out, progress, workers, backend)
            selected.append(line)
            echo(line)
    specs = list(dict.fromkeys(r.spec for r in rows if r.spec))
    _, results = compare(data, specs, seeds, base, out, progress=progress, workers=workers, overwrite=overwrite, track=track,
                         backend=backend)
    body = "\n".join([f"{summary}\n{paper_report(printed, rows, columns, results, data)}".rstrip(), *selected])
    line = summary_line(run_groups(results))
    body += f"\n{line}" if line else ""
    (out / "paper.md").write_text(f"{head}\n{body}\n")
    return body


def select_staged(data: HeadData, row: papers.PaperRow, seeds: list[int], base: TrainConfig, out: Path,
                  progress: bool = True, workers: int = 0, backend: Backend = LOCAL) -> tuple[papers.PaperRow, str]:
    """A row whose paper selected its options on validation (``select_by``: CCAT's r, then β): run that
    staged grid into ``out/grid-<method>`` and return the row with the selected options, and one line
    saying what was selected and which fraction of training samples the secondary update touched."""
    method = row.row["ours"]
    grid = run_grid(data, method, {}, seeds, replace(base, method=method), out / f"grid-{method}", protocol=row.row["select_by"],
                    workers=workers, progress=progress, yes=True, backend=backend)
    values = grid.selection.values
    chosen = replace(row, spec=f"{method}[{';'.join(f'{k}={v}' for k, v in values.items())}]")
    runs = [r["run"] for r in grid.records if r.get("stage") == 2 and r["label"] == grid.selection.config]
    share = secondary_share(out / f"grid-{method}", runs, data.spec.modalities)
    touched = (", ".join(f"{m} {100 * v:.1f}%" for m, v in share.items()) + " of the training samples per stage-2 epoch"
               if share else "no stage-2 epoch ran")
    picked = ", ".join(f"{'r' if k == 'rank' else 'β' if k == 'beta' else k} = {v:g}" for k, v in values.items())
    line = (f"{method}: selected on validation by the paper's staged grid (rank, then β): {picked} "
            f"(val {grid.selection.val_mean:.2f}); secondary update touched {touched}")
    return chosen, line


def secondary_share(folder: Path, runs: list[str], modalities: list[str]) -> dict[str, float]:
    """Mean over the runs' stage-2 epochs of ``ccat_secondary_<m>`` (``epochs.csv``); empty when none ran."""
    values: dict[str, list[float]] = {m: [] for m in modalities}
    for run in runs:
        with open(folder / run / "epochs.csv", newline="") as f:
            for row in csv.DictReader(f):
                for m in modalities:
                    if row.get(f"ccat_secondary_{m}") not in (None, ""):
                        values[m].append(float(row[f"ccat_secondary_{m}"]))
    return {m: sum(v) / len(v) for m, v in values.items() if v}
