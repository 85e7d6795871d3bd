"""Three methods that change what an epoch trains on (issue 23): ``valuation`` (METHODS-MORE.md §1),
``gblend`` (§9) and ``greedy`` (§3, its degraded frozen-feature form). Each spec test of those sections by
hand, a test per mechanism that fails when its defining line is removed, and each method through the
core on the built-in ``av``, ``avt`` and ``mv6``. Small random data unless marked ``trains``."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from cache.synthetic import builtin_cache
from heads.blocks.data import DataSpec, HeadData, SplitTensors
from heads.blocks.loading import load_head_data
from heads.errors import OptionError
from heads.methods import METHODS
from heads.methods.base import encode
from heads.methods.gblend import MM, GBlend, GBlendOptions, blend_weights, held_out_rows
from heads.methods.greedy import advance
from heads.methods.valuation import copy_counts, gap_difference, sample_values, shapley
from heads.train.config import TrainConfig, build_model
from heads.train.trainer import Trainer, fit

MODS = ["a", "v"]
D = 8
fast = pytest.mark.heads_fast


def split_of(n: int, seed: int, mods=MODS, dim: int = 4, classes: int = 3) -> SplitTensors:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = {m: torch.randn(n, dim, generator=g) + (2.0 if k == 0 else 0.3) * y[:, None] for k, m in enumerate(mods)}
    return SplitTensors([f"s{seed}_{i}" for i in range(n)], x, {m: t[:, None] for m, t in x.items()},
                        {m: torch.ones(n, dtype=torch.bool) for m in mods}, y)


def data_of(n: int = 24, mods=MODS) -> HeadData:
    spec = DataSpec(list(mods), dict.fromkeys(mods, 4), dict.fromkeys(mods, 1), 3, ["p", "q", "r"], 0)
    return HeadData(spec, split_of(n, 0, mods), split_of(n // 2, 1, mods), split_of(n // 2, 2, mods), {"caches": ["r"]})


def cfg_of(method: str, **kw) -> TrainConfig:
    options = kw.pop("options", {})
    base = dict(method=method, epochs=3, hidden=D, device="cpu", batch_size=6, lr=0.1, weight_decay=0.0,
                schedule="none", optimizer="sgd", options=options)
    return TrainConfig(**{**base, **kw})


def trainer_of(method: str, data=None, **options) -> Trainer:
    torch.manual_seed(0)
    return Trainer(data or data_of(), cfg_of(method, options=options))


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- valuation (§1) -------------------------------------------------------------------------------
@fast
def test_valuation_phi_table_and_copies_by_hand():
    """Spec test 1: (fused ✗, a ✗, v ✓) → φ^a −0.5 (3 copies), φ^v 0.5 (1); (fused ✓, a ✓, v ✗) → 1.5 (0),
    0.5 (1); all right → 1 each (0)."""
    a, v, av = frozenset("a"), frozenset("v"), frozenset("av")
    correct = {a: torch.tensor([False, True, True]), v: torch.tensor([True, False, True]),
               av: torch.tensor([False, True, True])}
    present = {m: torch.ones(3, dtype=torch.bool) for m in MODS}
    values = sample_values(correct, present)
    assert values[av].tolist() == [0.0, 2.0, 2.0] and values[a].tolist() == [0.0, 1.0, 1.0]
    phi = shapley(values, MODS)
    assert phi["a"].tolist() == [-0.5, 1.5, 1.0] and phi["v"].tolist() == [0.5, 0.5, 1.0]
    assert copy_counts(phi["a"]).tolist() == [3, 0, 0] and copy_counts(phi["v"]).tolist() == [1, 1, 0]


@fast
def test_valuation_thresholds_are_strict_as_the_official_code():
    phi = t(0.4, -0.1, 0.41, 0.39, -0.11, 1.0, 0.99, 0.0, 1.5, -0.09)
    assert copy_counts(phi).tolist() == [0, 0, 1, 2, 3, 0, 1, 2, 0, 2]


@fast
def test_valuation_three_modalities_keep_a_fair_share_of_one_and_absent_ones_count_nothing():
    """M = 3, everything right: v(S) = |S|, φ = 1 each. A sample lacking v: |S| counts only a and t, v's φ is 0."""
    mods = ["a", "v", "t"]
    subsets = [frozenset(c) for r in (1, 2, 3) for c in __import__("itertools").combinations(mods, r)]
    correct = {s: torch.tensor([True, True]) for s in subsets}
    present = {"a": torch.tensor([True, True]), "v": torch.tensor([True, False]), "t": torch.tensor([True, True])}
    values = sample_values(correct, present)
    assert values[frozenset(mods)].tolist() == [3.0, 2.0]
    phi = shapley(values, mods)
    for m in mods:
        assert phi[m][0].item() == pytest.approx(1.0)
    assert phi["v"][1].item() == pytest.approx(0.0) and phi["a"][1].item() == pytest.approx(1.0)


