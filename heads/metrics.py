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
    return float((pred == target).double().mean() * 100)  # double: the same number on every path


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Macro-averaged F1 in percent over the classes that occur in target or prediction.

    Counted with three ``bincount``s and read back once, so it costs one device sync on a GPU.
    """
    hit = pred == target
    tp = torch.bincount(target[hit], minlength=num_classes)[:num_classes]
    predicted = torch.bincount(pred, minlength=num_classes)[:num_classes]
    actual = torch.bincount(target, minlength=num_classes)[:num_classes]
    f1s = []
    for t, p, a in zip(tp.tolist(), predicted.tolist(), actual.tolist()):
        fp, fn = p - t, a - t
        if t + fp + fn == 0:
            continue  # class absent from both: it says nothing about the model
        f1s.append(2 * t / (2 * t + fp + fn))
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


EXACT_SHAPLEY_MAX = 8  # up to 2^8 − 1 = 255 subsets are scored exactly; beyond, permutations are sampled


def sample_permutations(modalities: list[str], count: int, seed: int = 0) -> list[list[str]]:
    """``count`` uniformly random orders of the modalities (seeded), for ``shapley_from_permutations``."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        order = list(modalities)
        rng.shuffle(order)
        out.append(order)
    return out


def permutation_subsets(permutations: list[list[str]]) -> list[Subset]:
    """Every prefix set the permutations visit (∅ included), each once: what must be scored."""
    seen = {frozenset()}
    for order in permutations:
        for k in range(1, len(order) + 1):
            seen.add(frozenset(order[:k]))
    return sorted(seen, key=lambda s: (len(s), sorted(s)))


def shapley_from_permutations(v: dict[Subset, float], permutations: list[list[str]]) -> tuple[dict[str, float], dict[str, float]]:
    """Permutation-sampling estimate of the Shapley values and its standard error.

    Each permutation gives every modality one marginal gain ``v(P ∪ {m}) − v(P)`` (P: the modalities
    before m); φ_m is their mean, unbiased, and its standard error is the gains' sample standard
    deviation over √(number of permutations) (0 with one permutation).
    """
    gains: dict[str, list[float]] = {m: [] for m in permutations[0]}
    for order in permutations:
        prefix: Subset = frozenset()
        for m in order:
            gains[m].append(v[prefix | {m}] - v[prefix])
            prefix = prefix | {m}
    phi, stderr = {}, {}
    for m, g in gains.items():
        n = len(g)
        mean = sum(g) / n
        phi[m] = mean
        stderr[m] = math.sqrt(sum((x - mean) ** 2 for x in g) / (n - 1) / n) if n > 1 else 0.0
    return phi, stderr


def shapley_sampled(value, modalities: list[str], permutations: int, seed: int = 0) -> dict[str, float]:
    """Permutation-sampling estimate of Shapley values for large M; ``value(frozenset) -> float``."""
    orders = sample_permutations(modalities, permutations, seed)
    v = {s: value(s) for s in permutation_subsets(orders)}
    return shapley_from_permutations(v, orders)[0]


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
