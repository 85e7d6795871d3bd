"""HDF5 shard store: writer (resumable, atomic shards), manifest, reader.

Layout of one cache folder::

    meta.json          schema version, dataset, backbone (+ resolved config), modalities with
                       tokens and dim, class names, split rule, code version, creation time
    manifest.parquet   one row per sample: sample_id, label, split, shard, row, present_<modality>
    shard-RR-SSSSS.h5  /ids /labels /splits /features/<m> [N,T,D] f16 /present/<m> [N] /extra/<k> [N]

The shards are the source of truth; the manifest is rebuilt from them by ``build_manifest`` (after
every rank of a multi-process extraction has closed its writer). A shard is written under a
temporary name and renamed, so a shard on disk is always whole: a killed writer loses at most the
samples it had buffered, and a rerun skips every id already in a shard.

Every dataset of a shard, and the shard as a whole, carries a BLAKE2b content checksum as an HDF5
attribute ``blake2b``, written before the rename (``cache/checksum.py``); ``cache/verify.py``
recomputes them and checks each shard against the manifest and meta.json.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from cache.checksum import stamp

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SHARD = re.compile(r"^shard-(\d+)-(\d+)\.h5$")
_F16_MAX = float(np.finfo(np.float16).max)


class CacheError(Exception):
    """A cache is missing, corrupt, or would become inconsistent. The message is one clear line."""


def _code_version() -> str:
    """The package version plus the git commit when run from a checkout (recorded in meta.json)."""
    root = Path(__file__).resolve().parent.parent
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_file = root / ".git" / ref[5:]
            commit = ref_file.read_text().strip() if ref_file.exists() else "uncommitted"
        else:
            commit = ref
    except OSError:
        commit = "unknown"
    return f"0.1.0+{commit[:12]}"


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise CacheError(f"invalid {kind} name {name!r}: use lowercase letters, digits and '_', starting with a letter")


def load_meta(path: str | Path) -> dict:
    """Read and sanity-check ``meta.json`` of the cache at ``path``."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CacheError(f"no cache at {path}: folder does not exist")
    if not meta_file.exists():
        raise CacheError(f"no cache at {path}: meta.json is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"corrupt cache at {path}: meta.json is unreadable ({err})") from None
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheError(f"cache at {path} has schema version {version}, this tool reads version {SCHEMA_VERSION}")
    for key in ("modalities", "class_names"):
        if key not in meta:
            raise CacheError(f"corrupt cache at {path}: meta.json lacks {key!r}")
    return meta


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
            "code_version": _code_version(),
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
            shard_rank, seq = map(int, _SHARD.match(shard.name).groups())
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


def _shards(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("shard-*.h5") if _SHARD.match(p.name))


def build_manifest(path: str | Path):
    """Scan every shard and write ``manifest.parquet`` (atomically). Refuses duplicate sample ids."""
    import polars as pl

    path = Path(path)
    meta = load_meta(path)
    mods = list(meta["modalities"])
    cols: dict[str, list] = {"sample_id": [], "label": [], "split": [], "shard": [], "row": []}
    cols.update({f"present_{m}": [] for m in mods})
    for shard in _shards(path):
        with h5py.File(shard, "r") as f:
            ids = [s.decode() for s in f["ids"][:]]
            cols["sample_id"] += ids
            cols["label"] += f["labels"][:].tolist()
            cols["split"] += [s.decode() for s in f["splits"][:]]
            cols["shard"] += [shard.name] * len(ids)
            cols["row"] += list(range(len(ids)))
            for m in mods:
                cols[f"present_{m}"] += f[f"present/{m}"][:].tolist()
    frame = pl.DataFrame(cols, schema_overrides={"label": pl.Int64, "row": pl.Int64})
    dup = frame.filter(pl.col("sample_id").is_duplicated())
    if dup.height:
        raise CacheError(f"cache at {path} holds {dup.height} rows with duplicated sample ids, e.g. {dup['sample_id'][0]!r}")
    tmp = path / ".manifest.parquet.tmp"
    frame.write_parquet(tmp)
    os.replace(tmp, path / "manifest.parquet")
    return frame


def _manifest(path: Path):
    import polars as pl

    file = path / "manifest.parquet"
    if not file.exists():
        raise CacheError(f"cache at {path} has no manifest.parquet (an unfinished extraction? rerun it to finish)")
    try:
        return pl.read_parquet(file)
    except Exception as err:  # polars raises several error types for a damaged file
        raise CacheError(f"corrupt cache at {path}: manifest.parquet is unreadable ({type(err).__name__})") from None


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

    path = Path(path)
    meta = load_meta(path)
    if split not in SPLITS:
        raise CacheError(f"unknown split {split!r}: use train, val or test")
    mods = modalities or list(meta["modalities"])
    unknown = set(mods) - set(meta["modalities"])
    if unknown:
        raise CacheError(f"cache at {path} has no modality {sorted(unknown)}; it has {list(meta['modalities'])}")
    rows = _manifest(path).filter(pl.col("split") == split)
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
    manifest = _manifest(path)
    counts = {s: manifest.filter(pl.col("split") == s).height for s in SPLITS}
    coverage = {m: float(manifest[f"present_{m}"].mean() or 0.0) for m in meta["modalities"]}
    failed = path / "failed.parquet"
    n_failed = pl.read_parquet(failed).height if failed.exists() else 0
    return {**meta, "counts": counts, "present_rate": coverage, "failed": n_failed, "path": str(path)}


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
