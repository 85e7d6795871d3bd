"""Config files (``--config``): a run's ``config.json`` (or a YAML file with the same keys) to train
that run again, and a YAML file holding a sweep's options. ``docs/configs.md`` shows the keys.

A run file's ``train`` section is ``TrainConfig`` (every field optional, the defaults of
``train-head`` otherwise), ``data.caches`` the caches it reads and ``spec.modalities`` the modalities
it uses; ``code_version``, ``used``, ``data.dataset``/``backbones`` and the rest of ``spec`` are what
the run recorded and are not read. Options given on the command line replace single keys.

A sweep file's keys are the command's options (``methods``, ``seeds``, ``cache`` or ``caches``,
``epochs``, …; ``axes`` for a grid), lists written as YAML lists or as the command line's
comma-separated text.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

from heads.blocks.optim import FIELDS
from heads.errors import OptionError
from heads.methods import method_class
from heads.train.config import TrainConfig, check_setting, config_from_options, flag
from heads.train.options import resolve_options

RUN_SECTIONS = ("train", "data", "spec", "code_version", "used")


def read_config_file(path: Path) -> dict:
    """A ``.json``, ``.yaml`` or ``.yml`` file holding one mapping; any problem is one line."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except (ValueError, ImportError) as err:  # JSONDecodeError is a ValueError
        raise OptionError(f"--config {path}: cannot read it ({' '.join(str(err).split())})") from None
    except Exception as err:  # noqa: BLE001  (yaml.YAMLError, without importing yaml up front)
        raise OptionError(f"--config {path}: cannot read it as YAML ({' '.join(str(err).split())})") from None
    if not isinstance(doc, dict):
        raise OptionError(f"--config {path}: expected a mapping of keys to values, got {type(doc).__name__}")
    return doc


# --- a run ---------------------------------------------------------------------------------------
@dataclass
class RunFile:
    """What a run file says: its ``TrainConfig`` fields, the caches and modalities it reads."""

    train: dict
    caches: list[str] | None
    modalities: list[str] | None


def _text_list(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise OptionError(f"{where} must be a list of names, got {value!r}")
    return [str(v).strip() for v in value if str(v).strip()]


def run_file(doc: dict, path: Path) -> RunFile:
    """The keys of a run file, checked: unknown sections or ``train`` keys are refused by name."""
    unknown = sorted(set(doc) - set(RUN_SECTIONS))
    if unknown:
        raise OptionError(f"--config {path}: unknown key(s) {', '.join(unknown)}; a run file has {', '.join(RUN_SECTIONS)}")
    train = doc.get("train", {})
    if not isinstance(train, dict):
        raise OptionError(f"--config {path}: train must be a mapping of TrainConfig fields")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    bad = sorted(set(train) - set(fields))
    if bad:
        raise OptionError(f"--config {path}: unknown train key(s) {', '.join(bad)}; train has {', '.join(fields)}")
    data, spec = doc.get("data") or {}, doc.get("spec") or {}
    if not isinstance(data, dict) or not isinstance(spec, dict):
        raise OptionError(f"--config {path}: data and spec must be mappings")
    return RunFile(dict(train), _text_list(data.get("caches"), f"--config {path}: data.caches"),
                   _text_list(spec.get("modalities"), f"--config {path}: spec.modalities"))


def coerce(label: str, value, kind, none: bool = False):
    """A file's value as the declared type ``kind`` (``int``, ``float``, ``str``, ``bool``, ``dict``,
    ``Path``, or one of them ``| None``): YAML reads ``1e-3`` as text, JSON has no int/float split.
    ``none`` lets any setting be empty (a command option left to its default)."""
    args = typing.get_args(kind)
    if value is None:
        if none or type(None) in args:
            return None
        raise OptionError(f"{label} may not be empty")
    kind = next((a for a in args if a is not type(None)), kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                raise ValueError
            return word in ("true", "yes", "1", "on")
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind in (str, Path):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return kind(str(value))
        if kind is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise OptionError(f"{label} expects {kind.__name__}, got {value!r}") from None
    return value


def config_from_file(run: RunFile, path: Path, given: dict, given_options: dict) -> TrainConfig:
    """The file's run as a ``TrainConfig``, with ``given`` (settings typed on the command line) and
    ``given_options`` (method options typed there) replacing single keys; every value is checked as
    ``train-head``'s own options are. A different ``method`` given drops the file's method options."""
    hints = typing.get_type_hints(TrainConfig)
    values = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(TrainConfig)}
    values.update({k: coerce(f"--config {path}: train.{k}", v, hints[k]) for k, v in run.train.items()})
    file_method = values["method"]
    values.update(given)
    method = values["method"]
    method_class(method)
    options = {**(values["options"] if method == file_method else {}), **given_options}
    options = resolve_options(method, options)
    cfg = config_from_options(method, values["epochs"], values["seed"], values["lr"], values["batch_size"],
                              values["optimizer"], values["hidden"], values["weight_decay"], values["missing_train"],
                              values["missing_test"], options, values["schedule"], values["standardize"],
                              values["device"], values["precision"], values["epoch_subsets"],
                              values["shapley_permutations"])
    check_setting("eval_batch_size", values["eval_batch_size"])
    if values["threads"] < 0:
        raise OptionError(f"--config {path}: train.threads must be 0 (torch's default) or positive")
    source = values["training_source"]
    changed = [n for n in FIELDS if n in given and given[n] != run.train.get(n)]
    if source and changed:  # the file's resolved settings no longer all come from where it says
        source += f"; rerun of {path.name} with " + ", ".join(f"{flag(n)[2:]} {given[n]}" for n in changed)
    return dataclasses.replace(cfg, eval_batch_size=values["eval_batch_size"], threads=values["threads"],
                               training_source=source if method == file_method else "")


# --- a sweep -------------------------------------------------------------------------------------
def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _joined(key: str, value):
    """A YAML list as the command line's text: ``[0.1, 0.5]`` → ``0.1,0.5`` (``|`` when a value holds a
    comma; a one-seed list keeps its comma, ``[4]`` → ``4,``, since ``--seeds 4`` is a count)."""
    if not isinstance(value, list):
        return value
    items = [_text(v) for v in value]
    text = ("|" if any("," in i for i in items) else ",").join(items)
    return text + "," if key == "seeds" and len(items) == 1 else text


def sweep_file(doc: dict, path: Path, keys: list[str], axes: bool = False) -> tuple[dict, dict]:
    """A sweep file's option values (names with ``-`` or ``_``; ``caches`` for ``cache``) and, for a
    grid, its ``axes`` as ``{name: text}``; unknown keys are refused with the valid ones."""
    values, axis_text = {}, {}
    for raw_key, value in doc.items():
        key = str(raw_key).replace("-", "_")
        key = "cache" if key == "caches" else key
        if key == "axes" and axes:
            if not isinstance(value, dict):
                raise OptionError(f"--config {path}: axes must map option names to values")
            axis_text = {str(k).replace("-", "_"): _text(_joined("", v)) for k, v in value.items()}
            continue
        if key not in keys:
            valid = ", ".join(sorted(keys + (["axes"] if axes else [])))
            raise OptionError(f"--config {path}: unknown key {raw_key!r}; this command's keys: {valid}")
        values[key] = _joined(key, value)
    return values, axis_text
