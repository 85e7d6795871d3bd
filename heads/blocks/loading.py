"""Loading a run's data: the three splits of one cache, or of several caches of one dataset (one per
backbone) joined on sample id, checked and held as ``SplitTensors`` in the working dtype.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from cache import CacheError, FeatureSplit, load_meta, load_splits
from cache.reader import STREAM_BUFFER_MB, memory_needed
from cache.replace import available_memory
from cache.store import read_manifest
from cache.stream import plan_splits
from heads.blocks.data import FEATURE_DTYPES, DataSpec, HeadData, SplitTensors
from heads.blocks.domains import POSITIVE
from heads.blocks.streaming import StreamedSplit
from heads.errors import OptionError

JOINS = ("exact", "inner")
IN_MEMORY = ("auto", "yes", "no")
# auto holds the splits in memory when their features, times this margin, plus the reserve, fit in
# the memory the machine has available (MemAvailable) **(choice)**: room for the model, the batches,
# the optimizer and the rest of the process.
MEMORY_MARGIN, MEMORY_RESERVE = 1.25, 1 << 30


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


def streams(paths: list[Path], metas: list[dict], modalities, feature_dtype: str, in_memory: str,
            buffer_mb: float) -> str | None:
    """Why the splits are streamed from the shards (a phrase for the line that says so), or None when
    they are held in memory: ``in_memory`` yes / no, or auto — in memory when they fit (``MEMORY_MARGIN``)."""
    if in_memory not in IN_MEMORY:
        raise OptionError(f"--in-memory must be one of {', '.join(IN_MEMORY)}, got {in_memory!r}")
    if not POSITIVE.contains(buffer_mb):
        raise OptionError(f"--stream-buffer {POSITIVE.phrase()} (megabytes), got {buffer_mb!r}")
    if in_memory == "yes":
        return None
    if in_memory == "auto":
        need = sum(memory_needed({**meta, "modalities": {m: s for m, s in meta["modalities"].items()
                                                           if not modalities or m in modalities}},
                                 _rows(p))[feature_dtype] for p, meta in zip(paths, metas))
        have = available_memory()
        if need * MEMORY_MARGIN + MEMORY_RESERVE <= have:
            return None
        reason = f"its features need {need / 1e9:.1f} GB in memory, {have / 1e9:.1f} GB is available"
    else:
        reason = "--in-memory no"
    if len(paths) > 1:
        raise OptionError(f"streaming from the shards ({reason}) reads one cache; joined caches (--cache a,b) "
                          "are held in memory: give --in-memory yes")
    return reason


def _rows(path: Path) -> int:
    """Samples in the cache (all splits), from its manifest."""
    return read_manifest(path).height


def load_head_data(paths: list[str | Path], modalities: list[str] | None = None, allow_nonfinite: bool = False,
                   join: str = "exact", feature_dtype: str = "fp16", in_memory: str = "auto",
                   stream_buffer: float = STREAM_BUFFER_MB) -> HeadData:
    """Load train/val/test of one cache, or of several caches of one dataset joined on sample id,
    features held in ``feature_dtype`` (``FEATURE_DTYPES``); or, with ``in_memory`` no (or auto when
    they do not fit), streamed from the shards with a ``stream_buffer`` MB shuffle buffer
    (``heads/blocks/streaming.py``; says so on stderr).

    Refused: a split that is empty (no test split reported every metric 0.00 with exit 0), fewer than
    two classes (a single class reported 100%), caches whose ids differ (unless ``join="inner"``).
    """
    if feature_dtype not in FEATURE_DTYPES:
        raise CacheError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}")
    if join not in JOINS:
        raise CacheError(f"--join must be one of {', '.join(JOINS)}, got {join!r}")
    paths = [Path(p) for p in paths]
    metas = [load_meta(p) for p in paths]
    reason = streams(paths, metas, modalities, feature_dtype, in_memory, stream_buffer)
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
    if reason is None:
        loaded = [  # each cache's three splits in one pass over its shards
            load_splits(p, ("train", "val", "test"), [m for m in meta["modalities"] if not modalities or m in modalities],
                        FEATURE_DTYPES[feature_dtype], allow_nonfinite)
            for p, meta in used
        ]
        splits = {s: SplitTensors.from_feature_split(_join([part[s] for part in loaded], [p for p, _ in used], join, s))
                  for s in ("train", "val", "test")}
    else:
        p, meta = used[0]
        plans = plan_splits(p, ("train", "val", "test"), [m for m in meta["modalities"] if not modalities or m in modalities],
                            allow_nonfinite)
        rows = max(1, int(stream_buffer * 2 ** 20) // max(plans["train"].row_bytes, 1))
        splits = {s: StreamedSplit(plan, rows) for s, plan in plans.items()}
        print(f"streaming {p} from its shards ({reason}): a {stream_buffer:g} MB shuffle buffer ({rows:,} rows) and "
              f"a prefetch thread", file=sys.stderr)
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
    mods = list(train.present)
    spec = DataSpec(
        modalities=mods,
        dims=train.dims if reason else {m: train.x[m].shape[1] for m in mods},
        tokens=train.n_tokens if reason else {m: train.tokens[m].shape[1] for m in mods},
        num_classes=len(names),
        class_names=list(names),
        majority_class=int(torch.bincount(train.y, minlength=len(names)).argmax()),
    )
    meta = {"caches": [str(p) for p in paths], "dataset": metas[0].get("dataset"), "feature_dtype": feature_dtype,
            "backbones": [m.get("backbone") for m in metas]}
    if reason:
        meta["streamed"] = {"buffer_mb": stream_buffer, "buffer_rows": train.buffer_rows}
    return HeadData(spec, train, splits["val"], splits["test"], meta)
