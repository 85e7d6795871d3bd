"""The ``report`` command's work: what kind of folder a path is (a run, a compare, a grid, a robustness
sweep), and its Markdown section and figures, read from the files the commands wrote.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from heads.errors import OptionError
from heads.reports import figures
from heads.reports.tables import grid_markdown, results_table, robustness_markdown


def folder_kind(path: Path) -> str:
    """``grid``, ``robustness``, ``compare`` or ``run``, from the files the commands write."""
    if not path.is_dir():
        raise FileNotFoundError(f"no folder {path}")
    if (path / "grid.json").exists():
        return "grid"
    if (path / "robustness.json").exists():
        return "robustness"
    if (path / "results.json").exists() and (path / "epochs.csv").exists():
        return "run"
    if any((p / "results.json").exists() for p in path.iterdir() if p.is_dir()):
        return "compare"
    raise FileNotFoundError(f"{path} is not a run, compare, grid or robustness folder (no results.json, grid.json or robustness.json)")


def _epochs(run: Path) -> list[dict]:
    with open(run / "epochs.csv", newline="") as f:
        return list(csv.DictReader(f))


def _modalities(run: Path) -> list[str]:
    return json.loads((run / "config.json").read_text())["spec"]["modalities"]


def _by_label(runs: list[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for run in runs:
        record = json.loads((run / "results.json").read_text())
        groups[record.get("label", record["method"])].append(run)
    return groups


def folder_report(path: Path, out: Path, prefix: str) -> str:
    """One folder's Markdown section; its figures are written into ``out`` as ``<prefix>-*.png``."""
    kind = folder_kind(path)
    section = [f"## {path.name} ({kind})", ""]
    if kind == "grid":
        info = json.loads((path / "grid.json").read_text())
        section.append(grid_markdown(info, info["summary"]))
        curve = figures.grid_curves(info["summary"], info["selected"]["config"], out / f"{prefix}-grid.png",
                                  f"{info['method']} grid")
        section += [f"![grid curve]({curve.name})", ""]
        runs = [path / name for name in dict.fromkeys(info["runs"]) if name.startswith(info["selected"]["config"] + "-seed")]
        title = f"selected {info['selected']['config']}"
    elif kind == "robustness":
        info = json.loads((path / "robustness.json").read_text())
        section.append(robustness_markdown(info["summary"]))
        curve = figures.robustness_curves(info["summary"], out / f"{prefix}-robustness.png", info.get("dataset") or "")
        section += [f"![robustness]({curve.name})", ""]
        return "\n".join(section)
    elif kind == "compare":
        runs = sorted(p for p in path.iterdir() if (p / "results.json").exists() and (p / "epochs.csv").exists())
        title = path.name
    else:
        runs, title = [path], path.name
    modalities = _modalities(runs[0])
    records = [json.loads((run / "results.json").read_text()) for run in runs]
    if kind != "grid":
        section += ["Test split (mean ± std over seeds), selection on validation:", "", results_table(records, modalities)]
    groups = {label: [_epochs(run) for run in members] for label, members in _by_label(runs).items()}
    figure = figures.epoch_curves(groups, modalities, out / f"{prefix}-epochs.png", title)
    section += [f"![per-epoch validation accuracy, EDM, φ and order]({figure.name})", ""]
    return "\n".join(section)


def write_report(paths: list[Path], out: Path | None = None, overwrite: bool = False) -> list[Path]:
    """``report.md`` with the paper-style tables and PNG figures: one per folder, or one for all in ``out``.

    Every folder is checked before anything is written. ``out`` is a folder: an existing file there,
    or a ``report.md`` already in it, is replaced only with ``overwrite`` (a report written into a
    sweep's own folder, without ``out``, is derived from it and simply regenerated).
    """
    for path in paths:
        folder_kind(path)
    written = []
    if out is not None:
        if out.exists() and not out.is_dir():
            if not overwrite:
                raise OptionError(f"--out {out} is an existing file; add --overwrite to replace it with the report folder")
            out.unlink()
        elif (out / "report.md").exists() and not overwrite:
            raise OptionError(f"{out / 'report.md'} exists; add --overwrite to replace it, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        sections = [folder_report(p, out, p.name) for p in paths]
        (out / "report.md").write_text("# Report\n\n" + "\n".join(sections))
        written.append(out / "report.md")
    else:
        for p in paths:
            (p / "report.md").write_text(f"# Report: {p.name}\n\n" + folder_report(p, p, "report"))
            written.append(p / "report.md")
    return written
