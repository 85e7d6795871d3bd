"""Write a whole cache folder so that ``--out`` is never left half written, and never silently reused.

Why: commands that create a cache from scratch (``make-synthetic``, ``import-features``) used to
write into ``--out`` directly. Given a folder that already held a cache, the writer resumed it
instead: the old samples stayed, the command still said "wrote", and a different ``--seed`` changed
nothing. And a failure halfway left a folder that looked like a cache.

``write_folder`` refuses an existing non-empty ``--out`` unless ``overwrite`` is given; it writes
into a temporary folder beside the target (same file system, so renames are atomic), then swaps it
in: the old folder is renamed aside, the new one renamed into place, the old one deleted. A failure
while writing removes the temporary folder and leaves ``--out`` as it was.

Two writers of one target: ``claim`` takes an exclusive lock file beside it (``O_CREAT | O_EXCL``,
holding the writer's pid), so a second concurrent writer gets one line instead of both "succeeding"
and the second silently replacing the first. A lock or temporary folder whose process is gone (a
kill -9, a full disk that killed the writer) is removed on the next start (``remove_stale``).
A write checks first that the space it needs is there (``check_space``: the free bytes of the file
system and the process's file-size limit), so h5py never meets a full disk mid-shard.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

from cache.store import CacheError


def alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _pid_of(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def remove_stale(target: Path) -> None:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` folders beside ``target`` whose process is gone."""
    if not target.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = _pid_of(path.name)
            if pid is not None and pid != os.getpid() and not alive(pid):
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def claim(target: Path, what: str = "--out"):
    """Hold an exclusive claim on ``target`` while writing it: ``.NAME.lock`` beside it, created with
    ``O_EXCL`` (atomic on a local file system), holding this process's pid; removed on exit.

    A live holder → ``CacheError`` naming its pid; a dead one's lock (kill -9) is taken over.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(f".{target.name}.lock")
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and alive(pid):
                raise CacheError(f"{what} {target} is being written by process {pid}; wait for it to finish, "
                                 f"or choose another name") from None
            if not pid:  # written by a process that died between create and write, or just being written
                time.sleep(0.2)
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and alive(pid):
                    continue
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:
        raise CacheError(f"{what} {target} is being written by another process; wait for it, or choose another name")
    try:
        remove_stale(target)
        yield target
    finally:
        lock.unlink(missing_ok=True)


def available_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable; the free pages where that is unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_space(folder: Path, need: int) -> None:
    """Refuse before writing when ``need`` bytes cannot fit: the file system's free space, and the
    process's file-size limit (``ulimit -f``; beyond it the kernel stops the writer mid-file)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if need > free:
        raise CacheError(f"no space left on device for {folder}: the write needs about {need / 2**20:,.1f} MiB, "
                         f"{free / 2**20:,.1f} MiB are free")
    if limit != resource.RLIM_INFINITY and need > limit:
        raise CacheError(f"the write to {folder} needs about {need / 2**20:,.1f} MiB, more than this process's "
                         f"file-size limit (ulimit -f) of {limit / 2**20:,.1f} MiB")


def write_folder(out: str | Path, overwrite: bool, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary folder beside ``out``, then make it ``out`` (see module doc)."""
    out = Path(out)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with claim(out):
        _check_target(out, overwrite)  # again under the claim: another writer may have finished meanwhile
        return _write_swap(out, write)


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CacheError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CacheError(f"--out {out} already exists and is not empty: pass --overwrite to replace it, "
                         f"or choose another --out")


def _write_swap(out: Path, write: Callable[[Path], object]) -> Path:
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
