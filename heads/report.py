"""Paper-style tables from run results: per modality accuracy and |δ_m|, multimodal accuracy, EDM."""
from __future__ import annotations

import statistics
from collections import defaultdict


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def results_table(results: list[dict], modalities: list[str], split: str = "test") -> str:
    """A Markdown table, one row per method (mean ± std over its seeds), in first-seen order.

    ``results`` are ``results.json`` dicts of runs. Columns follow the EDM paper's Table I: each
    modality's accuracy with its |δ_m| beside it, then multimodal accuracy, macro-F1 and EDM.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r.get("label", r["method"])].append(r[split])
    head = ["method", "seeds"] + [c for m in modalities for c in (f"acc {m}", f"|δ {m}|")] + ["acc multi", "macro-F1", "EDM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in groups.items():
        cells = [name, str(len(rows))]
        for m in modalities:
            cells.append(_fmt([r[f"acc_{m}"] for r in rows]))
            cells.append(_fmt([abs(r[f"delta_{m}"]) for r in rows]))
        cells += [_fmt([r["acc"] for r in rows]), _fmt([r["f1"] for r in rows]), _fmt([r["edm"] for r in rows])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
