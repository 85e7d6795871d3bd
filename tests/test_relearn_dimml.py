"""``relearn`` (METHODS-MORE.md §12) and ``dimml`` (§14): each spec test of those sections by hand, and a
test per mechanism that fails when its defining line is removed. Expected values are written out from the
equations in each module's docstring, never by calling the code under test twice. Small random data;
the two-epoch runs on the built-in caches are marked ``trains``."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from cache.synthetic import builtin_cache
from heads.blocks.data import Batch, DataSpec, HeadData, SplitTensors
from heads.blocks.loading import load_head_data
from heads.errors import OptionError
from heads.methods import METHODS
from heads.methods.dimml import certainty_weights, discriminative_dims, duc_term
from heads.methods.relearn import Relearn, RelearnOptions, holdout_rows, kmeans, min_max_scaled, purity, reset_due
from heads.train.config import TrainConfig, build_model
from heads.train.trainer import Trainer, fit

MODS = ["a", "v"]
D = 8
fast = pytest.mark.heads_fast


def split_of(n: int, seed: int, mods=MODS, dim: int = 4, classes: int = 3, absent=None) -> SplitTensors:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = {m: torch.randn(n, dim, generator=g) + (2.0 if k == 0 else 0.3) * y[:, None] for k, m in enumerate(mods)}
    present = {m: torch.ones(n, dtype=torch.bool) for m in mods}
    for m, rows in (absent or {}).items():
        present[m][rows] = False
        x[m][rows] = 0
    return SplitTensors([f"s{seed}_{i}" for i in range(n)], x, {m: t[:, None] for m, t in x.items()}, present, y)


def data_of(n: int = 30, mods=MODS, absent=None) -> HeadData:
    spec = DataSpec(list(mods), dict.fromkeys(mods, 4), dict.fromkeys(mods, 1), 3, ["p", "q", "r"], 0)
    return HeadData(spec, split_of(n, 0, mods, absent=absent), split_of(n // 2, 1, mods), split_of(n // 2, 2, mods),
                    {"caches": ["r"]})


def cfg_of(method: str, **kw) -> TrainConfig:
    options = kw.pop("options", {})
    base = dict(method=method, epochs=4, hidden=D, device="cpu", batch_size=6, lr=0.1, weight_decay=0.0,
                schedule="none", options=options)
    return TrainConfig(**{**base, **kw})


def build(method: str, spec=None, **kw):
    torch.manual_seed(0)
    model = build_model(cfg_of(method, **kw), spec or data_of().spec)
    model.optimizer = model.configure_optimizer()
    return model


def batch_of(n=6, seed=0, absent=None) -> Batch:
    split = split_of(n, seed, absent=absent)
    return split.batch(torch.arange(n))


def refuse_host_reads(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a tensor was read on the host inside train_step")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


# === relearn (§12) ================================================================================
@fast
def test_relearn_spec_numbers_purity_alpha_and_reset_by_hand():
    """§12: purity of y = [0,0,1,1], clusters [0,0,0,1] is 3/4; gap 0.3, λ 3 → α = tanh(0.9) = 0.716298;
    θ_init = 1, θ = 3 → 1.567404."""
    assert purity(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1])) == 0.75
    assert purity(torch.tensor([2, 2, 0, 1, 1]), torch.tensor([1, 1, 1, 0, 0])) == pytest.approx(4 / 5)
    model = build("relearn")
    with torch.no_grad():
        for p in model.initial.buffers():
            p.fill_(1.0)
        for p in model.proj.parameters():
            p.fill_(3.0)
    alpha = math.tanh(3 * 0.3)
    assert alpha == pytest.approx(0.716298, abs=1e-6)
    model.reset({"a": alpha, "v": 0.0})
    for p in model.proj["a"].parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.567404), atol=1e-6, rtol=0)
    for p in model.proj["v"].parameters():  # α = 0: untouched
        torch.testing.assert_close(p, torch.full_like(p, 3.0))


@fast
def test_relearn_reset_moves_only_the_projections_and_keeps_the_head_and_momentum():
    """A reset leaves the head and the optimizer's momentum buffers unchanged; θ_init is the projection
    as built (before any step), and the optimizer still holds the same parameter objects."""
    model = build("relearn")
    built = {n: p.detach().clone() for n, p in model.proj.named_parameters()}
    model.start_epoch(1)
    model.train_step(batch_of())
    model.train_step(batch_of(seed=1))
    head = {n: p.detach().clone() for n, p in model.cls.named_parameters()}
    current = {n: p.detach().clone() for n, p in model.proj.named_parameters()}
    momentum = {id(p): model.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    params = list(model.optimizer.param_groups[0]["params"])
    model.reset({"a": 0.25, "v": 0.5})
    for name, p in model.proj.named_parameters():
        alpha = 0.25 if name.startswith("a.") else 0.5
        torch.testing.assert_close(p, alpha * built[name] + (1 - alpha) * current[name])
    for name, p in model.cls.named_parameters():
        assert torch.equal(p, head[name])
    for p in model.parameters():
        assert torch.equal(model.optimizer.state[p]["momentum_buffer"], momentum[id(p)])
    assert all(a is b for a, b in zip(params, model.optimizer.param_groups[0]["params"]))
    assert "initial.0_linear__weight" in model.state_dict()  # θ_init travels with the checkpoint


@fast
def test_relearn_resets_after_the_official_epochs():
    """Official 20/3 resets after 0-based 20, 40, 60 = our epochs 21, 41, 61: in start_epoch 22, 42, 62."""
    assert [e for e in range(1, 200) if reset_due(e, 20, 3)] == [22, 42, 62]
    assert [e for e in range(1, 20) if reset_due(e, 1, 2)] == [3, 4]
    assert [e for e in range(1, 20) if reset_due(e, 5, 1)] == [7]
    assert not any(reset_due(e, 1, 0) for e in range(1, 20))


@fast
def test_relearn_holdout_is_class_stratified_seeded_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)[torch.randperm(60, generator=torch.Generator().manual_seed(3))]
    held, kept = holdout_rows(y, 0.1, seed=7)
    assert torch.bincount(y[held], minlength=3).tolist() == [1, 2, 3]
    assert sorted(held.tolist() + kept.tolist()) == list(range(60))
    assert held.tolist() == sorted(held.tolist()) and kept.tolist() == sorted(kept.tolist())
    again, _ = holdout_rows(y, 0.1, seed=7)
    other = {tuple(holdout_rows(y, 0.1, seed=s)[0].tolist()) for s in range(8, 12)}
    assert torch.equal(held, again) and len(other - {tuple(held.tolist())}) >= 1
    assert torch.bincount(y[holdout_rows(y, 0.25, seed=0)[0]], minlength=3).tolist() == [2, 5, 8]  # Python's round


@fast
def test_relearn_trains_on_the_training_split_minus_its_held_out_rows():
    trainer = Trainer(data_of(), cfg_of("relearn"))
    model, train = trainer.model, trainer.ready["train"]
    held, kept = holdout_rows(train.y, 0.1, trainer.cfg.seed)
    assert len(held) == 3
    split = model.epoch_split(1, train)
    assert split.index.tolist() == kept.tolist() and model.parts()["held"].index.tolist() == held.tolist()
    seen = torch.cat([b.index for b in split.batches(6, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == kept.tolist()
    assert model.parts()["held"] is model.parts()["held"]  # cut once per attach, not at every call
    val = Trainer(data_of(), cfg_of("relearn", options={"diagnose_split": "val"}))
    assert val.model.epoch_split(1, val.ready["train"]) is val.ready["train"]
    assert val.model.diagnosis_splits() == (val.ready["train"], val.ready["val"])
    tiny = Trainer(data_of(), cfg_of("relearn", options={"holdout": 0.01}))
    with pytest.raises(OptionError, match="--holdout 0.01 holds out no row of a training split of 30: give a larger "
                                          "--holdout or --diagnose-split val"):
        tiny.run(1)


@fast
def test_relearn_min_max_scaling_and_kmeans():
    x = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    torch.testing.assert_close(min_max_scaled(x), torch.tensor([[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0]]))
    # a column that does not start at 0, with a span below 1: (x − min) / (max − min) · 2 − 1
    torch.testing.assert_close(min_max_scaled(torch.tensor([[1.0], [1.25], [1.5]])), torch.tensor([[-1.0], [0.0], [1.0]]))
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(30) % 3
    points = centres[truth] + 0.1 * torch.randn(30, 2, generator=g)
    for seed in range(5):
        labels = kmeans(points, 3, torch.Generator().manual_seed(seed))
        assert purity(truth, labels) == 1.0 and len(set(labels.tolist())) == 3
    first = kmeans(points, 3, torch.Generator().manual_seed(1))
    assert torch.equal(first, kmeans(points, 3, torch.Generator().manual_seed(1)))
    assert kmeans(points[:2], 3, torch.Generator().manual_seed(0)).tolist() in ([0, 1], [1, 0])  # k = rows
    same = kmeans(torch.ones(4, 2), 2, torch.Generator().manual_seed(0))
    assert same.tolist() == [0, 0, 0, 0]  # every draw of the seeding has weight 0: no NaN, one cluster
    line = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    assert purity(torch.tensor([0, 0, 0, 1, 1, 1]), kmeans(line, 2, torch.Generator().manual_seed(0), 1)) == 1.0


@fast
def test_relearn_lloyd_iterations_move_a_poor_seeding_to_the_clusters(monkeypatch):
    """A seeding that puts both centres in one cluster is repaired by the Lloyd updates, not by the draw."""
    line = torch.tensor([[0.0], [0.5], [1.0], [10.0], [10.5], [11.0]])
    draws = iter([torch.tensor([0]), torch.tensor(0.0)])
    monkeypatch.setattr(torch, "randint", lambda *a, **k: next(draws))
    monkeypatch.setattr(torch, "rand", lambda *a, **k: next(draws))
    labels = kmeans(line, 2, torch.Generator())
    assert labels.tolist() in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])


@fast
def test_relearn_kmeans_plus_plus_draws_each_centre_by_its_squared_distance(monkeypatch):
    """k-means++ by hand, one Lloyd assignment (iterations 1, so the labels show the seeds): first centre 0;
    with D² = [0, 1, 1] the draw u·ΣD² = 0.5 · 2 = 1 lands on the first cumulative sum above it (right=True):
    row 2; then D² is the minimum over both centres, so the third centre of the four points is row 2 again."""
    def seeded(points, k, draws):
        it = iter(draws)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "randint", lambda *a, **k: next(it))
            patch.setattr(torch, "rand", lambda *a, **k: next(it))
            return kmeans(torch.tensor(points).unsqueeze(1), k, torch.Generator(), 1).tolist()

    assert seeded([0.0, 1.0, -1.0], 2, [torch.tensor([0]), torch.tensor(0.5)]) == [0, 0, 1]  # centres 0, −1
    # D² = [0, 1, 1, 100]: u = 0.5 → 51 → row 3 (point 10); D² ← min(D², (x − 10)²) = [0, 1, 1, 0]:
    # u = 0.75 → 1.5 → row 2 (point −1). Centres [0, 10, −1].
    assert seeded([0.0, 1.0, -1.0, 10.0], 3, [torch.tensor([0]), torch.tensor(0.5), torch.tensor(0.75)]) == [0, 0, 2, 1]


@fast
def test_relearn_kmeans_ends_on_the_means_of_its_clusters_and_keeps_an_empty_ones_centre():
    """Lloyd's fixed point: every row is nearest to the mean of its own cluster (a singleton's centre is its
    row, not a kept older centre or half of it). Two distinct points, k = 3: the third seed repeats a point,
    its cluster stays empty (bincount to k) and the labels are those of the two."""
    x = torch.tensor([[5.3, 4.6], [1.2, 1.7], [1.7, 4.2], [0.5, 3.1], [0.1, 2.8], [2.6, 0.3], [0.5, 5.2], [3.5, 1.4]])
    labels = kmeans(x, 4, torch.Generator().manual_seed(0))
    means = torch.stack([x[labels == c].mean(0) for c in range(4)])
    assert torch.equal(torch.cdist(x, means).argmin(1), labels)
    assert labels.tolist() == [2, 0, 1, 0, 0, 3, 1, 3]
    line = torch.tensor([[5.0], [0.0], [1.0], [3.0], [1.0], [1.0], [1.0], [3.0]])
    assert kmeans(line, 3, torch.Generator().manual_seed(0)).tolist() == [2, 0, 0, 1, 0, 0, 0, 1]  # {5} stays at 5
    assert kmeans(torch.tensor([[0.0], [0.0], [1.0], [1.0]]), 3, torch.Generator().manual_seed(0)).tolist() == [0, 0, 1, 1]


@fast
def test_relearn_diagnoses_and_resets_in_start_epoch_through_the_core(monkeypatch):
    """reinit every epoch, once: only start_epoch(3) acts; α = tanh(λ |purity_train − purity_held|), and the
    projections after it are α θ_init + (1 − α) θ of the state epoch 2 left (the state it validated)."""
    trainer = Trainer(data_of(), cfg_of("relearn", options={"reinit_epoch": 1, "reinit_num": 1, "move_lambda": 2.0}))
    model = trainer.model
    trainer.run(2)
    before = {n: p.detach().clone() for n, p in model.proj.named_parameters()}
    initial = {n: b.clone() for n, b in model.initial.named_buffers()}
    seen = {}
    original = type(model).start_epoch

    def spy(self, epoch):
        original(self, epoch)
        seen.setdefault(epoch, {n: p.detach().clone() for n, p in self.proj.named_parameters()})

    monkeypatch.setattr(type(model), "start_epoch", spy)
    trainer.run(4)
    rows = trainer.rows
    assert [r["relearn_alpha_a"] == 0 for r in rows] == [True, True, False, True]
    assert all("relearn_purity_train_a" not in r for r in (rows[0], rows[1], rows[3]))
    row = rows[2]
    for i, m in enumerate(MODS):
        gap = abs(row[f"relearn_purity_train_{m}"] - row[f"relearn_purity_held_{m}"])
        alpha = row[f"relearn_alpha_{m}"]
        assert alpha == pytest.approx(math.tanh(2.0 * gap)) and alpha > 0
        for name in ("linear.weight", "linear.bias"):
            want = alpha * initial[f"{i}_{name.replace('.', '__')}"] + (1 - alpha) * before[f"{m}.{name}"]
            torch.testing.assert_close(seen[3][f"{m}.{name}"], want)


@fast
def test_relearn_purities_are_those_of_kmeans_on_each_scaled_set():
    trainer = Trainer(data_of(), cfg_of("relearn", options={"diagnose_split": "val"}))
    model = trainer.model
    model.diagnose()
    for m in MODS:
        for name, split in (("train", trainer.ready["train"]), ("held", trainer.ready["val"])):
            with torch.no_grad():
                h = model.proj[m](split.x[m])
            want = purity(split.y, kmeans(min_max_scaled(h), 3, torch.Generator().manual_seed(trainer.cfg.seed)))
            assert model.last[f"relearn_purity_{name}_{m}"] == want


@fast
def test_relearn_diagnoses_only_the_rows_that_have_the_modality():
    data = data_of(absent={"v": list(range(0, 30, 2))})
    trainer = Trainer(data, cfg_of("relearn", options={"diagnose_split": "val"}))
    h, y = trainer.model.features(trainer.ready["train"], "v")
    assert len(h) == 15 and y.tolist() == trainer.ready["train"].y[1::2].tolist()
    nobody = Trainer(data_of(absent={"v": list(range(30))}), cfg_of("relearn", options={"diagnose_split": "val"}))
    assert nobody.model.diagnose()["v"] == 0.0  # nobody has v in train: no reset of v
    no_a = Trainer(data_of(absent={"a": list(range(30))}), cfg_of("relearn", options={"diagnose_split": "val"})).model
    alphas = no_a.diagnose()  # the first modality without rows: a gets 0, v is still diagnosed
    assert alphas["a"] == 0.0 and set(alphas) == {"a", "v"} and "relearn_purity_train_v" in no_a.last


@fast
def test_relearn_itself_refuses_a_holdout_outside_the_open_unit_interval():
    """Built directly (the Python API, no option parsing): --holdout 0, 1 and 1.5 are refused by Relearn itself."""
    spec, cfg = data_of().spec, cfg_of("relearn")
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(OptionError, match=rf"--holdout must lie in \(0, 1\), got {bad}"):
            Relearn(spec, cfg, RelearnOptions(holdout=bad))
    assert Relearn(spec, cfg, RelearnOptions(holdout=0.99)).opts.holdout == 0.99


# === dimml (§14) ==================================================================================
@fast
def test_dimml_certainty_weights_by_hand():
    """§14: max-probabilities [0.9, 0.5, 0.7], T = 1 → [0.401760, 0.269307, 0.328933]."""
    conf = torch.tensor([[0.9], [0.5], [0.7]])
    every = torch.ones(3, 1, dtype=torch.bool)
    torch.testing.assert_close(certainty_weights(conf, every, 1.0).squeeze(1),
                               torch.tensor([0.401760, 0.269307, 0.328933]), atol=1e-6, rtol=0)
    e = [math.exp(v / 3) for v in (0.9, 0.5, 0.7)]  # T = 3 (AVE)
    torch.testing.assert_close(certainty_weights(conf, every, 3.0).squeeze(1), torch.tensor([v / sum(e) for v in e]))
    absent = torch.tensor([[True, False], [False, False], [True, False]])
    w = certainty_weights(torch.tensor([[0.9, 0.9], [0.5, 0.5], [0.7, 0.7]]), absent, 1.0)
    e = [math.exp(0.9), math.exp(0.7)]
    torch.testing.assert_close(w[:, 0], torch.tensor([e[0] / sum(e), 0.0, e[1] / sum(e)]))
    assert w[:, 1].tolist() == [0.0, 0.0, 0.0]  # nobody present: zeros, no NaN


@fast
def test_dimml_dimension_selection_on_a_toy_set():
    """Dimension 0 separates the audio classes and dimension 1 the visual ones → A = {0}, V = {1}."""
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    spread = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0])  # the same values in both classes
    h_a = torch.stack([10.0 * y, spread], 1)
    h_v = torch.stack([spread, 10.0 * y], 1)
    top_a, top_v = discriminative_dims(h_a, y, 2), discriminative_dims(h_v, y, 2)
    assert (top_a & ~top_v).nonzero().flatten().tolist() == [0]
    assert (top_v & ~top_a).nonzero().flatten().tolist() == [1]
    # a class without rows has no centre: it never wins the argmin (class 2 here)
    assert discriminative_dims(h_a, y, 3).tolist() == [True, False]
    # accuracy strictly above the mean: equal accuracies select nothing
    assert discriminative_dims(torch.stack([10.0 * y, 10.0 * y], 1), y, 2).tolist() == [False, False]
    # a class of one row: its centre is that row (dim 0: centres 1, 4, every row right; dim 1: centres 1.5,
    # 0.5, row 0 wrong → accuracies [1, 2/3], mean 5/6); in float64 as in float32
    one = torch.tensor([[0.0, 0.0], [2.0, 3.0], [4.0, 0.5]])
    for h in (one, one.double()):
        assert discriminative_dims(h, torch.tensor([0, 0, 1]), 2).tolist() == [True, False]


@fast
def test_dimml_duc_by_hand_and_no_gradient_into_the_teacher():
    """L_DUC's first term has zero gradient w.r.t. h_a; its value is −mean_i log softmax_j(⟨v_i, a_j⟩/τ)_i
    on the selected dimensions."""
    h_a = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    h_v = torch.tensor([[0.5, 9.0], [2.0, 9.0]], requires_grad=True)
    dims = torch.tensor([True, False])
    loss = duc_term(h_v, h_a, dims, tau=0.5)
    s = [[0.5 * 1 / 0.5, 0.0], [2.0 * 1 / 0.5, 0.0]]  # ⟨v_i[0], a_j[0]⟩ / τ
    want = -(s[0][0] - math.log(math.exp(s[0][0]) + math.exp(s[0][1]))
             + s[1][1] - math.log(math.exp(s[1][0]) + math.exp(s[1][1]))) / 2
    assert float(loss.detach()) == pytest.approx(want)
    loss.backward()
    assert h_a.grad is None and h_v.grad[:, 1].tolist() == [0.0, 0.0] and h_v.grad[:, 0].abs().sum() > 0
    empty = duc_term(h_v.detach(), h_a.detach(), torch.tensor([False, False]), tau=1.0)
    assert float(empty) == pytest.approx(math.log(2))  # no dimension: the constant log B
    rows = torch.tensor([True, False, True])
    three_v, three_a = torch.randn(3, 2), torch.randn(3, 2)
    both = torch.tensor([0, 2])
    torch.testing.assert_close(duc_term(three_v, three_a, torch.ones(2, dtype=torch.bool), 2.0, rows),
                               duc_term(three_v[both], three_a[both], torch.ones(2, dtype=torch.bool), 2.0))


def stage1_by_hand(model, batch, duc: bool):
    h = {m: model.proj[m](batch.x[m]) for m in MODS}
    loss = sum(F.cross_entropy(model.own[m](h[m]), batch.y) + model.opts.weight * F.cross_entropy(model.shared(h[m]), batch.y)
               for m in MODS)
    if duc:
        a_only, v_only = model.top[0] & ~model.top[1], model.top[1] & ~model.top[0]
        for student, teacher, dims in ((h["v"], h["a"], a_only), (h["a"], h["v"], v_only)):
            sims = (student * dims) @ (teacher * dims).T / model.opts.tau
            loss = loss - sims.log_softmax(1).diagonal().mean()
    return loss


@fast
def test_dimml_stage1_loss_is_the_detached_objective_with_duc_from_its_epoch():
    trainer = Trainer(data_of(), cfg_of("dimml", epochs=9, options={"duc_start": 3, "weight": 0.5, "tau": 2.0}))
    model, batch = trainer.model, batch_of(seed=4)
    model.start_epoch(2)
    assert not bool(model.selected)
    torch.testing.assert_close(model.loss(batch), stage1_by_hand(model, batch, duc=False))
    model.start_epoch(3)
    assert bool(model.selected) and 0 < int(model.top[0].sum()) < D
    a_only = model.top[0] & ~model.top[1]
    assert a_only.any() and (~a_only).any()
    torch.testing.assert_close(model.loss(batch), stage1_by_hand(model, batch, duc=True))
    train = trainer.ready["train"]
    with torch.no_grad():
        for i, m in enumerate(MODS):
            assert torch.equal(model.top[i], discriminative_dims(model.proj[m](train.x[m]), train.y, 3))
    kept = model.top.clone()
    with torch.no_grad():
        model.proj["a"].linear.weight.add_(1.0)
    model.start_epoch(4)  # selected once: later epochs keep it
    assert torch.equal(model.top, kept)
    assert model.stage1_epochs == 6  # 2/3 of 9


@fast
def test_dimml_missing_rows_leave_each_unimodal_ce_and_pair_to_the_samples_that_have_them():
    model = build("dimml")
    model.start_epoch(1)
    batch = batch_of(seed=2, absent={"v": [0, 3]})
    h = {m: model.proj[m](batch.x[m]) * batch.present[m][:, None] for m in MODS}
    keep = batch.present["v"]
    want = (F.cross_entropy(model.own["a"](h["a"]), batch.y) + F.cross_entropy(model.shared(h["a"]), batch.y)
            + F.cross_entropy(model.own["v"](h["v"][keep]), batch.y[keep])
            + F.cross_entropy(model.shared(h["v"][keep]), batch.y[keep]))
    torch.testing.assert_close(model.loss(batch), want)
    model.duc, model.top[0, :3] = True, True
    model.top[1, 5:] = True
    extra = (duc_term(h["v"][keep], h["a"][keep], model.top[0] & ~model.top[1], model.opts.tau)
             + duc_term(h["a"][keep], h["v"][keep], model.top[1] & ~model.top[0], model.opts.tau))
    torch.testing.assert_close(model.loss(batch), want + extra)
    model.duc = False
    lone = batch_of(seed=2, absent={"v": [0, 1, 2, 3, 4]})  # one row has v: its CE is divided by 1
    h = {m: model.proj[m](lone.x[m]) for m in MODS}
    want = (F.cross_entropy(model.own["a"](h["a"]), lone.y) + F.cross_entropy(model.shared(h["a"]), lone.y)
            + F.cross_entropy(model.own["v"](h["v"][5:]), lone.y[5:]) + F.cross_entropy(model.shared(h["v"][5:]), lone.y[5:]))
    torch.testing.assert_close(model.loss(lone), want)


@fast
def test_dimml_stage2_freezes_the_unimodal_learners_trains_f_and_restarts_the_schedule():
    cfg = cfg_of("dimml", epochs=150, lr=1e-3, schedule="step:70:0.1")
    trainer = Trainer(data_of(), cfg)
    model = trainer.model
    assert model.stage1_epochs == 100
    assert {id(p) for g in model.optimizer.param_groups for p in g["params"]} == \
        {id(p) for n, p in model.named_parameters() if not n.startswith("cls.")}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("cls.")}
    model.start_epoch(101)
    assert int(model.stage) == 2 and not model.duc
    assert [p for g in model.optimizer.param_groups for p in g["params"]] == list(model.cls.parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("cls."))
    assert model.optimizer.param_groups[0]["lr_factor"] == pytest.approx(10.0)  # epoch 101 trains at 1e-3
    head = model.cls.weight.detach().clone()
    model.train_step(batch_of())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not n.startswith("cls."))
    assert not torch.equal(model.cls.weight, head)
    model.start_epoch(171)  # stage-2 epoch 71: the restarted StepLR has decayed once
    assert model.optimizer.param_groups[0]["lr_factor"] * 0.01 == pytest.approx(0.1)
    plain = Trainer(data_of(), cfg_of("dimml", epochs=150, lr=1e-3, schedule="step:70:0.1",
                                      options={"restart_schedule": False}))
    plain.model.start_epoch(101)
    assert "lr_factor" not in plain.model.optimizer.param_groups[0]
    # cosine: stage 2 (epochs 7–9 of 9) anneals over its own 3 epochs; epoch 8 is its 2nd:
    # factor = ½(1 + cos(π · 1/3)) / ½(1 + cos(π · 7/9))
    cosine = Trainer(data_of(), cfg_of("dimml", epochs=9, schedule="cosine")).model
    cosine.start_epoch(8)
    want = (1 + math.cos(math.pi / 3)) / (1 + math.cos(math.pi * 7 / 9))
    assert cosine.optimizer.param_groups[0]["lr_factor"] == pytest.approx(want)


@fast
def test_dimml_last_stage1_epoch_is_still_stage1():
    model = build("dimml", epochs=3)  # stage 1: round(3 · 100 / 150) = 2 epochs
    assert model.stage1_epochs == 2
    model.start_epoch(2)
    assert int(model.stage) == 1 and all(p.requires_grad for p in model.own.parameters())
    batch = batch_of(seed=6)
    torch.testing.assert_close(model.loss(batch), stage1_by_hand(model, batch, duc=False))
    model.start_epoch(3)
    assert int(model.stage) == 2 and not any(p.requires_grad for p in model.own.parameters())


@fast
def test_dimml_stage2_loss_is_ce_of_the_fused_head_on_frozen_features():
    model = build("dimml", epochs=3)
    model.start_epoch(3)
    batch = batch_of(seed=5)
    h = torch.cat([model.proj[m](batch.x[m]) for m in MODS], 1)
    loss = model.loss(batch)
    torch.testing.assert_close(loss, F.cross_entropy(model.cls(h), batch.y))
    assert not loss.requires_grad or loss.grad_fn is not None


@fast
def test_dimml_inference_weighs_the_unimodal_heads_and_f_once_stage2_began():
    model = build("dimml", epochs=3, options={"temperature": 2.0})
    model.eval()
    batch = batch_of(seed=3, absent={"a": [1]})
    h = {m: model.proj[m](batch.x[m]) * batch.present[m][:, None] for m in MODS}
    outs = [model.own["a"](h["a"]), model.own["v"](h["v"]), model.cls(torch.cat([h["a"], h["v"]], 1))]
    conf = torch.stack([o.softmax(-1).max(-1).values for o in outs]) / 2.0
    for stage, used in ((1, 2), (2, 3)):
        model.stage.fill_(stage)
        scores = conf[:used].clone()
        scores[0, 1] = -math.inf  # sample 1 lacks a
        w = scores.softmax(0)
        want = sum(w[k].unsqueeze(1) * outs[k] for k in range(used))
        torch.testing.assert_close(model.logits(batch), want)
    state = model.state_dict()
    assert int(state["stage"]) == 2 and "top" in state and "selected" in state


@fast
def test_dimml_logs_its_stage_and_once_selected_the_size_of_each_top_set():
    model = build("dimml")
    assert model.end_epoch(None) == {"dimml_stage": 1}
    model.top[0, :3], model.top[1, 2:7] = True, True
    assert model.end_epoch(None) == {"dimml_stage": 1}  # not selected yet: no sizes
    model.selected.fill_(True)
    model.stage.fill_(2)
    assert model.end_epoch(None) == {"dimml_stage": 2, "dimml_top_a": 3, "dimml_top_v": 5}


@fast
def test_relearn_and_dimml_steps_never_read_a_tensor_on_the_host(monkeypatch):
    """tests/test_device.py checks epoch 1 with defaults; here dimml's contrast (with missing rows) and its
    stage 2, and relearn's step on its epoch split, with every host read made to fail."""
    dimml = Trainer(data_of(), cfg_of("dimml", epochs=6, options={"duc_start": 2})).model
    dimml.start_epoch(2)
    relearn = Trainer(data_of(), cfg_of("relearn")).model
    relearn.start_epoch(1)
    split = relearn.epoch_split(1, relearn.attached("train"))
    full, gappy = batch_of(), batch_of(seed=1, absent={"a": [2], "v": [0]})
    first = next(split.batches(6, torch.Generator().manual_seed(0)))
    with monkeypatch.context() as patch:
        refuse_host_reads(patch)
        for b in (full, gappy):
            dimml.train_step(b)
        relearn.train_step(first)
    dimml.start_epoch(5)
    with monkeypatch.context() as patch:
        refuse_host_reads(patch)
        dimml.train_step(gappy)


