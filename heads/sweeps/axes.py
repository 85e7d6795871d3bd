"""A grid's axes: which names can be axes for a method (its options and the training settings), what
values an axis takes (``--tau 0.0:0.9:0.1``, ``0.1,0.5``, ``a,b|c,d``), how big a grid is before
anything is built, and the runs a grid expands to.
"""
from __future__ import annotations

import itertools
import math
import re
import typing
from dataclasses import replace

from heads.blocks.data import HeadData
from heads.errors import OptionError
from heads.methods import method_class
from heads.sweeps.jobs import RunSpec
from heads.sweeps.specs import MAX_RUNS
from heads.train.config import TrainConfig, build_model, check_setting, flag
from heads.train.options import resolve_options

# Training settings that can be grid axes besides the method's own options. Epochs are not an axis:
# the pruning milestones are fractions of one epoch budget.
CORE_AXES = ("lr", "batch_size", "hidden", "weight_decay", "optimizer", "schedule", "standardize", "eval_batch_size",
             "missing_train", "missing_test")
# A grid of more than CONFIRM_RUNS runs starts only with ``--yes`` (a typo such as 1:10000:1 should
# cost a line, not a week); no grid may exceed ``MAX_RUNS``.
CONFIRM_RUNS = 200
# The CCAT paper's protocol: tune the LoRA rank first (β at its default), then β at the best rank.
CCAT_STAGES = ("rank", "beta")
CCAT_DEFAULTS = {"rank": [1, 2, 4, 8, 16], "beta": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]}


def axis_kinds(method: str) -> dict[str, type]:
    """Every name that can be an axis for ``method``, with its declared type (a Literal stays one)."""
    core = typing.get_type_hints(TrainConfig)
    # ``int | None`` (a setting left to the method's paper default) is an int axis.
    kinds = {name: next(a for a in typing.get_args(core[name]) if a is not type(None)) if typing.get_args(core[name])
             else core[name] for name in CORE_AXES}
    kinds.update(typing.get_type_hints(method_class(method).Options))
    return kinds


def _number(kind: type, raw: str, name: str):
    try:
        value = kind(raw)
    except ValueError:
        raise OptionError(f"{flag(name)} expects {kind.__name__} values, got {raw!r}") from None
    return float(f"{value:.12g}") if kind is float else value


