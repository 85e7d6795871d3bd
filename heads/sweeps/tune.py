"""``compare --tune``: each method at its best validated setting, the third protocol beside each paper's
settings and one shared optimizer.

A table of methods trained with their papers' settings ranks, on small cached datasets, the step
budgets those settings give (a few thousand small SGD steps split across modalities); one shared
optimizer favours the methods it happens to suit. The protocol the field calls "each method at its
best validated setting" gives every method the same small grid around its own setting — by default
its paper's learning rate × {0.1, 1, 10} — selects on validation with the grid's rule
(``heads/sweeps/grid.py:select``, ``TIE_RULE``) and reports the test figures of the selected setting
only. Test is never read by the selection: shuffling the test labels moves no selected value
(``tests/test_tune.py``).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from heads.blocks.data import HeadData
from heads.errors import OptionError
from heads.sweeps.axes import CORE_AXES, config_slug, expand, parse_values
from heads.sweeps.backends import LOCAL, Backend
from heads.sweeps.grid import select
from heads.sweeps.jobs import RunSpec
from heads.sweeps.specs import parse_method_spec
from heads.sweeps.sweep import run_sweep
from heads.train.config import TrainConfig, check_setting, flag, resolve_training

# ``--tune lr`` with no values: the method's own rate times these. **(choice)** one decade each way,
# the coarsest grid that can tell "too small a budget" from "too large a step".
DEFAULT_FACTORS = {"lr": [0.1, 1.0, 10.0]}
TUNABLE = CORE_AXES + ("epochs",)
# Settings whose values may be written as factors of the method's own value (``lr=x0.1,x1,x10``).
RELATIVE = ("lr", "weight_decay")


def parse_tune(text: str) -> dict[str, list[str]]:
    """``"lr=1e-4,1e-3,epochs=50,100"`` → ``{"lr": ["1e-4", "1e-3"], "epochs": ["50", "100"]}``.

    A word with ``=`` (or a setting's bare name) starts a setting, the words after it are its further
    values; a setting named alone (``lr``) takes ``DEFAULT_FACTORS``. Values are checked per method
    (``tune_axes``), where factors (``x0.1``) meet the method's own value.
    """
    axes: dict[str, list[str]] = {}
    current = None
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        if "=" in word or word.replace("-", "_") in TUNABLE:  # no setting's value is a setting's name
            name, _, value = word.partition("=")
            current = name.strip().replace("-", "_")
            if current not in TUNABLE:
                raise OptionError(f"--tune: {name!r} is not a training setting; tunable: {', '.join(TUNABLE)}")
            if current in axes:
                raise OptionError(f"--tune: {name} given twice")
            axes[current] = [value.strip()] if value.strip() else []
        elif current is None:
            raise OptionError(f"--tune {text!r}: start with a setting, e.g. lr=1e-4,1e-3 or lr (× 0.1, 1, 10)")
        else:
            axes[current].append(word)
    if not axes:
        raise OptionError("--tune is empty: give e.g. lr (the method's rate × 0.1, 1, 10) or lr=1e-4,1e-3,epochs=50,100")
    for name, values in axes.items():
        if not values and name not in DEFAULT_FACTORS:
            raise OptionError(f"--tune {name} needs values, e.g. {name}=…,…")
    return axes


def check_given(tune: dict[str, list[str]], given: dict) -> None:
    """Refuse a setting both typed as an option (``given``: name → value or None) and tuned."""
    for name in tune:
        if given.get(name) is not None:
            raise OptionError(f"{flag(name)} and --tune {name} both set it; give one")


def tune_axes(method: str, tune: dict[str, list[str]], base: TrainConfig) -> dict[str, list]:
    """``method``'s grid: each setting's values checked, factors (``x0.1``) times the method's own value."""
    own = resolve_training(replace(base, method=method, training_source=""))
    axes = {}
    for name, words in tune.items():
        words = words or [f"x{f:g}" for f in DEFAULT_FACTORS[name]]
        values = []
        for word in words:
            if word.startswith("x"):
                if name not in RELATIVE:
                    raise OptionError(f"--tune {name}: factors (x…) apply only to {', '.join(RELATIVE)}")
                try:
                    factor = float(word[1:])
                except ValueError:
                    raise OptionError(f"--tune {name}: cannot read factor {word!r}") from None
                values.append(check_setting(name, float(f"{getattr(own, name) * factor:.12g}")))
            elif name == "epochs":
                try:
                    values.append(int(word))
                except ValueError:
                    raise OptionError(f"--tune epochs expects whole numbers, got {word!r}") from None
                if values[-1] < 1:
                    raise OptionError(f"--tune epochs must be positive, got {word}")
            else:
                values += parse_values(method, name, word)
        axes[name] = list(dict.fromkeys(values))
    return axes


def tuned_runs(spec: str, axes: dict[str, list], base: TrainConfig, seeds: list[int]) -> list[RunSpec]:
    """The runs of one method spec's grid, named ``<spec>-<config>-seed<k>`` so methods share a folder.

    ``epochs`` is expanded here (the grid's ``expand`` keeps one budget), outermost; every axis,
    even with one value, names the folder so the selected values can be shown.
    """
    name, options = parse_method_spec(spec)
    prefix = config_slug({"m": spec})[2:]
    budgets = axes.get("epochs", [base.epochs])
    others = {k: v for k, v in axes.items() if k != "epochs"}
    runs = []
    for epochs in budgets:
        cfg = replace(base, method=name, options=options, epochs=epochs)
        for run in expand(name, others, cfg, seeds, named=list(others)):
            values = ({"epochs": epochs} if "epochs" in axes else {}) | run.record["values"]
            config = f"{spec} {config_slug(values)}"
            runs.append(RunSpec(f"{prefix}-{config_slug(values)}-seed{run.cfg.seed}", f"{prefix}-{config_slug(values)}",
                                run.cfg, {"label": config, "values": values, "spec": spec}))
    return runs


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def compare_tuned(data: HeadData, specs: list[str], seeds: list[int], base: TrainConfig, out: Path,
                  tune: dict[str, list[str]], prune: bool = False, progress: bool = True,
                  workers: int = 0, backend: Backend = LOCAL) -> tuple[list[dict], dict[str, dict]]:
    """Every spec's grid over ``seeds`` in ``out``, one selection per spec on validation.

    Returns the selected setting's runs (labelled with the spec, "trained with" extended by the
    selected values and the grid) and, per spec, the selection (``grid.Selection`` as a dict). With
    ``prune`` each spec's grid is its own successive-halving sweep (configs compete only with their
    own method's).
    """
    if prune and "epochs" in tune and len(tune["epochs"]) > 1:
        raise OptionError("--prune needs one epoch budget; tune epochs without --prune")
    grids = {spec: tuned_runs(spec, tune_axes(parse_method_spec(spec)[0], tune, base), base, seeds) for spec in specs}
    if prune:
        records = [r for spec, runs in grids.items() for r in run_sweep(data, runs, out, workers, True, progress,
                                                                        label=f"tune {spec}", backend=backend)]
    else:
        records = run_sweep(data, [r for runs in grids.values() for r in runs], out, workers, False, progress,
                            label="compare --tune", backend=backend)
    chosen, selections = [], {}
    for spec, runs in grids.items():
        names = {r.name for r in runs}
        mine = [r for r in records if r["run"] in names]
        sel = select(mine)
        grid = "; ".join(f"{k} {'|'.join(map(_shown, dict.fromkeys(r.record['values'][k] for r in runs)))}"
                         for k in runs[0].record["values"])
        picked = ", ".join(f"{k} {_shown(v)}" for k, v in sel.values.items())
        selections[spec] = {"config": sel.config, "values": sel.values, "tied": sel.tied, "grid": grid,
                            "val_mean": sel.val_mean, "test_mean": sel.test_mean}
        for r in mine:
            if r["label"] == sel.config:
                chosen.append({**r, "label": spec, "training": f"{r.get('training', '')} · tuned: {picked} (of {grid})"})
    return chosen, selections
