"""The methods that act between epochs through the core's hooks: ``mslr`` (METHODS-MORE.md §15),
``mses`` (§16) and ``pmr`` (§11). Each spec test of those sections by hand, and a test per method that
fails when its defining line is removed. Small random data, no cache: these run in the fast subset."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from heads.blocks.data import DataSpec, HeadData, SplitTensors
from heads.methods import mses as mses_module
from heads.methods import mslr as mslr_module
from heads.methods.mses import track
from heads.methods.mslr import next_ratio, parse_factors
from heads.methods.pmr import coefficients, distances, updated_prototypes
from heads.train.config import TrainConfig, build_model
from heads.train.evaluation import evaluate
from heads.train.trainer import Trainer

MODS = ["a", "v"]
D = 8


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
    base = dict(method=method, epochs=4, hidden=D, device="cpu", batch_size=6, lr=0.1, weight_decay=0.0,
                schedule="none", options=options)
    return TrainConfig(**{**base, **kw})


def build(method: str, spec=None, **options):
    torch.manual_seed(0)
    return build_model(cfg_of(method, options=options), spec or data_of().spec)


def grads_of(model, batch, factors=None):
    """Every parameter's gradient after one ``train_step`` of ``model`` with ``factors`` (the step itself
    is a no-op: lr 0), as a dict."""
    model.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    if factors is not None:
        model.factors = dict(factors)
    model.train_step(batch)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# --- mslr (§15) ----------------------------------------------------------------------------------
def test_mslr_ratio_by_hand():
    """History [0.5]·5, current 0.6, c⁰ = 0.9 → c = 1.08; before five epochs of history c = c⁰."""
    ratio, memory = next_ratio([0.5] * 5, 0.6, 5)
    assert 0.9 * ratio == pytest.approx(1.08) and memory == [0.5] * 4 + [0.6]
    assert next_ratio([0.5] * 4, 0.6, 5) == (1.0, [0.5] * 4 + [0.6])
    assert next_ratio([0.0, 0.0], 0.7, 2) == (1.0, [0.0, 0.7])  # a mean of 0 keeps r = 1 (choice)
    ratio, memory = next_ratio([0.2, 0.4], 0.9, 2)
    assert ratio == pytest.approx(3.0) and memory == [0.4, 0.9]


def test_mslr_factors_parse_and_refuse_in_one_line():
    assert parse_factors("", MODS) == {"a": 1.0, "v": 1.0}
    assert parse_factors("a=0.9, v=1.1", MODS) == {"a": 0.9, "v": 1.1}
    assert parse_factors("v=2", MODS) == {"a": 1.0, "v": 2.0}
    for bad, match in (("t=1", "not a modality"), ("a=x", "modality=number"), ("a=0", "positive"),
                       ("a", "modality=number")):
        with pytest.raises(ValueError, match=match):
            parse_factors(bad, MODS)
    with pytest.raises(ValueError, match="--window"):
        build("mslr", window=0)


def test_factors_scale_each_modalitys_projection_and_head_columns_not_the_bias():
    """``∇θ ← c_m ∇θ`` for ``P_m`` and ``W_m`` (the head's columns of m), the bias unscaled."""
    batch = data_of().train.batch(torch.arange(6))
    plain = grads_of(build("mslr"), batch)
    scaled = grads_of(build("mslr"), batch, {"a": 0.5, "v": 3.0})
    for m, c in (("a", 0.5), ("v", 3.0)):
        for name in (f"proj.{m}.linear.weight", f"proj.{m}.linear.bias"):
            torch.testing.assert_close(scaled[name], c * plain[name])
    torch.testing.assert_close(scaled["cls.weight"][:, :D], 0.5 * plain["cls.weight"][:, :D])
    torch.testing.assert_close(scaled["cls.weight"][:, D:], 3.0 * plain["cls.weight"][:, D:])
    torch.testing.assert_close(scaled["cls.bias"], plain["cls.bias"])
    concat = build("concat")
    concat.optimizer = torch.optim.SGD(concat.parameters(), lr=0.0)
    concat.train_step(batch)
    for name, p in concat.named_parameters():  # factor 1: concat's gradients exactly
        torch.testing.assert_close(plain[name], p.grad)


def test_mslr_measures_each_modalitys_validation_accuracy_as_the_report_does():
    data = data_of()
    trainer = Trainer(data, cfg_of("mslr"))
    report = evaluate(trainer.model, trainer.ready["val"], data.spec, 5, prepared=True)
    trainer.model.train()
    assert trainer.model.unimodal_accuracy() == pytest.approx(report.unimodal)
    assert trainer.model.training  # the measuring pass left the mode as it found it


def test_mslr_adapts_each_factor_from_its_accuracy_history(monkeypatch):
    """Through the core, with scripted validation accuracies and c⁰ = (0.9, 1.1), window 2: epochs 1–3
    train with c⁰; epoch 3 gives r = acc(3) / mean(acc(1), acc(2)), used by epoch 4."""
    script = iter([{"a": 50.0, "v": 20.0}, {"a": 70.0, "v": 20.0}, {"a": 90.0, "v": 10.0}, {"a": 60.0, "v": 40.0}])
    monkeypatch.setattr(mslr_module.ModalityFactors, "unimodal_accuracy", lambda self: next(script))
    trainer = Trainer(data_of(), cfg_of("mslr", options={"lr_factors": "a=0.9,v=1.1", "window": 2}))
    trainer.run(4)
    rows = trainer.rows
    assert [r["mslr_factor_a"] for r in rows] == pytest.approx([0.9, 0.9, 0.9, 0.9 * 90 / 60])
    assert [r["mslr_factor_v"] for r in rows] == pytest.approx([1.1, 1.1, 1.1, 1.1 * 10 / 20])
    assert rows[0]["mslr_acc_a"] == 50.0
    assert trainer.model.factors == pytest.approx({"a": 0.9 * 60 / 80, "v": 1.1 * 40 / 15})


# --- mses (§16) ----------------------------------------------------------------------------------
def fresh():
    return {"previous": None, "smoothed": None, "best": None, "best_epoch": 0, "stopped": False}


def test_mses_smoothing_best_epoch_and_patience_by_hand():
    """ℓ = [1.0, 0.9, 0.95, 0.97] → L̃ = [1.0, 0.96, 0.92, 0.958]; best at 3; patience 1: no stop after
    epoch 4 (4 − 3 = 1 is not > 1); a stop after epoch 5 unless epoch 5 improves."""
    state, smoothed, flags = fresh(), [], []
    for epoch, loss in enumerate([1.0, 0.9, 0.95, 0.97], 1):
        flags.append(track(state, loss, epoch, 1, 0.6))
        smoothed.append(state["smoothed"])
    assert smoothed == pytest.approx([1.0, 0.96, 0.92, 0.958])
    assert flags == [(True, False), (True, False), (True, False), (False, False)]  # epoch 1 stored too
    assert state["best_epoch"] == 3 and state["best"] == pytest.approx(0.92)
    worse, better = dict(state), dict(state)
    assert track(worse, 0.97, 5, 1, 0.6) == (False, True) and worse["stopped"]
    assert track(better, 0.8, 5, 1, 0.6) == (True, False) and better["best_epoch"] == 5  # 0.582 + 0.32 < 0.92
    assert track(worse, 0.5, 6, 1, 0.6) == (True, False)  # a stopped modality stops once


@pytest.mark.parametrize("absent", [2, -1])
def test_mses_validation_slice_loss_by_hand(absent):
    """``ℓ_m`` = mean CE of ``W_m h_m + b/M`` over the validation samples that have m (v absent on two, or
    present on one row only: its loss is that row's CE, not half of it)."""
    data = data_of()
    data.val.present["v"][:absent] = False
    data.val.x["v"][:absent] = 0
    trainer = Trainer(data, cfg_of("mses"))
    model, val = trainer.model, trainer.ready["val"]
    with torch.no_grad():
        for i, m in enumerate(MODS):
            h = torch.relu(val.x[m] @ model.proj[m].linear.weight.T + model.proj[m].linear.bias)
            z = h @ model.cls.weight[:, i * D:(i + 1) * D].T + model.cls.bias / 2
            rows = val.present[m]
            assert model.slice_losses()[m] == pytest.approx(F.cross_entropy(z[rows], val.y[rows]).item(), rel=1e-5)


def scripted(monkeypatch, losses):
    script = iter(losses)
    monkeypatch.setattr(mses_module.MSES, "slice_losses", lambda self: next(script))


def test_mses_stops_a_modality_and_rolls_back_in_the_next_start_epoch(monkeypatch):
    """Patience 1, audio's ℓ = [1.0, 0.9, 0.95, 0.97, 0.97]: best at epoch 3, stop after epoch 5. The
    epoch-5 state is what the core validated and may select; epoch 6 starts from epoch 3's state (model
    and optimizer) and audio's factor is 0 from then on; visual keeps improving and learning."""
    scripted(monkeypatch, [{"a": a, "v": 1.0 - 0.1 * e} for e, a in enumerate([1.0, 0.9, 0.95, 0.97, 0.97, 0.9])])
    trainer = Trainer(data_of(), cfg_of("mses", epochs=6, options={"patience": 1}))
    model, states = trainer.model, {}

    def keep(t, report):
        states[t.epoch] = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        states[t.epoch]["momentum"] = t.model.optimizer.state[t.model.cls.weight]["momentum_buffer"].clone()

    trainer.run(5, keep)
    assert set(model.stored) == {3, 5} and model.pending == [3]  # audio's best, visual's best
    assert model.factors == {"a": 0.0, "v": 1.0}
    assert torch.equal(model.cls.weight, states[5]["cls.weight"])  # not rolled back inside end_epoch
    assert [r["mses_factor_a"] for r in trainer.rows] == [1.0] * 5
    model.start_epoch(6)
    for name, p in model.named_parameters():
        assert torch.equal(p, states[3][name]), name
    assert torch.equal(model.optimizer.state[model.cls.weight]["momentum_buffer"], states[3]["momentum"])
    assert model.pending == [] and set(model.stored) == {3, 5}


def test_mses_stores_the_epoch_one_state(monkeypatch):
    """The reference compares strictly and never saves epoch 1 ([BUG]); a stop whose best is epoch 1
    must find it: patience 1, ℓ rising from epoch 1 → stop after epoch 3, back to epoch 1's state."""
    scripted(monkeypatch, [{"a": 1.0 + e, "v": 1.0 + e} for e in range(3)])
    trainer = Trainer(data_of(), cfg_of("mses", epochs=4, options={"patience": 1}))
    first = {}
    trainer.run(3, lambda t, r: first or first.update({n: p.detach().clone() for n, p in t.model.named_parameters()}))
    model = trainer.model
    assert model.pending == [1, 1] and model.factors == {"a": 0.0, "v": 0.0}
    model.start_epoch(4)
    assert all(torch.equal(p, first[n]) for n, p in model.named_parameters())
    batch = trainer.ready["train"].batch(torch.arange(6))
    before = {n: p.clone() for n, p in model.named_parameters()}
    loss = model.train_step(batch)  # every modality stopped: no update at all
    assert not loss.requires_grad and all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_mses_refuses_bad_options():
    for options, flag in (({"patience": -1}, "--patience"), ({"smoothing": 1.5}, "--smoothing")):
        with pytest.raises(ValueError, match=flag):
            build("mses", **options)



def test_mses_itself_refuses_what_its_domains_refuse():
    """Built directly (the Python API, no option parsing), MSES checks its own options: patience
    below 0 alone, smoothing outside [0, 1] alone; both ends of [0, 1] are allowed."""
    spec, cfg = data_of().spec, cfg_of("mses")
    for patience, smoothing in ((-1, 0.5), (0, 1.5), (0, -0.1)):
        with pytest.raises(ValueError, match="--patience must be 0 or more"):
            mses_module.MSES(spec, cfg, mses_module.MSESOptions(patience=patience, smoothing=smoothing))
    for smoothing in (0.0, 1.0):
        assert mses_module.MSES(spec, cfg, mses_module.MSESOptions(patience=0, smoothing=smoothing)).opts.smoothing == smoothing

# --- pmr (§11) -----------------------------------------------------------------------------------
def test_pmr_prototype_similarities_by_hand():
    """``h_a = [0, 0]``, prototypes ``[1, 0]``, ``[0, 2]`` → S = [−1, −2], softmax [0.731059, 0.268941],
    CE(y = 0) = 0.313262; a zero distance has a zero gradient, not NaN."""
    h = torch.zeros(1, 2, requires_grad=True)
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    sims = -distances(h, protos)
    assert sims.tolist() == [[-1.0, -2.0]]
    assert sims.softmax(-1)[0].tolist() == pytest.approx([0.731059, 0.268941], abs=1e-6)
    assert F.cross_entropy(sims, torch.tensor([0])).item() == pytest.approx(0.313262, abs=1e-6)
    at_zero = torch.zeros(1, 2, requires_grad=True)
    distances(at_zero, torch.zeros(1, 2)).sum().backward()
    assert at_zero.grad.tolist() == [[0.0, 0.0]]
    off = torch.tensor([[3.0, 4.0]], requires_grad=True)
    distances(off, torch.zeros(1, 2)).sum().backward()
    assert off.grad[0].tolist() == pytest.approx([0.6, 0.8])


def test_pmr_prototype_momentum_and_absent_classes_by_hand():
    """c̃ = [2, 2], c_old = [0, 0], μ = 0.5 → [1, 1]; no momentum → c̃; a class without samples keeps c_old."""
    old = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    sums, counts = torch.tensor([[[4.0, 4.0], [0.0, 0.0]]]), torch.tensor([[2.0, 0.0]])
    assert updated_prototypes(old, sums, counts, 0.5).tolist() == [[[1.0, 1.0], [5.0, 5.0]]]
    assert updated_prototypes(old, sums, counts, None).tolist() == [[[2.0, 2.0], [5.0, 5.0]]]


def test_pmr_coefficient_goes_to_every_modality_below_the_others():
    """M = 2: ρ_a > 1 → visual gets α. M = 3, scores (.5, .25, .375): ρ = (1.6, .57, 1.0) → only the second
    (ρ = 1 is not below). A modality nobody in the batch has gets none, nor does a lone scored one."""
    assert coefficients(torch.tensor([0.6, 0.4]), 2.0).tolist() == [0.0, 2.0]
    assert coefficients(torch.tensor([0.4, 0.6]), 2.0).tolist() == [2.0, 0.0]
    assert coefficients(torch.tensor([0.5, 0.5]), 2.0).tolist() == [0.0, 0.0]
    assert coefficients(torch.tensor([0.5, 0.25, 0.375]), 1.5).tolist() == [0.0, 1.5, 0.0]
    assert coefficients(torch.tensor([0.5, float("nan"), 0.4]), 1.5).tolist() == [0.0, 0.0, 1.5]
    assert coefficients(torch.tensor([0.5, float("nan")]), 1.5).tolist() == [0.0, 0.0]


def test_pmr_loss_adds_the_weaker_modalitys_prototype_ce_and_leaves_the_stronger_ones_gradient():
    """With score_a > score_v the added term is α · CE(S_v, y) (by hand from the weights), and
    ∂L/∂P_a equals concat's (the same model's plain CE); outside the window L is the plain CE."""
    model = build("pmr", alpha=2.0)
    batch = data_of().train.batch(torch.arange(6))
    with torch.no_grad():
        h = {m: torch.relu(batch.x[m] @ model.proj[m].linear.weight.T + model.proj[m].linear.bias) for m in MODS}
        for k in range(3):  # audio's prototypes at its class means (high score), visual's far away
            model.prototypes[0, k] = h["a"][batch.y == k].mean(0) if (batch.y == k).any() else 0
        model.prototypes[1] = 10.0
    model.epoch = 1  # inside the window (no start_epoch: it would recompute the hand-set prototypes)
    plain = F.cross_entropy(model.cls(torch.cat([h["a"], h["v"]], 1)), batch.y)
    sim_v = -torch.cdist(h["v"], model.prototypes[1])
    want = plain + 2.0 * F.cross_entropy(sim_v, batch.y)
    loss = model.loss(batch)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    grad_a = torch.autograd.grad(loss, model.proj["a"].linear.weight)[0]
    model.epoch = 72  # past the window: concat's CE
    assert model.loss(batch).item() == pytest.approx(plain.item(), rel=1e-6)
    grad_plain = torch.autograd.grad(model.loss(batch), model.proj["a"].linear.weight)[0]
    torch.testing.assert_close(grad_a, grad_plain)


def test_pmr_prototypes_are_class_means_over_the_first_batches_of_a_shuffled_pass(monkeypatch):
    """24 rows, batch 6: 4 batches, ⌊0.4⌋ → at least one batch: the 6 first rows of the run's
    permutation; with fraction 1 every row. Momentum only from the third computation (epoch 3)."""
    data = data_of()
    trainer = Trainer(data, cfg_of("pmr", options={"momentum": 0.5}))
    model, train = trainer.model, trainer.ready["train"]
    torch.manual_seed(7)
    rows = torch.randperm(24)[:6]
    torch.manual_seed(7)
    sums, counts = model.class_sums()
    with torch.no_grad():
        h = {m: model.proj[m](train.x[m][rows]) for m in MODS}
    for i, m in enumerate(MODS):
        for k in range(3):
            chosen = train.y[rows] == k
            assert counts[i, k] == chosen.sum()
            torch.testing.assert_close(sums[i, k], h[m][chosen].sum(0))
    model.opts.proto_fraction = 1.0
    assert model.class_sums()[1].sum(1).tolist() == [24.0, 24.0]
    fixed = (torch.ones(2, 3, D), torch.ones(2, 3))
    monkeypatch.setattr(type(model), "class_sums", lambda self: (fixed[0] * self.epoch, fixed[1]))
    for epoch, want in ((1, 1.0), (2, 2.0), (3, 0.5 * 3 + 0.5 * 2)):
        model.start_epoch(epoch)
        assert model.prototypes.unique().tolist() == [want], epoch


def test_pmr_logs_each_modalitys_prototype_accuracy_on_validation():
    data = data_of()
    trainer = Trainer(data, cfg_of("pmr"))
    model, val = trainer.model, trainer.ready["val"]
    model.start_epoch(1)
    row = model.end_epoch(None)
    with torch.no_grad():
        for i, m in enumerate(MODS):
            nearest = torch.cdist(model.proj[m](val.x[m]), model.prototypes[i]).argmin(-1)
            assert row[f"pmr_proto_acc_{m}"] == pytest.approx(100 * (nearest == val.y).double().mean().item())


def test_pmr_refuses_bad_options():
    for options, flag in (({"proto_fraction": 0.0}, "--proto-fraction"), ({"momentum": 2.0}, "--momentum")):
        with pytest.raises(ValueError, match=flag):
            build("pmr", **options)


# --- the three through the core, any M --------------------------------------------------------------
@pytest.mark.parametrize("method", ["mslr", "mses", "pmr"])
def test_each_method_runs_three_modalities_through_the_core(method):
    data = data_of(mods=["a", "v", "t"])
    trainer = Trainer(data, cfg_of(method, epochs=2, options={"patience": 0} if method == "mses" else {}))
    trainer.run(2)
    result = trainer.finish()
    assert all(math.isfinite(r["train_loss"]) for r in trainer.rows) and len(result.test.v) == 8
    assert {k for k in trainer.rows[0] if k.startswith(method)} == {f"{method}_{kind}_{m}" for m in "avt" for kind in
                                                                    {"mslr": ("factor", "acc"),
                                                                     "mses": ("loss", "smoothed", "factor"),
                                                                     "pmr": ("proto_acc",)}[method]}
