"""Import features made elsewhere (a ``.npz``) into a cache, so stage two serves them like its own."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.replace import check_space, write_folder
from cache.store import CacheError
from cache.writer import write_arrays


def stratified_split(labels: np.ndarray, seed: int, fractions=(0.8, 0.1, 0.1)) -> list[str]:
    """Seeded stratified train/val/test assignment; every class with ≥ 3 samples reaches all three."""
    rng = np.random.default_rng(seed)
    splits = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        n = len(members)
        n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
        n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
        splits[members[:n_test]] = "test"
        splits[members[n_test:n_test + n_val]] = "val"
        splits[members[n_test + n_val:]] = "train"
    return list(splits)


def _labels(y: np.ndarray, names, file: Path) -> tuple[np.ndarray, list[str]]:
    """Integer class ids and class names from ``y`` (ints, integral floats or strings) and ``class_names``.

    Why so strict: ``astype(int64)`` would silently truncate 1.7 to 1, and strings would fail with
    numpy's ``invalid literal for int()``. String labels become class names (sorted, unless the file
    gives ``class_names``, which must then hold every label).
    """
    y = y.reshape(-1)
    given = None if names is None else [str(c) for c in names.reshape(-1)]
    if given is not None and len(set(given)) != len(given):
        raise CacheError(f"class_names in {file.name} holds a name twice")
    if y.dtype.kind in ("U", "S", "O"):
        text = [v.decode() if isinstance(v, bytes) else str(v) for v in y]
        classes = given if given is not None else sorted(set(text))
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise CacheError(f"label(s) {', '.join(map(repr, unknown[:3]))} of 'y' are not in class_names "
                             f"({len(classes)} names)")
        return np.array([index[t] for t in text], dtype=np.int64), classes
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise CacheError(f"labels in 'y' must be integer class ids; {int(bad.sum())} of {len(y)} are not, "
                             f"e.g. {y[bad][0]!r}: round or map them first")
    elif y.dtype.kind not in ("i", "u", "b"):
        raise CacheError(f"labels in 'y' must be integers or strings, got dtype {y.dtype}")
    labels = y.astype(np.int64)
    if labels.min(initial=0) < 0:
        raise CacheError("labels in 'y' must be non-negative class ids")
    used = np.unique(labels)
    if given is None and labels.size and used[-1] + 1 != len(used):
        # A class list 0…max would hold every unused id (a label of 10,000,000 wrote a 149 MB meta.json).
        raise CacheError(f"labels in 'y' must be the dense class ids 0…C−1: {len(used)} distinct value(s) up to "
                         f"{used[-1]}, so {used[-1] + 1 - len(used):,} id(s) are unused; map them to 0…{len(used) - 1} "
                         f"first, or give class_names")
    classes = given if given is not None else [str(c) for c in range(int(labels.max(initial=-1)) + 1)]
    if labels.size and labels.max() >= len(classes):
        raise CacheError(f"label {labels.max()} has no entry in class_names ({len(classes)} names)")
    return labels, classes


def _modality(m: str, x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(features with absent rows zeroed, present mask) of one ``x_<m>``; refuses non-finite data.

    A row that is wholly NaN marks the modality missing for that sample; NaN or inf anywhere else is
    refused with its count, and so is a modality with no finite row at all (nothing to learn from).
    """
    if x.shape[0] != n:
        raise CacheError(f"x_{m} has {x.shape[0]} rows for {n} labels")
    if x.dtype.kind == "c":  # float32 would drop the imaginary part without a word
        raise CacheError(f"x_{m} holds complex numbers (dtype {x.dtype}); store real features, e.g. the real and "
                         f"imaginary parts side by side")
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise CacheError(f"x_{m} is not numeric (dtype {x.dtype})") from None
    flat = x.reshape(n, -1)
    absent = np.isnan(flat).all(1)
    if absent.all():
        raise CacheError(f"x_{m} is NaN in all {n} rows: the modality holds no data; leave it out of the file")
    bad = int((~np.isfinite(flat[~absent])).sum())
    if bad:
        raise CacheError(f"x_{m} holds {bad} NaN or inf value(s) inside rows that are not wholly NaN; refused")
    return np.where(absent.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, x).astype(np.float32), ~absent


def import_npz(file: str | Path, out: str | Path, dataset: str, seed: int = 0,
               overwrite: bool = False) -> tuple[Path, dict[str, int]]:
    """Read ``x_<modality>`` ([N, D] or [N, T, D]), ``y``, optional ``split`` and ``class_names``; write a cache.

    A row of ``x_<modality>`` that is entirely NaN marks that modality missing for the sample. Every
    check runs before anything is written; ``out`` is written whole or not at all, and an existing
    non-empty ``out`` is refused unless ``overwrite`` (``cache/replace.py``).
    """
    file = Path(file)
    if not file.exists():
        raise CacheError(f"no such file: {file}")
    try:
        npz = np.load(file, allow_pickle=False)
    except Exception as err:  # numpy raises several types for a file that is not an npz
        raise CacheError(f"{file} is not a readable .npz ({type(err).__name__})") from None
    keys = set(npz.files)
    if "y" not in keys:
        raise CacheError(f"{file} has no array 'y' (labels); it has {sorted(keys)}")
    features = {k[2:]: npz[k] for k in sorted(keys) if k.startswith("x_")}
    if not features:
        raise CacheError(f"{file} has no feature arrays named x_<modality>; it has {sorted(keys)}")
    n = npz["y"].size
    if not n:
        raise CacheError(f"{file.name} holds no samples ('y' is empty)")
    present = {}
    for m, x in features.items():
        features[m], present[m] = _modality(m, x, n)
    labels, class_names = _labels(npz["y"], npz["class_names"] if "class_names" in keys else None, file)
    used = np.unique(labels)
    if len(used) < 2:
        raise CacheError(f"every label in {file.name} is class {class_names[used[0]]!r}: a classifier needs "
                         f"at least two classes")
    if "split" in keys:
        splits = [v.decode() if isinstance(v, bytes) else str(v) for v in npz["split"].reshape(-1)]
        rule = f"split given in {file.name}"
        fix = "add 'val' (and 'train', 'test') entries to its 'split' array, or leave 'split' out for a seeded " \
              "stratified 80/10/10"
    else:
        splits = stratified_split(labels, seed)
        rule = f"seeded stratified 80/10/10 (seed {seed}) made on import"
        fix = "too few samples per class for 80/10/10: give a 'split' array"
    if len(splits) != len(labels):
        raise CacheError(f"'split' has {len(splits)} entries for {len(labels)} labels")
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    empty = [s for s, c in counts.items() if not c]
    if empty:
        raise CacheError(f"{file.name}: no {' and no '.join(empty)} samples: {fix}")
    out = Path(out)
    # float16 on disk; 10% and 1 MiB for HDF5's own structures and the manifest (choice)
    check_space(out.parent, int(sum(x.size for x in features.values()) * 2 * 1.1) + 2**20)
    path = write_folder(out, overwrite, lambda tmp: write_arrays(
        tmp, dataset=dataset, backbone=f"imported:{file.name}", features=features, labels=labels, splits=splits,
        class_names=class_names, present=present, split_rule=rule))
    return path, counts
