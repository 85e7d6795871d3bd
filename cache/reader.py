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


BLOCK_ROWS = 4096  # rows read from a shard at a time: the reader's only buffer besides the output


def load_split(path: str | Path, split: str, modalities: list[str] | None = None,
               dtype: str = "float32", allow_nonfinite: bool = False) -> FeatureSplit:
    """Load a whole split into tensors: features in ``dtype`` (float32, or the cache's own float16)."""
    return load_splits(path, (split,), modalities, dtype, allow_nonfinite)[split]


def load_splits(path: str | Path, splits=SPLITS, modalities: list[str] | None = None,
                dtype: str = "float32", allow_nonfinite: bool = False) -> dict[str, FeatureSplit]:
    """Several splits in one pass over the shards, each modality read into one preallocated array.

    Why this shape: memory proportional to the data. Each split's final arrays (rows sorted by sample
    id) are allocated once; every shard is read in blocks of ``BLOCK_ROWS`` rows (hyperslab reads with
    ``read_direct`` into one reused buffer) and each needed row is copied to its final position. No
    shard is read whole, nothing is concatenated or reordered afterwards, and float16 on disk becomes
    float32 (``dtype="float32"``, the values exactly those of the cache) in that same copy, or stays
    float16 (``"float16"``) at half the memory. Reading all three splits together reads each shard once.
    The light checks of the module docstring run on the way (``check_manifest``, ``_read_shard``,
    ``_finite``).
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
    check_manifest(path, manifest)
    n_classes = len(meta["class_names"])
    plans, out, listed = [], {}, {}
    for split in splits:
        rows = manifest.filter(pl.col("split") == split)
        ids = rows["sample_id"].to_list()
        order = np.argsort(np.array(ids, dtype=object), kind="stable") if ids else np.zeros(0, np.int64)
        dest = np.empty(len(ids), np.int64)
        dest[order] = np.arange(len(ids))  # the sorted position of each manifest row
        n = len(ids)
        labels = rows["label"].to_numpy()
        listed[split] = (np.array(ids, dtype=object)[order] if n else np.zeros(0, dtype=object),
                         labels[order] if n else np.zeros(0, np.int64))  # what the manifest says, id-sorted
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
        if not (path / shard_name).is_file():  # a FIFO, a folder or a device in place of a shard (a FIFO would hang)
            raise CacheError(f"corrupt cache at {path}: shard {shard_name} is not a regular file")
        try:
            with h5py.File(path / shard_name, "r") as f:
                _check_rows(path, shard_name, f, wanted, listed, n_classes)
                _read_shard(f, wanted, out, mods, shapes)
        except (OSError, KeyError, ValueError, IndexError) as err:
            raise CacheError(f"corrupt cache at {path}: shard {shard_name} is unreadable ({err})") from None
    for split in splits:
        _finite(path, split, {m: [a] for m, a in out[split][2].items()}, allow_nonfinite)
    return {
        split: FeatureSplit(ids=ids, labels=torch.from_numpy(labels), features={m: torch.from_numpy(a) for m, a in feats.items()},
                            present={m: torch.from_numpy(p) for m, p in pres.items()}, class_names=list(meta["class_names"]))
        for split, (ids, labels, feats, pres) in out.items()
    }


def _check_rows(path: Path, shard_name: str, f, wanted, listed, n_classes: int) -> None:
    """The rows the manifest points at exist in the shard and hold the ids, labels and splits it says,
    and the labels lie within the class list (another cache's manifest, or a shortened class list, is
    caught here)."""
    n = f["ids"].shape[0]
    shard_ids = f["ids"][:]
    shard_labels = f["labels"][:]
    shard_splits = f["splits"][:] if "splits" in f else None
    for split, rows, dest in wanted:
        if not len(rows):
            continue
        if rows.min() < 0 or rows.max() >= n:
            raise CacheError(f"corrupt cache at {path}: the manifest points at row {int(rows.max())} of "
                             f"shard {shard_name}, which holds {n} rows")
        ids = [s.decode() if isinstance(s, bytes) else s for s in shard_ids[rows]]
        expected = listed[split][0][dest]
        if ids != list(expected):
            first = next(i for i, (a, b) in enumerate(zip(ids, expected)) if a != b)
            raise CacheError(f"corrupt cache at {path}: row {int(rows[first])} of {shard_name} holds sample "
                             f"{ids[first]!r}, the manifest says {expected[first]!r} (another cache's manifest?)")
        labels = shard_labels[rows]
        wrong_split = shard_splits is not None and any(
            (s.decode() if isinstance(s, bytes) else s) != split for s in shard_splits[rows])
        if not np.array_equal(labels, listed[split][1][dest]) or wrong_split:
            raise CacheError(f"corrupt cache at {path}: shard {shard_name} disagrees with the manifest on the labels "
                             f"or splits of the {split} samples (another cache's manifest?); run `cache verify {path}`")
        if labels.min() < 0 or labels.max() >= n_classes:
            bad = int(labels.max() if labels.max() >= n_classes else labels.min())
            raise CacheError(f"corrupt cache at {path}: shard {shard_name} holds label {bad}, outside the "
                             f"{n_classes} classes of meta.json")


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


STREAM_BUFFER_MB = 128  # --stream-buffer: the shuffle window of a split streamed from the shards
STREAM_WINDOWS = 3  # windows a streamed split holds at once: the one in use, one read ahead, one being read
ROW_BYTES = 80  # what a streamed split keeps per row besides features: id, label, masks, shard and row


def memory_needed(meta: dict, n: int, buffer_mb: float = STREAM_BUFFER_MB) -> dict[str, int]:
    """Bytes the features of ``n`` samples take in memory while heads train, per mode: in memory with
    ``--feature-dtype fp16``, the cache's float16 values once (plus float32 token means for T > 1); with
    ``fp32``, them as float32 and a standardised float32 copy (the earlier path); ``streamed`` from the
    shards (``--in-memory no``), the shuffle buffer, the window read ahead and the one being read
    (``STREAM_WINDOWS`` × ``buffer_mb``, capped by the data itself), plus a few values per row."""
    mods = meta["modalities"].values()
    stored = sum(n * m["tokens"] * m["dim"] * 2 for m in mods)
    pooled = sum(n * m["dim"] * 4 for m in mods if m["tokens"] > 1)
    window = min(int(buffer_mb * 2 ** 20), stored)
    return {"fp16": stored + pooled, "fp32": 4 * stored + 2 * pooled,
            "streamed": STREAM_WINDOWS * window + n * ROW_BYTES, "buffer": window}
