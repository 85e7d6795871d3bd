"""Loading a run's data: the three splits of one cache, or of several caches of one dataset (one per
backbone) joined on sample id, checked and held as ``SplitTensors`` in the working dtype.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from cache import CacheError, FeatureSplit, load_meta, load_splits
from heads.blocks.data import FEATURE_DTYPES, DataSpec, HeadData, SplitTensors

JOINS = ("exact", "inner")


def _join(parts: list[FeatureSplit], paths: list[Path], join: str = "exact", split: str = "") -> FeatureSplit:
    """Join splits of several caches of the same dataset (one per backbone) on sample id.

    ``exact`` (default) refuses caches whose id sets differ: two caches that shared half their ids
    silently trained on the shared half. ``inner`` keeps the shared ids and says how many each cache
    loses (on stderr).
    """
    if len(parts) == 1:
        return parts[0]
    common = set(parts[0].ids)
    for p in parts[1:]:
        common &= set(p.ids)
    lost = {path: len(part.ids) - len(common) for part, path in zip(parts, paths)}
    if any(lost.values()):
        counts = ", ".join(f"{path} {n:,} of {len(part.ids):,}" for (path, n), part in zip(lost.items(), parts))
        if join != "inner":
            raise CacheError(f"the joined caches hold different {split} samples ({len(common):,} shared; only in one: "
                             f"{counts}); add --join inner to train on the shared ones")
        print(f"warning: --join inner drops {split} samples not in every cache: {counts}", file=sys.stderr)
    ids = sorted(common)
    feats, present, labels = {}, {}, None
    for part, path in zip(parts, paths):
        pos = {s: i for i, s in enumerate(part.ids)}
        index = torch.tensor([pos[s] for s in ids], dtype=torch.long)
        lab = part.labels[index]
        if labels is not None and not torch.equal(labels, lab):
            raise CacheError(f"caches disagree on labels for the same sample ids ({path})")
        labels = lab
        for m in part.features:
            if m in feats:
                raise CacheError(f"modality {m!r} appears in two of the joined caches")
            feats[m], present[m] = part.features[m][index], part.present[m][index]
    return FeatureSplit(ids, labels, feats, present, parts[0].class_names)


def load_head_data(paths: list[str | Path], modalities: list[str] | None = None, allow_nonfinite: bool = False,
                   join: str = "exact", feature_dtype: str = "fp16") -> HeadData:
    """Load train/val/test of one cache, or of several caches of one dataset joined on sample id,
    features held in ``feature_dtype`` (``FEATURE_DTYPES``).

    Refused: a split that is empty (no test split reported every metric 0.00 with exit 0), fewer than
    two classes (a single class reported 100%), caches whose ids differ (unless ``join="inner"``).
    """
    if feature_dtype not in FEATURE_DTYPES:
        raise CacheError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}")
    if join not in JOINS:
        raise CacheError(f"--join must be one of {', '.join(JOINS)}, got {join!r}")
    paths = [Path(p) for p in paths]
    metas = [load_meta(p) for p in paths]
    names = metas[0]["class_names"]
    for p, meta in zip(paths[1:], metas[1:]):
        if meta["class_names"] != names:
            raise CacheError(f"cache {p} has other class names than {paths[0]}; they cannot be joined")
    available = [m for meta in metas for m in meta["modalities"]]
    if modalities:
        unknown = set(modalities) - set(available)
        if unknown:
            raise CacheError(f"no modality {sorted(unknown)} in the cache(s); available: {available}")
    used = [(p, meta) for p, meta in zip(paths, metas) if not modalities or set(meta["modalities"]) & set(modalities)]
    loaded = [  # each cache's three splits in one pass over its shards
        load_splits(p, ("train", "val", "test"), [m for m in meta["modalities"] if not modalities or m in modalities],
                    FEATURE_DTYPES[feature_dtype], allow_nonfinite)
        for p, meta in used
    ]
    splits = {s: SplitTensors.from_feature_split(_join([part[s] for part in loaded], [p for p, _ in used], join, s))
              for s in ("train", "val", "test")}
    train = splits["train"]
    if len(train) == 0:
        raise CacheError(f"cache {paths[0]} has no training samples")
    if len(splits["val"]) == 0:
        raise CacheError(f"cache {paths[0]} has no validation split; selection never uses test, so one is required")
    if len(splits["test"]) == 0:
        raise CacheError(f"cache {paths[0]} has no test split; every test metric would be empty")
    if len(names) < 2 or len(torch.unique(train.y)) < 2:
        raise CacheError(f"cache {paths[0]} has {len(torch.unique(train.y))} class(es) in its training split "
                         f"({len(names)} in meta.json): a classifier needs at least two")
    mods = list(train.x)
    spec = DataSpec(
        modalities=mods,
        dims={m: train.x[m].shape[1] for m in mods},
        tokens={m: train.tokens[m].shape[1] for m in mods},
        num_classes=len(names),
        class_names=list(names),
        majority_class=int(torch.bincount(train.y, minlength=len(names)).argmax()),
    )
    meta = {"caches": [str(p) for p in paths], "dataset": metas[0].get("dataset"), "feature_dtype": feature_dtype,
            "backbones": [m.get("backbone") for m in metas]}
    return HeadData(spec, train, splits["val"], splits["test"], meta)
