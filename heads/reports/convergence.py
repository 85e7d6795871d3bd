"""Convergence diagnostics of a run, from its per-epoch rows: did it train long enough, or too long?

A comparison table ranks whatever each run reached within its budget. A run selected at its last
epoch with validation loss still falling was cut short (the table then ranks step budgets, not
methods); a run whose validation accuracy fell far after its best had overfitted, and selection on
validation hides it. These are pure functions of the rows ``epochs.csv`` holds (``epoch``,
``train_loss``, ``val_acc``, ``val_loss``), written into every ``results.json`` under
``convergence`` and read back by the tables (``heads/reports/tables.py``) to mark rows.
"""
from __future__ import annotations

import math

# The last WINDOW_FRACTION of a run's epochs (at least MIN_WINDOW) is where "still falling" is read.
WINDOW_FRACTION = 0.1
MIN_WINDOW = 3  # **(choice)** a slope needs three points to mean more than one step's noise
# Validation loss counts as still falling when its least-squares slope over the window is below
# −FALL_TOLERANCE × the window's mean loss per epoch (−0.1% per epoch). **(choice)** a flat curve's
# noise then does not raise the flag.
FALL_TOLERANCE = 1e-3
# A drop of validation accuracy after the selected epoch counts as falling away from DROP_POINTS. **(choice)**
DROP_POINTS = 5.0

IMPROVING, FELL = "↗", "↘"


def window(n: int) -> int:
    """How many of the last epochs the "still falling" test reads: 10% of ``n``, at least 3 (at most ``n``)."""
    return min(n, max(MIN_WINDOW, math.ceil(WINDOW_FRACTION * n)))


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, … (0 for fewer than two points)."""
    n = len(values)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def loss_still_falling(val_losses: list[float]) -> bool:
    """Whether validation loss was still falling over the last 10% of epochs (``window``, ``FALL_TOLERANCE``)."""
    tail = [v for v in val_losses[-window(len(val_losses)):] if math.isfinite(v)]
    if len(tail) < 2:
        return False
    mean = sum(tail) / len(tail)
    return slope(tail) < -FALL_TOLERANCE * abs(mean)


def diagnose(rows: list[dict], best_epoch: int) -> dict:
    """The run's convergence diagnostics from its per-epoch ``rows`` and its selected ``best_epoch``.

    ``selected_fraction`` = best_epoch / epochs run; ``val_loss_falling`` (the last 10% of epochs);
    ``val_acc_drop`` = validation accuracy at the selected epoch − at the last epoch (points);
    ``final_train_loss``; ``flag``: ``↗`` when validation loss was still falling, ``↘`` when accuracy
    fell ``DROP_POINTS`` or more after the best, else ``""`` (↗ first: a run cut short says so).
    """
    if not rows:
        return {"selected_fraction": None, "val_loss_falling": False, "val_acc_drop": 0.0,
                "final_train_loss": None, "flag": ""}
    by_epoch = {r["epoch"]: r for r in rows}
    best = by_epoch.get(best_epoch, rows[-1])
    falling = loss_still_falling([float(r.get("val_loss", float("nan"))) for r in rows])
    drop = float(best["val_acc"]) - float(rows[-1]["val_acc"])
    flag = IMPROVING if falling else FELL if drop >= DROP_POINTS else ""
    return {"selected_fraction": best_epoch / rows[-1]["epoch"], "val_loss_falling": falling,
            "val_acc_drop": drop, "final_train_loss": float(rows[-1]["train_loss"]), "flag": flag}


def row_flag(runs: list[dict]) -> str:
    """A table row's mark from its runs' ``results.json`` dicts: a flag held by at least half its runs.

    **(choice)** half, not any: one seed's noisy tail should not mark a method. ↗ wins a tie with ↘.
    Runs written before the diagnostics existed carry none and mark nothing.
    """
    flags = [r.get("convergence", {}).get("flag", "") for r in runs]
    for mark in (IMPROVING, FELL):
        if flags and 2 * flags.count(mark) >= len(flags):
            return mark
    return ""


FOOTNOTE = {
    IMPROVING: f"{IMPROVING} validation loss was still falling over the last 10% of epochs in at least half the "
               "row's runs: the row ranks a training budget, not the method; rerun with more --epochs or a larger "
               "--lr (or compare --tune).",
    FELL: f"{FELL} validation accuracy fell {DROP_POINTS:g}+ points after the selected epoch in at least half the "
          "row's runs: it overfits; selection hides it — read epochs.csv, or compare --tune with fewer epochs or a "
          "smaller --lr.",
}


def flagged(groups: dict[str, list[dict]]) -> dict[str, str]:
    """``{row label: mark}`` for the rows of ``groups`` (label → its runs' results) that carry a mark."""
    return {label: mark for label, runs in groups.items() if (mark := row_flag(runs))}


def summary_line(groups: dict[str, list[dict]]) -> str:
    """One line naming the flagged rows (empty when none), what `compare` prints under its table."""
    marks = flagged(groups)
    if not marks:
        return ""
    parts = [f"{mark} {', '.join(label for label, m in marks.items() if m == mark)}"
             for mark in (IMPROVING, FELL) if mark in marks.values()]
    return "convergence: " + "; ".join(parts) + " (still improving ↗ / fell after their best ↘: see the table's notes)"
