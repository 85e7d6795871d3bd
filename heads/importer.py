"""Import features made elsewhere (a ``.npz``) into a cache, so stage two serves them like its own."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cache import CacheError, write_arrays


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


def import_npz(file: str | Path, out: str | Path, dataset: str, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Read ``x_<modality>`` ([N, D] or [N, T, D]), ``y``, optional ``split`` and ``class_names``; write a cache.

    A row of ``x_<modality>`` that is entirely NaN marks that modality missing for the sample.
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
    labels = npz["y"].astype(np.int64).reshape(-1)
    if labels.min(initial=0) < 0:
        raise CacheError("labels in 'y' must be non-negative class ids")
    if "class_names" in keys:
        class_names = [str(c) for c in npz["class_names"]]
    else:
        class_names = [str(c) for c in range(int(labels.max(initial=-1)) + 1)]
    if labels.size and labels.max() >= len(class_names):
        raise CacheError(f"label {labels.max()} has no entry in class_names ({len(class_names)} names)")
    if "split" in keys:
        splits = [str(s) for s in npz["split"]]
        rule = f"split given in {file.name}"
    else:
        splits = stratified_split(labels, seed)
        rule = f"seeded stratified 80/10/10 (seed {seed}) made on import"
    if len(splits) != len(labels):
        raise CacheError(f"'split' has {len(splits)} entries for {len(labels)} labels")
    present = {}
    for m, x in features.items():
        if x.shape[0] != len(labels):
            raise CacheError(f"x_{m} has {x.shape[0]} rows for {len(labels)} labels")
        x = np.asarray(x, dtype=np.float32)
        flat = x.reshape(len(labels), -1)
        absent = np.isnan(flat).all(1)  # a wholly-NaN row marks a missing modality
        if not np.isfinite(flat[~absent]).all():
            raise CacheError(f"x_{m} holds NaN or inf inside rows that are not wholly NaN; refused")
        present[m] = ~absent
        features[m] = np.where(absent.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, x).astype(np.float32)
    path = write_arrays(out, dataset=dataset, backbone=f"imported:{file.name}", features=features, labels=labels,
                        splits=splits, class_names=class_names, present=present, split_rule=rule)
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    return path, counts
