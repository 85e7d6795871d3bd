"""Where heads run and in which precision: ``--device auto|cpu|cuda[:N]`` and ``--precision``.

Both are resolved once per run and written to its ``config.json`` (``device``/``precision`` hold
what was asked; the run's ``results.json`` says what was used), so a number can always be traced to
the hardware path that produced it. The default precision is fp32 on every device: ``auto`` lets a
timing probe decide, which makes the numbers depend on the machine (and, near the break-even point,
on its load), so it is opt-in and its decision is recorded. Nothing here is assumed from the machine's name: CUDA is used
when torch sees a device, and bf16 on the CPU only when the CPU reports native bf16 instructions
(``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``) *and* a short probe on the run's own matrix
sizes finds it faster than fp32 (CPUs without native bf16 emulate it, which is slower than fp32).
"""
from __future__ import annotations

import functools
import time

import torch

PRECISIONS = ("auto", "fp32", "bf16")


class DeviceError(ValueError):
    """A device or precision that does not exist here; the message names what does."""


def resolve_device(name: str | None) -> torch.device:
    """``auto`` → the first CUDA device when torch sees one, else the CPU; ``cuda[:N]`` must exist."""
    if name is not None and not name.strip():  # --device '' is a typo, not a request for auto
        raise DeviceError("--device is empty; give auto, cpu, cuda or cuda:N")
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if name.startswith("cuda:") and not index.isdigit():  # checked first: a typo is not "no CUDA"
            raise DeviceError(f"--device {name}: the part after 'cuda:' must be a device number, e.g. cuda:0")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__}); "
                              "use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has CUDA devices 0–{torch.cuda.device_count() - 1}")
        return torch.device(name)
    raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether the CPU reports native bf16 arithmetic (AVX-512-BF16 or AMX-BF16); False if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


@functools.lru_cache(maxsize=16)
def bf16_wins(rows: int, dim_in: int, dim_out: int) -> bool:
    """A ~0.1 s probe: is a bf16-autocast ``[rows, dim_in] @ [dim_in, dim_out]`` forward+backward
    faster than fp32 on this CPU? (One per process and shape; the threads are the run's.)"""
    x = torch.randn(rows, dim_in)
    w = torch.randn(dim_in, dim_out, requires_grad=True)

    def seconds(autocast: bool) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(5):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = x @ w
                out.float().sum().backward()
            best = min(best, time.perf_counter() - start)
        return best

    seconds(True)  # warm-up (first bf16 call builds its kernels)
    return seconds(True) < 0.9 * seconds(False)


def resolve_precision(asked: str | None, device: torch.device, rows: int, dim_in: int, dim_out: int) -> str:
    """``fp32`` or ``bf16``: the one asked for, or under ``auto`` bf16 only on a CPU with native bf16
    where the probe finds it faster (on CUDA ``auto`` is fp32: one head is launch-bound there, so
    lower precision buys little and would change the numbers)."""
    asked = (asked or "auto").lower()
    if asked not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {', '.join(PRECISIONS)}, got {asked!r}")
    if asked != "auto":
        return asked
    if device.type == "cpu" and cpu_native_bf16() and bf16_wins(rows, dim_in, dim_out):
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The context the training and evaluation passes run under (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
