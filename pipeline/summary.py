"""What an extraction did: the counts it reports (``Summary``) and ``failed.parquet``.

Each process writes the failures it saw to its own part (``.failed-RR.parquet``); process 0, after
every process closed its writer, rebuilds the manifest, merges the parts into ``failed.parquet``
and counts the run from both (``finish``). Failure reasons are counted by cause, without the file
they name, so the summary stays a few lines however many files failed.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from cache import build_manifest
from pipeline.datasets.base import DatasetListing
from pipeline.decode import LFS_REASON, cause

FAILED = "failed.parquet"


@dataclass
class Summary:
    """What one run did. Counts of ``written``/``failed`` cover all processes (known to process 0)."""

    cache: Path
    rank: int = 0
    listed: int = 0
    rejected_by_listing: int = 0
    already_done: int = 0
    attempted: int = 0
    written: int = 0
    failed_samples: int = 0
    failed_modalities: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # cause (reason without file name) -> count
    lfs_pointers: int = 0  # media files that are Git LFS pointers (a clone without `git lfs pull`)
    data_root: Path | None = None
    in_cache: int = 0
    left_out: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.attempted / self.seconds if self.seconds > 0 else 0.0


def _write_parquet_atomic(frame, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, target)


def _failure_frame(rows: list[tuple[str, str, str]]):
    schema = {"sample_id": pl.String, "modality": pl.String, "reason": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row")


def clear_failure_parts(path: Path) -> None:
    """Delete the per-process failure parts a crashed run left (process 0, before anyone writes)."""
    for stale in path.glob(".failed-*.parquet"):
        stale.unlink()


def write_failure_part(path: Path, rank: int, rows: list[tuple[str, str, str]]) -> None:
    """This process's failures ``(sample_id, modality, reason)``, for process 0 to merge."""
    _write_parquet_atomic(_failure_frame(rows), path / f".failed-{rank:02d}.parquet")


def _merge_failed(path: Path, listed_ids: set[str], written_now: set[str]):
    """Merge this run's per-process failure parts into failed.parquet (atomically).

    A sample this run attempted has its old rows replaced (by new ones, or by nothing if it now
    succeeded); rows of samples this run did not touch are kept; rows of samples no longer listed
    are dropped. Returns this run's rows.
    """
    parts = sorted(path.glob(".failed-*.parquet"))
    new = pl.concat([pl.read_parquet(p) for p in parts]) if parts else _failure_frame([])
    old = pl.read_parquet(path / FAILED) if (path / FAILED).exists() else _failure_frame([])
    touched = set(new["sample_id"].to_list()) | written_now
    old = old.filter(~pl.col("sample_id").is_in(list(touched)) & pl.col("sample_id").is_in(list(listed_ids)))
    merged = pl.concat([new, old]).unique(subset=["sample_id", "modality"], keep="first", maintain_order=True)
    _write_parquet_atomic(merged, path / FAILED)
    for p in parts:
        p.unlink()
    return new


def finish(path: Path, listing: DatasetListing, done_at_start: set[str], summary: Summary) -> None:
    """Process 0, after every process closed its writer: manifest, failed.parquet, the run's counts."""
    manifest = build_manifest(path)
    done_now = set(manifest["sample_id"].to_list())
    rejected = {s.sample_id for s in listing.skipped}
    new = _merge_failed(path, {r.sample_id for r in listing.samples} | rejected, done_now - done_at_start)
    in_cache = pl.col("sample_id").is_in(list(done_now))
    summary.in_cache = manifest.height
    summary.written = len(done_now - done_at_start)
    summary.failed_samples = new.filter(~in_cache & ~pl.col("sample_id").is_in(list(rejected)))["sample_id"].n_unique()
    # A modality stored absent is a decoding failure of a sample that is in the cache; a listing row
    # (modality "") of an id in the cache is a rejected duplicate row, not an absent modality.
    summary.failed_modalities = new.filter(in_cache & (pl.col("modality") != "")).height
    causes = Counter(cause(r) for r in new["reason"].to_list())
    summary.reasons = dict(sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])))
    summary.lfs_pointers = sum(n for c, n in causes.items() if c.startswith(LFS_REASON))
