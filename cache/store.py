"""The on-disk layout of a cache: meta.json, the shards, and the manifest built from them.

Layout of one cache folder::

    meta.json          schema version, dataset, backbone (+ resolved config), modalities with
                       tokens and dim, class names, split rule, code version, creation time
    manifest.parquet   one row per sample: sample_id, label, split, shard, row, present_<modality>
    shard-RR-SSSSS.h5  /ids /labels /splits /features/<m> [N,T,D] f16 /present/<m> [N] /extra/<k> [N]

The shards are the source of truth; the manifest is rebuilt from them by ``build_manifest`` (after
every rank of a multi-process extraction has closed its writer). ``cache/writer.py`` writes the
shards (each whole, under a temporary name and renamed), ``cache/reader.py`` reads splits back.

Every dataset of a shard, and the shard as a whole, carries a BLAKE2b content checksum as an HDF5
attribute ``blake2b``, written before the rename (``cache/checksum.py``); ``cache/verify.py``
recomputes them and checks each shard against the manifest and meta.json.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
SHARD_NAME = re.compile(r"^shard-(\d+)-(\d+)\.h5$")


class CacheError(Exception):
    """A cache is missing, corrupt, or would become inconsistent. The message is one clear line."""


def code_version() -> str:
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
    if not isinstance(meta, dict):
        raise CacheError(f"corrupt cache at {path}: meta.json holds a {type(meta).__name__}, not an object")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheError(f"cache at {path} has schema version {version}, this tool reads version {SCHEMA_VERSION}")
    for key in ("modalities", "class_names"):
        if key not in meta:
            raise CacheError(f"corrupt cache at {path}: meta.json lacks {key!r}")
    if not isinstance(meta["class_names"], list) or not isinstance(meta["modalities"], dict):
        raise CacheError(f"corrupt cache at {path}: meta.json's class_names must be a list, modalities an object")
    return meta


def shard_files(path: Path) -> list[Path]:
    """The shards of the cache at ``path``, in name order (temporary files of a writer left out)."""
    return sorted(p for p in path.glob("shard-*.h5") if SHARD_NAME.match(p.name))


def build_manifest(path: str | Path):
    """Scan every shard and write ``manifest.parquet`` (atomically). Refuses duplicate sample ids."""
    import polars as pl

    path = Path(path)
    meta = load_meta(path)
    mods = list(meta["modalities"])
    cols: dict[str, list] = {"sample_id": [], "label": [], "split": [], "shard": [], "row": []}
    cols.update({f"present_{m}": [] for m in mods})
    for shard in shard_files(path):
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


def read_manifest(path: Path):
    """``manifest.parquet`` of the cache at ``path`` as a polars frame; missing or unreadable: a ``CacheError``."""
    import polars as pl

    file = path / "manifest.parquet"
    if not file.exists():
        raise CacheError(f"cache at {path} has no manifest.parquet (an unfinished extraction? rerun it to finish)")
    try:
        return pl.read_parquet(file)
    except Exception as err:  # polars raises several error types for a damaged file
        raise CacheError(f"corrupt cache at {path}: manifest.parquet is unreadable ({type(err).__name__})") from None