@fast
def test_valuation_modality_level_difference_by_hand():
    """Spec test 2: φ̄ = (1.2, 0.6), α 1 → gaps (−0.2, 0.4), difference 0.4, copies of v; tanh and square forms;
    M = 3 averages the pairs' gaps."""
    difference, keep = gap_difference({"a": 1.2, "v": 0.6}, 1.0, "linear")
    assert difference == pytest.approx(0.4) and keep == "v"
    assert gap_difference({"a": 1.2, "v": 0.6}, 0.5, "linear")[0] == pytest.approx(0.2)
    assert gap_difference({"a": 1.2, "v": 0.6}, 2.0, "tanh")[0] == pytest.approx(math.tanh(0.8))
    assert gap_difference({"a": 1.2, "v": 0.6}, 2.0, "square")[0] == pytest.approx(0.4 ** 1.5 * 2)
    assert gap_difference({"a": 0.3}, 1.0, "linear") == (0.0, "a")  # one modality: no pair, no difference
    difference, keep = gap_difference({"a": 1.0, "v": 0.7, "t": 0.4}, 1.0, "linear")
    assert difference == pytest.approx((0.3 + 0.6 + 0.3) / 3 * 2 / 3) and keep == "t"


@fast
def test_valuation_modality_level_makes_400_visual_copies_of_1000_rows():
    trainer = trainer_of("valuation", level="modality")
    model, train = trainer.model, split_of(1000, 5)
    rows = model.copies(train, {"a": torch.full((1000,), 1.2), "v": torch.full((1000,), 0.6)})
    assert len(rows["v"]) == 400 and len(rows["a"]) == 0
    assert 0 <= int(rows["v"].min()) and int(rows["v"].max()) < 1000


@fast
def test_valuation_modality_level_averages_the_drawn_rows_that_have_m_from_the_torch_stream():
    """--level modality: ⌊0.2 · N⌋ rows drawn from the run's torch stream, φ̄^m over those of them that have m,
    then ⌊difference · N⌋ copies of the kept modality drawn from its rows (the same stream), for each --func."""
    n = 100
    train = split_of(n, 6).with_present({"v": torch.arange(n) % 2 == 0})
    phi = {"a": torch.arange(n) / n, "v": 1 - torch.arange(n) / (2 * n)}
    for func in ("linear", "tanh"):
        model = trainer_of("valuation", level="modality", func=func).model
        torch.manual_seed(11)
        rows = model.copies(train, phi)
        torch.manual_seed(11)
        drawn = torch.randint(0, n, (20,))
        mean = {}
        for m in MODS:
            has = train.present[m][drawn]
            mean[m] = float(phi[m][drawn][has].mean())
        difference, keep = gap_difference(mean, 1.0, func)
        candidates = train.present[keep].nonzero().squeeze(1)
        want = candidates[torch.randint(0, len(candidates), (int(difference * n + 1e-9),))]
        assert keep == "a" and len(want) > 0 and torch.equal(rows[keep], want) and len(rows["v"]) == 0


@fast
def test_valuation_modality_level_with_a_modality_nobody_or_one_row_has():
    """Nobody has v: φ̄^v counts as 1 (gap 0), so with φ^a = 1.5 (gap −0.5) v is kept and has no row to copy.
    One row (3) has v, φ^v = 1: the same gaps, difference 0.5 · 2/3, ⌊(1/3) · 30⌋ = 10 copies of row 3."""
    model = trainer_of("valuation", level="modality").model
    phi = {"a": torch.full((30,), 1.5), "v": torch.ones(30)}
    nobody = split_of(30, 6).with_present({"v": torch.zeros(30, dtype=torch.bool)})
    rows = model.copies(nobody, phi)
    assert len(rows["a"]) == 0 and len(rows["v"]) == 0
    one = split_of(30, 6).with_present({"v": torch.arange(30) == 3})
    rows = model.copies(one, phi)
    assert len(rows["a"]) == 0 and rows["v"].tolist() == [3] * 10


@fast
def test_valuation_values_are_each_samples_own_from_the_models_subset_predictions():
    """φ from ``logits(batch.only(S))`` per row (not batch 0's, BalanceMM's [BUG]), in eval mode."""
    trainer = trainer_of("valuation")
    model, train = trainer.model, trainer.ready["train"]
    model.train()
    phi = model.values(train)
    assert model.training
    model.eval()
    with torch.no_grad():
        batch = train.batch(torch.arange(len(train)))
        hit = {s: (model.logits(batch.only(s)).argmax(-1) == batch.y).float() for s in map(frozenset, ("a", "v", "av"))}
    want_a = (hit[frozenset("a")] + 2 * hit[frozenset("av")] - hit[frozenset("v")]) / 2
    want_v = (hit[frozenset("v")] + 2 * hit[frozenset("av")] - hit[frozenset("a")]) / 2
    torch.testing.assert_close(phi["a"], want_a)
    torch.testing.assert_close(phi["v"], want_v)


