"""Cost of a grid against its arithmetic: an EDM τ grid over seeds on the built-in `av` data.

(a) the sum of the single runs' times, each run alone as `train-head` does it (this process, torch's
    default threads, a run folder written); (b) the grid's wall time with one worker per core and
    its ratio to (a) (target ≤ 1.1); (c) the pruned grid (successive halving) and its ratio to (a)
    (target ≤ 0.35), and whether it selects the config the unpruned grid selects. The full size
    (10 τ × 3 seeds × 100 epochs) takes about half an hour on two cores; shrink it with the options.

    .venv/bin/python benchmarks/bench_grid.py [--epochs 100] [--taus 0.0:0.9:0.1] [--seeds 0,1,2]
                                              [--single-sample K] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cache.synthetic import builtin_cache  # noqa: E402
from heads.train.config import TrainConfig  # noqa: E402
from heads.train.trainer import fit
from heads.blocks.loading import load_head_data  # noqa: E402
from heads.sweeps.axes import expand, parse_values  # noqa: E402
from heads.sweeps.grid import run_grid
from heads.sweeps.sweep import halving_milestones  # noqa: E402
from heads.sweeps.workers import default_workers


def sampled(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (first and last included), so every τ region is timed."""
    if k >= len(items):
        return items
    if k == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def row(label: str, seconds: float, note: str) -> None:
    print(f"{label:<58s}{seconds:9.1f} s  {note}")


def timed_grid(data, taus, seeds, base, folder, prune, workers):
    start = time.perf_counter()
    outcome = run_grid(data, "edm", {"tau": taus}, seeds, base, folder, prune=prune, workers=workers, progress=False)
    return time.perf_counter() - start, outcome, json.loads((folder / "grid.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--taus", default="0.0:0.9:0.1", help="τ values: a list (0.1,0.5) or a range (0.0:0.9:0.1)")
    parser.add_argument("--seeds", default="0,1,2", help="the seeds, a list (0,1,2; 0 is seed 0)")
    parser.add_argument("--single-sample", type=int, default=0, metavar="K",
                        help="time only K single runs and extrapolate (a) from their mean (0 = time them all)")
    parser.add_argument("--workers", type=int, default=0, help="grid workers (0 = one per core)")
    parser.add_argument("--preset", default="av")
    args = parser.parse_args()

    taus, seeds = parse_values("edm", "tau", args.taus), [int(s) for s in args.seeds.split(",") if s.strip()]
    data = load_head_data([builtin_cache(args.preset, ROOT / "data" / "builtin")])
    # One fixed setting (batch 256, Adam) so the figures compare with earlier records.
    base = TrainConfig(method="edm", epochs=args.epochs, optimizer="adam", lr=1e-3, weight_decay=1e-4,
                       schedule="none", batch_size=256)
    specs = expand("edm", {"tau": taus}, base, seeds)
    workers = min(args.workers or default_workers(), len(specs))
    print(f"machine: {default_workers()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads by default), "
          f"load average {os.getloadavg()[0]:.2f} at start (other work slows the multi-thread single runs most)")
    print(f"data: {args.preset}, train {len(data.train)}, val {len(data.val)}, test {len(data.test)}; edm, "
          f"{args.epochs} epochs, batch {base.batch_size}, hidden {base.hidden}")
    print(f"grid: {len(taus)} τ ({', '.join(map(str, taus))}) × {len(seeds)} seed(s) = {len(specs)} runs")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        timed = sampled(specs, args.single_sample) if args.single_sample > 0 else specs
        times = []
        for spec in timed:
            start = time.perf_counter()
            fit(data, spec.cfg, root / "single" / spec.name, progress=False)
            times.append(time.perf_counter() - start)
        single = sum(times) / len(times) * len(specs)
        how = (f"sum of all {len(specs)} runs" if len(timed) == len(specs) else
               f"EXTRAPOLATED from {len(timed)} of {len(specs)} runs: mean {sum(times) / len(times):.1f} s × {len(specs)}")
        row(f"(a) single runs one after another, as train-head ({torch.get_num_threads()} threads)", single, f"[{how}]")

        full_s, full, full_info = timed_grid(data, taus, seeds, base, root / "grid", False, workers)
        threads = max(1, default_workers() // workers)
        row(f"(b) grid, {workers} worker(s) × {threads} thread(s)", full_s, f"b/a = {full_s / single:.2f} (target ≤ 1.10)")
        sel = full.selection
        print(f"    selected {sel.config} · val {sel.val_mean:.2f} ± {sel.val_std:.2f} · test {sel.test_mean:.2f} ± {sel.test_std:.2f}")

        pruned_s, pruned, pruned_info = timed_grid(data, taus, seeds, base, root / "pruned", True, workers)
        rungs = ", ".join(map(str, halving_milestones(args.epochs)[:-1])) or "none"
        row(f"(c) pruned grid (halving at epochs {rungs})", pruned_s,
            f"c/a = {pruned_s / single:.2f} (target ≤ 0.35); epochs trained {pruned_info['epochs_trained']} of "
            f"{full_info['epochs_trained']} ({pruned_info['epochs_trained'] / full_info['epochs_trained']:.3f})")
        same = pruned.selection.config == sel.config
        print(f"    selected {pruned.selection.config} · {'the same config as' if same else 'NOT the config of'} the unpruned grid")


if __name__ == "__main__":
    main()
