"""The split options the paper datasets share, and how an adapter's samples get their splits.

``SplitPolicy`` reads the options (``seed``, ``split``, ``fractions``, ``val_fraction``,
``split_file``, ``train_file``/``test_file``, and ``test_<group>``/``val_<group>`` for
leave-one-group-out) when the adapter is built, so that a bad value or file fails before any model
loads; ``listing`` then turns the adapter's samples into a ``DatasetListing`` with the split
functions of ``splits.py``. A user's split file reproduces a paper's split exactly, and ids it
names that the dataset lacks are reported, never silently dropped. ``parse_int`` and
``parse_choice`` check the adapters' own option values the same way.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.datasets.base import DatasetError, DatasetListing, SampleRef, Skipped, check_options
from pipeline.datasets.files import read_id_list, read_split_file
from pipeline.datasets.splits import SPLITS, carve_val, group_split, holdout_split, stratified_split

SPLIT_OPTIONS = ("seed", "split", "fractions", "val_fraction", "split_file", "train_file", "test_file")


def parse_fractions(value) -> tuple[float, float, float]:
    """``0.8,0.1,0.1`` or ``80/10/10`` (or a sequence): three positive parts summing to 1 (or 100)."""
    parts = re.split(r"[,/:\s]+", value.strip()) if isinstance(value, str) else list(value)
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) == 3 and abs(sum(numbers) - 100) < 1e-6:
        numbers = [x / 100 for x in numbers]
    if len(numbers) != 3 or min(numbers) <= 0 or abs(sum(numbers) - 1) > 1e-6:
        raise DatasetError(f"fractions must be three positive numbers train,val,test summing to 1 (or 100), "
                           f"got {value!r}")
    return tuple(numbers)


def parse_int(name: str, value) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DatasetError(f"option {name} must be an integer, got {value!r}") from None


def parse_choice(name: str, value, choices: Sequence[str]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise DatasetError(f"option {name} must be one of {', '.join(choices)}, got {value!r}")
    return text


def _fraction(name: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = -1.0
    if not 0 < x < 1:
        raise DatasetError(f"option {name} must be a number in (0, 1), got {value!r}")
    return x


def _percent(fractions: Sequence[float]) -> str:
    return "/".join(f"{100 * f:g}" for f in fractions)


class SplitPolicy:
    """One adapter's split options, validated at construction; ``listing`` applies them.

    ``choices`` are the values ``split`` may take for this dataset, the first being the default:
    ``random`` (stratified over all samples), ``official`` (the dataset's own train/test or
    train/val/test; val carved from train when absent), ``group`` (the adapter's ``group`` word,
    e.g. ``actor``: group-disjoint stratified) and ``loso`` (leave one ``group`` out: options
    ``test_<group>`` and ``val_<group>``). ``split_file`` or ``train_file`` + ``test_file`` replace
    ``split``; they are read here, so that a bad file fails before any model is loaded. Relative
    file paths are tried from the current folder, then from the data ``root``.
    ``adapter_options`` are the adapter's own option names; any other name is an error.
    """

    def __init__(self, dataset: str, options: Mapping, root: Path, *, choices: Sequence[str],
                 fractions=(0.8, 0.1, 0.1), val_fraction: float = 0.1, group: str | None = None,
                 adapter_options: Sequence[str] = ()):
        holdout = (f"test_{group}", f"val_{group}") if group and "loso" in choices else ()
        known = (*SPLIT_OPTIONS, *holdout, *adapter_options)
        check_options(dataset, options, known)
        allowed = [c if c != "group" else group for c in choices]
        self.dataset, self.group = dataset, group
        self.seed = parse_int("seed", options.get("seed", 0))
        self.split = parse_choice("split", options.get("split", allowed[0]), allowed)
        if self.split == group:
            self.split = "group"
        self.fractions = parse_fractions(options["fractions"]) if "fractions" in options else tuple(fractions)
        self.val_fraction = _fraction("val_fraction", options.get("val_fraction", val_fraction))
        split_file, train_file, test_file = (options.get(k) for k in ("split_file", "train_file", "test_file"))
        if bool(train_file) != bool(test_file):
            raise DatasetError("train_file and test_file go together (val is carved from train_file's ids)")
        if split_file and train_file:
            raise DatasetError("give either split_file or train_file + test_file, not both")
        if (split_file or train_file) and "split" in options:
            raise DatasetError("a split file replaces the split option: give one or the other")
        if "fractions" in options and (self.split not in ("random", "group") or split_file or train_file):
            raise DatasetError(f"fractions apply to split=random{'/' + group if group in allowed else ''} only")
        self.given, self.source = self._read_files(split_file, train_file, test_file, Path(root))
        self.test_groups = self._groups(options.get(holdout[0])) if holdout else ()
        self.val_groups = self._groups(options.get(holdout[1])) if holdout else ()
        if holdout and self.split != "loso" and (self.test_groups or self.val_groups):
            raise DatasetError(f"{holdout[0]} / {holdout[1]} apply to split=loso only")
        if self.split == "loso" and not self.test_groups:
            raise DatasetError(f"split=loso needs {holdout[0]}=NAME")
        if set(self.test_groups) & set(self.val_groups):
            raise DatasetError(f"{holdout[0]} and {holdout[1]} overlap")

    @staticmethod
    def _groups(value) -> tuple[str, ...]:
        if value is None or value == "":
            return ()
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return tuple(str(v).strip() for v in items if str(v).strip())

    @staticmethod
    def _read_files(split_file, train_file, test_file, root: Path) -> tuple[dict[str, str] | None, str]:
        """The split a user's file(s) give (id -> split) and how to name them in the rule; None without."""

        def resolve(value) -> Path:
            path = Path(value).expanduser()
            path = path if path.is_absolute() or path.exists() else root / path
            if not path.is_file():
                raise DatasetError(f"split file {value} not found (relative paths are tried from the data root too)")
            return path

        if split_file:
            path = resolve(split_file)
            return read_split_file(path), f"split file {path.name}"
        if not train_file:
            return None, ""
        train_path, test_path = resolve(train_file), resolve(test_file)
        train_ids, test_ids = read_id_list(train_path), read_id_list(test_path)
        both = set(train_ids) & set(test_ids)
        if both:
            raise DatasetError(f"{len(both)} id(s) in both {train_path.name} and {test_path.name}, "
                               f"e.g. {sorted(both)[0]}")
        given = {**dict.fromkeys(train_ids, "train"), **dict.fromkeys(test_ids, "test")}
        return given, f"train file {train_path.name} + test file {test_path.name}"

    def listing(self, samples: list[SampleRef], skipped: list[Skipped], *,
                groups: Mapping[str, str] | None = None, official: Mapping[str, str] | None = None,
                official_rule: str = "", val_count: int | None = None,
                normalize_group=lambda g: g) -> DatasetListing:
        """Give every sample its split and return the listing, samples sorted by id.

        ``groups`` maps sample id to group (actor, session) for ``group``/``loso``; ``official`` maps
        sample id to the dataset's own split (train/test, or train/val/test), described by
        ``official_rule``; ``val_count`` replaces ``val_fraction`` when val is carved from the
        official train split (Food-101's 5000). ``normalize_group`` turns a user's group name into
        the adapter's (``5`` -> ``Session5``).
        """
        samples = sorted(samples, key=lambda s: s.sample_id)
        labels = {s.sample_id: s.label for s in samples}
        extra: list[Skipped] = []
        if self.given is not None:
            assignment, rule = self._from_files(labels, skipped, extra)
        elif self.split == "random":
            assignment = stratified_split(labels, self.fractions, self.seed)
            rule = f"random stratified {_percent(self.fractions)} by label, seed {self.seed}"
        elif self.split == "group":
            assignment = group_split(labels, groups, self.fractions, self.seed)
            rule = self._group_rule(assignment, groups)
        elif self.split == "loso":
            assignment, rule = self._holdout(labels, groups, normalize_group)
        else:
            assignment, rule = self._official(labels, official, official_rule, val_count)
        kept = [s for s in samples if s.sample_id in assignment]
        for s in kept:
            s.split = assignment[s.sample_id]
        counts = Counter(s.split for s in kept)
        empty = [name for name in SPLITS if not counts[name]]
        if empty:
            raise DatasetError(f"{self.dataset}: split(s) {', '.join(empty)} would be empty ({rule}); "
                               f"the data are too few for this split")
        rule += " -> " + ", ".join(f"{name} {counts[name]}" for name in SPLITS)
        return DatasetListing(kept, list(skipped) + extra, split_rule=rule)

    def _group_rule(self, assignment: Mapping[str, str], groups: Mapping[str, str]) -> str:
        members = {name: sorted({groups[sid] for sid, s in assignment.items() if s == name}) for name in SPLITS}
        n = sum(len(v) for v in members.values())
        return (f"{self.group}-disjoint stratified {_percent(self.fractions)} over {n} {self.group}s "
                f"(val: {', '.join(members['val'])}; test: {', '.join(members['test'])}; the rest train), "
                f"seed {self.seed}")

    def _holdout(self, labels, groups, normalize_group) -> tuple[dict[str, str], str]:
        test = tuple(normalize_group(g) for g in self.test_groups)
        val = tuple(normalize_group(g) for g in self.val_groups)
        present = set(groups[sid] for sid in labels)
        missing = [g for g in (*test, *val) if g not in present]
        if missing:
            raise DatasetError(f"{self.group}(s) {', '.join(missing)} not in the data; "
                               f"found {', '.join(sorted(present))}")
        assignment = holdout_split(labels, groups, test, val, self.val_fraction, self.seed)
        how = (f"val {self.group} {', '.join(val)}" if val else
               f"val = stratified {self.val_fraction:g} of the other {self.group}s' samples, seed {self.seed}")
        return assignment, f"leave-one-{self.group}-out: test {self.group} {', '.join(test)}; {how}; train the rest"

    def _official(self, labels, official, official_rule, val_count) -> tuple[dict[str, str], str]:
        assignment = {sid: official[sid] for sid in labels}
        if "val" in assignment.values():
            return assignment, official_rule
        train = {sid: labels[sid] for sid, s in assignment.items() if s == "train"}
        fraction = self.val_fraction if val_count is None else min(val_count / max(len(train), 1), 0.5)
        assignment.update(carve_val(train, fraction, self.seed))
        size = f"{fraction:g}" if val_count is None else f"{val_count} samples"
        return assignment, f"{official_rule}; val = stratified {size} of train, seed {self.seed}"

    def _from_files(self, labels, skipped: list[Skipped], extra: list[Skipped]) -> tuple[dict[str, str], str]:
        given, source = self.given, self.source
        already = {s.sample_id for s in skipped}
        unknown = sorted(sid for sid in given if sid not in labels and sid not in already)
        extra += [Skipped(sid, f"listed in the {source} but not in the dataset") for sid in unknown]
        extra += [Skipped(sid, f"not in the {source}") for sid in sorted(labels) if sid not in given]
        assignment = {sid: given[sid] for sid in labels if sid in given}
        rule = source
        if "val" not in assignment.values():
            train = {sid: labels[sid] for sid, s in assignment.items() if s == "train"}
            assignment.update(carve_val(train, self.val_fraction, self.seed))
            rule += f"; val = stratified {self.val_fraction:g} of its train ids, seed {self.seed}"
        unused = sum(1 for sid in given if sid not in labels)
        if unused:
            rule += (f"; {unused} of its ids not used ({len(unknown)} not in the dataset, "
                     f"{unused - len(unknown)} skipped by the listing)")
        return assignment, rule
