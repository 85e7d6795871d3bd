"""Train/val/test splits that any run can reproduce: stratified, seeded, group-disjoint when asked.

The reference repositories of the modality-imbalance papers split with unseeded shuffles, disagree
on which samples form "the" split, and mostly evaluate on the validation set. So here:

- every split is a pure function of (sample ids, labels, options): ids are sorted first, and each
  class is shuffled by its own generator seeded from ``seed`` and the class, so neither the order
  files were listed in nor the other classes change a class's assignment;
- splits are stratified: per class the counts follow the fractions, the split totals are exact
  (``floor(n * f)`` for train and val, the rest for test: 2592 samples at 60/20/20 give
  1555/518/519), and a class with at least as many samples as there are splits appears in each;
- there is always a validation split distinct from test; when a source gives only train and test
  (official lists, split files), validation is carved from train, stratified and seeded (``carve_val``);
- group-disjoint splits (CREMA-D actors, IEMOCAP sessions) put every group in exactly one split.

``SplitPolicy`` (``policy.py``) picks among these from an adapter's options; a user's split file
(read by ``files.py``) replaces them.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from typing import Mapping, Sequence

from pipeline.datasets.base import DatasetError

SPLITS = ("train", "val", "test")


def _floor(x: float) -> int:
    """``floor`` that does not lose a unit to float error (5000/n * n may be 4999.999...)."""
    return math.floor(x + 1e-6)


def _allocate(sizes: Mapping[int, int], fractions: Sequence[float]) -> dict[int, list[int]]:
    """How many samples of each class go to each split.

    Split totals are exact (``floor(n*f)`` for all but the last split, which takes the rest); per
    class the counts are the floors of the ideal ``n_c * f`` plus single units handed out by largest
    remainder where a split still needs samples; a class with at least ``len(fractions)`` samples
    gets at least one in every split (that minimum wins over the exact totals on tiny data).
    """
    k, n = len(fractions), sum(sizes.values())
    totals = [_floor(n * f) for f in fractions[:-1]]
    totals.append(n - sum(totals))
    ideal = {c: [m * f for f in fractions] for c, m in sizes.items()}
    alloc = {}
    for c, m in sizes.items():
        counts = [_floor(q) for q in ideal[c]]
        if m >= k:
            counts = [max(1, x) for x in counts]
            while sum(counts) > m:
                counts[counts.index(max(counts))] -= 1
        alloc[c] = counts
    need = [totals[s] - sum(alloc[c][s] for c in alloc) for s in range(k)]
    left = {c: sizes[c] - sum(alloc[c]) for c in alloc}
    # One unit per (class, split), largest remainder first, only where the split is short...
    for _, c, s in sorted((-(ideal[c][s] - alloc[c][s]), c, s) for c in alloc for s in range(k)):
        if left[c] > 0 and need[s] > 0:
            alloc[c][s] += 1
            left[c] -= 1
            need[s] -= 1
    # ...then what is left. sum(need) == sum(left) throughout, so a short split always exists.
    for c in sorted(alloc):
        while left[c] > 0:
            short = [s for s in range(k) if need[s] > 0] or list(range(k))
            s = max(short, key=lambda s: (ideal[c][s] - alloc[c][s], -s))
            alloc[c][s] += 1
            left[c] -= 1
            need[s] -= 1
    return alloc


def stratified_split(labels: Mapping[str, int], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                     names: Sequence[str] = SPLITS) -> dict[str, str]:
    """Assign every id to one of ``names`` with the given fractions, stratified by label."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for sid in sorted(labels):
        by_class[labels[sid]].append(sid)
    alloc = _allocate({c: len(ids) for c, ids in by_class.items()}, fractions)
    out = {}
    for c in sorted(by_class):
        ids = by_class[c]
        random.Random(f"{seed}:{c}").shuffle(ids)
        start = 0
        for name, count in zip(names, alloc[c]):
            out.update((sid, name) for sid in ids[start:start + count])
            start += count
    return out


def carve_val(labels: Mapping[str, int], val_fraction: float, seed: int = 0) -> dict[str, str]:
    """Split train ids into train and val (stratified, seeded): how val is made when a source has none."""
    return stratified_split(labels, (1 - val_fraction, val_fraction), seed, names=("train", "val"))


def group_split(labels: Mapping[str, int], groups: Mapping[str, str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> dict[str, str]:
    """Assign whole groups to splits so that sizes and class counts follow the fractions.

    Groups are visited in a seeded order; each goes to the split where it most reduces the squared
    gap between per-class counts and their targets, except that the last groups fill splits still
    empty, so every split gets at least one group.
    """
    names = sorted({groups[sid] for sid in labels})
    if len(names) < len(SPLITS):
        raise DatasetError(f"a group-disjoint split needs at least 3 groups, found {len(names)}: {', '.join(names)}")
    per_group: dict[str, Counter] = defaultdict(Counter)
    for sid, label in labels.items():
        per_group[groups[sid]][label] += 1
    classes = sorted(set(labels.values()))
    n_class = Counter(labels.values())
    target = [{c: f * n_class[c] for c in classes} for f in fractions]
    current = [Counter() for _ in SPLITS]
    members: list[list[str]] = [[] for _ in SPLITS]
    order = list(names)
    random.Random(f"{seed}:groups").shuffle(order)
    for i, g in enumerate(order):
        empty = [s for s in range(len(SPLITS)) if not members[s]]
        candidates = empty if len(order) - i <= len(empty) else range(len(SPLITS))

        def cost(s):
            return sum((current[s][c] + per_group[g][c] - target[s][c]) ** 2 - (current[s][c] - target[s][c]) ** 2
                       for c in classes)

        best = min(candidates, key=lambda s: (cost(s), s))
        members[best].append(g)
        current[best].update(per_group[g])
    where = {g: SPLITS[s] for s in range(len(SPLITS)) for g in members[s]}
    return {sid: where[groups[sid]] for sid in labels}


def holdout_split(labels: Mapping[str, int], groups: Mapping[str, str], test_groups: Sequence[str],
                  val_groups: Sequence[str] = (), val_fraction: float = 0.1, seed: int = 0) -> dict[str, str]:
    """Leave-groups-out: ``test_groups`` are test; ``val_groups`` are val, or else val is a stratified
    ``val_fraction`` of the remaining groups' samples."""
    out = {sid: "test" for sid in labels if groups[sid] in test_groups}
    out.update((sid, "val") for sid in labels if groups[sid] in val_groups)
    rest = {sid: label for sid, label in labels.items() if sid not in out}
    out.update(carve_val(rest, val_fraction, seed) if not val_groups else dict.fromkeys(rest, "train"))
    return out
