"""The feature cache: the contract between stage one (extraction) and stage two (heads).

A cache is a folder ``<root>/<dataset>/<backbone>/`` holding ``meta.json``, ``manifest.parquet`` and
float16 HDF5 shards with content checksums. Both stages import only from here; see ``store.py`` for
the layout, ``checksum.py`` and ``verify.py`` for what ``cache verify`` checks.
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
    write_arrays,
)
from cache.verify import Report, check, verify

__all__ = [
    "SCHEMA_VERSION",
    "CacheError",
    "CacheWriter",
    "FeatureSplit",
    "build_manifest",
    "cache_info",
    "load_meta",
    "load_split",
    "check",
    "Report",
    "verify",
    "write_arrays",
]
