"""What a user names a sweep's runs with: method specs like ``edm[order=strong-to-weak]``, lists of
method specs, seeds, and the bound on a sweep's size that every axis and seed list is held to.
"""
from __future__ import annotations

import re

from heads.blocks.domains import SEED
from heads.errors import OptionError
from heads.train.options import check_value, resolve_options

# A grid that cannot end is refused before anything is built: no axis, seed list or grid may exceed
# MAX_RUNS (a range's length is computed from its ends, never by listing it).
MAX_RUNS = 100_000

_SPEC = re.compile(r"^([a-z][a-z0-9_-]*)(?:\[(.*)\])?$")


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``"edm[tau=0.3,order=fixed]"`` → ``("edm", {"tau": 0.3, "order": "fixed"})`` (validated)."""
    match = _SPEC.match(spec.strip())
    if not match:
        raise OptionError(f"cannot read method spec {spec!r}: use NAME or NAME[key=value,...]")
    name, body = match.group(1), match.group(2)
    given = {}
    for item in filter(None, re.split(r"[;,]", body or "")):
        if "=" not in item:
            raise OptionError(f"method spec {spec!r}: {item!r} is not key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key.replace("-", "_") in {k.replace("-", "_") for k in given}:
            raise OptionError(f"method spec {spec!r} sets {key!r} twice; give each option once")
        given[key] = value.strip()
    resolved = resolve_options(name, given)
    return name, {k: resolved[k.replace("-", "_")] for k in given}


def split_specs(text: str) -> list[str]:
    """Split ``"concat,edm[tau=0.3,order=fixed]"`` at the commas outside brackets."""
    specs, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            specs.append(current)
            current = ""
        else:
            current += ch
    specs.append(current)
    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise OptionError("--methods is empty")
    return specs


def parse_seeds(text: str) -> list[int]:
    """``"3"`` → seeds 0, 1, 2; ``"0,5,9"`` → exactly those."""
    text = text.strip()
    try:
        if "," in text:
            seeds = [check_value("--seeds", int(s), SEED) for s in text.split(",") if s.strip()]
            if not seeds:
                raise OptionError(f"--seeds {text!r} lists no seed; give a count (3) or a list (0,5,9)")
            return seeds
        count = int(text)
    except ValueError as err:
        if isinstance(err, OptionError):
            raise
        raise OptionError(f"--seeds takes a count (3) or a list (0,5,9), got {text!r}") from None
    if count < 1:
        raise OptionError("--seeds N is a count of seeds (3 → 0,1,2) and must be at least 1; "
                          "for one given seed write a list, e.g. --seeds 0,")
    if count > MAX_RUNS:
        raise OptionError(f"--seeds {count:,} is more seeds than the {MAX_RUNS:,} runs a sweep may have")
    return list(range(count))
