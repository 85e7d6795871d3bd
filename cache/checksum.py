"""Content checksums of a shard: BLAKE2b of every array, and of the shard as a whole.

Why: a shard that opens fine can still hold changed bytes (a flipped disk sector, a copy cut short
and padded, a hand edit), and counts, shapes and finiteness checks do not see that. So the writer
stores, with the shard and inside the same atomic rename:

- on every dataset (``ids``, ``labels``, ``splits``, ``features/<m>``, ``present/<m>``,
  ``extra/<k>``) an HDF5 attribute ``blake2b``: the hex BLAKE2b-256 digest of the array's dtype,
  shape and raw C-order bytes (strings: the UTF-8 text of each entry, NUL-separated);
- on the file's root an attribute ``blake2b``: the digest of the sorted ``name=digest`` lines of
  all its datasets, so a dataset added, removed or renamed is seen too.

``cache verify`` recomputes both (``cache/verify.py``). Shards written before checksums existed
have no ``blake2b`` attribute; they still verify, with a warning that their content was not checked.
hashlib's BLAKE2b needs no extra package and hashes faster than SHA-256 on CPUs without SHA units.
"""
from __future__ import annotations

import hashlib

import numpy as np

ATTR = "blake2b"


def array_digest(values) -> str:
    """Hex BLAKE2b-256 of an array: dtype, shape and bytes; a list of str hashes its UTF-8 entries."""
    h = hashlib.blake2b(digest_size=32)
    if isinstance(values, list) or (isinstance(values, np.ndarray) and values.dtype == object):
        items = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
        h.update(f"str[{len(items)}]".encode())
        h.update("\0".join(items).encode("utf-8"))
        return h.hexdigest()
    arr = np.ascontiguousarray(values)
    h.update(f"{arr.dtype.str}{list(arr.shape)}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def shard_digest(digests: dict[str, str]) -> str:
    """Hex BLAKE2b-256 over the ``name=digest`` lines of every dataset of one shard, sorted by name."""
    text = "".join(f"{name}={digests[name]}\n" for name in sorted(digests))
    return hashlib.blake2b(text.encode(), digest_size=32).hexdigest()


def datasets(f) -> dict[str, object]:
    """Every dataset of an open HDF5 file by its full name (``features/audio``), groups walked."""
    found: dict[str, object] = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj) if hasattr(obj, "shape") else None)
    return found


def read_values(dataset):
    """A dataset's contents as ``array_digest`` hashes them (strings as a list of str)."""
    if dataset.dtype.kind in ("O", "S", "U"):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[:]]
    return dataset[:]


def stamp(f) -> None:
    """Write the ``blake2b`` attribute on every dataset of ``f`` and on its root (before the rename)."""
    digests = {}
    for name, ds in datasets(f).items():
        digests[name] = array_digest(read_values(ds))
        ds.attrs[ATTR] = digests[name]
    f.attrs[ATTR] = shard_digest(digests)
