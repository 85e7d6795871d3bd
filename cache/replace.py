"""Write a whole cache folder so that ``--out`` is never left half written, and never silently reused.

Why: commands that create a cache from scratch (``make-synthetic``, ``import-features``) used to
write into ``--out`` directly. Given a folder that already held a cache, the writer resumed it
instead: the old samples stayed, the command still said "wrote", and a different ``--seed`` changed
nothing. And a failure halfway left a folder that looked like a cache.

``write_folder`` refuses an existing non-empty ``--out`` unless ``overwrite`` is given; it writes
into a temporary folder beside the target (same file system, so renames are atomic), then swaps it
in: the old folder is renamed aside, the new one renamed into place, the old one deleted. A failure
while writing removes the temporary folder and leaves ``--out`` as it was.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from cache.store import CacheError


def write_folder(out: str | Path, overwrite: bool, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary folder beside ``out``, then make it ``out`` (see module doc)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CacheError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CacheError(f"--out {out} already exists and is not empty: pass --overwrite to replace it, "
                         f"or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
