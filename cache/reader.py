"""Reading a cache back: one split into tensors, and the summary ``cache info`` prints.

The manifest says which rows of which shard form a split; the values come from the shards. Rows
are sorted by sample id, so nothing read here depends on how or in what order shards were written.
"""
from __future__ import annotations

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
    """One split of a cache in memory: features (float32, or float16 when asked), present masks, labels.

    Rows are sorted by sample id, so the order does not depend on how shards were written.
    """

    ids: list[str]
    labels: torch.Tensor  # [N] int64
    features: dict[str, torch.Tensor]  # modality -> [N, T, D] float32 (or float16)
    present: dict[str, torch.Tensor]  # modality -> [N] bool
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modalities(self) -> list[str]:
        return list(self.features)


BLOCK_ROWS = 4096  # rows read from a shard at a time: the reader's only buffer besides the output


def load_split(path: str | Path, split: str, modalities: list[str] | None = None,
               dtype: str = "float32") -> FeatureSplit:
    """Load a whole split into tensors: features in ``dtype`` (float32, or the cache's own float16)."""
    return load_splits(path, (split,), modalities, dtype)[split]


def load_splits(path: str | Path, splits=SPLITS, modalities: list[str] | None = None,
                dtype: str = "float32") -> dict[str, FeatureSplit]:
    """Several splits in one pass over the shards, each modality read into one preallocated array.

    Why this shape: memory proportional to the data. Each split's final arrays (rows sorted by sample
    id) are allocated once; every shard is read in blocks of ``BLOCK_ROWS`` rows (hyperslab reads with
    ``read_direct`` into one reused buffer) and each needed row is copied to its final position. No
    shard is read whole, nothing is concatenated or reordered afterwards, and float16 on disk becomes
    float32 (``dtype="float32"``, the values exactly those of the cache) in that same copy, or stays
    float16 (``"float16"``) at half the memory. Reading all three splits together reads each shard once.
    """
    import polars as pl
    import torch  # a second to import: the CLI imports the cache for --help, which needs no tensors

    path = Path(path)
    meta = load_meta(path)
    if dtype not in ("float32", "float16"):
        raise CacheError(f"features can be read as float32 or float16, not {dtype!r}")
    for split in splits:
        if split not in SPLITS:
            raise CacheError(f"unknown split {split!r}: use train, val or test")
    mods = modalities or list(meta["modalities"])
    unknown = set(mods) - set(meta["modalities"])
    if unknown:
        raise CacheError(f"cache at {path} has no modality {sorted(unknown)}; it has {list(meta['modalities'])}")
    shapes = {m: (meta["modalities"][m]["tokens"], meta["modalities"][m]["dim"]) for m in mods}
    manifest = read_manifest(path)
    plans, out = [], {}
    for split in splits:
        rows = manifest.filter(pl.col("split") == split)
        ids = rows["sample_id"].to_list()
        order = np.argsort(np.array(ids, dtype=object), kind="stable") if ids else np.zeros(0, np.int64)
        dest = np.empty(len(ids), np.int64)
        dest[order] = np.arange(len(ids))  # the sorted position of each manifest row
        n = len(ids)
        out[split] = ([ids[i] for i in order], np.zeros(n, np.int64),
                      {m: np.empty((n, *shapes[m]), dtype) for m in mods}, {m: np.zeros(n, bool) for m in mods})
        plans.append((split, rows["shard"].to_numpy(), rows["row"].to_numpy(), dest))
    names = np.array(sorted({s for _, shards, _, _ in plans for s in set(shards.tolist())}), dtype=object)
    plans = [(split, np.searchsorted(names, shards), rows, dest) for split, shards, rows, dest in plans]  # shard codes
    for code, shard_name in enumerate(names):
        wanted = []  # (split, rows in the shard, their positions in the split), rows ascending
        for split, shards, rows, dest in plans:
            here = shards == code
            by_row = np.argsort(rows[here], kind="stable")
            wanted.append((split, rows[here][by_row], dest[here][by_row]))
        try:
            with h5py.File(path / shard_name, "r") as f:
                _read_shard(f, wanted, out, mods, shapes)
        except (OSError, KeyError, ValueError, IndexError) as err:
            raise CacheError(f"corrupt cache at {path}: shard {shard_name} is unreadable ({err})") from None
    return {
        split: FeatureSplit(ids=ids, labels=torch.from_numpy(labels), features={m: torch.from_numpy(a) for m, a in feats.items()},
                            present={m: torch.from_numpy(p) for m, p in pres.items()}, class_names=list(meta["class_names"]))
        for split, (ids, labels, feats, pres) in out.items()
    }


def _read_shard(f, wanted, out, mods, shapes) -> None:
    """Copy the rows ``wanted`` of one open shard into the splits' arrays ``out`` (see ``load_splits``)."""
    small = {"labels": f["labels"][:], **{m: f[f"present/{m}"][:] for m in mods}}  # a value per row: small
    for split, rows, dest in wanted:
        out[split][1][dest] = small["labels"][rows]
        for m in mods:
            out[split][3][m][dest] = small[m][rows]
    last = max((int(rows[-1]) + 1 for _, rows, _ in wanted if len(rows)), default=0)
    for m in mods:
        ds = f[f"features/{m}"]
        if ds.shape[1:] != shapes[m] or ds.shape[0] < last:
            raise ValueError(f"features/{m} has shape {list(ds.shape)}, meta.json says [N, {shapes[m][0]}, {shapes[m][1]}]")
        buffer = np.empty((min(BLOCK_ROWS, last), *shapes[m]), ds.dtype)
        for start in range(0, last, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, last)
            cuts = [(split, np.searchsorted(rows, start), np.searchsorted(rows, stop)) for split, rows, _ in wanted]
            if all(a == b for _, a, b in cuts):
                continue  # no requested row in this block
            ds.read_direct(buffer, np.s_[start:stop], np.s_[0:stop - start])
            for (split, a, b), (_, rows, dest) in zip(cuts, wanted):
                if b > a:
                    out[split][2][m][dest[a:b]] = buffer[rows[a:b] - start]


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
    return {**meta, "counts": counts, "present_rate": coverage, "failed": n_failed, "path": str(path),
            "memory": memory_needed(meta, sum(counts.values()))}


def memory_needed(meta: dict, n: int) -> dict[str, int]:
    """Bytes the features of ``n`` samples take in memory while heads train, per ``--feature-dtype``:
    ``fp16`` holds the cache's float16 values once (plus float32 token means for T > 1); ``fp32`` holds
    them as float32 and a standardised float32 copy (the earlier path)."""
    mods = meta["modalities"].values()
    stored = sum(n * m["tokens"] * m["dim"] * 2 for m in mods)
    pooled = sum(n * m["dim"] * 4 for m in mods if m["tokens"] > 1)
    return {"fp16": stored + pooled, "fp32": 4 * stored + 2 * pooled}
