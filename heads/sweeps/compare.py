"""``compare``: several method specs over several seeds through the sweep runner, and their table; with
a paper's name, the rows of that paper's main table that this tool implements, its numbers beside ours.
"""
from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

from heads.blocks.data import HeadData
from heads.errors import OptionError
from heads.methods import METHODS
from heads.reports import papers
from heads.reports.tables import paper_report, results_table
from heads.sweeps.jobs import RunSpec
from heads.sweeps.specs import parse_method_spec
from heads.sweeps.sweep import run_sweep
from heads.sweeps.tracking import SweepLog
from heads.train.config import TrainConfig


def compare(data: HeadData, specs: list[str], seeds: list[int], base: TrainConfig, out: Path,
            progress: bool = True, workers: int = 0, track: SweepLog | None = None) -> tuple[str, list[dict]]:
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
    results = run_sweep(data, runs, out, workers, progress=progress, label="compare", track=track)
    table = results_table(results, data.spec.modalities)
    (out / "table.md").write_text(table)
    with open(out / "results.csv", "w", newline="") as f:
        rows = [{"label": r["label"], "method": r["method"], "seed": r["seed"], "best_epoch": r["best_epoch"],
                 "seconds": round(r["seconds"], 3), **{k: v for k, v in r["test"].items() if k != "v"}} for r in results]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table, results


def paper_table(paper: str) -> tuple[dict, str]:
    """``--paper``'s table, and the first of its methods this tool implements (the base config's method)."""
    printed = papers.paper_table(paper)
    first = next((row["ours"] for row in printed["rows"] if row["ours"] in METHODS), None)
    if first is None:
        raise OptionError(f"none of the methods of the {paper} table is registered yet")
    return printed, first


def compare_paper(data: HeadData, paper: str, printed: dict, seeds: list[int], base: TrainConfig, out: Path,
                  summary: str, progress: bool = True, workers: int = 0, echo=print, track: SweepLog | None = None) -> str:
    """The rows of ``paper``'s table that we implement, each with its paper's settings, and the paper's
    number for the cache's dataset beside ours. ``echo`` shows the plan before training starts; the
    report (returned) is also written to ``out/paper.md``."""
    columns = papers.match_columns(printed, data.meta["dataset"], data.meta["backbones"])
    rows = papers.plan(printed, METHODS, columns)
    head = papers.plan_lines(paper, printed, rows)
    echo(head)
    specs = list(dict.fromkeys(r.spec for r in rows if r.spec))
    _, results = compare(data, specs, seeds, base, out, progress=progress, workers=workers, track=track)
    body = f"{summary}\n{paper_report(printed, rows, columns, results, data)}"
    (out / "paper.md").write_text(f"{head}\n{body}\n")
    return body
