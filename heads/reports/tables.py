"""Paper-style tables from run results: per modality accuracy and |δ_m|, multimodal accuracy, EDM."""
from __future__ import annotations

import statistics
from collections import defaultdict

from heads.reports.convergence import FOOTNOTE, flagged
from heads.reports.papers import cell, column_title, notes


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _grouped(results: list[dict], split: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Each row label's split results (its seeds) in first-seen order, and how the label was trained."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r.get("label", r["method"])].append(r[split])
    return groups, {r.get("label", r["method"]): r.get("training", "") for r in results}


def _metric_columns(modalities: list[str]) -> list[str]:
    return [c for m in modalities for c in (f"acc {m}", f"|δ {m}|")] + ["acc multi", "macro-F1", "EDM"]


def _metric_cells(rows: list[dict], modalities: list[str]) -> list[str]:
    """The cells of ``_metric_columns`` for one label's seeds (mean ± std)."""
    cells = []
    for m in modalities:
        cells.append(_fmt([r[f"acc_{m}"] for r in rows]))
        cells.append(_fmt([abs(r[f"delta_{m}"]) for r in rows]))
    return cells + [_fmt([r["acc"] for r in rows]), _fmt([r["f1"] for r in rows]), _fmt([r["edm"] for r in rows])]


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def run_groups(results: list[dict]) -> dict[str, list[dict]]:
    """Each row label's whole ``results.json`` dicts (its seeds), in first-seen order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r.get("label", r["method"])].append(r)
    return groups


def convergence_notes(marks: dict[str, str]) -> str:
    """The footnotes of the marks used in a table (``heads/reports/convergence.py``), one line each."""
    return "".join(f"\n{FOOTNOTE[mark]}\n" for mark in dict.fromkeys(sorted(marks.values())))


def results_table(results: list[dict], modalities: list[str], split: str = "test") -> str:
    """A Markdown table, one row per method (mean ± std over its seeds), in first-seen order.

    ``results`` are ``results.json`` dicts of runs. Columns follow the EDM paper's Table I: each
    modality's accuracy with its |δ_m| beside it, then multimodal accuracy, macro-F1 and EDM; the
    last column says how the row was trained (optimizer, rate, schedule, batch, standardisation).
    A row whose runs were still improving (↗) or fell away after their best (↘) is marked after its
    name, with a footnote under the table saying what to do.
    """
    groups, trained = _grouped(results, split)
    marks = flagged(run_groups(results))
    show_training = any(trained.values())
    head = ["method", "seeds"] + _metric_columns(modalities) + (["trained with"] if show_training else [])
    rows = [[f"{name} {marks[name]}" if name in marks else name, str(len(runs))] + _metric_cells(runs, modalities)
            + ([trained[name]] if show_training else []) for name, runs in groups.items()]
    return _markdown(head, rows) + convergence_notes(marks)


_PAPER_METRIC = {"acc": ("acc multi", "paper acc"), "f1": ("macro-F1", "paper F1"), "edm": ("EDM", "paper EDM")}


def paper_results_table(results: list[dict], modalities: list[str], table: dict, rows: list, columns: list[dict],
                        split: str = "test") -> str:
    """Our table in the order of a paper's table, with the paper's reported numbers beside ours.

    ``rows`` are ``heads.reports.papers.PaperRow`` (a row that did not run shows why in its seeds cell);
    ``columns`` the paper's columns of the cache's dataset: for each, a "paper acc" column after our
    multimodal accuracy (and "paper EDM" after our EDM where the table reports EDM).
    """
    groups, trained = _grouped(results, split)
    marks = flagged(run_groups(results))
    ours = _metric_columns(modalities)
    head = ["method", f"paper row ({table['table']})", "seeds"]
    for name in ours:
        head.append(name)
        for metric in table["metrics"]:
            if _PAPER_METRIC[metric][0] == name:
                head += [f"{_PAPER_METRIC[metric][1]} · {column_title(c)}" for c in columns]
    head.append("trained with")
    lines = []
    for prow in rows:
        runs = groups.get(prow.spec, [])
        mine = dict(zip(ours, _metric_cells(runs, modalities))) if runs else {}
        name = prow.spec or prow.row["ours"] or "-"
        cells = [f"{name} {marks[prow.spec]}" if prow.spec in marks else name, prow.row["row"], str(len(runs)) if runs else (prow.status or "not run")]
        for name in ours:
            cells.append(mine.get(name, "-"))
            for metric in table["metrics"]:
                if _PAPER_METRIC[metric][0] == name:
                    cells += [cell(prow.row, c, metric) for c in columns]
        cells.append(trained.get(prow.spec, "") or "-")
        lines.append(cells)
    return _markdown(head, lines) + convergence_notes({k: v for k, v in marks.items() if k in groups})


def paper_reference_table(table: dict, rows: list) -> str:
    """A paper's multimodal accuracy (and macro-F1 where it reports it) on each of its datasets, as printed,
    for a cache that is none of them.

    ``rows`` are ``heads.reports.papers.PaperRow``: the "ours" column names the spec that ran, or why none did.
    """
    shown = ["acc"] + (["f1"] if "f1" in table["metrics"] else [])  # the multimodal figures the table reports
    head = ["paper row", "ours"] + [f"{_PAPER_METRIC[m][1]} · {column_title(c)}" for c in table["columns"] for m in shown]
    lines = [[prow.row["row"], prow.spec or f"{prow.row['ours'] or '-'} ({prow.status})"]
             + [cell(prow.row, c, m) for c in table["columns"] for m in shown] for prow in rows]
    return _markdown(head, lines)


def paper_report(table: dict, rows: list, columns: list[dict], results: list[dict], data) -> str:
    """`compare --paper`'s table with the paper's numbers beside ours, what those columns are, and the notes.

    With no column of the cache's dataset (``columns`` empty), the paper's table follows for reference.
    """
    meta = data.meta
    lines = [paper_results_table(results, data.spec.modalities, table, rows, columns).rstrip()]
    if columns:
        lines.append("paper columns: " + "; ".join(column_title(c) + (f" — {c['note']}" if c.get("note") else "")
                                                   for c in columns)
                     + f"; the cache's dataset is {meta['dataset']} (backbones: {', '.join(map(str, meta['backbones']))})")
    else:
        datasets = ", ".join(dict.fromkeys(c["dataset"] for c in table["columns"]))
        lines += [f"no paper column: this cache's dataset {meta['dataset']!r} is none of {table['table']}'s ({datasets}). "
                  "For reference only, the paper's multimodal accuracy on its own datasets, not comparable with the "
                  "rows above:", paper_reference_table(table, rows).rstrip()]
    lines += [f"paper note · {n}" for n in notes(table, columns or table["columns"])]
    if table.get("remark"):
        lines.append(f"paper remark: {table['remark']}")
    return "\n".join(lines)


# --- sweeps and the `report` command -----------------------------------------------------------
def _pm(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} ± {std:.2f}"


def grid_markdown(info: dict, summary: list[dict]) -> str:
    """The grid as the papers report a hyper-parameter study: one row per config, selection on validation.

    ``info`` is ``grid.json``; ``summary`` the per-config rows of ``heads.sweeps.grid.summarize``.
    """
    sel = info["selected"]
    lines = [f"Grid of `{info['method']}` · protocol {info['protocol']} · seeds {', '.join(map(str, info['seeds']))}"
             f"{' · pruned by successive halving' if info['prune'] else ''}", "",
             f"**Selected on validation: `{sel['config']}`** · validation {_pm(sel['val_mean'], sel['val_std'], sel['seeds'])}"
             f" · test {_pm(sel['test_mean'], sel['test_std'], sel['seeds'])} ({sel['seeds']} seed(s))", ""]
    if sel.get("tied"):
        rule = info.get("tie_rule", "the grid's tie rule (grid.json written before the rule was recorded)")
        lines += [f"Tied on validation accuracy: {', '.join(f'`{c}`' for c in sel['tied'])}; broken by the rule: {rule}.", ""]
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
