"""Stage two at scale, in one command: the figures of the "stage two on the GPU" issue.

    .venv/bin/python benchmarks/bench_device.py [--epochs 100] [--quick]

Prints, each measured in this run:

1. **CPU ratio to the arithmetic bound**: a 100-epoch concat run on ``av`` (Adam, batch 256 — the
   shared speed setting) against the fp32 matmul rate of its own shapes, sampled between epochs; the
   same for bf16 autocast when the CPU reports native bf16 (AVX-512-BF16/AMX; detected, not assumed).
2. **Evaluation share on six modalities**: a concat run on the generated ``mv6`` cache (6 views,
   1400 training samples, 63 subsets): seconds in the batch loop vs everything else (per-epoch
   validation, selection, the final reports).
3. **On a CUDA device, when torch sees one**: a 100-epoch edm run on ``av``; a concat run; 30
   concat configs (10 learning rates × 3 seeds) and the 30-config edm grid of the issue (10 τ × 3
   seeds) stacked, each as a multiple of one run of its method.

``--quick`` runs 10 epochs (for checking the script; the issue's figures are at 100).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cache.synthetic import builtin_cache  # noqa: E402
from heads.train.config import TrainConfig  # noqa: E402
from heads.train.trainer import Trainer
from heads.blocks.loading import load_head_data  # noqa: E402
from heads.blocks.device import cpu_native_bf16  # noqa: E402
from bench_heads import SAME, matmul_gflops  # noqa: E402  (the same bound as bench_heads.py)


def cpu_ratio(epochs: int) -> None:
    data = load_head_data([builtin_cache("av", ROOT / "data" / "builtin")])
    dims = [data.spec.dims[m] for m in data.spec.modalities]
    precisions = ["fp32"] + (["bf16"] if cpu_native_bf16() else [])
    trainers = {p: Trainer(data, TrainConfig(method="concat", epochs=epochs, device="cpu", precision=p, **SAME))
                for p in precisions}
    rates = []
    for epoch in range(1, epochs + 1):  # interleaved, so a slow spell of the machine hits all alike
        rates.append(matmul_gflops(SAME["batch_size"], dims, 256, repeats=5))
        for t in trainers.values():
            t.run(epoch)
    results = {p: t.finish() for p, t in trainers.items()}
    gflops = statistics.median(rates)
    bound = epochs * 4 * len(data.train) * sum(dims) * 256 / 1e9 / gflops
    print(f"1. CPU: {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{cpu_native_bf16()}; fp32 matmul on the head's shapes {gflops:.0f} GFLOP/s (median of {len(rates)})")
    print(f"   arithmetic bound of a {epochs}-epoch concat run on av (batch 256, hidden 256): {bound:.2f} s")
    for p, r in results.items():
        phases = trainers[p].phase_seconds
        print(f"   concat {p}: {r.seconds:.2f} s = {r.seconds / bound:.2f}× the bound "
              f"(batch loop {phases['train']:.2f} s = {phases['train'] / bound:.2f}×), test acc {r.test.acc:.2f}")


def evaluation_share(epochs: int) -> None:
    data = load_head_data([builtin_cache("mv6", ROOT / "data" / "builtin")])
    trainer = Trainer(data, TrainConfig(method="concat", epochs=epochs, device="cpu"))
    start = time.perf_counter()
    trainer.run(epochs)
    result = trainer.finish()
    total = time.perf_counter() - start
    train = trainer.phase_seconds["train"]
    print(f"2. mv6 (6 modalities, train {len(data.train)}, val {len(data.val)}, test {len(data.test)}), concat, "
          f"{epochs} epochs at its paper setting (batch {trainer.cfg.batch_size}):")
    print(f"   {total:.2f} s in all; batch loop {train:.2f} s; outside training {total - train:.2f} s = "
          f"{100 * (total - train) / total:.1f}% (target ≤ 30%); test acc {result.test.acc:.2f}, "
          f"φ {result.test.shapley}")


def gpu_figures(epochs: int) -> None:
    from heads.sweeps.grid import run_grid

    if not torch.cuda.is_available():
        print("3. GPU: torch sees no CUDA device here; these figures need one (same command there)")
        return
    name = torch.cuda.get_device_name(0)
    data = load_head_data([builtin_cache("av", ROOT / "data" / "builtin")])

    def one(method: str, **extra) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        t = Trainer(data, TrainConfig(method=method, epochs=epochs, device="cuda", **extra))
        t.run(epochs)
        t.finish()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    one("concat", **SAME)  # warm-up: CUDA context, kernels
    edm = one("edm")
    concat = one("concat", **SAME)
    print(f"3. GPU {name}: edm {epochs} epochs on av {edm:.2f} s (target ≤ 3 s at 100); concat {concat:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(method="concat", epochs=epochs, device="cuda", **{k: v for k, v in SAME.items() if k != "lr"})
        lrs = [round(1e-4 * 1.7 ** k, 6) for k in range(10)]
        start = time.perf_counter()
        run_grid(data, "concat", {"lr": lrs}, [0, 1, 2], base, Path(tmp) / "stacked", progress=False, stack="on")
        stacked = time.perf_counter() - start
        print(f"   30 concat configs (10 lr × 3 seeds) stacked: {stacked:.2f} s = {stacked / concat:.2f}× one run "
              f"(target ≤ 1.5×)")
        start = time.perf_counter()
        run_grid(data, "edm", {"tau": [round(0.1 * k, 1) for k in range(10)]}, [0, 1, 2],
                 TrainConfig(method="edm", epochs=epochs, device="cuda"), Path(tmp) / "edm", progress=False,
                 stack="on")
        grid = time.perf_counter() - start
        print(f"   30 edm configs (10 τ × 3 seeds) stacked: {grid:.2f} s = {grid / edm:.2f}× one run (target ≤ 1.5×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="10 epochs (checks the script)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: cpu, share, gpu")
    args = parser.parse_args()
    epochs = 10 if args.quick else args.epochs
    skip = set(filter(None, args.skip.split(",")))
    print(f"torch {torch.__version__}; {epochs} epochs")
    if "cpu" not in skip:
        cpu_ratio(epochs)
    if "share" not in skip:
        evaluation_share(epochs)
    if "gpu" not in skip:
        gpu_figures(epochs)


if __name__ == "__main__":
    main()