@fast
def test_valuation_copies_are_rebuilt_from_the_original_rows_each_epoch():
    """Spec test 4: the split of epoch e + 1 is N plus the copies valued then, never cumulative; warm-up
    epochs train on the split itself; a copy keeps one modality and names its original row."""
    trainer = trainer_of("valuation", warmup=1)
    model, train = trainer.model, trainer.ready["train"]
    assert model.epoch_split(1, train) is train and model.end_epoch(None) == {}
    for epoch in (2, 3):
        split = model.epoch_split(epoch, train)
        logged = model.end_epoch(None)
        copies = logged["valuation_copies_a"] + logged["valuation_copies_v"]
        assert copies > 0 and len(split) == len(train) + copies
        extra = slice(len(train), None)
        one = split.present["a"][extra].to(torch.long) + split.present["v"][extra].to(torch.long)
        assert (one == 1).all() and split.present["a"][extra].sum() == logged["valuation_copies_a"]
        assert torch.equal(split.y[extra], train.y[split.index[extra]])
    phi = model.values(train)
    assert logged["valuation_phi_a"] == pytest.approx(phi["a"].mean().item())


@fast
def test_valuation_logs_phi_over_the_rows_that_have_m_and_copies_one_modality_alone(monkeypatch):
    """The logged φ̄^m is over the rows that have m (here one row of v); copies of one modality only are still
    added; with no copy at all the epoch trains on the split itself."""
    model = trainer_of("valuation", warmup=0).model
    assert model.end_epoch(None) == {}  # nothing logged before the first epoch split
    split = split_of(6, 3).with_present({"v": torch.tensor([False, False, True, False, False, False])})
    model.epoch_split(1, split)
    phi = model.values(split)
    assert model.logged["valuation_phi_v"] == pytest.approx(float(phi["v"][2]))
    assert model.logged["valuation_phi_a"] == pytest.approx(float(phi["a"].mean()))
    full = split_of(6, 3)
    monkeypatch.setattr(type(model), "values", lambda self, train: {"a": torch.ones(6), "v": torch.full((6,), 0.5)})
    only_v = model.epoch_split(2, full)  # φ^a = 1: no copy; φ^v = 0.5: one copy of each row's v
    assert len(only_v) == 12 and not only_v.present["a"][6:].any() and only_v.present["v"][6:].all()
    monkeypatch.setattr(type(model), "values", lambda self, train: {m: torch.ones(6) for m in MODS})
    assert model.epoch_split(3, full) is full


@fast
def test_valuation_a_sample_lacking_a_modality_gets_no_copy_of_it():
    trainer = trainer_of("valuation")
    model, train = trainer.model, split_of(4, 3)
    train = train.with_present({"v": torch.tensor([True, False, True, False])})
    rows = model.copies(train, {"a": t(0.0, 0.0, 1.0, 1.0), "v": t(0.0, 0.0, 0.0, 0.0)})
    assert rows["a"].tolist() == [0, 0, 1, 1] and rows["v"].tolist() == [0, 0, 2, 2]


@fast
def test_valuation_audio_only_copy_trains_audio_and_the_bias_alone():
    """Spec test 3: a copy keeping only a has loss CE(W_a h_a + b, y) and leaves P_v, W_v without gradient."""
    trainer = trainer_of("valuation")
    model, train = trainer.model, trainer.ready["train"]
    copies = train.take(torch.tensor([0, 1, 2, 3])).only(["a"])
    batch = copies.batch(torch.arange(4))
    model.zero_grad()
    loss = model.loss(batch)
    h = model.proj["a"](batch.x["a"])
    want = F.cross_entropy(h @ model.cls.weight[:, :D].T + model.cls.bias, batch.y)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert model.proj["v"].linear.weight.grad.abs().sum() == 0 and model.cls.weight.grad[:, D:].abs().sum() == 0
    assert model.proj["a"].linear.weight.grad.abs().sum() > 0


@fast
def test_valuation_refuses_one_modality_and_declares_the_official_training():
    spec = DataSpec(["a"], {"a": 4}, {"a": 1}, 3, ["p", "q", "r"], 0)
    with pytest.raises(OptionError, match="at least two"):
        build_model(cfg_of("valuation"), spec)
    tr = METHODS["valuation"].training
    assert (tr.optimizer, tr.lr, tr.weight_decay, tr.schedule, tr.batch_size, tr.epochs) == ("adam", 5e-5, 1e-4, "step:30:0.1", 64, 60)
    assert vars(METHODS["valuation"].Options()) == {"level": "sample", "warmup": 5, "part_ratio": 0.2, "alpha": 1.0,
                                                     "func": "linear"}


