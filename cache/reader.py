"""Reading a cache back: one split into tensors, and the summary ``cache info`` prints.

The manifest says which rows of which shard form a split; the values come from the shards. Rows
are sorted by sample id, so nothing read here depends on how or in what order shards were written.

Every load runs a light consistency check (``cache verify`` stays the deep one, with checksums):
the manifest's sample ids are unique and its split names known; each shard is a regular file (a
FIFO would hang the open), its rows lie within the shard and hold the ids the manifest says (another
cache's manifest is caught here); labels lie within the class list; features are finite (counted;
refused, or zeroed with a warning under ``allow_nonfinite``). Why on every load: training on what
``cache verify`` rejects ended with exit 0 and chance accuracy, or 100% on a single class.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from cache.store import SPLITS, CacheError, load_meta, read_manifest

if TYPE_CHECKING:
    import torch


@dataclass
class FeatureSplit:
    """One split of a cache in memory: float32 features, per-modality present masks, labels.

    Rows are sorted by sample id, so the order does not depend on how shards were written.
    """

    ids: list[str]
    labels: torch.Tensor  # [N] int64
    features: dict[str, torch.Tensor]  # modality -> [N, T, D] float32
    present: dict[str, torch.Tensor]  # modality -> [N] bool
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modalities(self) -> list[str]:
        return list(self.features)


def check_manifest(path: Path, manifest) -> None:
    """Unique sample ids and known split names, or a ``CacheError`` naming the first offender."""
    dup = manifest.filter(manifest["sample_id"].is_duplicated())["sample_id"]
    if len(dup):
        raise CacheError(f"corrupt cache at {path}: the manifest lists sample id {dup[0]!r} more than once "
                         f"({len(dup)} duplicated row(s)); run `cache verify {path}`")
    unknown = sorted(set(manifest["split"].unique().to_list()) - set(SPLITS))
    if unknown:
        raise CacheError(f"corrupt cache at {path}: the manifest has unknown split name(s) "
                         f"{', '.join(map(repr, unknown[:3]))}; splits are {', '.join(SPLITS)}")


def _read_shard(path: Path, shard_name: str, index: np.ndarray, listed: list[str], listed_labels: np.ndarray,
                split: str, mods: list[str], n_classes: int) -> tuple:
    """(labels, features, present) of the rows ``index`` of one shard, after the light checks."""
    file = path / shard_name
    if not file.is_file():  # a FIFO, a folder or a device in place of a shard
        raise CacheError(f"corrupt cache at {path}: shard {shard_name} is not a regular file")
    try:
        with h5py.File(file, "r") as f:
            n = f["ids"].shape[0]
            if len(index) and (index.min() < 0 or index.max() >= n):
                raise CacheError(f"corrupt cache at {path}: the manifest points at row {int(index.max())} of "
                                 f"shard {shard_name}, which holds {n} rows")
            ids = [s.decode() for s in f["ids"][:][index]]
            if ids != listed:
                first = next(i for i, (a, b) in enumerate(zip(ids, listed)) if a != b)
                raise CacheError(f"corrupt cache at {path}: row {int(index[first])} of {shard_name} holds sample "
                                 f"{ids[first]!r}, the manifest says {listed[first]!r} (another cache's manifest?)")
            labels = f["labels"][:][index]
            splits = f["splits"][:][index] if "splits" in f else None
            if not np.array_equal(labels, listed_labels) or (
                    splits is not None and any((s.decode() if isinstance(s, bytes) else s) != split for s in splits)):
                raise CacheError(f"corrupt cache at {path}: shard {shard_name} disagrees with the manifest on the labels "
                                 f"or splits of the {split} samples (another cache's manifest?); run `cache verify {path}`")
            feats = {m: f[f"features/{m}"][:][index] for m in mods}
            pres = {m: f[f"present/{m}"][:][index] for m in mods}
    except (OSError, KeyError) as err:
        raise CacheError(f"corrupt cache at {path}: shard {shard_name} is unreadable ({err})") from None
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        bad = int(labels.max() if labels.max() >= n_classes else labels.min())
        raise CacheError(f"corrupt cache at {path}: shard {shard_name} holds label {bad}, outside the "
                         f"{n_classes} classes of meta.json")
    return labels, feats, pres


def _finite(path: Path, split: str, feats: dict[str, list[np.ndarray]], allow_nonfinite: bool) -> None:
    """Refuse NaN/inf features with their count, or zero them with a warning under ``allow_nonfinite``."""
    for m, parts in feats.items():
        count = sum(int((~np.isfinite(x)).sum()) for x in parts)
        if not count:
            continue
        if not allow_nonfinite:
            raise CacheError(f"cache at {path}: {count:,} NaN or inf value(s) in {m} features of the {split} split; "
                             f"refused (--allow-nonfinite zeroes them)")
        for x in parts:
            x[~np.isfinite(x)] = 0
        print(f"warning: {count:,} NaN or inf value(s) in {m} features of the {split} split of {path} set to 0 "
              f"(--allow-nonfinite)", file=sys.stderr)


def load_split(path: str | Path, split: str, modalities: list[str] | None = None,
               allow_nonfinite: bool = False) -> FeatureSplit:
    """Load a whole split into tensors (float16 on disk becomes float32 in memory), checked lightly."""
    import polars as pl
    import torch  # a second to import: the CLI imports the cache for --help, which needs no tensors

    path = Path(path)
    meta = load_meta(path)
    if split not in SPLITS:
        raise CacheError(f"unknown split {split!r}: use train, val or test")
    mods = modalities or list(meta["modalities"])
    unknown = set(mods) - set(meta["modalities"])
    if unknown:
        raise CacheError(f"cache at {path} has no modality {sorted(unknown)}; it has {list(meta['modalities'])}")
    manifest = read_manifest(path)
    check_manifest(path, manifest)
    rows = manifest.filter(pl.col("split") == split)
    ids: list[str] = []
    labels, feats, pres = [], {m: [] for m in mods}, {m: [] for m in mods}
    for shard_name, group in rows.group_by("shard", maintain_order=True):
        shard_name = shard_name[0]
        listed = group["sample_id"].to_list()
        lab, fe, pr = _read_shard(path, shard_name, group["row"].to_numpy(), listed, group["label"].to_numpy(), split,
                                  mods, len(meta["class_names"]))
        labels.append(lab)
        for m in mods:
            feats[m].append(fe[m])
            pres[m].append(pr[m])
        ids += listed
    _finite(path, split, feats, allow_nonfinite)
    order = np.argsort(np.array(ids, dtype=object), kind="stable") if ids else np.zeros(0, int)
    def cat(parts, dtype, shape):
        arr = np.concatenate(parts) if parts else np.zeros(shape, dtype)
        return torch.from_numpy(np.ascontiguousarray(arr[order]))
    return FeatureSplit(
        ids=[ids[i] for i in order],
        labels=cat(labels, np.int64, (0,)).long(),
        features={
            m: cat(feats[m], np.float16, (0, meta["modalities"][m]["tokens"], meta["modalities"][m]["dim"])).float()
            for m in mods
        },
        present={m: cat(pres[m], bool, (0,)).bool() for m in mods},
        class_names=list(meta["class_names"]),
    )


def cache_info(path: str | Path) -> dict:
    """A summary of a cache for ``cache info``: meta plus counts per split and modality coverage."""
    import polars as pl

    path = Path(path)
    meta = load_meta(path)
    manifest = read_manifest(path)
    counts = {s: manifest.filter(pl.col("split") == s).height for s in SPLITS}
    coverage = {m: float(manifest[f"present_{m}"].mean() or 0.0) for m in meta["modalities"]}
    failed = path / "failed.parquet"
    n_failed = pl.read_parquet(failed).height if failed.exists() else 0
    return {**meta, "counts": counts, "present_rate": coverage, "failed": n_failed, "path": str(path)}
