"""How far our orderings of the papers' methods agree with the papers' own, from `compare --paper` folders.

    .venv/bin/python benchmarks/paper_orderings.py runs/paper-av cremad runs/paper-avt iemocap

For each folder (the runs of `compare --paper …` on one cache) and the dataset whose paper column it
is compared with, prints per paper: the Spearman correlation of our mean multimodal test accuracy
with the paper's (and, for the EDM paper, of EDM), and both orderings. The built-in presets mimic a
dataset's shape, not its content: only orderings are compared, never values.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ours(folder: Path) -> dict[str, tuple[float, float]]:
    runs: dict[str, list[dict]] = {}
    for path in folder.glob("*-seed*/results.json"):
        record = json.loads(path.read_text())
        runs.setdefault(record["method"], []).append(record)
    return {m: (statistics.mean(r["test"]["acc"] for r in rs), statistics.mean(r["test"]["edm"] for r in rs))
            for m, rs in runs.items()}


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    keys = [k for k in a if k in b]
    rank_a = {k: i for i, k in enumerate(sorted(keys, key=lambda k: -a[k]))}
    rank_b = {k: i for i, k in enumerate(sorted(keys, key=lambda k: -b[k]))}
    n = len(keys)
    return 1 - 6 * sum((rank_a[k] - rank_b[k]) ** 2 for k in keys) / (n * (n * n - 1))


def column(paper: dict, dataset: str) -> str | None:
    """The paper's first column of ``dataset`` (matched as the compare command matches it)."""
    for col in paper["columns"]:
        if dataset in col["matches"]:
            return col["id"]
    return None


def main() -> None:
    args = sys.argv[1:]
    if not args or len(args) % 2:
        raise SystemExit("usage: paper_orderings.py FOLDER DATASET [FOLDER DATASET …]")
    tables = json.loads((ROOT / "heads" / "reports" / "paper_tables.json").read_text())
    for folder, dataset in zip(args[::2], args[1::2]):
        measured = ours(Path(folder))
        for name in ("edm", "mla", "ccat"):
            paper = tables[name]
            col = column(paper, dataset)
            if col is None:
                print(f"{folder} · {name}: no {dataset} column")
                continue
            rows = [r for r in paper["rows"] if r["ours"] in measured and (r["values"].get(col) or {}).get("acc") is not None]
            theirs = {r["ours"]: r["values"][col]["acc"] for r in rows}
            acc = {m: measured[m][0] for m in theirs}
            line = (f"{folder} · {name} [{col}] {len(acc)} methods · ρ(accuracy) {spearman(acc, theirs):+.2f}\n"
                    f"    ours:  {' > '.join(f'{m} {acc[m]:.2f}' for m in sorted(acc, key=lambda k: -acc[k]))}\n"
                    f"    paper: {' > '.join(f'{m} {theirs[m]:.2f}' for m in sorted(theirs, key=lambda k: -theirs[k]))}")
            if "edm" in paper["metrics"]:
                their_edm = {r["ours"]: r["values"][col]["edm"] for r in rows}
                our_edm = {m: measured[m][1] for m in their_edm}
                rho = spearman({k: -v for k, v in our_edm.items()}, {k: -v for k, v in their_edm.items()})
                line += (f"\n    ρ(EDM) {rho:+.2f} · ours, lowest first: "
                         f"{' < '.join(f'{m} {our_edm[m]:.2f}' for m in sorted(our_edm, key=our_edm.get))}"
                         f"\n    paper, lowest first: {' < '.join(f'{m} {their_edm[m]:.2f}' for m in sorted(their_edm, key=their_edm.get))}")
            print(line)


if __name__ == "__main__":
    main()