# --- gblend (§9) ----------------------------------------------------------------------------------
@fast
def test_gblend_weights_by_hand():
    """Spec: head 1 L^T 1.0 → 0.5, L^V 1.2 → 1.0 (raw 2.2222); head 2 L^T 1.0 → 0.8, L^V 1.1 → 0.95 (raw 60):
    weights 0.035714, 0.964286; a head whose held-out loss rises gets 0."""
    before = {"a": (1.0, 1.2), "v": (1.0, 1.1)}
    after = {"a": (0.5, 1.0), "v": (0.8, 0.95)}
    w = blend_weights(before, after)
    assert w["a"] == pytest.approx(2.2222 / 62.2222, abs=1e-5) and w["v"] == pytest.approx(0.964286, abs=1e-6)
    w = blend_weights({**before, MM: (1.0, 1.0)}, {**after, MM: (0.5, 1.1)})
    assert w[MM] == 0 and w["a"] == pytest.approx(0.035714, abs=1e-6)
    balancemm = blend_weights({"a": (1.0, 1.0), "v": (1.0, 1.1)}, {"a": (0.5, 1.1), "v": (0.8, 0.95)}, "balancemm")
    raw_a, raw_v = 0.1 / 0.6 ** 2, 0.15 / 0.05 ** 2  # |ΔG| counts a rise as a gain (BalanceMM)
    assert balancemm["a"] == pytest.approx(raw_a / (raw_a + raw_v))


@fast
def test_gblend_guards_a_flat_overfitting_and_all_zero_weights():
    w = blend_weights({"a": (1.0, 1.0), "v": (1.0, 1.0)}, {"a": (0.9, 0.9), "v": (0.9, 0.95)})
    assert w["a"] == pytest.approx((0.1 / 1e-8) / (0.1 / 1e-8 + 0.05 / 0.05 ** 2))  # |ΔO| < 1e-4 → 1e-4
    assert blend_weights({"a": (1.0, 1.0), "v": (1.0, 1.0)}, {"a": (0.9, 1.1), "v": (0.9, 1.0)}) == {"a": 0.5, "v": 0.5}


@fast
def test_gblend_holds_out_a_stratified_seeded_part_of_train_and_trains_on_the_rest():
    y = torch.tensor([0] * 50 + [1] * 25 + [2] * 13)
    held = held_out_rows(y, 0.08, 3)
    assert [int(held[y == c].sum()) for c in range(3)] == [4, 2, 1]
    assert torch.equal(held, held_out_rows(y, 0.08, 3)) and not torch.equal(held, held_out_rows(y, 0.08, 4))
    trainer = trainer_of("gblend", holdout=0.25)
    model, train = trainer.model, trainer.ready["train"]
    fit_part, held_part = model.split_parts(train)
    split = model.epoch_split(1, train)
    assert split is fit_part and len(split) + len(held_part) == len(train)
    assert set(split.index.tolist()).isdisjoint(held_part.index.tolist())
    counts = [int((train.y == c).sum()) for c in range(3)]
    assert [int((held_part.y == c).sum()) for c in range(3)] == [round(0.25 * n) for n in counts]
    drawn = held_out_rows(train.y, 0.25, trainer.cfg.seed + 9)  # the run's seed, offset by 9
    assert held_part.index.tolist() == drawn.nonzero().squeeze(1).tolist()
    with pytest.raises(OptionError, match="--holdout 0.0 leaves 0 of 24 training rows held out: choose one that keeps "
                                          "both parts non-empty"):
        trainer_of("gblend", holdout=0.0).model.split_parts(train)


@fast
def test_gblend_never_reads_validation_or_test():
    """Validation and test replaced by label-shuffled copies: the weights of every epoch are identical."""
    def weights(data):
        trainer = trainer_of("gblend", data, super_epoch=1)
        trainer.run(3)
        return [[r[f"gblend_w_{k}"] for k in ("a", "v", MM)] for r in trainer.rows], trainer.rows

    data = data_of()
    g = torch.Generator().manual_seed(7)
    shuffled = HeadData(data.spec, data.train,
                        *[SplitTensors(s.ids, s.x, s.tokens, s.present, s.y[torch.randperm(len(s), generator=g)])
                          for s in (data.val, data.test)], data.meta)
    first, rows = weights(data)
    second, other = weights(shuffled)
    assert first == second and rows[-1]["train_loss"] == other[-1]["train_loss"]
    assert rows[0]["val_acc"] != other[0]["val_acc"] or rows[1]["val_acc"] != other[1]["val_acc"]  # val did change
    assert len({tuple(w) for w in first}) == 3  # re-estimated every super-epoch of 1


@fast
def test_gblend_loss_is_the_weighted_sum_and_each_head_learns_from_its_own_term():
    trainer = trainer_of("gblend")
    model = trainer.model
    batch = trainer.ready["train"].batch(torch.arange(6))
    with torch.no_grad():
        model.weights.copy_(t(0.2, 0.0, 0.8))
    h = {m: model.proj[m](batch.x[m]) for m in MODS}
    want = 0.2 * F.cross_entropy(model.uni["a"](h["a"]), batch.y) + \
        0.8 * F.cross_entropy(model.cls(torch.cat([h["a"], h["v"]], 1)), batch.y)
    model.zero_grad()
    loss = model.loss(batch)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert model.uni["v"].weight.grad.abs().sum() == 0 and model.uni["a"].weight.grad.abs().sum() > 0


