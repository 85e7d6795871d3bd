"""Metrics against hand-computed values."""
import math

import pytest
import torch

from heads import metrics

F = frozenset


def toy_additive():
    # v(S) of a 3-modality toy whose gains are additive: a adds 30, b 20, c 10 over v(∅) = 10.
    return {F(): 10, F("a"): 40, F("b"): 30, F("c"): 20, F("ab"): 60, F("ac"): 50, F("bc"): 40, F("abc"): 70}


def test_shapley_additive_toy_by_hand():
    phi = metrics.shapley_values(toy_additive(), ["a", "b", "c"])
    assert phi == pytest.approx({"a": 30, "b": 20, "c": 10})


def test_shapley_with_redundancy_and_synergy():
    # a and b are redundant (ab = a = b = 50); c is useless alone but adds 40 on top of a and b.
    v = {F(): 0, F("a"): 50, F("b"): 50, F("c"): 0, F("ab"): 50, F("ac"): 50, F("bc"): 50, F("abc"): 90}
    phi = metrics.shapley_values(v, ["a", "b", "c"])
    # φ_c = 1/3·(abc − ab) = 40/3; φ_a = 1/3·50 + 1/6·(0 + 50) + 1/3·40 = 115/3.
    assert phi["c"] == pytest.approx(40 / 3)
    assert phi["a"] == pytest.approx(115 / 3) and phi["b"] == pytest.approx(115 / 3)
    assert sum(phi.values()) == pytest.approx(v[F("abc")] - v[F()])  # efficiency


def test_deviation_edm_and_order():
    phi = {"a": 30.0, "b": 20.0, "c": 10.0}
    delta = metrics.deviations(phi, v_full=70, v_empty=10)  # φ* = 20
    assert delta == pytest.approx({"a": -10, "b": 0, "c": 10})
    assert metrics.edm(delta) == pytest.approx(20)
    assert metrics.weak_to_strong(delta) == ["c", "b", "a"]


def test_two_modalities_have_equal_absolute_deviation():
    v = {F(): 20, F("x"): 80, F("y"): 30, F("xy"): 85}
    delta = metrics.deviations(metrics.shapley_values(v, ["x", "y"]), 85, 20)
    assert abs(delta["x"]) == pytest.approx(abs(delta["y"]))
    # φ_x = ½(60) + ½(55) = 57.5, φ* = 32.5 → δ_x = −25
    assert delta["x"] == pytest.approx(-25)


def test_sampled_shapley_converges_to_exact():
    v = toy_additive()
    est = metrics.shapley_sampled(lambda s: v[s], ["a", "b", "c"], permutations=2000, seed=1)
    assert est == pytest.approx({"a": 30, "b": 20, "c": 10}, abs=1e-9)  # additive: every order gives the same gains


def test_accuracy_and_macro_f1_by_hand():
    y = torch.tensor([0, 0, 1, 1, 2])
    p = torch.tensor([0, 1, 1, 1, 0])
    assert metrics.accuracy(p, y) == pytest.approx(60.0)
    # class 0: tp1 fp1 fn1 → 0.5; class 1: tp2 fp1 fn0 → 0.8; class 2: tp0 fp0 fn1 → 0
    assert metrics.macro_f1(p, y, 3) == pytest.approx(100 * (0.5 + 0.8 + 0) / 3)


def test_all_subsets_counts():
    subsets = metrics.all_subsets(["a", "b", "c", "d"])
    assert len(subsets) == 16 and subsets[0] == F() and subsets[-1] == F("abcd")
    assert len(set(subsets)) == 16 and all(isinstance(s, frozenset) for s in subsets)
    assert math.comb(4, 2) == sum(len(s) == 2 for s in subsets)


def test_sampled_shapley_of_an_interacting_game_by_hand():
    # Redundancy and synergy (exact φ: a = b = 115/3, c = 40/3, see above): the marginal gains depend on
    # the prefix, so the estimate is right only if each permutation's prefix grows. Seeded: the same
    # seed (0 by default) gives the same estimate, another seed another one.
    v = {F(): 0, F("a"): 50, F("b"): 50, F("c"): 0, F("ab"): 50, F("ac"): 50, F("bc"): 50, F("abc"): 90}
    est = metrics.shapley_sampled(lambda s: v[s], ["a", "b", "c"], permutations=3000, seed=2)
    assert est == pytest.approx({"a": 115 / 3, "b": 115 / 3, "c": 40 / 3}, abs=1.5)
    few = metrics.shapley_sampled(lambda s: v[s], ["a", "b", "c"], permutations=50)
    assert few == metrics.shapley_sampled(lambda s: v[s], ["a", "b", "c"], permutations=50, seed=0)
    assert few != metrics.shapley_sampled(lambda s: v[s], ["a", "b", "c"], permutations=50, seed=1)


def test_accuracy_and_macro_f1_edge_cases_by_hand():
    empty = torch.zeros(0, dtype=torch.long)
    assert metrics.accuracy(empty, empty) == 0.0 and metrics.macro_f1(empty, empty, 3) == 0.0
    assert metrics.accuracy(torch.tensor([2]), torch.tensor([2])) == 100.0  # one sample is not "empty"
    # Classes 0 and 1 swapped (tp 0, fp 1, fn 1 each: F1 0, they count), class 2 right (F1 1): 100/3.
    assert metrics.macro_f1(torch.tensor([1, 0, 2]), torch.tensor([0, 1, 2]), 3) == pytest.approx(100 / 3)
    # Class 1 absent from both is skipped, and the classes after it still count:
    # class 0 tp 2 fp 1 fn 0 → 0.8, class 2 tp 0 fp 0 fn 1 → 0: 40.
    assert metrics.macro_f1(torch.tensor([0, 0, 0]), torch.tensor([0, 0, 2]), 3) == pytest.approx(40.0)


def test_permutation_estimate_and_its_standard_error_by_hand():
    """Two permutations of a 2-player game: gains of a are v(a)−v(∅) = 10 (a first) and v(ab)−v(b) = 30
    (a second): φ_a = 20, stderr = sd(10, 30)/√2 = 14.142…/1.414… = 10."""
    v = {frozenset(): 0.0, frozenset("a"): 10.0, frozenset("b"): 50.0, frozenset("ab"): 80.0}
    phi, stderr = metrics.shapley_from_permutations(v, [["a", "b"], ["b", "a"]])
    assert phi == {"a": 20.0, "b": 60.0}
    assert stderr["a"] == pytest.approx(10.0) and stderr["b"] == pytest.approx(10.0)
    assert metrics.permutation_subsets([["a", "b"]]) == [frozenset(), frozenset("a"), frozenset("ab")]
    additive = {s: 3.0 * ("a" in s) + 5.0 * ("b" in s) + 7.0 * ("c" in s) for s in metrics.all_subsets(["a", "b", "c"])}
    phi, stderr = metrics.shapley_from_permutations(additive, metrics.sample_permutations(["a", "b", "c"], 5, seed=3))
    assert phi == {"a": 3.0, "b": 5.0, "c": 7.0} and all(e == 0.0 for e in stderr.values())


def test_macro_f1_counts_by_hand():
    """Classes 0, 1, 2 (2 absent from both): F1_0 = 2·1/(2·1+1+0) = 2/3, F1_1 = 2·1/(2·1+0+1) = 2/3."""
    pred, target = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    assert metrics.macro_f1(pred, target, 3) == pytest.approx(100 * 2 / 3)
