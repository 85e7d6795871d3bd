"""The files a dataset listing reads besides the media themselves: text, split files, id lists.

``file_problem`` and ``read_text`` are the listing-time checks the adapters share (existence and
size of media, judged without decoding them; text read with the encodings the datasets really
use). ``read_split_file`` and ``read_id_list`` read a user's (or a paper's) split: CSV or TSV, an
optional header row, ``#`` comments, and errors that name the line.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.datasets.base import DatasetError

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test", "testing": "test"}
_ID_HEADERS = {"sample_id", "id", "name", "file", "filename", "clip", "video_id"}


def file_problem(path: Path) -> str | None:
    """Why a media file cannot be used, judged without decoding it (missing, not a file, 0 bytes)."""
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if not path.is_file():
        return "not a file"
    return "empty (0 bytes)" if size == 0 else None


def read_text(path: Path) -> str:
    """A text file as str: UTF-8, else Latin-1 (MVSA's tweets and IEMOCAP's transcripts mix both).

    Raises ``OSError`` when the file cannot be read; the caller turns that into a skip reason.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of a CSV or TSV file; blank lines and ``#`` comments left out."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read {path}: {err}") from None
    lines = text.splitlines()
    delimiter = "\t" if any("\t" in line for line in lines[:5]) else ","
    rows = []
    for number, cells in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
        cells = [c.strip() for c in cells]
        if cells and cells[0] and not cells[0].startswith("#"):
            rows.append((number, cells))
    return rows


def read_split_file(path: str | Path) -> dict[str, str]:
    """A split file: rows ``sample_id,split`` (comma or tab), an optional header row, ``#`` comments.

    Split names: train, val (also valid, validation, dev) and test. An id given two different
    splits, or an unknown split name, is an error naming the line.
    """
    path = Path(path)
    out: dict[str, str] = {}
    for i, (number, cells) in enumerate(_rows(path)):
        name = _SPLIT_NAMES.get(cells[1].lower()) if len(cells) > 1 else None
        if name is None:
            if i == 0 and len(cells) > 1:
                continue  # a header row such as "sample_id,split"
            raise DatasetError(f"{path.name} line {number}: expected sample_id,split with split train/val/test, "
                               f"got {','.join(cells)!r}")
        sid = cells[0]
        if out.get(sid, name) != name:
            raise DatasetError(f"{path.name} line {number}: {sid} is given two splits ({out[sid]}, {name})")
        out[sid] = name
    if not out:
        raise DatasetError(f"split file {path} lists no samples")
    return out


def read_id_list(path: str | Path) -> list[str]:
    """The sample ids of a list file: the first cell of each row (``name,LABEL`` rows of the OGM-GE
    CREMA-D csvs, for one); a first row whose first cell is a column name is a header."""
    path = Path(path)
    rows = _rows(path)
    if rows and rows[0][1][0].lower() in _ID_HEADERS:
        rows = rows[1:]
    ids = list(dict.fromkeys(cells[0] for _, cells in rows))
    if not ids:
        raise DatasetError(f"list file {path} lists no samples")
    return ids