@fast
def test_gblend_measures_mean_per_sample_ce_of_a_head_over_the_rows_that_have_it():
    trainer = trainer_of("gblend")
    model = trainer.model
    split = split_of(10, 4).with_present({"v": torch.tensor([True] * 7 + [False] * 3)})
    with torch.no_grad():
        h = model.proj["v"](split.x["v"])
        want_v = F.cross_entropy(model.uni["v"](h[:7]), split.y[:7]).item()
        hm = torch.cat([model.proj["a"](split.x["a"]), h * split.present["v"][:, None]], 1)
        want_mm = F.cross_entropy(model.cls(hm), split.y).item()
    assert model.measure(model.parts(), split, "v") == pytest.approx(want_v, rel=1e-5)
    assert model.measure(model.parts(), split, MM) == pytest.approx(want_mm, rel=1e-5)
    lone = split.with_present({"v": torch.tensor([False] * 6 + [True] + [False] * 3)})  # one row has v: its CE
    with torch.no_grad():
        want_lone = F.cross_entropy(model.uni["v"](h[6:7]), split.y[6:7]).item()
    assert model.measure(model.parts(), lone, "v") == pytest.approx(want_lone, rel=1e-5)


@fast
def test_gblend_estimate_trains_copies_of_each_path_and_leaves_the_model_alone(monkeypatch):
    """Online: estimates at epochs 1, n + 1, …; offline: epoch 1 only. Each copy trains its own path."""
    trainer = trainer_of("gblend", super_epoch=2)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    monkeypatch.setattr(type(model), "estimate", lambda self, e: seen.append(e) or {"a": 0.5, "v": 0.25, MM: 0.25})
    for epoch in range(1, 6):
        model.start_epoch(epoch)
    assert seen == [1, 3, 5] and model.weights.tolist() == [0.5, 0.25, 0.25]
    every_third = trainer_of("gblend", super_epoch=3).model
    seen.clear()
    for epoch in range(1, 9):
        every_third.start_epoch(epoch)
    assert seen == [1, 4, 7]
    monkeypatch.undo()
    parts = model.parts()
    assert {id(p) for p in model.path(parts, "a")} == {id(p) for p in [*model.proj["a"].parameters(), *model.uni["a"].parameters()]}
    assert {id(p) for p in model.path(parts, MM)} == {id(p) for p in [*model.proj.parameters(), *model.cls.parameters()]}
    weights = model.estimate(1)
    assert sum(weights.values()) == pytest.approx(1.0) and set(weights) == {"a", "v", MM}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    offline = trainer_of("gblend", mode="offline", super_epoch=1).model
    calls = []
    monkeypatch.setattr(type(offline), "estimate", lambda self, e: calls.append(e) or {"a": 1.0, "v": 0.0, MM: 0.0})
    for epoch in range(1, 4):
        offline.start_epoch(epoch)
    assert calls == [1]


@fast
def test_gblend_estimate_measures_before_and_after_training_each_copy(monkeypatch):
    """The weights come from each head's (L^T, L^V) on T′ and V before and after n epochs of its copy."""
    trainer = trainer_of("gblend", super_epoch=1)
    model = trainer.model
    seen = {}
    monkeypatch.setattr("heads.methods.gblend.blend_weights", lambda b, a, form: seen.update(b=b, a=a, form=form) or {"a": 1.0, "v": 0.0, MM: 0.0})
    model.estimate(1)
    fit_part, held = model.split_parts(trainer.ready["train"])
    assert set(seen["b"]) == {"a", "v", MM} and seen["form"] == "paper"
    assert seen["b"][MM] == (pytest.approx(model.measure(model.parts(), fit_part, MM)), pytest.approx(model.measure(model.parts(), held, MM)))
    assert seen["a"]["a"][0] < seen["b"]["a"][0]  # the copy learned on T′ (lr 0.1, one epoch)


@fast
def test_gblend_itself_refuses_a_holdout_outside_zero_to_one_and_starts_with_equal_weights():
    """Built directly (no option parsing): --holdout −0.1, 1 and 1.5 are refused by GBlend itself, 0 is not
    (split_parts refuses it once it holds out no row); before the first estimate every head weighs 1/(M + 1)."""
    spec, cfg = data_of().spec, cfg_of("gblend")
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(OptionError, match=rf"--holdout must lie in \[0, 1\), got {bad}"):
            GBlend(spec, cfg, GBlendOptions(holdout=bad))
    model = GBlend(spec, cfg, GBlendOptions(holdout=0.0))
    torch.testing.assert_close(model.weights, torch.full((3,), 1 / 3))


