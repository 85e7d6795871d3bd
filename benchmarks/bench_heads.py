"""Speed of stage two on the built-in `av` data: seconds per epoch and 100-epoch run time per method.

The methods train side by side, one epoch of each in turn, so a slow spell of the shared machine
hits all of them alike and their ratios hold. The machine's fp32 matmul rate on the head's shapes
is sampled before every round, so each time can also be read as a multiple of the arithmetic bound
of a concat run measured in the same run.

    .venv/bin/python benchmarks/bench_heads.py [--methods concat,...] [--epochs 100]
    .venv/bin/python benchmarks/bench_heads.py --preset mv6 --settings paper --epochs 5   # issue 24, part 5

``--settings same`` (default) trains every method under one setting (batch 256, Adam), which measures
arithmetic; ``--settings paper`` gives each method its own training defaults, as ``compare`` runs them
(batch size, optimizer, stages: ccat's pretraining epochs are 30% of ``--epochs``), which is what a
user's epoch costs. ``s/epoch`` is the time inside the epochs (training and each epoch's validation),
without the final reports; ``× concat`` is that ratio, from the same interleaved run. ``cpu ×`` is the
same ratio in the process's own CPU time, which a busy shared machine disturbs less than wall time
(a run waiting for a core accrues none). ``--methods`` takes method specs with options, as
``compare`` does: ``concat,ccat,ccat[fusion=joint]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cache.synthetic import builtin_cache  # noqa: E402
from heads.train.config import TrainConfig  # noqa: E402
from heads.train.trainer import Trainer
from heads.blocks.loading import load_head_data  # noqa: E402
from heads.methods import METHODS  # noqa: E402
from heads.blocks.optim import SHARED  # noqa: E402
from heads.sweeps.specs import parse_method_spec, split_specs  # noqa: E402

SAME = {"optimizer": SHARED.optimizer, "lr": SHARED.lr, "weight_decay": SHARED.weight_decay,
        "schedule": SHARED.schedule, "batch_size": SHARED.batch_size}


def matmul_gflops(batch: int, dims: list[int], hidden: int, repeats: int = 30) -> float:
    """fp32 GFLOP/s of the head's dominant products (forward and weight gradient) at this batch size."""
    xs = [torch.randn(batch, d) for d in dims]
    ws = [torch.randn(hidden, d) for d in dims]
    gs = [torch.randn(batch, hidden) for _ in dims]
    for _ in range(3):
        for x, w, g in zip(xs, ws, gs):
            x @ w.T, g.T @ x
    start = time.perf_counter()
    for _ in range(repeats):
        for x, w, g in zip(xs, ws, gs):
            x @ w.T, g.T @ x
    flops = repeats * sum(4 * batch * d * hidden for d in dims)
    return flops / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--preset", default="av")
    parser.add_argument("--settings", choices=["same", "paper"], default="same")
    args = parser.parse_args()
    data = load_head_data([builtin_cache(args.preset, ROOT / "data" / "builtin")])
    # Speed is about arithmetic: every method runs under one setting (batch 256, Adam), not its paper's.
    cfg = TrainConfig(**SAME)
    dims = [data.spec.dims[m] for m in data.spec.modalities]
    methods = split_specs(args.methods)
    settings = SAME if args.settings == "same" else {}
    trainers = {}
    for spec in methods:
        name, options = parse_method_spec(spec)
        trainers[spec] = Trainer(data, TrainConfig(method=name, epochs=args.epochs, device="cpu", options=options, **settings))
    rates, inside, cpu = [], {m: 0.0 for m in methods}, {m: 0.0 for m in methods}
    for epoch in range(1, args.epochs + 1):
        rates.append(matmul_gflops(cfg.batch_size, dims, cfg.hidden, repeats=5))
        for method, trainer in trainers.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer.run(epoch)
            inside[method] += time.perf_counter() - start
            cpu[method] += time.process_time() - start_cpu
    results = {m: t.finish() for m, t in trainers.items()}
    gflops = statistics.mean(rates)
    # One epoch of concat: forward + weight gradient of every projection on every training sample.
    epoch_gflop = 4 * len(data.train) * sum(dims) * cfg.hidden / 1e9
    bound = args.epochs * epoch_gflop / gflops
    print(f"machine: {torch.get_num_threads()} threads, fp32 matmul {gflops:.0f} GFLOP/s on the head's shapes "
          f"(mean of {len(rates)} samples, {min(rates):.0f}–{max(rates):.0f})")
    print(f"data: {args.preset}, train {len(data.train)}, val {len(data.val)}, test {len(data.test)}; "
          f"batch {cfg.batch_size}, hidden {cfg.hidden}")
    print(f"arithmetic bound of a {args.epochs}-epoch concat run: {args.epochs * epoch_gflop:.0f} GFLOP → {bound:.1f} s")
    reference = results["concat"].seconds if "concat" in results else None
    print(f"settings: {args.settings} ({'batch 256, adam, for every method' if args.settings == 'same' else 'each method its own'})")
    width = max(10, *map(len, results))
    print(f"{'method':{width}s} {'s/epoch':>8s} {'× concat':>9s} {'cpu ×':>6s} {'run (s)':>8s} {'× bound':>8s} {'test acc':>9s}")
    for method, result in results.items():
        per_epoch = inside[method] / args.epochs
        versus = f"{inside[method] / inside['concat']:9.2f}" if reference else f"{'-':>9s}"
        versus_cpu = f"{cpu[method] / cpu['concat']:6.2f}" if reference else f"{'-':>6s}"
        print(f"{method:{width}s} {per_epoch:8.3f} {versus} {versus_cpu} {result.seconds:8.1f} {result.seconds / bound:8.2f} "
              f"{result.test.acc:9.2f}")


if __name__ == "__main__":
    main()
