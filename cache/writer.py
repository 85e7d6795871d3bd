"""Writing a cache: samples appended one whole shard at a time, resumable, several ranks at once.

A shard is written under a temporary name and renamed, so a shard on disk is always whole: a killed
writer loses at most the samples it had buffered, and a rerun skips every id already in a shard.
The content checksums (``cache/checksum.py``) are stamped before that rename. ``write_arrays``
writes in-memory arrays as a complete cache through the same writer.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from cache.checksum import stamp
from cache.store import SCHEMA_VERSION, SHARD_NAME, SPLITS, CacheError, build_manifest, code_version, load_meta

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_F16_MAX = float(np.finfo(np.float16).max)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise CacheError(f"invalid {kind} name {name!r}: use lowercase letters, digits and '_', starting with a letter")


def _atomic_write_text(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


class CacheWriter:
    """Append samples to a cache, one whole shard at a time.

    ``done_ids`` holds every sample id already in any shard of the cache (all ranks), so a rerun of
    an interrupted job can skip them; ``add`` silently skips such ids as well, which is what makes a
    resumed job end with every sample exactly once. Several processes may write the same cache if
    each uses its own ``rank`` and a disjoint set of ids.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        dataset: str,
        backbone: str,
        modalities: dict[str, tuple[int, int]],
        class_names: list[str],
        split_rule: str = "",
        backbone_config: dict | None = None,
        extra_meta: dict | None = None,
        shard_size: int = 1024,
        rank: int = 0,
    ):
        self.path = Path(path)
        if not modalities:
            raise CacheError("a cache needs at least one modality")
        for name, (tokens, dim) in modalities.items():
            _check_name("modality", name)
            if int(tokens) < 1 or int(dim) < 1:
                raise CacheError(f"modality {name!r}: tokens and dim must be positive, got [{tokens}, {dim}]")
        if not class_names:
            raise CacheError("a cache needs class names")
        self.modalities = {m: (int(t), int(d)) for m, (t, d) in modalities.items()}
        self.num_classes = len(class_names)
        self.shard_size = int(shard_size)
        self.rank = int(rank)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "dataset": dataset,
            "backbone": backbone,
            "backbone_config": backbone_config or {},
            "modalities": {m: {"tokens": t, "dim": d} for m, (t, d) in self.modalities.items()},
            "class_names": list(class_names),
            "split_rule": split_rule,
            "code_version": code_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **(extra_meta or {}),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / "meta.json").exists():
            old = load_meta(self.path)
            if old["modalities"] != meta["modalities"] or old["class_names"] != meta["class_names"]:
                raise CacheError(
                    f"cache at {self.path} holds other modalities/dims/classes; use a new output folder"
                )
        elif self.rank == 0:
            _atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2))
        for stale in self.path.glob(f".shard-{self.rank:02d}-*.tmp"):
            stale.unlink()  # a shard that a killed writer never finished
        self.done_ids: set[str] = set()
        self._next_seq = 0
        for shard in sorted(self.path.glob("shard-*.h5")):
            with h5py.File(shard, "r") as f:
                self.done_ids.update(s.decode() for s in f["ids"][:])
            shard_rank, seq = map(int, SHARD_NAME.match(shard.name).groups())
            if shard_rank == self.rank:
                self._next_seq = max(self._next_seq, seq + 1)
        self._buffer: list[tuple] = []
        self._buffered_ids: set[str] = set()
        self.written = 0

    def add(
        self,
        ids: list[str],
        labels,
        splits: list[str],
        features: dict[str, np.ndarray],
        present: dict[str, np.ndarray] | None = None,
        extras: dict[str, np.ndarray] | None = None,
    ) -> int:
        """Buffer a batch of samples; returns how many were new. Absent modalities must be zeros."""
        ids = [str(i) for i in ids]
        n = len(ids)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(set(ids)) != n:
            raise CacheError("a batch holds the same sample id twice")
        if labels.shape[0] != n or len(splits) != n:
            raise CacheError(f"batch of {n} ids has {labels.shape[0]} labels and {len(splits)} splits")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise CacheError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        bad_split = set(splits) - set(SPLITS)
        if bad_split:
            raise CacheError(f"unknown split(s) {sorted(bad_split)}: use train, val or test")
        if set(features) != set(self.modalities):
            raise CacheError(f"features for {sorted(features)}, cache expects {sorted(self.modalities)}")
        feats = {}
        for m, (tokens, dim) in self.modalities.items():
            x = np.asarray(features[m], dtype=np.float32)
            if x.ndim == 2:
                x = x[:, None, :]
            if x.shape != (n, tokens, dim):
                raise CacheError(f"modality {m!r}: got shape {list(x.shape)}, cache expects [{n}, {tokens}, {dim}]")
            if not np.isfinite(x).all():
                raise CacheError(f"modality {m!r}: non-finite values (NaN or inf) in features; refused")
            if np.abs(x).max(initial=0.0) > _F16_MAX:
                raise CacheError(f"modality {m!r}: values beyond the float16 range (|x| > {_F16_MAX:g}); refused")
            feats[m] = x.astype(np.float16)
        pres = {}
        for m in self.modalities:
            p = np.ones(n, bool) if present is None or m not in present else np.asarray(present[m], bool)
            if p.shape != (n,):
                raise CacheError(f"present mask of {m!r} has shape {list(p.shape)}, expected [{n}]")
            feats[m][~p] = 0  # a missing modality is zeros on disk, never NaN
            pres[m] = p
        extras = {k: np.asarray(v).reshape(n) for k, v in (extras or {}).items()}
        for k in extras:
            _check_name("extra", k)
        keep = [i for i, s in enumerate(ids) if s not in self.done_ids and s not in self._buffered_ids]
        if not keep:
            return 0
        sel = np.asarray(keep)
        self._buffer.append((
            [ids[i] for i in keep], labels[sel], [splits[i] for i in keep],
            {m: x[sel] for m, x in feats.items()}, {m: p[sel] for m, p in pres.items()},
            {k: v[sel] for k, v in extras.items()},
        ))
        self._buffered_ids.update(ids[i] for i in keep)
        if len(self._buffered_ids) >= self.shard_size:
            self.flush()
        return len(keep)

    def flush(self) -> None:
        """Write everything buffered as one shard (temporary name, then an atomic rename)."""
        if not self._buffer:
            return
        ids = [i for b in self._buffer for i in b[0]]
        labels = np.concatenate([b[1] for b in self._buffer])
        splits = [s for b in self._buffer for s in b[2]]
        name = f"shard-{self.rank:02d}-{self._next_seq:05d}.h5"
        tmp = self.path / f".{name}.tmp"
        str_dt = h5py.string_dtype("utf-8")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=str_dt)
            f.create_dataset("labels", data=labels)
            f.create_dataset("splits", data=np.array(splits, dtype=object), dtype=str_dt)
            for m in self.modalities:
                f.create_dataset(f"features/{m}", data=np.concatenate([b[3][m] for b in self._buffer]))
                f.create_dataset(f"present/{m}", data=np.concatenate([b[4][m] for b in self._buffer]))
            for k in self._buffer[0][5]:
                f.create_dataset(f"extra/{k}", data=np.concatenate([b[5][k] for b in self._buffer]))
            stamp(f)  # content checksums, inside the same atomic rename as the data
        os.replace(tmp, self.path / name)
        self._next_seq += 1
        self.done_ids.update(ids)
        self.written += len(ids)
        self._buffer, self._buffered_ids = [], set()

    def close(self, finalize: bool = True) -> None:
        """Flush; with ``finalize`` (single process, or rank 0 after all ranks closed) rebuild the manifest."""
        self.flush()
        if finalize:
            build_manifest(self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # On an error keep what is whole on disk and skip the manifest: the rerun resumes.
        self.close(finalize=exc_type is None)


def write_arrays(
    path: str | Path,
    *,
    dataset: str,
    backbone: str,
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    splits: list[str],
    class_names: list[str],
    ids: list[str] | None = None,
    present: dict[str, np.ndarray] | None = None,
    split_rule: str = "",
    extra_meta: dict | None = None,
    shard_size: int = 8192,
) -> Path:
    """Write in-memory arrays (``[N, D]`` or ``[N, T, D]`` per modality) as a complete cache."""
    feats = {m: (x[:, None, :] if x.ndim == 2 else x) for m, x in features.items()}
    n = len(labels)
    for m, x in feats.items():
        if x.ndim != 3 or x.shape[0] != n:
            raise CacheError(f"modality {m!r}: expected [N, D] or [N, T, D] with N = {n}, got {list(x.shape)}")
    ids = ids if ids is not None else [f"{i:07d}" for i in range(n)]
    writer = CacheWriter(
        path, dataset=dataset, backbone=backbone,
        modalities={m: (x.shape[1], x.shape[2]) for m, x in feats.items()},
        class_names=class_names, split_rule=split_rule, extra_meta=extra_meta, shard_size=shard_size,
    )
    for start in range(0, n, shard_size):
        sl = slice(start, start + shard_size)
        writer.add(
            ids[sl], labels[sl], splits[sl], {m: x[sl] for m, x in feats.items()},
            None if present is None else {m: p[sl] for m, p in present.items()},
        )
    writer.close()
    return Path(path)