@fast
def test_gblend_checkpoints_and_copies_carry_neither_the_data_nor_its_cut():
    trainer = trainer_of("gblend")
    model = trainer.model
    state = model.__getstate__()  # before the cut: nothing to drop
    assert "_parts" not in state and "_attached" not in state
    model.split_parts(trainer.ready["train"])
    assert "_parts" in model.__dict__
    state = model.__getstate__()
    assert "_parts" not in state and "_attached" not in state and "weights" in state["_buffers"]
    assert "_parts" in model.__dict__  # the model itself keeps its cut


@fast
def test_gblend_estimate_trains_each_copy_on_every_row_of_t_prime_per_epoch_at_the_scheduled_rate(monkeypatch):
    """Each of the n epochs of a copy visits every row of T′ once, in batches of the run's size; its fresh
    optimizer runs at the epoch's scheduled rate (cosine over 3 epochs, at epoch 2: 0.1 · ½(1 + cos(π/3)))."""
    torch.manual_seed(0)
    trainer = Trainer(data_of(), cfg_of("gblend", schedule="cosine", options={"super_epoch": 2}))
    model = trainer.model
    fit_part, _ = model.split_parts(trainer.ready["train"])
    seen, optimizers = [], []
    losses = type(model).head_losses

    def spy(self, parts, batch, heads):
        if torch.is_grad_enabled():  # the training steps, not the measurements
            seen.append(batch.index.tolist())
        return losses(self, parts, batch, heads)

    import heads.methods.gblend as gblend
    made = gblend.make_optimizer
    monkeypatch.setattr(type(model), "head_losses", spy)
    monkeypatch.setattr(gblend, "make_optimizer", lambda params, cfg: optimizers.append(made(params, cfg)) or optimizers[-1])
    model.estimate(2)
    n = len(fit_part)
    per_epoch = math.ceil(n / 6)
    assert len(seen) == 3 * 2 * per_epoch  # 3 heads × n = 2 epochs
    for e in range(3 * 2):
        chunk = seen[e * per_epoch:(e + 1) * per_epoch]
        assert [len(b) for b in chunk] == [6] * (n // 6) + ([n % 6] if n % 6 else [])
        assert sorted(sum(chunk, [])) == sorted(fit_part.index.tolist())
    assert len(optimizers) == 3 and all(g["lr"] == pytest.approx(0.075) for o in optimizers for g in o.param_groups)


@fast
def test_gblend_slice_heads_are_the_concat_slices():
    trainer = trainer_of("gblend", uni_heads="slice")
    model = trainer.model
    assert model.uni is None and "uni" not in model.parts()
    batch = trainer.ready["train"].batch(torch.arange(6))
    h = {m: model.proj[m](batch.x[m]) for m in MODS}
    logits = model.head_logits(model.parts(), h)
    slices = model.slices(h)
    for m in MODS:
        torch.testing.assert_close(logits[m], slices[m])
    assert {id(p) for p in model.path(model.parts(), "v")} == {id(p) for p in [*model.proj["v"].parameters(), *model.cls.parameters()]}


# --- greedy (§3) ----------------------------------------------------------------------------------
def state_of(k: int = 2) -> dict:
    return {"mu_bypass": torch.zeros(k), "mu_main": torch.zeros(k), "curating": torch.tensor(False),
            "count": torch.tensor(0), "caring": torch.tensor(0), "bdr": torch.zeros(k)}


@fast
def test_greedy_curates_the_faster_bypass_for_exactly_the_window_by_hand():
    """Spec test 1: μ_bypass = (0.02, 0.01), μ_main = (0.01, 0.01) → BDR (0.30103, 0), d > ε: modality 0 is
    cared for during the next 5 forwards; μ is unchanged meanwhile and accumulates again after."""
    state = state_of()
    advance(state, t(0.02, 0.01), t(0.01, 0.01), True, 0.01, 5)
    assert state["bdr"].tolist() == pytest.approx([math.log10(2), 0.0], abs=1e-6)
    assert bool(state["curating"]) and int(state["caring"]) == 0 and int(state["count"]) == 0
    curated = 0
    for _ in range(7):
        curated += int(state["curating"])  # the forward of the next step
        advance(state, t(1.0, 1.0), t(1.0, 1.0), True, 0.01, 5)
        if curated < 5:
            assert state["mu_bypass"].tolist() == pytest.approx([0.02, 0.01])
    assert curated == 5
    assert state["mu_main"].tolist() == pytest.approx([2.01, 2.01])  # the two steps after the window


@fast
def test_greedy_cares_for_the_second_modality_when_d_is_negative_and_waits_within_epsilon():
    state = state_of()
    advance(state, t(0.01, 0.04), t(0.01, 0.01), True, 0.01, 5)
    assert bool(state["curating"]) and int(state["caring"]) == 1
    state = state_of()
    advance(state, t(0.0102, 0.01), t(0.01, 0.01), True, 0.01, 5)  # d = log10(1.02) = 0.0086 ≤ ε
    assert not bool(state["curating"])
    state = state_of()
    advance(state, t(0.01, 0.01), t(0.01, 0.01), True, 0.0, 5)  # spread 0 = ε: strictly above is needed
    assert not bool(state["curating"])
    state = state_of(3)  # M = 3: the spread max − min, the argmax cared for
    advance(state, t(0.01, 0.03, 0.02), t(0.01, 0.01, 0.01), True, 0.01, 5)
    assert bool(state["curating"]) and int(state["caring"]) == 1


@fast
def test_greedy_never_curates_before_the_starting_epoch_but_computes_d():
    """Spec test 3, through train_step: epochs before --starting-epoch compute and log BDR, never curate."""
    trainer = trainer_of("greedy", starting_epoch=3, epsilon=0.0)
    trainer.run(2)
    assert all(r["greedy_curated_a"] == 0 and r["greedy_curated_v"] == 0 for r in trainer.rows)
    assert math.isfinite(trainer.rows[0]["greedy_bdr_a"]) and trainer.rows[0]["greedy_bdr_a"] != trainer.rows[0]["greedy_bdr_v"]
    trainer.run(3)
    assert trainer.rows[2]["greedy_curated_a"] + trainer.rows[2]["greedy_curated_v"] > 0


@fast
def test_greedy_curated_gate_is_the_running_mean_and_cuts_the_squeeze_gradient():
    """Spec test 2: caring 0 → h̃_0 = h_0 ⊙ ē_0 for every sample, and head 0's loss sends nothing into G."""
    trainer = trainer_of("greedy")
    model = trainer.model
    batch = trainer.ready["train"].batch(torch.arange(6))
    model.train()
    with torch.no_grad():
        model.running.copy_(torch.rand(2, D))
        model.forwards.fill_(1000000)  # ē barely moves with one more forward
        model.curating.fill_(True)
        model.caring.fill_(0)
    model.zero_grad()
    h = model.gated(batch)
    raw = model.proj["a"](batch.x["a"])
    torch.testing.assert_close(h["a"], raw * model.running[0], rtol=1e-4, atol=1e-6)
    F.cross_entropy(model.cls["a"](h["a"]), batch.y).backward()
    assert model.squeeze.weight.grad is None or model.squeeze.weight.grad.abs().sum() == 0
    assert model.curated.tolist() == [1, 0]
    with torch.no_grad():
        model.gated(batch)
    assert model.curated.tolist() == [2, 0]  # counted over the epoch's forwards
    with torch.no_grad():
        model.curating.fill_(False)
    model.zero_grad()
    h = model.gated(batch)
    F.cross_entropy(model.cls["a"](h["a"]), batch.y).backward()
    assert model.squeeze.weight.grad.abs().sum() > 0


@fast
def test_greedy_running_mean_of_each_excitation_in_training_only():
    trainer = trainer_of("greedy")
    model = trainer.model
    b1 = trainer.ready["train"].batch(torch.arange(6))
    b2 = trainer.ready["train"].batch(torch.arange(6, 12))

    def excitation(batch, m):
        with torch.no_grad():
            h = {k: model.proj[k](batch.x[k]) for k in MODS}
            z = torch.relu(model.squeeze(torch.cat([h["a"], h["v"]], 1)))
            return torch.sigmoid(model.excite[m](z)).mean(0)

    want = {m: (excitation(b1, m) + excitation(b2, m)) / 2 for m in MODS}
    model.train()
    model.gated(b1)
    model.gated(b2)
    torch.testing.assert_close(model.running[0], want["a"])
    torch.testing.assert_close(model.running[1], want["v"])  # v's own (the official code's [BUG] fixed)
    assert int(model.forwards) == 2
    model.eval()
    model.gated(b1)
    assert int(model.forwards) == 2 and torch.equal(model.running[0], want["a"])
    # over the rows that have the modality: one row of v, then none (ē_v unchanged, the forward still counts)
    fresh = trainer_of("greedy").model
    fresh.train()
    split = trainer.ready["train"].take(torch.arange(6))
    one = split.with_present({"v": torch.tensor([False, False, True, False, False, False])}).batch(torch.arange(6))
    none = split.with_present({"v": torch.zeros(6, dtype=torch.bool)}).batch(torch.arange(6))
    with torch.no_grad():
        h = encode(fresh.proj, one)
        e_v = torch.sigmoid(fresh.excite["v"](torch.relu(fresh.squeeze(torch.cat([h["a"], h["v"]], 1)))))
        fresh.gated(one)
        torch.testing.assert_close(fresh.running[1], e_v[2])
        fresh.gated(none)
        torch.testing.assert_close(fresh.running[1], e_v[2])
    assert int(fresh.forwards) == 2


@fast
def test_greedy_speeds_are_gradient_over_weight_norms_of_main_and_bypass():
    """After one step's backward: μ_main,a = Σ‖∇‖²/Σ‖θ‖² over {P_a, g_a}; μ_bypass,a over {E_a, c_a, G, g}."""
    trainer = trainer_of("greedy")
    model = trainer.model
    batch = trainer.ready["train"].batch(torch.arange(6))
    model.train()
    model.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train_step(batch)

    def ratio(modules):
        ps = [p for mod in modules for p in mod.parameters()]
        return sum(p.grad.pow(2).sum() for p in ps) / sum(p.pow(2).sum() for p in ps)

    torch.testing.assert_close(model.mu_main[0], ratio([model.proj["a"], model.cls["a"]]))
    torch.testing.assert_close(model.mu_bypass[1], ratio([model.excite["v"], model.squeeze]))
    torch.testing.assert_close(model.bdr, torch.log10(model.mu_bypass / model.mu_main))


@fast
def test_greedy_loss_sums_each_modalitys_ce_and_predicts_the_mean_present_logit():
    trainer = trainer_of("greedy")
    model = trainer.model
    split = trainer.ready["train"].take(torch.arange(6))
    split = split.with_present({"v": torch.tensor([True, True, False, True, True, True])})
    batch = split.batch(torch.arange(6))
    model.eval()
    with torch.no_grad():
        h = model.gated(batch)
        la, lv = model.cls["a"](h["a"]), model.cls["v"](h["v"])
        logits = model.logits(batch)
        torch.testing.assert_close(logits[0], (la[0] + lv[0]) / 2)
        torch.testing.assert_close(logits[2], la[2])
        keep = torch.tensor([0, 1, 3, 4, 5])
        want = F.cross_entropy(la, batch.y) + F.cross_entropy(lv[keep], batch.y[keep])
        torch.testing.assert_close(model.loss(batch), want)
    assert model.squeeze.out_features == 2 * 2 * D // 4
    lone = split.with_present({"v": torch.tensor([False, True, False, False, False, False])}).batch(torch.arange(6))
    with torch.no_grad():
        h = model.gated(lone)
        want = F.cross_entropy(model.cls["a"](h["a"]), lone.y) + F.cross_entropy(model.cls["v"](h["v"][1:2]), lone.y[1:2])
        torch.testing.assert_close(model.loss(lone), want)  # one row has v: its CE over 1
    assert trainer_of("greedy", ratio=100.0).model.squeeze.out_features == 1  # int(2 · 2 · 8 / 100) = 0 → at least 1


@fast
def test_greedy_is_labelled_as_the_degraded_form_and_declares_its_defaults():
    assert METHODS["greedy"].summary.startswith("DEGRADED frozen-feature form")
    assert "one gate after the projections" in METHODS["greedy"].summary
    assert vars(METHODS["greedy"].Options()) == {"epsilon": 0.01, "window": 5, "starting_epoch": 3, "ratio": 4.0}
    assert vars(METHODS["gblend"].Options()) == {"mode": "online", "super_epoch": 10, "holdout": 0.08,
                                                  "ogr_form": "paper", "uni_heads": "separate"}
    same = ("optimizer", "lr", "weight_decay", "schedule", "batch_size", "epochs")
    assert all(getattr(METHODS[m].training, f) == getattr(METHODS["concat"].training, f) for m in ("gblend", "greedy") for f in same)
    assert "no official G-Blend code" in METHODS["gblend"].training.source
    assert "ModelNet40" in METHODS["greedy"].training.source
    assert not any(METHODS[m].stackable for m in ("valuation", "gblend", "greedy"))


# --- through the core -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin():
    root = Path(__file__).resolve().parent.parent / "data" / "builtin"
    return {name: load_head_data([builtin_cache(name, root)]) for name in ("av", "avt", "mv6")}


@pytest.mark.trains
@pytest.mark.parametrize("cache", ["av", "avt", "mv6"])
@pytest.mark.parametrize("method", ["valuation", "gblend", "greedy"])
def test_each_method_trains_two_epochs(one_thread, builtin, method, cache):
    """Two epochs through the core with the method's defaults: every subset is scored, the loss is finite."""
    result = fit(builtin[cache], TrainConfig(method=method, epochs=2, hidden=16, seed=0, device="cpu"), progress=False)
    assert len(result.epochs) == 2 and all(math.isfinite(r["train_loss"]) for r in result.epochs)
    assert len(result.test.v) == 2 ** len(builtin[cache].spec.modalities)


@pytest.mark.trains
def test_valuation_trains_on_copies_through_the_core(one_thread, builtin):
    result = fit(builtin["av"], TrainConfig(method="valuation", epochs=2, hidden=16, seed=0, device="cpu",
                                            options={"warmup": 1}), progress=False)
    row = result.epochs[1]
    assert row["valuation_copies_" + builtin["av"].spec.modalities[0]] + row["valuation_copies_" + builtin["av"].spec.modalities[1]] > 0
