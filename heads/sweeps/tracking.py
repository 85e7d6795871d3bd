"""A sweep's runs in the trackers: each run is its own tracked run, grouped by the sweep, so the
trackers' own comparison views line up the configs and seeds of one grid.

Grouping: TensorBoard sub-folders ``<log-dir>/tensorboard/<run>/`` (with the default log dir, the
sweep's own folder) or ``<log-dir>/tensorboard/<sweep>/<run>/`` (a shared ``--log-dir``); an MLflow
experiment named after the sweep; a W&B group named after the sweep.

**(choice)** A sweep's run is logged when it finishes, whole, from its folder
(``heads.train.tracking.replay``), not epoch by epoch: its epochs may run in worker processes, in a
stack of runs trained together, or across a resume, and its folder is the one record all of them
share. Runs an earlier call finished are logged too, unless their ``tracked.json`` says they were
logged to the same place already, so a resumed sweep logs every run exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from heads.train.tracking import Where, logged, replay, warn


@dataclass(frozen=True)
class SweepLog:
    """The trackers a sweep logs to, and the log dir (``None``: the sweep's folder)."""

    trackers: tuple[str, ...]
    log_dir: Path | None = None

    def where(self, folder: Path, run: str) -> Where:
        group = folder.name
        if self.log_dir is None:
            return Where(folder, run, run, group)
        return Where(self.log_dir, f"{group}/{run}", run, group)

    def log(self, folder: Path, run: str) -> None:
        """Log the finished run ``folder/run`` to each tracker that does not have it yet."""
        where = self.where(folder, run)
        todo = tuple(t for t in self.trackers if not logged(folder / run, t, where.place(t)))
        if not todo:
            return
        try:
            replay(folder / run, todo, where)
        except Exception as err:  # noqa: BLE001  (a run folder that cannot be read back: warn, go on)
            warn(",".join(todo), err)