def _expand_range(kind: type, text: str, name: str) -> list:
    """``a:b:step`` inclusive of b, robust to float error (0.0:0.9:0.1 gives ten values, 0.3 not 0.30000000000000004)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise OptionError(f"{flag(name)}: a range is start:stop:step, got {text!r}")
    start, stop, step = (_number(kind, p, name) for p in parts)
    if step <= 0 or stop < start:
        raise OptionError(f"{flag(name)}: range {text!r} needs step > 0 and stop ≥ start")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_RUNS:  # counted from the ends, before a single value is made
        raise OptionError(f"{flag(name)}: range {text!r} has {count:,} values, more than the {MAX_RUNS:,} "
                          "a grid may have; use a larger step")
    return [_number(kind, str(start + i * step), name) for i in range(count)]


def parse_values(method: str, name: str, text: str) -> list:
    """One axis: ``0.0:0.9:0.1`` (inclusive range), ``0.1,0.5``, ``weak-to-strong,fixed``, ``true,false``.

    Values that contain commas are separated with ``|`` instead. Duplicates are dropped.
    """
    kind = axis_kinds(method)[name]
    sep = "|" if "|" in text else ","
    raw = []
    for item in (s.strip() for s in text.split(sep)):
        if not item:
            continue
        if kind in (int, float) and ":" in item:
            raw += _expand_range(kind, item, name)
        else:
            raw.append(_number(kind, item, name) if kind in (int, float) else item)
    # Range ends and single values go through the same checks, so 0:1:0.5 on a rate fails here.
    values = []
    for value in raw:
        if name in CORE_AXES:
            values.append(check_setting(name, value))
        else:
            value = resolve_options(method, {name: value})[name]
            values.append(float(f"{value:.12g}") if isinstance(value, float) else value)
    if not values:
        raise OptionError(f"{flag(name)} has no values")
    return list(dict.fromkeys(values))


def parse_axis_args(method: str, args: list[str]) -> dict[str, list]:
    """Extra CLI words (``--tau 0.0:0.9:0.1 --order fixed,random --no-align``) → ``{axis: values}``.

    An axis with one value is simply a fixed setting. Bool options also take the switch forms
    ``--align`` and ``--no-align``.
    """
    kinds = axis_kinds(method)
    axes: dict[str, list] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--"):
            raise OptionError(f"unexpected argument {word!r}")
        name, eq, text = word[2:].partition("=")
        key = name.replace("-", "_")
        if not eq:
            alone = i + 1 == len(args) or args[i + 1].startswith("--")
            if key.startswith("no_") and kinds.get(key[3:]) is bool and alone:
                key, text = key[3:], "false"
            elif kinds.get(key) is bool and alone:
                text = "true"
            elif alone:
                raise OptionError(f"option {word} needs a value")
            else:
                text = args[i + 1]
                i += 1
        if key not in kinds:
            raise OptionError(f"{flag(key)} is neither an option of method {method!r} nor a training setting; "
                              f"axes: {', '.join(flag(k) for k in kinds)}")
        if key in axes:
            raise OptionError(f"{flag(key)} given twice")
        axes[key] = parse_values(method, key, text)
        i += 1
    return axes


def planned_runs(axes: dict[str, list], seeds: list[int], protocol: str = "joint") -> int:
    """How many runs a grid trains, from the axis lengths alone (the ``ccat`` protocol: at most
    |rank| + |β| configs, one of them shared by its two stages)."""
    if protocol == "ccat":
        configs = sum(len(axes.get(k, CCAT_DEFAULTS[k])) for k in CCAT_STAGES)
    else:
        configs = math.prod(len(v) for v in axes.values())
    return configs * len(seeds)


def check_size(axes: dict[str, list], seeds: list[int], protocol: str = "joint", yes: bool = False) -> int:
    """Refuse a grid too large to be meant before anything loads or trains; return its run count.

    Above ``MAX_RUNS`` always; above ``CONFIRM_RUNS`` unless the user confirmed with ``--yes``.
    """
    runs = planned_runs(axes, seeds, protocol)
    shape = f"{runs:,} runs ({runs // len(seeds):,} config(s) × {len(seeds)} seed(s))"
    if runs > MAX_RUNS:
        raise OptionError(f"the grid has {shape}, more than the {MAX_RUNS:,} allowed; use fewer values or seeds")
    if runs > CONFIRM_RUNS and not yes:
        raise OptionError(f"the grid has {shape}; add --yes to start it, or use fewer values or seeds")
    return runs


def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def config_slug(values: dict) -> str:
    """``{"tau": 0.3, "order": "fixed"}`` → ``tau=0.3_order=fixed`` (a folder name; ``default`` if empty)."""
    slug = "_".join(f"{k.replace('_', '-')}={_text(v)}" for k, v in values.items()) or "default"
    return re.sub(r"[^A-Za-z0-9.=+_-]+", "-", slug)


def expand(method: str, axes: dict[str, list], base: TrainConfig, seeds: list[int],
           named: list[str] | None = None) -> list[RunSpec]:
    """The cartesian product of the axes (first axis outermost), seeds innermost.

    ``named`` are the axes that name the folders (default: those with several values); the staged
    protocol names both of its axes in every stage so a config shared by two stages is one run.
    """
    named = [k for k, v in axes.items() if len(v) > 1] if named is None else named
    specs = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        cfg = _config(method, values, base)
        shown = {k: values[k] for k in named}
        slug = config_slug(shown)
        for seed in seeds:
            specs.append(RunSpec(f"{slug}-seed{seed}", slug, replace(cfg, seed=seed), {"label": slug, "values": shown}))
    return specs


def _config(method: str, values: dict, base: TrainConfig) -> TrainConfig:
    """``base`` with one combination of axis values applied (training settings and method options)."""
    core = {k: v for k, v in values.items() if k in CORE_AXES}
    opts = resolve_options(method, {**base.options, **{k: v for k, v in values.items() if k not in CORE_AXES}})
    return replace(base, method=method, options=opts, **core)


def validate_axes(method: str, axes: dict[str, list], base: TrainConfig, data: HeadData) -> None:
    """Build one model per axis value, the other axes at their first value, before the full product.

    A value out of range (``--tau 0:1000:1``) then fails after a handful of builds instead of after
    building every config before it. Each config checked here is one of the grid's own, so nothing
    valid is refused; ``validate`` still checks every combination afterwards.
    """
    first = {k: v[0] for k, v in axes.items()}
    build_model(_config(method, first, base), data.spec).configure_optimizer()
    for name, values in axes.items():
        for value in values[1:]:
            build_model(_config(method, {**first, name: value}, base), data.spec).configure_optimizer()
