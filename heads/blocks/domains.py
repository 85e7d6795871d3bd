"""Where a number may lie: the one vocabulary of option domains, declared beside each option.

Every numeric field of ``TrainConfig`` and of every method's ``Options`` states its domain in its
metadata (``option(default, help, domain)`` below writes it), and one validator
(``heads.train.options.check_value``) refuses what falls outside, naming the option, the value and the
domain. A NaN or an infinity is outside every domain: a rate of ``inf`` trains to NaN and reports
chance accuracy with exit 0, so it must never reach a run. The domains live in ``blocks`` because
methods import blocks and the training core imports methods: each may read them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Domain:
    """A set of numbers, as an interval with optional integer and extra-value rules.

    ``low``/``high`` are bounds (``None`` = unbounded), ``low_open``/``high_open`` exclude them;
    ``integer`` requires a whole number; ``also`` lists single values allowed outside the interval
    (``-1`` = "derive it", ``0`` = "same as another setting"); ``text`` is the domain as the user reads it.
    """

    text: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    also: tuple = ()

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.integer and value != int(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def phrase(self) -> str:
        """``must lie in [0, 1)`` for an interval, ``must be positive (…)`` otherwise."""
        return ("must lie in " if self.text[0] in "[(" else "must be ") + self.text

    def outside(self) -> list:
        """Values that must be refused (NaN, ±inf and one just past each bound); the domain test uses them."""
        probes = [math.nan, math.inf, -math.inf]
        if self.low is not None:
            probes.append(self.low if self.low_open else self.low - 1)
        if self.high is not None:
            probes.append(self.high if self.high_open else self.high + 1)
        return [p for p in probes if p not in self.also]

    def __or__(self, values: tuple) -> "Domain":
        """``POSITIVE_INT | (-1,)``: the same domain with single extra values allowed."""
        shown = " or ".join(str(v) for v in values)
        return Domain(f"{self.text} (or {shown})", self.low, self.high, self.low_open, self.high_open,
                      self.integer, self.also + tuple(values))


FINITE = Domain("a finite number")
POSITIVE = Domain("positive (a finite number > 0)", low=0, low_open=True)
NONNEGATIVE = Domain("a finite number ≥ 0", low=0)
UNIT = Domain("[0, 1]", low=0, high=1)
UNIT_OPEN = Domain("[0, 1)", low=0, high=1, high_open=True)
FRACTION = Domain("(0, 1]", low=0, low_open=True, high=1)
OPEN_FRACTION = Domain("(0, 1)", low=0, low_open=True, high=1, high_open=True)
# A learning rate above 10 diverges for every optimizer here; 1e10 is a typo (choice).
LR = Domain("(0, 10]", low=0, low_open=True, high=10)
POSITIVE_INT = Domain("positive (an integer ≥ 1)", low=1, integer=True)
NONNEGATIVE_INT = Domain("an integer ≥ 0", low=0, integer=True)
WIDTH = Domain("an integer in [1, 65536]", low=1, high=65536, integer=True)
# Seeds feed numpy's and torch's generators, which take 64-bit unsigned integers (choice: 0 … 2**63−1,
# so the value also fits a signed long long).
SEED = Domain("an integer in [0, 2**63 − 1]", low=0, high=2 ** 63 - 1, integer=True)


def option(default, help: str, domain: Domain | None = None):
    """A dataclass field with its help line and, for a number, its domain: the one declaration."""
    meta = {"help": help}
    if domain is not None:
        meta["domain"] = domain
    return field(default=default, metadata=meta)
