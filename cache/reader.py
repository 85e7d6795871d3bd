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


def load_split(path: str | Path, split: str, modalities: list[str] | None = None) -> FeatureSplit:
    """Load a whole split into tensors (float16 on disk becomes float32 in memory)."""
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
    rows = read_manifest(path).filter(pl.col("split") == split)
    ids: list[str] = []
    labels, feats, pres = [], {m: [] for m in mods}, {m: [] for m in mods}
    for shard_name, group in rows.group_by("shard", maintain_order=True):
        shard_name = shard_name[0]
        index = group["row"].to_numpy()
        try:
            with h5py.File(path / shard_name, "r") as f:
                labels.append(f["labels"][:][index])
                for m in mods:
                    feats[m].append(f[f"features/{m}"][:][index])
                    pres[m].append(f[f"present/{m}"][:][index])
        except (OSError, KeyError) as err:
            raise CacheError(f"corrupt cache at {path}: shard {shard_name} is unreadable ({err})") from None
        ids += group["sample_id"].to_list()
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
