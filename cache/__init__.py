"""The feature cache: the contract between stage one (extraction) and stage two (heads).

A cache is a folder ``<root>/<dataset>/<backbone>/`` holding ``meta.json``, ``manifest.parquet`` and
float16 HDF5 shards. Both stages import only from here; see ``store.py`` for the layout.
"""
from cache.store import (
    SCHEMA_VERSION,
    CacheError,
    CacheWriter,
    FeatureSplit,
    build_manifest,
    cache_info,
    load_meta,
    load_split,
    verify,
    write_arrays,
)

__all__ = [
    "SCHEMA_VERSION",
    "CacheError",
    "CacheWriter",
    "FeatureSplit",
    "build_manifest",
    "cache_info",
    "load_meta",
    "load_split",
    "verify",
    "write_arrays",
]
