"""The feature cache: the contract between stage one (extraction) and stage two (heads).

A cache is a folder ``<root>/<dataset>/<backbone>/`` holding ``meta.json``, ``manifest.parquet`` and
float16 HDF5 shards with content checksums. Both stages import only from here; see ``store.py`` for
the layout, ``writer.py`` and ``reader.py`` for writing and reading it, ``checksum.py`` and
``verify.py`` for what ``cache verify`` checks.
"""
from cache.reader import FeatureSplit, cache_info, load_split, load_splits
from cache.store import SCHEMA_VERSION, CacheError, build_manifest, code_version, load_meta
from cache.verify import Report, check, verify
from cache.writer import CacheWriter, write_arrays

__all__ = [
    "SCHEMA_VERSION",
    "CacheError",
    "CacheWriter",
    "FeatureSplit",
    "build_manifest",
    "cache_info",
    "code_version",
    "load_meta",
    "load_split",
    "load_splits",
    "check",
    "Report",
    "verify",
    "write_arrays",
]
