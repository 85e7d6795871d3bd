"""Reading a split's rows straight from the shards, for caches bigger than memory (issue 24, part 2).

``plan_splits`` reads what is small (sample ids, labels, present masks: a value per row) and where
each row lives (shard, row in the shard); the features stay on disk. ``RowReader.read`` then brings
any set of a split's rows into memory, float16 as stored. Rows are numbered as ``load_splits``
numbers them (sorted by sample id), so a streamed split and an in-memory one agree row for row.

How rows are read: grouped by shard and sorted by their row in it, then, per run of rows that fall
within ``BLOCK_ROWS`` of each other, one hyperslab read (``read_direct``) of the span when the rows
fill at least a quarter of it, or an h5py point selection of just those rows when they are sparse
(a validation split interleaved with training rows). The light checks of ``cache/reader.py`` run
on the plan (ids, labels and splits of every shard against the manifest), and every block read is
checked finite (refused, or zeroed with a warning under ``allow_nonfinite``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cache.reader import BLOCK_ROWS, _check_rows, check_manifest
from cache.store import SPLITS, CacheError, load_meta, read_manifest

DENSE = 4  # a span is read whole when its requested rows fill at least 1/DENSE of it


@dataclass
class SplitPlan:
    """Where the rows of one split live; everything but the features, in memory."""

    path: Path
    split: str
    ids: list[str]  # sorted: row i of the split is the i-th id
    labels: np.ndarray  # [N] int64
    present: dict[str, np.ndarray]  # modality -> [N] bool
    shapes: dict[str, tuple[int, int]]  # modality -> (T, D)
    shards: list[str]  # shard file names; ``shard`` holds indices into it
    shard: np.ndarray  # [N] which shard holds row i
    row: np.ndarray  # [N] its row in that shard
    allow_nonfinite: bool = False
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def row_bytes(self) -> int:
        """Feature bytes of one row as stored (float16)."""
        return sum(2 * t * d for t, d in self.shapes.values())

    def locations(self) -> np.ndarray:
        """The split's rows in storage order (by shard, then row in the shard): contiguous reads."""
        return np.lexsort((self.row, self.shard))


def plan_splits(path: str | Path, splits=SPLITS, modalities: list[str] | None = None,
                allow_nonfinite: bool = False) -> dict[str, SplitPlan]:
    """The plans of ``splits`` of the cache at ``path``, checked as ``load_splits`` checks them."""
    import polars as pl

    path = Path(path)
    meta = load_meta(path)
    mods = modalities or list(meta["modalities"])
    unknown = set(mods) - set(meta["modalities"])
    if unknown:
        raise CacheError(f"cache at {path} has no modality {sorted(unknown)}; it has {list(meta['modalities'])}")
    shapes = {m: (meta["modalities"][m]["tokens"], meta["modalities"][m]["dim"]) for m in mods}
    manifest = read_manifest(path)
    check_manifest(path, manifest)
    names = sorted(set(manifest["shard"].unique().to_list()))
    plans, listed, wanted = {}, {}, {n: [] for n in names}
    for split in splits:
        if split not in SPLITS:
            raise CacheError(f"unknown split {split!r}: use train, val or test")
        rows = manifest.filter(pl.col("split") == split)
        ids = np.array(rows["sample_id"].to_list(), dtype=object)
        order = np.argsort(ids, kind="stable") if len(ids) else np.zeros(0, np.int64)
        shard = np.searchsorted(np.array(names, dtype=object), rows["shard"].to_numpy()[order]) if len(ids) \
            else np.zeros(0, np.int64)
        row = rows["row"].to_numpy()[order] if len(ids) else np.zeros(0, np.int64)
        plans[split] = SplitPlan(path, split, list(ids[order]), np.zeros(len(ids), np.int64),
                                 {m: np.zeros(len(ids), bool) for m in mods}, shapes, names, shard, row,
                                 allow_nonfinite, list(meta["class_names"]))
        listed[split] = (ids[order], rows["label"].to_numpy()[order] if len(ids) else np.zeros(0, np.int64))
        for code, shard_name in enumerate(names):
            dest = np.flatnonzero(shard == code)
            by_row = np.argsort(row[dest], kind="stable")
            wanted[shard_name].append((split, row[dest][by_row], dest[by_row]))
    for shard_name in names:
        if not (path / shard_name).is_file():
            raise CacheError(f"corrupt cache at {path}: shard {shard_name} is not a regular file")
        try:
            with h5py.File(path / shard_name, "r") as f:
                _check_rows(path, shard_name, f, wanted[shard_name], listed, len(meta["class_names"]))
                labels = f["labels"][:]
                present = {m: f[f"present/{m}"][:] for m in mods}
                for m in mods:
                    if f[f"features/{m}"].shape[1:] != shapes[m]:
                        raise ValueError(f"features/{m} has shape {list(f[f'features/{m}'].shape)}, meta.json says "
                                         f"[N, {shapes[m][0]}, {shapes[m][1]}]")
        except (OSError, KeyError, ValueError, IndexError) as err:
            raise CacheError(f"corrupt cache at {path}: shard {shard_name} is unreadable ({err})") from None
        for split, rows, dest in wanted[shard_name]:
            plans[split].labels[dest] = labels[rows]
            for m in mods:
                plans[split].present[m][dest] = present[m][rows]
    return plans


