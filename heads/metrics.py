"""Pure metric functions: accuracy, macro-F1, exact Shapley contributions, deviations and EDM.

Vocabulary (METHODS.md): ``v(S)`` is accuracy (%) with only the modalities in S; ``v(∅)`` is the
accuracy of always predicting the training set's majority class. Shapley contribution
``φ_m = Σ_{S ⊆ M∖{m}} |S|!(M−|S|−1)!/M! · (v(S∪{m}) − v(S))``; ideal share
``φ* = (v(M) − v(∅)) / M``; deviation ``δ_m = φ* − φ_m`` (positive = under-contributing);
``EDM = Σ_m |δ_m|``.
"""
from __future__ import annotations

import itertools
import math
import random

import torch

Subset = frozenset


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Accuracy in percent (the papers' unit). An empty split has accuracy 0."""
    if target.numel() == 0:
        return 0.0
    return float((pred == target).float().mean() * 100)


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Macro-averaged F1 in percent over the classes that occur in target or prediction."""
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        if tp + fp + fn == 0:
            continue  # class absent from both: it says nothing about the model
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return 100 * sum(f1s) / len(f1s) if f1s else 0.0


def all_subsets(modalities: list[str]) -> list[Subset]:
    """Every subset of the modalities, the empty one included, smallest first."""
    return [frozenset(c) for r in range(len(modalities) + 1) for c in itertools.combinations(modalities, r)]


def shapley_values(v: dict[Subset, float], modalities: list[str]) -> dict[str, float]:
    """Exact Shapley value of each modality from the value of every subset (``v`` keyed by frozenset)."""
    n = len(modalities)
    phi = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        total = 0.0
        for r in range(n):
            weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                s = frozenset(s)
                total += weight * (v[s | {m}] - v[s])
        phi[m] = total
    return phi


def shapley_sampled(value, modalities: list[str], permutations: int, seed: int = 0) -> dict[str, float]:
    """Permutation-sampling estimate of Shapley values for large M; ``value(frozenset) -> float``.

    Each sampled permutation adds every modality's marginal gain at its position; the estimate is
    unbiased and its error shrinks as 1/sqrt(permutations).
    """
    rng = random.Random(seed)
    phi = dict.fromkeys(modalities, 0.0)
    memo: dict[Subset, float] = {}

    def v(s: Subset) -> float:
        if s not in memo:
            memo[s] = value(s)
        return memo[s]

    for _ in range(permutations):
        order = modalities[:]
        rng.shuffle(order)
        prefix: Subset = frozenset()
        for m in order:
            phi[m] += v(prefix | {m}) - v(prefix)
            prefix = prefix | {m}
    return {m: total / permutations for m, total in phi.items()}


def deviations(phi: dict[str, float], v_full: float, v_empty: float) -> dict[str, float]:
    """``δ_m = φ* − φ_m`` with the ideal equal share ``φ* = (v(M) − v(∅)) / M``."""
    ideal = (v_full - v_empty) / len(phi)
    return {m: ideal - p for m, p in phi.items()}


def edm(delta: dict[str, float]) -> float:
    """Equilibrium Deviation Metric: the total absolute deviation from the equal share."""
    return sum(abs(d) for d in delta.values())


def weak_to_strong(delta: dict[str, float]) -> list[str]:
    """Modalities sorted by deviation, most under-contributing first (ties keep the given order)."""
    return sorted(delta, key=lambda m: -delta[m])
