"""Paper-style tables from run results: per modality accuracy and |δ_m|, multimodal accuracy, EDM."""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def results_table(results: list[dict], modalities: list[str], split: str = "test") -> str:
    """A Markdown table, one row per method (mean ± std over its seeds), in first-seen order.

    ``results`` are ``results.json`` dicts of runs. Columns follow the EDM paper's Table I: each
    modality's accuracy with its |δ_m| beside it, then multimodal accuracy, macro-F1 and EDM; the
    last column says how the row was trained (optimizer, rate, schedule, batch, standardisation).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r.get("label", r["method"])].append(r[split])
    trained = {r.get("label", r["method"]): r.get("training", "") for r in results}
    head = ["method", "seeds"] + [c for m in modalities for c in (f"acc {m}", f"|δ {m}|")] + ["acc multi", "macro-F1", "EDM"]
    show_training = any(trained.values())
    if show_training:
        head.append("trained with")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in groups.items():
        cells = [name, str(len(rows))]
        for m in modalities:
            cells.append(_fmt([r[f"acc_{m}"] for r in rows]))
            cells.append(_fmt([abs(r[f"delta_{m}"]) for r in rows]))
        cells += [_fmt([r["acc"] for r in rows]), _fmt([r["f1"] for r in rows]), _fmt([r["edm"] for r in rows])]
        if show_training:
            cells.append(trained[name])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- sweeps and the `report` command -----------------------------------------------------------
def _pm(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} ± {std:.2f}"


def grid_markdown(info: dict, summary: list[dict]) -> str:
    """The grid as the papers report a hyper-parameter study: one row per config, selection on validation.

    ``info`` is ``grid.json``; ``summary`` the per-config rows of ``heads.grid.summarize``.
    """
    sel = info["selected"]
    lines = [f"Grid of `{info['method']}` · protocol {info['protocol']} · seeds {', '.join(map(str, info['seeds']))}"
             f"{' · pruned by successive halving' if info['prune'] else ''}", "",
             f"**Selected on validation: `{sel['config']}`** · validation {_pm(sel['val_mean'], sel['val_std'], sel['seeds'])}"
             f" · test {_pm(sel['test_mean'], sel['test_std'], sel['seeds'])} ({sel['seeds']} seed(s))", ""]
    if sel.get("tied"):
        from heads.grid import TIE_RULE

        lines += [f"Tied on validation accuracy: {', '.join(f'`{c}`' for c in sel['tied'])}; broken by the rule: {TIE_RULE}.", ""]
    for stage in sorted({r.get("stage") or 0 for r in summary}):
        rows = [r for r in summary if (r.get("stage") or 0) == stage]
        axes = list(rows[0]["values"])
        if stage:
            lines += [f"Stage {stage}", ""]
        head = axes + ["seeds", "val acc", "test acc", "test EDM", "stopped at"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            mark = " ◀" if r["config"] == sel["config"] else ""
            cells = [str(r["values"][a]) for a in axes] + [
                str(r["seeds"]), _pm(r["val_acc"], r["val_acc_std"], r["seeds"]) + mark,
                _pm(r["test_acc"], r["test_acc_std"], r["seeds"]), _pm(r["test_edm"], r["test_edm_std"], r["seeds"]),
                "-" if r["stopped_at"] is None else f"epoch {r['stopped_at']}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def robustness_markdown(summary: list[dict]) -> str:
    """The papers' robustness tables: test accuracy (mean ± std) per method (rows) and missing rate (columns)."""
    titles = {"mla": "Missing in train, validation and test (MLA protocol)",
              "test-only": "Missing at test only (EDM paper, Table VI)"}
    lines = []
    for protocol in dict.fromkeys(r["protocol"] for r in summary):
        rows = [r for r in summary if r["protocol"] == protocol]
        rates = sorted({r["rate"] for r in rows})
        cell = {(r["method"], r["rate"]): _pm(r["test_acc"], r["test_acc_std"], r["seeds"]) for r in rows}
        head = ["method"] + [f"η = {100 * rate:g}%" for rate in rates]
        lines += [f"{titles.get(protocol, protocol)} · test accuracy (%)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in dict.fromkeys(r["method"] for r in rows):
            lines.append("| " + " | ".join([method] + [cell.get((method, rate), "-") for rate in rates]) + " |")
        realised = {r["rate"]: r.get("missing_realised") for r in rows if r.get("missing_realised") is not None}
        if realised:
            lines.append("| realised missing (test, per modality) | " + " | ".join(
                realised[rate] if rate in realised else "-" for rate in rates) + " |")
        lines.append("")
    return "\n".join(lines)


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
    import csv

    with open(run / "epochs.csv", newline="") as f:
        return list(csv.DictReader(f))


def _modalities(run: Path) -> list[str]:
    import json

    return json.loads((run / "config.json").read_text())["spec"]["modalities"]


def _by_label(runs: list[Path]) -> dict[str, list[Path]]:
    import json

    groups: dict[str, list[Path]] = defaultdict(list)
    for run in runs:
        record = json.loads((run / "results.json").read_text())
        groups[record.get("label", record["method"])].append(run)
    return groups


def folder_report(path: Path, out: Path, prefix: str) -> str:
    """One folder's Markdown section; its figures are written into ``out`` as ``<prefix>-*.png``."""
    import json

    from heads import plots

    kind = folder_kind(path)
    section = [f"## {path.name} ({kind})", ""]
    if kind == "grid":
        info = json.loads((path / "grid.json").read_text())
        section.append(grid_markdown(info, info["summary"]))
        curve = plots.grid_curves(info["summary"], info["selected"]["config"], out / f"{prefix}-grid.png",
                                  f"{info['method']} grid")
        section += [f"![grid curve]({curve.name})", ""]
        runs = [path / name for name in dict.fromkeys(info["runs"]) if name.startswith(info["selected"]["config"] + "-seed")]
        title = f"selected {info['selected']['config']}"
    elif kind == "robustness":
        info = json.loads((path / "robustness.json").read_text())
        section.append(robustness_markdown(info["summary"]))
        curve = plots.robustness_curves(info["summary"], out / f"{prefix}-robustness.png", info.get("dataset") or "")
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
    figure = plots.epoch_curves(groups, modalities, out / f"{prefix}-epochs.png", title)
    section += [f"![per-epoch validation accuracy, EDM, φ and order]({figure.name})", ""]
    return "\n".join(section)


def write_report(paths: list[Path], out: Path | None = None, overwrite: bool = False) -> list[Path]:
    """``report.md`` with the paper-style tables and PNG figures: one per folder, or one for all in ``out``.

    Every folder is checked before anything is written. ``out`` is a folder: an existing file there,
    or a ``report.md`` already in it, is replaced only with ``overwrite`` (a report written into a
    sweep's own folder, without ``out``, is derived from it and simply regenerated).
    """
    from heads.core import OptionError

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
