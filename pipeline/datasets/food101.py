"""UPMC Food-101: recipe web pages of the 101 Food-101 classes, an image and its page title each.

The release (UPMC Food-101, Wang et al. 2015, from the LIP6 Visiir project) has
``images/{train,test}/<class>/<class>_<n>.jpg`` and ``texts/{train,test}_titles.csv`` with rows
``<image file name>,<text>,<class>``. The CSVs have no header row (a header is accepted too).
Classes are the class folders, sorted (101). Image names repeat between train and test, so a
sample id is ``<split>/<image stem>``.

Splits: the official train and test; val is a stratified ``val_size`` (default 5000, as in the
MMBT benchmark) carved from train, capped at 10% of train so that small copies keep most of their
training data. ``split=random`` re-splits everything instead; ``split_file`` reproduces a given split.
"""
from __future__ import annotations

import csv
import math

from pipeline.datasets.base import DatasetAdapter, DatasetError, DatasetListing, SampleRef, Skipped
from pipeline.datasets.files import file_problem, read_text
from pipeline.datasets.policy import SplitPolicy, parse_int

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_OFFICIAL = ("train", "test")


class UPMCFood101(DatasetAdapter):
    name = "food101"
    modalities = {"image": "image", "text": "text"}
    description = ("UPMC Food-101 recipe pages (image + title text), 101 classes; from the UPMC Food-101 release "
                   "(LIP6 Visiir). Official train/test, val = 5000 stratified from train.")
    layout = ("images/{train,test}/<class>/<class>_<n>.jpg, texts/{train,test}_titles.csv (rows image_name,text,class; "
              "no header); options val_size (5000), split=official|random, seed, fractions, split_file")

    def __init__(self, data_root, **options):
        super().__init__(data_root, **options)
        self.val_size = parse_int("val_size", options.get("val_size", 5000))
        if self.val_size < 1:
            raise DatasetError(f"option val_size must be positive, got {self.val_size}")
        self.policy = SplitPolicy(self.name, options, self.data_root, choices=("official", "random"),
                                  adapter_options=("val_size",))
        for split in _OFFICIAL:
            for path in (self.data_root / "images" / split, self.data_root / "texts" / f"{split}_titles.csv"):
                if not path.exists():
                    raise DatasetError(f"food101: {path.relative_to(self.data_root)} not found in {self.data_root}")
        self._class_names = sorted({d.name for split in _OFFICIAL for d in (self.data_root / "images" / split).iterdir()
                                    if d.is_dir() and not d.name.startswith(".")})
        if not self._class_names:
            raise DatasetError(f"food101: no class folders in {self.data_root / 'images' / 'train'}")

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    def _rows(self, split: str, skipped: list[Skipped]) -> tuple[dict[str, tuple[str, str]], set[str]]:
        """image name -> (text, class) of one split's CSV, and every image name it lists; malformed
        rows and names given twice with different contents go to ``skipped``."""
        path = self.data_root / "texts" / f"{split}_titles.csv"
        rows: dict[str, tuple[str, str]] = {}
        conflicts: set[str] = set()
        for number, cells in enumerate(csv.reader(read_text(path).splitlines()), start=1):
            if not cells or not cells[0].strip():
                continue
            name = cells[0].strip()
            if not name.lower().endswith(_IMAGE_SUFFIXES) or len(cells) < 3:
                if number > 1:  # the first row may be a header
                    skipped.append(Skipped(f"{split}/line-{number}",
                                           f"{path.name} line {number} is not image_name,text,class"))
                continue
            entry = (",".join(cells[1:-1]).strip(), cells[-1].strip())
            if rows.setdefault(name, entry) != entry:
                conflicts.add(name)
        listed = set(rows)
        for name in sorted(conflicts):
            del rows[name]
            skipped.append(Skipped(f"{split}/{name.rsplit('.', 1)[0]}",
                                   f"{path.name} lists {name} twice with different texts or classes"))
        return rows, listed

    def listing(self) -> DatasetListing:
        skipped: list[Skipped] = []
        samples, official = [], {}
        label_ids = {name: i for i, name in enumerate(self._class_names)}
        for split in _OFFICIAL:
            rows, listed = self._rows(split, skipped)
            images = self.data_root / "images" / split
            for name, (text, label) in rows.items():
                sid = f"{split}/{name.rsplit('.', 1)[0]}"
                if label not in label_ids:
                    skipped.append(Skipped(sid, f"class {label!r} has no folder under images/ (outside the scheme)"))
                    continue
                image = images / label / name
                problem = file_problem(image)
                if problem:
                    skipped.append(Skipped(sid, f"image {split}/{label}/{name} is {problem}"))
                elif not text:
                    skipped.append(Skipped(sid, "empty text"))
                else:
                    sources = {"image": str(image), "text": text}
                    samples.append(SampleRef(sid, label_ids[label], "", sources))
                    official[sid] = split
            for image in sorted(images.glob("*/*")):
                if image.suffix.lower() in _IMAGE_SUFFIXES and image.name not in listed:
                    skipped.append(Skipped(f"{split}/{image.stem}",
                                           f"no row for {image.name} in texts/{split}_titles.csv"))
        n_train = sum(1 for s in official.values() if s == "train")
        val_count = max(1, min(self.val_size, math.floor(0.1 * n_train)))
        return self.policy.listing(samples, skipped, official=official, official_rule="official train / test",
                                   val_count=val_count)
