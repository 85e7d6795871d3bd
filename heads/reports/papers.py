"""The three papers' main comparison tables, and what `compare --paper` takes from them.

The tables are data, in ``paper_tables.json`` beside this file: each paper's main table as printed
(EDM paper Table I, MLA Table 1 with its ± from Table 5, CCAT Table 1), every row with its source
table and row name and the method name of this tool it maps to (``ours``; null when we do not
implement it). This module only reads them: which methods a table asks for, which of its columns is
the cache's dataset, and a paper cell as text. No torch, no training.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from heads.errors import OptionError

TABLES_FILE = Path(__file__).with_name("paper_tables.json")
NOT_IMPLEMENTED = "not implemented"
NOT_REGISTERED = "not registered yet"


def load_tables() -> dict[str, dict]:
    """Every paper's table by the name `--paper` takes (edm, mla, ccat)."""
    data = json.loads(TABLES_FILE.read_text(encoding="utf-8"))
    return {name: table for name, table in data.items() if not name.startswith("_")}


def paper_table(name: str) -> dict:
    tables = load_tables()
    if name not in tables:
        raise OptionError(f"unknown paper {name!r} for --paper; known: {', '.join(tables)}")
    return tables[name]


def _key(text: str | None) -> str:
    """Names compared as lower-case letters and digits: CREMA-D, crema_d and cremad are one."""
    return re.sub(r"[^a-z0-9]", "", (text or "").lower())


def match_columns(table: dict, dataset: str | None, backbones: list[str | None]) -> list[dict]:
    """The table's columns that report the cache's dataset (none for a synthetic cache).

    Where the table has several columns of that dataset (the EDM paper's MVSA with three backbones),
    those whose backbone the cache was extracted with; all of them when none is.
    """
    found = [c for c in table["columns"] if _key(dataset) in c["matches"]]
    names = [_key(b) for b in backbones]
    same_backbone = [c for c in found if any(m in b for m in c["backbone_matches"] for b in names)]
    return same_backbone if len(found) > 1 and same_backbone else found


@dataclass
class PaperRow:
    """One row of a paper's table and what compare does with it."""

    row: dict
    spec: str | None  # the method spec that runs (None: not run)
    status: str | None  # None when it runs; else NOT_IMPLEMENTED or NOT_REGISTERED


def row_options(row: dict, columns: list[dict], modalities=()) -> dict:
    """The method options a row runs with: its source's (``run_options``, every column), then the
    modality roles of the official code (``roles``: the first listed modality the cache has), then
    the options the paper sets for the matched dataset (CCAT's rank and β; only with one matched
    column)."""
    options = dict(row.get("run_options", {}))
    for name, preferred in row.get("roles", {}).items():
        chosen = next((m for m in preferred if m in modalities), None)
        if chosen is not None:
            options[name] = chosen
    if len(columns) == 1:
        options.update(row.get("options", {}).get(columns[0]["id"]) or {})
    return options


def plan(table: dict, registered, columns: list[dict], modalities=()) -> list[PaperRow]:
    """Each row of the table: run with our method of that name and the row's options
    (``row_options``), or say why not. ``modalities``: the cache's, for the rows' roles."""
    rows = []
    for row in table["rows"]:
        ours = row["ours"]
        if ours is None:
            rows.append(PaperRow(row, None, NOT_IMPLEMENTED))
        elif ours not in registered:
            rows.append(PaperRow(row, None, NOT_REGISTERED))
        else:
            options = row_options(row, columns, modalities)
            spec = ours + (f"[{';'.join(f'{k}={v}' for k, v in options.items())}]" if options else "")
            rows.append(PaperRow(row, spec, None))
    return rows


def cell(row: dict, column: dict, metric: str) -> str:
    """A paper's number as printed (± where the paper gives it), or '-' where it reports none."""
    values = row["values"].get(column["id"])
    if not values or values.get(metric) is None:
        return "-"
    std = values.get(f"{metric}_std")
    return f"{values[metric]:.2f}" if std is None else f"{values[metric]:.2f} ± {std:.2f}"


def column_title(column: dict) -> str:
    return f"{column['dataset']} ({column['backbone']})"


def notes(table: dict, columns: list[dict]) -> list[str]:
    """The data's notes on the cells of these columns (inconsistencies in the printed tables)."""
    ids = {c["id"]: c for c in columns}
    return [f"{row['row']}, {column_title(ids[cid])}: {text}" for row in table["rows"]
            for cid, text in row.get("notes", {}).items() if cid in ids]


def plan_lines(name: str, table: dict, rows: list[PaperRow]) -> str:
    """What `compare --paper` is about to run, and one note line per reason a row does not run."""
    runs = list(dict.fromkeys(r.spec for r in rows if r.spec))
    lines = [f"paper {name}: {table['table']} of {table['short']}, \"{table['title']}\"",
             f"runs its rows that this tool implements: {', '.join(runs)}"]
    for status in (NOT_REGISTERED, NOT_IMPLEMENTED):
        missing = [r.row["ours"] or r.row["row"] for r in rows if r.status == status]
        if missing:
            lines.append(f"note: {status}, skipped: {', '.join(missing)} (their rows show the paper's numbers only)")
    return "\n".join(lines)