class RowReader:
    """Reads rows of one split from its shards (each opened once, on first use; ``close`` after).

    One reader per thread: the prefetch thread of a streamed split owns its own."""

    def __init__(self, plan: SplitPlan):
        self.plan = plan
        self.files: dict[int, h5py.File] = {}
        self.warned: set[str] = set()
        self.scratch: dict = {}  # ``_read_sorted``'s block buffers, one per (dtype, row shape)

    def _file(self, code: int) -> h5py.File:
        if code not in self.files:
            self.files[code] = h5py.File(self.plan.path / self.plan.shards[code], "r")
        return self.files[code]

    def read(self, rows: np.ndarray, modalities=None) -> dict[str, np.ndarray]:
        """The features of split rows ``rows`` (any order, no repeats), ``[len(rows), T, D]`` float16 each,
        in the order given; of ``modalities`` only, when given."""
        plan = self.plan
        rows = np.asarray(rows, dtype=np.int64)
        out = {m: np.empty((len(rows), *shape), np.float16) for m, shape in plan.shapes.items()
               if modalities is None or m in modalities}
        codes, at_rows = plan.shard[rows], plan.row[rows]
        order = np.lexsort((at_rows, codes))
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        try:
            for group in np.split(order, bounds) if len(order) else []:
                f = self._file(int(codes[group[0]]))
                for m in out:
                    _read_sorted(f[f"features/{m}"], at_rows[group], out[m], group, self.scratch)
        except (OSError, KeyError, ValueError) as err:
            raise CacheError(f"corrupt cache at {plan.path}: reading the {plan.split} split failed ({err})") from None
        for m, values in out.items():
            self._finite(m, values)
        return out

    def _finite(self, m: str, values: np.ndarray) -> None:
        if all_finite(values):
            return
        bad = ~np.isfinite(values)
        plan = self.plan
        if not plan.allow_nonfinite:
            raise CacheError(f"cache at {plan.path}: NaN or inf value(s) in {m} features of the {plan.split} split "
                             f"({int(bad.sum()):,} in one block of {len(values):,} rows); refused "
                             f"(--allow-nonfinite zeroes them)")
        values[bad] = 0
        if m not in self.warned:
            self.warned.add(m)
            print(f"warning: NaN or inf value(s) in {m} features of the {plan.split} split of {plan.path} set to 0 "
                  f"(--allow-nonfinite)", file=sys.stderr)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


FINITE_ROWS = 4096  # rows tested at a time: the integer temporary stays a few MB


def all_finite(values: np.ndarray) -> bool:
    """Whether float16 ``values`` hold no NaN or inf: those are the values whose five exponent bits are
    all set, so one integer pass over the bits (``|bits| < 0x7C00``) answers it. numpy's float16
    ``isfinite`` goes through a float conversion per element and took 4× as long, most of a streamed
    epoch's reading (``benchmarks/RESULTS.md``, issue 24 part 2). In blocks of ``FINITE_ROWS`` rows."""
    bits = values.view(np.uint16)
    for start in range(0, len(bits), FINITE_ROWS):
        if int(np.bitwise_and(bits[start:start + FINITE_ROWS], 0x7FFF).max(initial=0)) >= 0x7C00:
            return False
    return True


def _read_sorted(ds, rows: np.ndarray, out: np.ndarray, at: np.ndarray, scratch: dict) -> None:
    """``out[at[i]] = ds[rows[i]]`` for ascending ``rows`` of one shard's dataset ``ds`` (see the module).

    Copies as few times as the rows allow: a span of consecutive rows bound for consecutive places
    (a chunk of a shard that holds one split) is read straight into ``out``; a dense span is read
    into ``scratch`` (one block buffer per reader, reused, so no fresh pages per block) and its rows
    taken from there into ``out`` in one pass."""
    i = 0
    while i < len(rows):
        start = int(rows[i])
        j = int(np.searchsorted(rows, start + BLOCK_ROWS))
        stop = int(rows[j - 1]) + 1
        place = int(at[i])
        consecutive = bool((np.diff(at[i:j]) == 1).all())  # out[place:place + j - i] is the destination
        if consecutive and ds.dtype == out.dtype and stop - start == j - i:
            ds.read_direct(out, np.s_[start:stop], np.s_[place:place + j - i])
        elif (j - i) * DENSE >= stop - start:
            key = (ds.dtype, ds.shape[1:])
            if key not in scratch:
                scratch[key] = np.empty((BLOCK_ROWS, *ds.shape[1:]), ds.dtype)
            block = scratch[key][:stop - start]
            ds.read_direct(block, np.s_[start:stop])
            if consecutive and ds.dtype == out.dtype:
                np.take(block, rows[i:j] - start, axis=0, out=out[place:place + j - i])
            else:
                out[at[i:j]] = block[rows[i:j] - start]
        else:
            out[at[i:j]] = ds[rows[i:j]]
        i = j
