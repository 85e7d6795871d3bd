"""Progress of a long command, with rate and ETA, on a terminal and in a cluster log alike.

On a terminal: a rich bar (what, done/total, rate, elapsed, remaining), advanced per epoch so it
moves smoothly. Off a terminal (a Slurm log, ``nohup``, CI), where a bar would print nothing or
garbage: one plain line on stderr at most every ``PLAIN_EVERY`` seconds — what, how far, rate, ETA —
so a log shows the run is alive without filling up. ``enabled=False`` (``--quiet``) prints nothing.
Every long command of stage two uses this one helper.
"""
from __future__ import annotations

import sys
import time

PLAIN_EVERY = 30.0  # seconds between plain lines off a terminal (choice: a Slurm log read by a person)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plain_line(description: str, done: float, total: float | None, elapsed: float, unit: str,
               rate: float | None = None) -> str:
    """``grid: 12/24 epochs · 3.10 epochs/s · elapsed 0:04 · ETA 0:04`` (ETA from the mean rate so far)."""
    rate = (done / elapsed if elapsed > 0 else 0.0) if rate is None else rate
    far = f"{done:g}/{total:g} {unit}" if total else f"{done:g} {unit}"
    line = f"{description}: {far} · {rate:.2f} {unit}/s · elapsed {_duration(elapsed)}"
    if total and rate > 0:
        line += f" · ETA {_duration((total - done) / rate)}"
    return line


class Progress:
    """One task's progress: ``update(advance=…, description=…, total=…)``; a context manager."""

    def __init__(self, description: str, total: float | None = None, unit: str = "epochs", enabled: bool = True,
                 stream=None, every: float = PLAIN_EVERY):
        self.description, self.total, self.unit, self.enabled = description, total, unit, enabled
        self.stream = stream or sys.stderr
        self.every = every
        self.done, self.start, self.last = 0.0, time.monotonic(), time.monotonic()
        self.origin, self.base = self.start, 0.0  # the rate counts from the last reset of ``completed``
        self.bar = None
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                           TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                           TimeRemainingColumn(), console=Console(file=self.stream), transient=True)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task(self.description, total=self.total, rate="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def update(self, advance: float = 0, description: str | None = None, total: float | None = None,
               completed: float | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if completed is not None and completed < self.done:  # a new stage (a grid's next rung)
            self.origin, self.base = now, completed
        self.done = completed if completed is not None else self.done + advance
        self.description = description or self.description
        self.total = total if total is not None else self.total
        rate = (self.done - self.base) / (now - self.origin) if now > self.origin else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=self.description, total=self.total,
                            rate=f"{rate:.2f}/s")
            return
        if now - self.last >= self.every:
            self.last = now
            print(plain_line(self.description, self.done, self.total, now - self.start, self.unit, rate),
                  file=self.stream, flush=True)
