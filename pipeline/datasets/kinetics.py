"""Kinetics-400 and its audio-visual subset Kinetics-Sounds: 10 s YouTube clips, audio + frames.

Both modalities come from one video file: ``audio`` decodes its sound track (16 kHz mono, through
PyAV), ``visual`` takes K frames at fixed times. Clip files follow the CVDF release's naming,
``<youtube_id>_<start:06d>_<end:06d>.mp4``.

- ``k400``: the official annotation CSVs (``annotations/{train,val,test}.csv``; columns label,
  youtube_id, time_start, time_end, split) and clips in ``{train,val,test}/`` (a ``replacement/``
  folder, as the CVDF release ships for corrupted clips, is searched too). Classes: the sorted
  labels found (400). With ``test_from=auto`` (default) the official test split is test when its
  annotations carry labels, the official val is val; otherwise the official val becomes test and
  val is carved from train. ``test_from=val`` forces the latter (the papers report on official val).
- ``ks``: a train list and a test list with lines ``<youtube_id>_<start>[_<end>],<seconds>,<label>``
  (the OGM-GE repository's ``my_train.txt``/``my_test.txt``: 31 classes, 14,799 / 2,597 clips),
  clips anywhere under a videos folder (a Kinetics-400 tree works). A label is a class name, or an
  integer index into ``classes.txt`` when one is given (without it, integer labels name their
  classes by number). Val is carved from the train list.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from pipeline.datasets.base import DatasetAdapter, DatasetError, DatasetListing, SampleRef, Skipped
from pipeline.datasets.files import file_problem, read_text
from pipeline.datasets.policy import SplitPolicy, parse_choice

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".flv", ".mov"}
# YouTube ids are 11 characters and may contain '_' and '-', so the id is taken by length.
_CLIP = re.compile(r"^(?P<ytid>[A-Za-z0-9_-]{11})_(?P<start>\d+)(?:_(?P<end>\d+))?$")
_OFFICIAL = ("train", "val", "test")


def index_videos(folders: list[Path]) -> tuple[dict[str, Path], dict[tuple[str, int], Path]]:
    """Video files under ``folders`` (recursively) by file stem and by (youtube id, start second)."""
    by_stem: dict[str, Path] = {}
    by_start: dict[tuple[str, int], Path] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in VIDEO_SUFFIXES or path.name.startswith("."):
                continue
            by_stem.setdefault(path.stem, path)
            match = _CLIP.match(path.stem)
            if match:
                by_start.setdefault((match["ytid"], int(match["start"])), path)
    return by_stem, by_start


def _with_conflicts(rows: list[tuple[str, str, str, str]], skipped: list[Skipped]) -> dict[str, tuple[str, str]]:
    """(id, label, split, where) rows -> id: (label, split). An id listed with two labels or in two
    splits is dropped and reported; an exact repeat is kept once."""
    seen: dict[str, tuple[str, str]] = {}
    where: dict[str, set[str]] = {}
    for sid, label, split, source in rows:
        seen.setdefault(sid, (label, split))
        where.setdefault(sid, set()).add(f"{source}: {label}")
        if seen[sid] != (label, split):
            seen[sid] = ("", "")
    for sid, (label, split) in list(seen.items()):
        if not label:
            del seen[sid]
            shown = "; ".join(sorted(where[sid]))
            skipped.append(Skipped(sid, f"listed twice with different labels or splits ({shown})"))
    return seen


class KineticsSounds(DatasetAdapter):
    name = "ks"
    modalities = {"audio": "audio", "visual": "video"}
    description = ("Kinetics-Sounds (31 audio-visual Kinetics-400 classes; OGM-GE's train/test lists), audio + "
                   "frames of each clip; clips from the Kinetics-400 release (CVDF), lists from the OGM-GE repository.")
    layout = ("my_train.txt + my_test.txt (or train.txt/test.txt; lines <ytid>_<start>[_<end>],10,<label>), clips "
              "<ytid>_<start>_<end>.mp4 (or <ytid>_<start>.mp4) anywhere under videos/ (or the root); optional "
              "classes.txt; options train_list, test_list, videos, classes, split=official|random, seed, "
              "val_fraction, fractions, split_file")

    def __init__(self, data_root, **options):
        super().__init__(data_root, **options)
        self.policy = SplitPolicy(self.name, options, self.data_root, choices=("official", "random"),
                                  adapter_options=("train_list", "test_list", "videos", "classes"))
        self.lists = {split: self._file(options.get(f"{split}_list"), (f"my_{split}.txt", f"{split}.txt"),
                                        f"{split}_list") for split in ("train", "test")}
        videos = options.get("videos") or ("videos" if (self.data_root / "videos").is_dir() else ".")
        self.videos = self._path(videos)
        if not self.videos.is_dir():
            raise DatasetError(f"ks: videos folder {self.videos} not found")
        classes = options.get("classes") or ("classes.txt" if (self.data_root / "classes.txt").is_file() else None)
        self.classes_file = self._file(classes, (), "classes") if classes else None
        self._malformed: list[Skipped] = []
        self._rows = self._read_lists()
        self._class_names = self._classes()

    def _path(self, value) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.data_root / path

    def _file(self, value, defaults, option) -> Path:
        candidates = [self._path(value)] if value else [self.data_root / name for name in defaults]
        for path in candidates:
            if path.is_file():
                return path
        raise DatasetError(f"ks: {' or '.join(str(p) for p in candidates)} not found (option {option}=FILE)")

    def _read_lists(self) -> list[tuple[str, str, str, str]]:
        """(id, label, split, list name) of both lists; malformed lines go to ``self._malformed``."""
        rows = []
        for split, path in self.lists.items():
            for number, cells in enumerate(csv.reader(read_text(path).splitlines()), start=1):
                cells = [c.strip() for c in cells]
                if not cells or not cells[0]:
                    continue
                if len(cells) < 2 or not cells[-1]:
                    self._malformed.append(Skipped(f"{path.name}-line-{number}", f"{path.name} line {number} is not "
                                                   f"<clip id>,<seconds>,<label>: {','.join(cells)[:60]!r}"))
                    continue
                rows.append((cells[0], cells[-1], split, path.name))
        return rows

    def _classes(self) -> list[str]:
        if self.classes_file is not None:
            names = [line.strip() for line in read_text(self.classes_file).splitlines() if line.strip()]
            if len(set(names)) != len(names):
                raise DatasetError(f"{self.classes_file}: duplicated class names")
            return names
        labels = {row[1] for row in self._rows}
        if labels and all(label.isdigit() for label in labels):
            return [str(i) for i in range(max(int(x) for x in labels) + 1)]
        return sorted(labels)

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def _label_id(self, label: str) -> int | None:
        if label in self._class_names:
            return self._class_names.index(label)
        if label.isdigit() and int(label) < len(self._class_names):
            return int(label)
        return None

    def listing(self) -> DatasetListing:
        skipped: list[Skipped] = list(self._malformed)
        by_stem, by_start = index_videos([self.videos])
        rows = _with_conflicts(self._rows, skipped)
        samples, official = [], {}
        for sid, (label, split) in rows.items():
            label_id = self._label_id(label)
            if label_id is None:
                skipped.append(Skipped(sid, f"label {label!r} is outside the {len(self._class_names)} classes"))
                continue
            match = _CLIP.match(sid)
            path = by_stem.get(sid) or (by_start.get((match["ytid"], int(match["start"]))) if match else None)
            if path is None:
                skipped.append(Skipped(sid, f"no video file for this clip under {self.videos}"))
                continue
            problem = file_problem(path)
            if problem:
                skipped.append(Skipped(sid, f"video {path.name} is {problem}"))
                continue
            samples.append(SampleRef(sid, label_id, "", {"audio": str(path), "visual": str(path)}))
            official[sid] = split
        rule = f"official lists: train {self.lists['train'].name}, test {self.lists['test'].name}"
        return self.policy.listing(samples, skipped, official=official, official_rule=rule)


class Kinetics400(DatasetAdapter):
    name = "k400"
    modalities = {"audio": "audio", "visual": "video"}
    description = ("Kinetics-400 action clips (audio + frames), 400 classes from the official annotation CSVs; "
                   "clips and annotations from the CVDF Kinetics release.")
    layout = ("annotations/{train,val,test}.csv (label,youtube_id,time_start,time_end,split), clips "
              "{train,val,test}/<ytid>_<start:06d>_<end:06d>.mp4 (sub-folders allowed; replacement/ searched); "
              "options test_from=auto|test|val, split=official|random, seed, val_fraction, fractions, split_file")

    def __init__(self, data_root, **options):
        super().__init__(data_root, **options)
        self.test_from = parse_choice("test_from", options.get("test_from", "auto"), ("auto", "test", "val"))
        self.policy = SplitPolicy(self.name, options, self.data_root, choices=("official", "random"),
                                  adapter_options=("test_from",))
        self.annotations = {split: self._csv(split) for split in _OFFICIAL}
        for split in ("train", "val"):
            if self.annotations[split] is None:
                raise DatasetError(f"k400: annotations/{split}.csv not found in {self.data_root}")
        if self.test_from == "test" and self.annotations["test"] is None:
            raise DatasetError("k400: test_from=test needs annotations/test.csv")
        self._rows = {split: self._read(split) for split in _OFFICIAL if self.annotations[split] is not None}
        self._class_names = sorted({r["label"] for rows in self._rows.values() for r in rows if r["label"]})
        if not self._class_names:
            raise DatasetError("k400: the annotation CSVs hold no labels")
        has_test_labels = any(r["label"] for r in self._rows.get("test", []))
        if self.test_from == "test" and not has_test_labels:
            raise DatasetError("k400: test_from=test, but annotations/test.csv has no labels")
        self.use_official_test = self.test_from == "test" or (self.test_from == "auto" and has_test_labels)

    def _csv(self, split: str) -> Path | None:
        names = (f"{split}.csv", "validate.csv") if split == "val" else (f"{split}.csv",)
        paths = [self.data_root / "annotations" / name for name in names]
        return next((path for path in paths if path.is_file()), None)

    def _read(self, split: str) -> list[dict]:
        path = self.annotations[split]
        rows = list(csv.DictReader(read_text(path).splitlines()))
        need = {"youtube_id", "time_start", "time_end"} | ({"label"} if split != "test" else set())
        if rows and need - set(rows[0]):
            raise DatasetError(f"{path}: expected columns label,youtube_id,time_start,time_end[,split]")
        out = []
        for r in rows:
            clean = {k: (v or "").strip() for k, v in r.items() if k}
            clean.setdefault("label", "")  # the test CSV of some releases has no label column
            out.append(clean)
        return out

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def listing(self) -> DatasetListing:
        skipped: list[Skipped] = []
        entries = []
        for split, rows in self._rows.items():
            if split == "test" and not self.use_official_test:
                continue
            for number, r in enumerate(rows, start=2):
                try:
                    sid = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
                except ValueError:
                    skipped.append(Skipped(f"{split}-line-{number}",
                                           f"annotations/{split}.csv line {number}: bad times"))
                    continue
                if not r["label"]:
                    skipped.append(Skipped(sid, f"no label in annotations/{split}.csv"))
                    continue
                target = split if self.use_official_test or split == "train" else "test"
                entries.append((sid, r["label"], target, split))
        rows = _with_conflicts(entries, skipped)
        indexes = {s: index_videos([self.data_root / s])[0] for s in (*_OFFICIAL, "replacement")}
        replacement = indexes["replacement"]
        origin = {sid: split for sid, _, _, split in entries}
        label_ids = {name: i for i, name in enumerate(self._class_names)}
        samples, official = [], {}
        for sid, (label, target) in rows.items():
            path = indexes[origin[sid]].get(sid)
            problem = file_problem(path) if path else "missing"
            if problem and sid in replacement and not file_problem(replacement[sid]):
                path, problem = replacement[sid], None
            if problem:
                skipped.append(Skipped(sid, f"video {origin[sid]}/{sid}.mp4 is {problem}"))
                continue
            sources = {"audio": str(path), "visual": str(path)}
            samples.append(SampleRef(sid, label_ids[label], "", sources))
            official[sid] = target
        if self.use_official_test:
            rule = "official train / val / test annotations"
        else:
            rule = "official train; official val used as test" + (" (test.csv not used)" if "test" in self._rows else "")
        return self.policy.listing(samples, skipped, official=official, official_rule=rule)
