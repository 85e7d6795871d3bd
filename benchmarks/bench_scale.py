"""Memory and load speed of stage two on a large cache (issue 24): what `train-head` holds, how fast a
split set loads.

Prints, for the cache given (build the 32× one with `cli.py make-synthetic --out /tmp/scale/big --scale 32`):

- feature bytes: every split's features as the cache stores them (float16);
- load rate, cold and warm: `load_head_data` in MB/s of feature bytes, by the wall clock and per
  second of this process's CPU time (on a shared machine the wall clock mostly measures the queue). *Cold* first evicts the
  cache's own shard files from the page cache (`posix_fadvise(DONTNEED)` on those files only, so
  nothing else on the machine is touched); *warm* is a second load right after;
- peak RSS of `train-head --method concat --epochs 1` run as a child process, per `--feature-dtype`,
  and its ratio to the feature bytes against the target (≤ 1.5 × feature bytes + 1 GB);
- the streamed / in-memory epoch ratio (part 2 of the issue): the same `train-head` with `--in-memory no`
  right after the in-memory fp16 one (so the shards are in the page cache: warm), seconds per epoch
  from each run's `results.json` (its `seconds` over its epochs: the batch loop, validation each
  epoch and the final validation and test passes, streamed too), and the streamed run's peak RSS.

    .venv/bin/python benchmarks/bench_scale.py --cache /tmp/scale/big [--dtypes fp16,fp32] [--no-train] [--epochs 2]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.stdout.reconfigure(line_buffering=True)  # each figure is kept even if a later step is stopped
sys.path.insert(0, str(ROOT))

from cache import cache_info, load_meta  # noqa: E402
from cache.store import shard_files  # noqa: E402
from heads.blocks.loading import load_head_data  # noqa: E402

GB = 1024 ** 3


def feature_bytes(path: Path) -> int:
    meta, info = load_meta(path), cache_info(path)
    n = sum(info["counts"].values())
    return sum(n * m["tokens"] * m["dim"] * 2 for m in meta["modalities"].values())


def evict(path: Path) -> None:
    """Drop this cache's shards from the page cache (only these files)."""
    for shard in shard_files(path):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_rate(path: Path, size: int, dtype: str) -> dict[str, float]:
    out = {}
    for kind in ("cold", "warm"):
        if kind == "cold":
            evict(path)
        gc.collect()
        tick, cpu = time.perf_counter(), time.process_time()
        data = load_head_data([path], feature_dtype=dtype)
        seconds, cpu = time.perf_counter() - tick, time.process_time() - cpu
        out[kind], out[f"{kind}_cpu"] = size / seconds / 1e6, size / cpu / 1e6
        out[f"{kind}_s"], out[f"{kind}_cpu_s"] = seconds, cpu
        del data
    return out


def train_peak(path: Path, dtype: str, epochs: int, in_memory: str = "yes") -> tuple[float, float, float]:
    """Peak RSS (bytes), wall seconds and seconds per epoch (``results.json``) of one `train-head` child."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "cli.py"), "train-head", "--method", "concat", "--cache", str(path),
               "--epochs", str(epochs), "--feature-dtype", dtype, "--out", out, "--name", "run", "--quiet",
               "--device", "cpu", "--in-memory", in_memory]
        tick = time.perf_counter()
        # A fresh Python per dtype: RUSAGE_CHILDREN's peak is the largest child so far, so run the
        # smaller-memory dtype first (fp16 before fp32) or read each in its own wrapper.
        wrapper = ("import resource,subprocess,sys; subprocess.run(sys.argv[1:], check=True); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"train-head failed: {done.stderr.strip()[-500:]}")
        seconds = time.perf_counter() - tick
        results = json.loads((Path(out) / "run" / "results.json").read_text())
        print(f"  ({dtype}, --in-memory {in_memory}: test acc {results['test']['acc']:.2f}, "
              f"run seconds {results['seconds']:.1f})")
        return int(done.stdout.strip().splitlines()[-1]) * 1024, seconds, results["seconds"] / results["epochs_run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--dtypes", default="fp16,fp32")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--no-train", action="store_true", help="only the load rate")
    args = parser.parse_args()
    size = feature_bytes(args.cache)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"cache {args.cache}: {sum(cache_info(args.cache)['counts'].values())} samples, "
          f"feature bytes {size / 1e6:.0f} MB (float16)")
    for dtype in args.dtypes.split(","):
        rate = load_rate(args.cache, size, dtype)
        print(f"load --feature-dtype {dtype}: cold {rate['cold']:.0f} MB/s ({rate['cold_s']:.2f} s wall; "
              f"{rate['cold_cpu']:.0f} MB per CPU second), warm {rate['warm']:.0f} MB/s ({rate['warm_s']:.2f} s wall; "
              f"{rate['warm_cpu']:.0f} MB per CPU second)   target ≥ 500 MB/s warm")
    print(f"peak RSS of this benchmark process so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    if args.no_train:
        return
    target = 1.5 * size + GB
    per_epoch = {}
    for dtype in args.dtypes.split(","):
        peak, seconds, per_epoch[dtype] = train_peak(args.cache, dtype, args.epochs)
        print(f"train-head concat --epochs {args.epochs} --feature-dtype {dtype}: peak RSS {peak / GB:.2f} GiB "
              f"= {peak / size:.2f} × feature bytes; target {target / GB:.2f} GiB "
              f"({'met' if peak <= target else 'NOT met'}); {seconds:.0f} s wall; {per_epoch[dtype]:.1f} s per epoch")
    first = args.dtypes.split(",")[0]
    peak, seconds, streamed = train_peak(args.cache, first, args.epochs, "no")
    print(f"train-head concat --epochs {args.epochs} --in-memory no: peak RSS {peak / GB:.2f} GiB "
          f"= {peak / size:.2f} × feature bytes; {seconds:.0f} s wall; {streamed:.1f} s per epoch")
    ratio = streamed / per_epoch[first]
    print(f"streamed / in-memory ({first}) epoch ratio: {ratio:.2f} (warm page cache)   target ≤ 1.5 "
          f"({'met' if ratio <= 1.5 else 'NOT met'})")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
