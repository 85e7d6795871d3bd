"""A method's own options: the ``Options`` dataclass of each method is their one declaration (type,
default, help, domain), and this file parses what a user types against it — ``--tau 0.3 --no-align`` on
the command line, ``edm[tau=0.3]`` in a spec, a grid axis, or a saved config's dict — and holds every
number to its declared domain (``check_value``, the one validator; ``heads.blocks.domains``).
"""
from __future__ import annotations

import dataclasses
import typing

from heads.blocks.domains import Domain

from heads.errors import OptionError
from heads.methods import method_class


def option_fields(method: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(method_class(method).Options))


def field_type(method: str, name: str):
    """The declared type of an option (annotations may be strings under ``from __future__``)."""
    return typing.get_type_hints(method_class(method).Options)[name]


def check_value(flag: str, value, domain: Domain):
    """The one validator: refuse a number outside its option's domain, naming option, value and domain."""
    if not domain.contains(value):
        raise OptionError(f"{flag} {domain.phrase()}, got {value!r}")
    return value


def _convert(f: dataclasses.Field, raw, method: str):
    """Parse one option value by the field's declared type (bool, int, float, str or a Literal)."""
    kind = field_type(method, f.name)
    flag = f"--{f.name.replace('_', '-')}"
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        if raw not in choices:
            raise OptionError(f"{flag} must be one of {', '.join(map(str, choices))}, got {raw!r}")
        return raw
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).lower()
        if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise OptionError(f"{flag} expects true or false, got {raw!r}")
        return word in ("1", "true", "yes", "on")
    try:
        value = kind(raw)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(f"{flag} expects {kind.__name__}, got {raw!r}") from None
    if "domain" in f.metadata:
        check_value(flag, value, f.metadata["domain"])
    return value


def resolve_options(method: str, given: dict) -> dict:
    """Defaults of the method's Options, overridden by ``given`` (names with '_' or '-')."""
    fields = {f.name: f for f in option_fields(method)}
    out = {name: f.default for name, f in fields.items()}
    for key, raw in given.items():
        name = key.replace("-", "_")
        if name not in fields:
            valid = ", ".join("--" + n.replace("_", "-") for n in fields) or "none"
            raise OptionError(f"method {method!r} has no option --{key.replace('_', '-')}; its options: {valid}")
        out[name] = _convert(fields[name], raw, method)
    return out


def parse_option_args(method: str, args: list[str]) -> dict:
    """Turn ``--tau 0.3 --no-align --order=fixed`` (extra CLI words) into a method options dict."""
    return resolve_options(method, given_option_args(method, args))


def given_option_args(method: str, args: list[str]) -> dict:
    """Only the options ``args`` give (checked), as typed: what replaces single keys of a config file."""
    names = {f.name for f in option_fields(method)}

    def is_flag(name: str) -> bool:
        return name in names and field_type(method, name) is bool

    given, i = {}, 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--"):
            raise OptionError(f"unexpected argument {word!r}")
        name = word[2:]
        key = name.replace("-", "_")
        if "=" in name:
            name, value = name.split("=", 1)
            given[name] = value
        elif key.startswith("no_") and is_flag(key[3:]):
            given[key[3:]] = False
        elif is_flag(key):
            given[key] = True
        else:
            if i + 1 >= len(args):
                raise OptionError(f"option {word} needs a value")
            given[name] = args[i + 1]
            i += 1
        i += 1
    resolve_options(method, given)  # every name and value checked
    return {key.replace("-", "_"): value for key, value in given.items()}