@fast
def test_defaults_are_the_ones_the_sections_say_to_use():
    def training(m):
        t = METHODS[m].training
        return (t.optimizer, t.lr, t.weight_decay, t.schedule, t.batch_size, t.epochs, t.stages)

    assert training("relearn") == ("sgd", 2e-3, 1e-4, "none", 64, 90, ())
    assert "Relearning official" in METHODS["relearn"].training.source
    assert training("dimml") == ("sgd", 1e-3, 1e-4, "step:70:0.1", 64, 150, (100, 50))
    assert "DI-MML official" in METHODS["dimml"].training.source
    assert vars(METHODS["relearn"].Options()) == {"move_lambda": 3.0, "reinit_epoch": 20, "reinit_num": 3,
                                                  "diagnose_split": "holdout", "holdout": 0.1}
    assert vars(METHODS["dimml"].Options()) == {"tau": 50.0, "weight": 1.0, "duc_start": 21, "temperature": 1.0,
                                                "stage1_epochs": -1, "restart_schedule": True}
    assert not METHODS["relearn"].stackable and not METHODS["dimml"].stackable
    assert METHODS["relearn"].max_modalities is None and METHODS["dimml"].max_modalities is None
    assert build("dimml", epochs=1).stage1_epochs == 1 and build("dimml", options={"stage1_epochs": 1}).stage1_epochs == 1


# === both: two epochs through the core on the built-in caches ======================================
@pytest.fixture(scope="module")
def builtin():
    root = Path(__file__).resolve().parent.parent / "data" / "builtin"
    return {name: load_head_data([builtin_cache(name, root)]) for name in ("av", "avt", "mv6")}


@pytest.mark.trains
@pytest.mark.parametrize("cache", ["av", "avt", "mv6"])
@pytest.mark.parametrize("method", ["relearn", "dimml"])
def test_each_method_trains_two_epochs(one_thread, builtin, method, cache):
    """Two epochs with the method's own settings (dimml: stage 1 then stage 2 at 2/3 of two epochs)."""
    result = fit(builtin[cache], TrainConfig(method=method, epochs=2, hidden=16, seed=0, device="cpu"), progress=False)
    assert len(result.epochs) == 2 and all(math.isfinite(r["train_loss"]) for r in result.epochs)
    assert len(result.test.v) == 2 ** len(builtin[cache].spec.modalities)
    if cache == "av":
        assert result.test.acc > 100 / len(builtin[cache].spec.class_names)
    if method == "dimml":
        assert [r["dimml_stage"] for r in result.epochs] == [1, 2]
