"""``cache verify``: every shard against its checksums, the manifest and meta.json.

What is checked, and why each:

- the manifest lists exactly the shards on disk, with no sample id twice (a half-copied cache);
- per shard: ids, labels, splits and present masks equal the manifest's rows (the reader trusts the
  manifest for which rows form a split, the shard for the values; they must agree);
- shapes match meta.json, labels lie in the class range, values are finite, absent samples hold
  zeros (the contract stage two relies on);
- the content checksums (``cache/checksum.py``) recomputed from the bytes equal those stored when
  the shard was written: only this sees a value changed in place.

Shards written before checksums existed still verify; ``check`` then adds a warning that their
content was not verified, and ``cache verify`` prints it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cache.checksum import ATTR, array_digest, datasets, read_values, shard_digest
from cache.store import load_meta, read_manifest, shard_files

OLD_SHARDS = "no checksums: written by an older version; content not verified"


@dataclass
class Report:
    """What ``check`` found: problems (the cache is not valid) and warnings (valid, but not fully checked)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _differ(what: str, ids: list[str], disk, listed) -> str | None:
    """A one-line problem when ``disk`` and ``listed`` (one value per sample) differ, else None."""
    disk, listed = np.asarray(disk), np.asarray(listed)
    if disk.shape != listed.shape:
        return None  # a count mismatch, reported on its own
    bad = np.flatnonzero(disk != listed)
    if not len(bad):
        return None
    i = bad[0]
    return (f"{what} of {len(bad)} sample(s) differ from the manifest, e.g. {ids[i]!r}: "
            f"{disk[i]!r} in the shard, {listed[i]!r} in the manifest")


def _checksums(name: str, f, problems: list[str]) -> bool:
    """Recompute the shard's checksums; problems for any mismatch. False when it has none (older writer)."""
    stored_root = f.attrs.get(ATTR)
    if stored_root is None:
        return False
    digests, changed = {}, 0
    for ds_name, ds in datasets(f).items():
        digests[ds_name] = array_digest(read_values(ds))
        stored = ds.attrs.get(ATTR)
        if stored is None:
            problems.append(f"{name}/{ds_name}: no checksum, although the shard has them (added after writing?)")
            changed += 1
        elif stored != digests[ds_name]:
            problems.append(f"{name}/{ds_name}: content checksum mismatch (the bytes changed after writing)")
            changed += 1
    if not changed and shard_digest(digests) != stored_root:
        problems.append(f"{name}: shard checksum mismatch (a dataset was added, removed or renamed)")
    return True


def _check_shard(shard: Path, rows, meta: dict, problems: list[str]) -> tuple[int, bool]:
    """Check one open-able shard; returns (samples on disk, whether it carries checksums)."""
    name, n_classes = shard.name, len(meta["class_names"])
    with h5py.File(shard, "r") as f:
        n = f["ids"].shape[0]
        if n != rows.height:
            problems.append(f"{name}: {n} samples on disk, {rows.height} in the manifest")
        ids = [s.decode() for s in f["ids"][:]]
        if ids != rows["sample_id"].to_list():
            problems.append(f"{name}: sample ids differ from the manifest")
        labels = f["labels"][:]
        if n and (labels.min() < 0 or labels.max() >= n_classes):
            problems.append(f"{name}: labels outside [0, {n_classes})")
        splits = [s.decode() for s in f["splits"][:]]
        same_ids = ids == rows["sample_id"].to_list()
        if same_ids:
            for what, disk, listed in (("labels", labels, rows["label"].to_numpy()),
                                       ("splits", splits, rows["split"].to_list())):
                if (line := _differ(what, ids, disk, listed)) is not None:
                    problems.append(f"{name}: {line}")
        for m, spec in meta["modalities"].items():
            x = f[f"features/{m}"]
            if tuple(x.shape) != (n, spec["tokens"], spec["dim"]):
                problems.append(f"{name}/{m}: shape {list(x.shape)}, meta says [{n}, {spec['tokens']}, {spec['dim']}]")
                continue
            arr = x[:]
            if not np.isfinite(arr).all():
                problems.append(f"{name}/{m}: non-finite values")
            p = f[f"present/{m}"][:]
            if (arr[~p] != 0).any():
                problems.append(f"{name}/{m}: absent samples with non-zero features")
            column = f"present_{m}"
            if same_ids and column in rows.columns:
                if (line := _differ(f"presence of {m}", ids, p, rows[column].to_numpy())) is not None:
                    problems.append(f"{name}: {line}")
        has_sums = _checksums(name, f, problems)
    return n, has_sums


def check(path: str | Path) -> Report:
    """Check every shard of the cache at ``path`` against checksums, manifest and meta (see module doc)."""
    import polars as pl

    path = Path(path)
    meta = load_meta(path)
    report = Report()
    problems = report.problems
    manifest = read_manifest(path)
    if manifest["sample_id"].is_duplicated().any():
        problems.append("manifest holds duplicated sample ids")
    shards = shard_files(path)
    listed = set(manifest["shard"].unique().to_list())
    for missing in sorted(listed - {s.name for s in shards}):
        problems.append(f"{missing}: listed in the manifest but missing on disk")
    seen, unsummed = 0, 0
    for shard in shards:
        rows = manifest.filter(pl.col("shard") == shard.name).sort("row")
        if not shard.is_file():  # a FIFO would block h5py's open for ever
            problems.append(f"{shard.name}: not a regular file")
            continue
        try:
            n, has_sums = _check_shard(shard, rows, meta, problems)
        except (OSError, KeyError) as err:
            problems.append(f"{shard.name}: unreadable ({err})")
            continue
        seen += n
        unsummed += not has_sums
    if seen != manifest.height and not problems:
        problems.append(f"shards hold {seen} samples, the manifest {manifest.height}")
    if unsummed:
        report.warnings.append(f"{OLD_SHARDS} ({unsummed} of {len(shards)} shard(s))")
    return report


def verify(path: str | Path) -> list[str]:
    """The problems ``check`` finds (empty = valid); its warnings are left out."""
    return check(path).problems
