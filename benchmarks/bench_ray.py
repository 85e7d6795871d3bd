"""What Ray costs a sweep (issue 24, part 3): its start-up, and its overhead per run against the local pool.

(a) Ray start-up: ``ray.init`` of a local instance with ``--cpus`` CPUs until a first (empty) task
    has returned, the fixed price of ``--backend ray`` on one machine (a running cluster joined with
    ``--ray-address auto`` pays only the connection).
(b) the same grid (EDM, τ × seeds on the built-in `av` data) with ``--backend local`` (``--cpus``
    worker processes, one thread each) and with ``--backend ray`` on the instance of (a) (one CPU per
    run), each timed as ``run_grid`` end to end, in this one process, so both see the same machine;
    their ratio, and the difference per run: what a task costs beyond the local pool's job (the data
    put in the object store once, a task's submission, scheduling and result). The pair is timed
    ``--repeats`` times, alternating which goes first (a shared machine's load drifts), and the best
    of each is compared. Both must give the same numbers: the script says whether they do.

    .venv/bin/python benchmarks/bench_ray.py [--epochs 10] [--taus 0.1,0.3,0.5,0.7] [--seeds 0,1] [--cpus 2]
                                             [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cache.synthetic import builtin_cache  # noqa: E402
from heads.blocks.loading import load_head_data  # noqa: E402
from heads.sweeps.axes import parse_values  # noqa: E402
from heads.sweeps.backends import Backend, import_ray  # noqa: E402
from heads.sweeps.grid import run_grid  # noqa: E402
from heads.train.config import TrainConfig  # noqa: E402


def numbers(folder: Path) -> dict:
    """Per run: its best-epoch validation and test accuracy."""
    records = {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/results.json")}
    return {name: (r["val"]["acc"], r["test"]["acc"]) for name, r in records.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--taus", default="0.1,0.3,0.5,0.7")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--cpus", type=int, default=2, help="local workers, and the CPUs of the Ray instance")
    parser.add_argument("--preset", default="av")
    parser.add_argument("--repeats", type=int, default=2, help="timings of each backend (alternating order)")
    args = parser.parse_args()

    ray = import_ray()
    taus, seeds = parse_values("edm", "tau", args.taus), [int(s) for s in args.seeds.split(",") if s.strip()]
    data = load_head_data([builtin_cache(args.preset, ROOT / "data" / "builtin")])
    base = TrainConfig(method="edm", epochs=args.epochs, optimizer="adam", lr=1e-3, weight_decay=1e-4,
                       schedule="none", batch_size=256)
    runs = len(taus) * len(seeds)
    print(f"machine: {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"torch {torch.__version__}, ray {ray.__version__}")
    print(f"data: {args.preset}, train {len(data.train)}, val {len(data.val)}, test {len(data.test)}; "
          f"grid: edm, {len(taus)} τ × {len(seeds)} seed(s) = {runs} runs × {args.epochs} epochs, batch 256")

    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.get(ray.remote(lambda: None).remote())
    startup = time.perf_counter() - start
    print(f"(a) Ray start-up, ray.init(num_cpus={args.cpus}) to a first task's result: {startup:.2f} s")

    pair = [("local", Backend(), args.cpus), ("ray", Backend("ray"), 0)]
    seconds: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, backend, workers in (pair if repeat % 2 == 0 else pair[::-1]):
                folder = Path(tmp) / f"{name}-{repeat}"
                start = time.perf_counter()
                run_grid(data, "edm", {"tau": taus}, seeds, base, folder, workers=workers, progress=False,
                         backend=backend)
                seconds[name].append(time.perf_counter() - start)
                print(f"    {name:<5s} (repeat {repeat + 1}): {seconds[name][-1]:.1f} s", flush=True)
        found = [numbers(folder) for folder in sorted(Path(tmp).iterdir())]
        same = all(f == found[0] for f in found)
    ray.shutdown()
    local, distributed = min(seconds["local"]), min(seconds["ray"])
    print(f"(b) --backend local, {args.cpus} worker processes × 1 thread: best {local:.1f} s")
    print(f"    --backend ray, {args.cpus} CPUs, 1 per run:            best {distributed:.1f} s · ray/local = "
          f"{distributed / local:.2f} · {(distributed - local) / runs:+.2f} s per run")
    print(f"    per-run val/test accuracies {'identical' if same else 'DIFFER'} between the backends")


if __name__ == "__main__":
    main()
