"""A generic dataset: one CSV that lists samples, so any folder of media can be extracted.

Format of ``<data_root>/samples.csv`` (UTF-8, header row; another name with the ``csv`` option)::

    sample_id,label,split,image_path,audio_path,text
    0001,positive,train,img/0001.jpg,wav/0001.wav,what a day
    0002,negative,test,img/0002.jpg,,not again

- ``sample_id`` unique; ``label`` a class name; ``split`` one of train, val, test.
- ``<modality>_path``: a media file, relative to the data root (or absolute). The kind of the
  modality is its name when that is ``image``, ``audio`` or ``video``; other names (``frames_path``,
  ``speech_path``) need the ``kinds`` option: ``kinds=frames:video,speech:audio``.
- ``text`` or ``<modality>_text``: the text itself, in the cell.
- An empty cell means that modality is absent for that sample.
- Class names (and so label ids) follow ``<data_root>/classes.txt`` (one name a line) when present,
  otherwise the sorted distinct labels (numerically when every label is an integer).
"""
from __future__ import annotations

import csv
import re

from pipeline.datasets.base import (KINDS, DatasetAdapter, DatasetError, DatasetListing, SampleRef, Skipped,
                                    check_options)
from pipeline.datasets.policy import SPLIT_OPTIONS

_MODALITY = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLITS = ("train", "val", "test")


def _parse_kinds(value) -> dict[str, str]:
    """``kinds`` option: a dict, or ``name:kind,name:kind`` as typed on the command line."""
    if not value:
        return {}
    if isinstance(value, dict):
        return dict(value)
    kinds = {}
    for item in filter(None, (t.strip() for t in str(value).split(","))):
        name, sep, kind = item.partition(":")
        if not sep:
            name, sep, kind = item.partition("=")
        if not sep:
            raise DatasetError(f"kinds option: expected name:kind, got {item!r}")
        kinds[name.strip()] = kind.strip()
    return kinds


class FolderDataset(DatasetAdapter):
    name = "folder"
    description = "Any media folder described by a CSV (sample_id,label,split,<modality>_path|text columns)."
    layout = (
        "samples.csv with columns sample_id,label,split and per modality <name>_path (file relative to the root) "
        "or text / <name>_text (inline); optional classes.txt; options csv=FILE, kinds=name:kind,..."
    )

    def __init__(self, data_root, **options):
        super().__init__(data_root, **options)
        split_options = sorted(set(options) & set(SPLIT_OPTIONS))
        note = (f" ({', '.join(split_options)}: the folder dataset takes its splits from the split column)"
                if split_options else "")
        check_options(self.name, options, ("csv", "kinds"), note)
        self.csv_path = self.data_root / options.get("csv", "samples.csv")
        if not self.csv_path.is_file():
            raise DatasetError(f"folder dataset: {self.csv_path} not found (see `cli.py datasets` for the format)")
        with open(self.csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            self._rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
        missing = [c for c in ("sample_id", "label", "split") if c not in header]
        if missing:
            raise DatasetError(f"{self.csv_path.name}: missing column(s) {', '.join(missing)}")
        self._columns = self._modality_columns(header, _parse_kinds(options.get("kinds")))
        self.modalities = {m: kind for m, (_, kind) in self._columns.items()}
        self._class_names = self._read_classes()

    def _modality_columns(self, header: list[str], kinds: dict[str, str]) -> dict[str, tuple[str, str]]:
        """modality -> (column, kind), from the column names and the ``kinds`` option."""
        columns = {}
        for col in header:
            if col in ("sample_id", "label", "split"):
                continue
            if col == "text":
                name, kind = "text", "text"
            elif col.endswith("_text"):
                name, kind = col[: -len("_text")], "text"
            elif col.endswith("_path"):
                name = col[: -len("_path")]
                kind = kinds.get(name, name)
                if kind not in ("image", "audio", "video"):
                    raise DatasetError(
                        f"{self.csv_path.name}: the kind of column {col!r} is unknown; "
                        f"pass kinds={name}:image|audio|video"
                    )
            else:
                raise DatasetError(f"{self.csv_path.name}: column {col!r} is neither <modality>_path "
                                   "nor text / <modality>_text")
            if not _MODALITY.match(name):
                raise DatasetError(f"{self.csv_path.name}: modality name {name!r} must be lowercase letters, "
                                   "digits and '_'")
            if kind not in KINDS:
                raise DatasetError(f"{self.csv_path.name}: kind {kind!r} of {name!r} is not one of {', '.join(KINDS)}")
            if name in columns:
                raise DatasetError(f"{self.csv_path.name}: modality {name!r} is given by two columns")
            columns[name] = (col, kind)
        unused = set(kinds) - set(columns)
        if unused:
            raise DatasetError(f"kinds option names {sorted(unused)}, which have no <name>_path column")
        if not columns:
            raise DatasetError(f"{self.csv_path.name}: no modality columns (<modality>_path, text or <modality>_text)")
        return columns

    def _read_classes(self) -> list[str]:
        file = self.data_root / "classes.txt"
        if file.is_file():
            names = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
            if len(set(names)) != len(names):
                raise DatasetError(f"{file}: duplicated class names")
            return names
        labels = {row["label"] for row in self._rows if row["label"]}
        if not labels:
            raise DatasetError(f"{self.csv_path.name}: no labels")
        if all(re.fullmatch(r"-?\d+", x) for x in labels):
            return sorted(labels, key=int)
        return sorted(labels)

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def listing(self) -> DatasetListing:
        index = {name: i for i, name in enumerate(self._class_names)}
        samples, skipped, seen = [], [], set()
        for line, row in enumerate(self._rows, start=2):
            sid = row["sample_id"]
            if not sid:
                skipped.append(Skipped(f"line-{line}", "empty sample_id"))
                continue
            if sid in seen:
                skipped.append(Skipped(sid, f"line {line}: duplicated sample_id"))
                continue
            seen.add(sid)
            if row["label"] not in index:
                skipped.append(Skipped(sid, f"line {line}: label {row['label']!r} is not a known class"))
                continue
            if row["split"] not in _SPLITS:
                skipped.append(Skipped(sid, f"line {line}: split {row['split']!r} is not train, val or test"))
                continue
            sources = {}
            for m, (col, kind) in self._columns.items():
                value = row.get(col, "")
                if value:
                    sources[m] = value if kind == "text" else str(self.data_root / value)
            samples.append(SampleRef(sid, index[row["label"]], row["split"], sources))
        return DatasetListing(samples, skipped, split_rule=f"given by the split column of {self.csv_path.name}")
