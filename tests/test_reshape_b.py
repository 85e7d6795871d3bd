"""``umt`` (METHODS-MORE.md §6, with UME as ``late --combine``) and ``reconboost`` (§13): every test of
those sections with its hand-computed numbers, and a test per mechanism that fails when its defining
line is removed. Expected values are written out from the model's own weights (the equations in each
module's docstring), never by calling the code under test a second time. The core's ``selectable`` hook
(umt's selection restricted to the joint phase) is pinned here too.
"""
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
from heads.methods.concat import Concat
from heads.methods.late import mean_logits
from heads.methods.reconboost import boosting, masked_mean, phase_of
from heads.methods.umt import distillation, masked_ce, teacher_epochs
from heads.train.config import TrainConfig, build_model
from heads.train.trainer import Trainer, fit

SPEC2 = DataSpec(["a", "v"], {"a": 6, "v": 4}, {"a": 1, "v": 1}, 3, ["x", "y", "z"], 0)
SPEC3 = DataSpec(["a", "v", "t"], {"a": 6, "v": 4, "t": 5}, dict.fromkeys("avt", 1), 3, ["x", "y", "z"], 0)
D = 8
fast = pytest.mark.heads_fast


def build(method, spec=SPEC2, epochs=10, start=1, **options):
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, hidden=D, epochs=epochs, optimizer="sgd", lr=0.5, weight_decay=0.0,
                      schedule="none", options=options)
    model = build_model(cfg, spec)
    model.optimizer = model.configure_optimizer()
    for e in range(1, start + 1):
        model.start_epoch(e)
    return model


def make_batch(spec=SPEC2, n=6, seed=0, absent=None):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, spec.dims[m], generator=g) for m in spec.modalities}
    present = {m: torch.ones(n, dtype=torch.bool) for m in x}
    for m, rows in (absent or {}).items():
        for i in rows:
            present[m][i] = False
            x[m][i] = 0
    counts = {m: int(present[m].sum()) for m in x}
    return Batch(x, {m: t[:, None] for m, t in x.items()}, present, torch.randint(0, spec.num_classes, (n,), generator=g),
                 counts)


def split_of(spec, n, seed):
    b = make_batch(spec, n, seed)
    return SplitTensors([f"s{seed}_{i}" for i in range(n)], b.x, b.tokens, b.present, b.y)


def frozen_grads(model, batch):
    """``train_step`` with the optimizer's step off: the loss and every parameter's gradient (None kept)."""
    model.optimizer.step = lambda *a, **k: None
    loss = model.train_step(batch)
    return loss, {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def relu_lin(lin, x):
    return torch.relu(x @ lin.weight.T + lin.bias)


# --- umt ------------------------------------------------------------------------------------------
@fast
def test_umt_distillation_is_the_sections_number():
    """§6: h = [1, 2], h^T = [0, 0], λ = 10 → 10 · (1 + 4)/2 = 25; a sample without m does not count."""
    h, t = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    assert 10 * distillation(h, t, torch.tensor([True]), full=True) == pytest.approx(25.0)
    h2, t2 = torch.tensor([[1.0, 2.0], [7.0, 9.0]]), torch.zeros(2, 2)
    assert 10 * distillation(h2, t2, torch.tensor([True, False]), full=False) == pytest.approx(25.0)
    assert distillation(h2, t2, torch.tensor([False, False]), full=False) == 0
    assert masked_ce(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([True, False])) == pytest.approx(math.log(3))


@fast
def test_umt_teacher_epochs_rule():
    assert [teacher_epochs(e, -1) for e in (2, 3, 9, 100)] == [1, 1, 3, 33]
    assert teacher_epochs(10, 9) == 9
    with pytest.raises(OptionError, match="--teacher-epochs must lie in \\[1, 9\\]"):
        teacher_epochs(10, 10)
    with pytest.raises(OptionError, match="\\[1, 0\\]"):
        teacher_epochs(1, -1)
    model = build("umt", epochs=9)
    assert model.teacher_epochs == 3 and [model.selectable(e) for e in (1, 3, 4, 9)] == [False, False, True, True]


@fast
def test_umt_phase_a_trains_the_teachers_alone_by_their_own_ce():
    model = build("umt", epochs=4, teacher_epochs=2)
    assert model.phase == 1
    assert {id(p) for g in model.optimizer.param_groups for p in g["params"]} == {id(p) for p in model.teachers.parameters()}
    b = make_batch(absent={"v": [0, 3]})
    loss, grads = frozen_grads(model, b)
    t = model.teachers
    expected = sum((F.cross_entropy(t["cls"][m](relu_lin(t["proj"][m].linear, b.x[m])), b.y, reduction="none")
                    * b.present[m]).sum() / b.present[m].sum() for m in "av")
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert all(grads[n] is None for n in grads if not n.startswith("teachers."))
    assert all(grads[n] is not None for n in grads if n.startswith("teachers."))


@fast
def test_umt_switch_loads_each_teachers_best_epoch_freezes_it_and_trains_the_student(monkeypatch):
    model = build("umt", epochs=5, teacher_epochs=2)
    accs = iter([{"a": 50.0, "v": 10.0}, {"a": 40.0, "v": 10.0}])  # a: epoch 1 best; v: a tie → the later, epoch 2
    monkeypatch.setattr(type(model), "teacher_accuracy", lambda self: next(accs))
    with torch.no_grad():
        for p in model.teachers.parameters():
            p.fill_(1.0)
    model.end_epoch(None)
    model.start_epoch(2)
    with torch.no_grad():
        for p in model.teachers.parameters():
            p.fill_(2.0)
    model.end_epoch(None)
    model.start_epoch(3)
    assert model.phase == 2
    teachers = model.teachers
    assert all((p == 1.0).all() for p in [*teachers["proj"]["a"].parameters(), *teachers["cls"]["a"].parameters()])
    assert all((p == 2.0).all() for p in [*teachers["proj"]["v"].parameters(), *teachers["cls"]["v"].parameters()])
    assert not any(p.requires_grad for p in model.teachers.parameters())
    student = {id(p) for p in [*model.proj.parameters(), *model.cls.parameters()]}
    assert {id(p) for g in model.optimizer.param_groups for p in g["params"]} == student
    model.train()
    assert model.training and model.proj.training and not model.teachers.training  # teachers in eval mode


@fast
def test_umt_student_loss_is_ce_plus_lambda_mse_and_teachers_get_no_gradient():
    model = build("umt", epochs=3, teacher_epochs=1, lam=10.0, start=2)
    model.train()
    b = make_batch(absent={"a": [1]})
    before = {n: p.clone() for n, p in model.teachers.named_parameters()}
    loss, grads = frozen_grads(model, b)
    h = {m: relu_lin(model.proj[m].linear, b.x[m]) * b.present[m][:, None] for m in "av"}
    ce = F.cross_entropy(torch.cat([h["a"], h["v"]], 1) @ model.cls.weight.T + model.cls.bias, b.y)
    mse = 0.0
    for m in "av":
        target = relu_lin(model.teachers["proj"][m].linear, b.x[m])
        rows = b.present[m]
        mse = mse + ((h[m] - target)[rows] ** 2).mean()
    assert float(loss) == pytest.approx(float(ce + 10 * mse), rel=1e-6)
    assert all(grads[n] is None for n in grads if n.startswith("teachers."))
    assert all(torch.equal(p, before[n]) for n, p in model.teachers.named_parameters())
    assert not model.teachers.training
    def distilled(batch):
        with torch.no_grad():
            return {m: float(((relu_lin(model.proj[m].linear, batch.x[m]) - relu_lin(model.teachers["proj"][m].linear,
                                                                                    batch.x[m]))[batch.present[m]] ** 2).mean())
                    for m in "av"}

    first = distilled(b)  # before the second batch, with the parameters the first one saw (step off)
    assert model.end_epoch(None)["umt_distill_a"] == pytest.approx(first["a"], rel=1e-5)  # one batch so far
    second_batch = make_batch(seed=3)
    second = distilled(second_batch)
    model.loss(second_batch)
    out = model.end_epoch(None)  # the epoch means over the two batches
    assert out["umt_phase"] == 2 and out["umt_distill_v"] > 0
    for m in "av":
        assert out[f"umt_distill_{m}"] == pytest.approx((first[m] + second[m]) / 2, rel=1e-5)
    no_a = make_batch(seed=4, absent={"a": range(6)})  # nobody has a: v is still distilled
    h_v = relu_lin(model.proj["v"].linear, no_a.x["v"])
    ce = F.cross_entropy(torch.cat([torch.zeros_like(h_v), h_v], 1) @ model.cls.weight.T + model.cls.bias, no_a.y)
    mse_v = ((h_v - relu_lin(model.teachers["proj"]["v"].linear, no_a.x["v"])) ** 2).mean()
    assert float(model.loss(no_a).detach()) == pytest.approx(float(ce + 10 * mse_v), rel=1e-6)


@fast
def test_umt_at_lambda_zero_the_student_is_concat():
    """§6: at λ = 0 the student equals concat — same initial weights for a seed, same loss and gradients."""
    model = build("umt", epochs=3, teacher_epochs=1, lam=0.0, start=2)
    concat = build("concat", epochs=3)
    assert all(torch.equal(p, q) for p, q in zip([*model.proj.parameters(), *model.cls.parameters()], concat.parameters()))
    b = make_batch(absent={"v": [2]})
    loss, grads = frozen_grads(model, b)
    loss_c, grads_c = frozen_grads(concat, b)
    assert float(loss) == pytest.approx(float(loss_c), rel=1e-6)
    for name in grads_c:
        assert torch.allclose(grads[name], grads_c[name], atol=1e-7)


@fast
def test_umt_teacher_accuracy_is_measured_on_the_samples_that_have_the_modality():
    model = build("umt", epochs=3)
    val = split_of(SPEC2, 8, 5)
    val.present["v"][:3] = False
    model.attach(split_of(SPEC2, 8, 4), val)
    acc = model.teacher_accuracy()
    t = model.teachers
    for m in "av":
        rows = val.present[m]
        pred = t["cls"][m](relu_lin(t["proj"][m].linear, val.x[m])).argmax(-1)
        assert acc[m] == pytest.approx(100 * float((pred == val.y)[rows].float().mean()))
    model.cfg.eval_batch_size = 3  # three batches (3 + 3 + 2 rows): the counts add up over them
    assert model.teacher_accuracy() == pytest.approx(acc)
    model.cfg.eval_batch_size = 0
    lone = split_of(SPEC2, 8, 5)
    lone.present["v"][1:] = False  # one validation row has v: its accuracy is 0 or 100
    model.attach(split_of(SPEC2, 8, 4), lone)
    pred = t["cls"]["v"](relu_lin(t["proj"]["v"].linear, lone.x["v"][:1])).argmax(-1)
    assert model.teacher_accuracy()["v"] == 100.0 * float(pred[0] == lone.y[0])
    model.attach(split_of(SPEC2, 8, 4), val)
    out = model.end_epoch(None)
    assert out == {"umt_phase": 1, "umt_teacher_acc_a": acc["a"], "umt_teacher_acc_v": acc["v"]}
    assert set(model.best_teachers) == {"a", "v"}


# --- the core's selection hook ---------------------------------------------------------------------
class Still(Concat):
    """A concat that never changes (every epoch validates alike) and refuses epoch 2's selection."""

    def train_step(self, batch):
        return torch.zeros(())

    def selectable(self, epoch):
        return epoch != 2


@fast
def test_the_core_never_selects_an_epoch_the_method_refuses():
    spec = SPEC2
    data = HeadData(spec, split_of(spec, 12, 0), split_of(spec, 6, 1), split_of(spec, 6, 2), {"caches": ["random"]})
    cfg = TrainConfig(method="concat", epochs=2, hidden=D, device="cpu", batch_size=6, optimizer="sgd", lr=0.1,
                      weight_decay=0.0, schedule="none")
    trainer = Trainer(data, cfg, model=Still(spec, cfg, None))
    trainer.run(2)
    assert trainer.best_epoch == 1  # ties go to the later epoch, unless it is refused
    plain = Trainer(data, cfg)
    plain.run(2)
    assert plain.best_epoch == 2


# --- late --combine (UME) --------------------------------------------------------------------------
@fast
def test_late_combine_logits_is_the_mean_of_present_logits():
    logits = {"a": torch.tensor([[1.0, 3.0], [2.0, 0.0]]), "v": torch.tensor([[3.0, 1.0], [9.0, 9.0]])}
    present = {"a": torch.tensor([True, True]), "v": torch.tensor([True, False])}
    assert torch.equal(mean_logits(logits, present), torch.tensor([[2.0, 2.0], [2.0, 0.0]]))
    assert torch.equal(mean_logits(logits, {m: torch.tensor([False, False]) for m in "av"}), torch.zeros(2, 2))
    model = build("late", combine="logits")
    b = make_batch(absent={"v": [0]})
    uni = model.unimodal_logits(b)
    assert torch.allclose(model.logits(b), mean_logits(uni, b.present))
    assert not torch.allclose(build("late").logits(b), model.logits(b))


# --- reconboost ------------------------------------------------------------------------------------
@fast
def test_boosting_is_the_sections_number():
    """§13: C = 2, y = 0, f_m = [1, 0], softmax(F_{−m})[y] = 0.6, w₁ = 5, w₂ = 1 → (5 − 0.6)·0.313262/2."""
    value = boosting(torch.tensor([[1.0, 0.0]]), torch.tensor([0.6]), torch.tensor([0]), 5.0, 1.0)
    assert float(value) == pytest.approx(0.689176, abs=1e-6)
    assert masked_mean(torch.tensor([1.0, 3.0, 8.0]), torch.tensor([True, True, False])) == 2.0
    assert masked_mean(torch.tensor([1.0, 3.0, 8.0]), torch.tensor([False, False, True])) == 8.0  # one row: itself
    assert masked_mean(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([False, True])) == 6.0


@fast
def test_phase_map_is_the_sections():
    """§13: E₁ = E₂ = 4, M = 2: epochs 1–4 phase 1 (audio), 5–8 phase 2, 9–12 phase 1 (visual), 13–16
    phase 2; with pretraining the map starts after it."""
    got = [phase_of(e, 0, 4, 4, 2) for e in range(1, 18)]
    assert got == [(1, 0, 0)] * 4 + [(2, 0, -1)] * 4 + [(1, 1, 1)] * 4 + [(2, 1, -1)] * 4 + [(1, 2, 0)]
    assert [phase_of(e, 4, 4, 4, 2) for e in (1, 4, 5, 9, 13)] == [(0, -1, -1), (0, -1, -1), (1, 0, 0), (2, 0, -1), (1, 1, 1)]
    assert [phase_of(e, 0, 1, 0, 3)[2] for e in (1, 2, 3, 4)] == [0, 1, 2, 0]  # E₂ = 0, M = 3: cyclic


def params_of(model):
    return {id(p) for g in model.optimizer.param_groups for p in g["params"]}


@fast
def test_each_phase_gets_a_new_optimizer_over_its_parameters():
    model = build("reconboost", pretrain_epochs=1, e1=2, e2=1)
    head = {id(p) for p in model.head.parameters()}
    proj = {m: {id(p) for p in model.proj[m].parameters()} for m in "av"}
    assert model.current == (0, -1, -1) and params_of(model) == proj["a"] | proj["v"] | head
    model.start_epoch(2)
    first = model.optimizer
    assert model.current == (1, 0, 0) and params_of(model) == proj["a"] | head
    model.start_epoch(3)
    assert model.optimizer is first  # the same phase: the same optimizer
    model.start_epoch(4)
    assert model.current == (2, 0, -1) and params_of(model) == proj["a"] | proj["v"] | head | {id(model.beta)}
    model.start_epoch(5)
    assert model.current == (1, 1, 1) and params_of(model) == proj["v"] | head


@fast
def test_without_pretraining_learners_join_at_their_first_stage_and_q_is_one():
    model = build("reconboost", pretrain=False, e1=1, e2=1)
    assert model.members.tolist() == [True, False]
    b = make_batch()
    f_a = model.head(model.proj["a"](b.x["a"]))
    assert torch.allclose(model.logits(b), model.beta * f_a)  # only the joined learner predicts
    assert params_of(model) == {id(p) for p in [*model.proj["a"].parameters(), *model.head.parameters()]}
    loss = model.loss(b)
    assert float(loss) == pytest.approx(float(((5.0 - 1.0) * F.cross_entropy(f_a, b.y, reduction="none") / 3).mean()), rel=1e-6)
    model.start_epoch(2)  # rectification over the ensemble so far: a, H, β
    assert params_of(model) == {id(p) for p in [*model.proj["a"].parameters(), *model.head.parameters(), model.beta]}
    model.start_epoch(3)
    assert model.members.tolist() == [True, True]


@fast
def test_boosting_loss_by_hand_with_the_ensemble_of_the_others():
    """Stage 0 with pretraining, learner a, v lacking in sample 1 and a in sample 4: q from β f_v (uniform
    where v is absent), the mean over the samples that have a, no ga."""
    model = build("reconboost", spec=SPEC2, pretrain_epochs=1, start=2, boost_init=0.7)
    b = make_batch(absent={"v": [1], "a": [4]})
    loss, grads = frozen_grads(model, b)
    f = {m: model.head(relu_lin(model.proj[m].linear, b.x[m])) for m in "av"}
    other = 0.7 * f["v"] * b.present["v"][:, None]
    q = other.softmax(-1)[torch.arange(6), b.y]
    per = (5 - q) * F.cross_entropy(f["a"], b.y, reduction="none") / 3
    assert float(loss) == pytest.approx(float(per[b.present["a"]].mean()), rel=1e-6)
    assert grads["beta"] is None and grads["proj.v.linear.weight"] is None
    assert grads["proj.a.linear.weight"] is not None


@pytest.mark.parametrize("ga", ["code", "paper"])
@fast
def test_ga_code_leaves_the_gradient_of_the_boosting_term_alone(ga):
    """§13: with --ga code the gradient of L₁ equals that of the boosting term alone; --ga paper adds
    α · ∇ MSE(softmax(f_m), s.g.(softmax(f_prev)))."""
    model = build("reconboost", spec=SPEC3, pretrain_epochs=1, e1=1, e2=1, start=4, ga=ga, alpha=0.5)
    assert model.current == (1, 1, 1)  # stage 1 boosts v; the previous stage's learner is a
    b = make_batch(SPEC3, absent={"a": [0]})
    loss, grads = frozen_grads(model, b)
    params = [*model.proj["v"].parameters(), *model.head.parameters()]
    f = {m: model.head(relu_lin(model.proj[m].linear, b.x[m])) for m in "avt"}
    others = model.beta.detach() * (f["a"] * b.present["a"][:, None] + f["t"]).detach()  # a absent in sample 0
    q = others.softmax(-1)[torch.arange(6), b.y]
    boost = ((5 - q) * F.cross_entropy(f["v"], b.y, reduction="none") / 3).mean()
    rows = b.present["a"]
    ga_value = ((f["v"].softmax(-1) - f["a"].detach().softmax(-1))[rows] ** 2).mean()
    expected = boost + 0.5 * (ga_value if ga == "paper" else ga_value.detach())
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    boost_only = torch.autograd.grad(boost, params[:1], retain_graph=True)[0]
    want = torch.autograd.grad(expected, params)
    names = [f"proj.v.{n}" for n, _ in model.proj["v"].named_parameters()] + [f"head.{n}" for n, _ in model.head.named_parameters()]
    for name, g in zip(names, want):
        assert torch.allclose(grads[name], g, atol=1e-7), name
    assert torch.allclose(grads["proj.v.linear.weight"], boost_only, atol=1e-7) == (ga == "code")
    out = model.end_epoch(None)
    assert out["reconboost_ga"] == pytest.approx(float(ga_value), rel=1e-5) and out["reconboost_learner"] == 1


@fast
def test_reconboost_logs_the_epoch_means_of_the_boosting_term_and_of_ga():
    """Two batches of stage 1 (v boosted, a before it), α = 0 so the loss is the boosting term alone: the log
    holds the mean over the batches of each, ga = mean (softmax f_v − softmax f_a)²."""
    model = build("reconboost", pretrain_epochs=1, e1=1, e2=1, start=4, alpha=0.0)
    assert model.current == (1, 1, 1)
    batches = [make_batch(seed=s) for s in (1, 2)]
    losses = [float(model.loss(b).detach()) for b in batches]
    with torch.no_grad():
        ga = [float(((model.learner("v", b).softmax(-1) - model.learner("a", b).softmax(-1)) ** 2).mean()) for b in batches]
    out = model.end_epoch(None)
    assert out["reconboost_boosting"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert out["reconboost_ga"] == pytest.approx(sum(ga) / 2, rel=1e-5) and ga[0] != ga[1]


@fast
def test_rectification_is_ce_of_the_boosted_ensemble_and_inference_drops_absent_learners():
    model = build("reconboost", pretrain_epochs=1, e1=1, e2=1, start=3, boost_init=0.9)
    assert model.current == (2, 0, -1)
    b = make_batch(absent={"v": [2]})
    f = {m: model.head(relu_lin(model.proj[m].linear, b.x[m])) for m in "av"}
    fused = 0.9 * (f["a"] + f["v"] * b.present["v"][:, None])
    assert torch.allclose(model.logits(b), fused, atol=1e-6)
    assert torch.allclose(model.logits(b)[2], 0.9 * f["a"][2], atol=1e-6)  # H(0) of the absent v is not added
    loss, grads = frozen_grads(model, b)
    assert float(loss) == pytest.approx(float(F.cross_entropy(fused, b.y)), rel=1e-6)
    assert grads["beta"] is not None and grads["proj.v.linear.weight"] is not None


@fast
def test_pretraining_is_the_sum_of_unimodal_ces_through_the_shared_head():
    model = build("reconboost")
    b = make_batch(absent={"a": [0, 1]})
    loss, grads = frozen_grads(model, b)
    expected = sum(F.cross_entropy(model.head(relu_lin(model.proj[m].linear, b.x[m]))[b.present[m]], b.y[b.present[m]])
                   for m in "av")
    assert float(loss) == pytest.approx(float(expected), rel=1e-6) and grads["beta"] is None
    assert model.end_epoch(None) == {"reconboost_phase": 0, "reconboost_learner": -1, "reconboost_beta": 1.0}
    # f_m = H(P_m(x_m)), H = Linear → ReLU → Linear (the official shared head)
    h = relu_lin(model.proj["a"].linear, b.x["a"])
    want = relu_lin(model.head[0], h) @ model.head[2].weight.T + model.head[2].bias
    torch.testing.assert_close(model.learner("a", b), want)


@fast
def test_reconboost_needs_two_modalities_and_umt_takes_any():
    spec1 = DataSpec(["a"], {"a": 6}, {"a": 1}, 3, ["x", "y", "z"], 0)
    with pytest.raises(OptionError, match="at least two"):
        build("reconboost", spec=spec1)
    assert build("umt", spec=spec1).modalities == ["a"]


@fast
def test_defaults_are_the_ones_the_sections_say_to_use():
    def training(m):
        t = METHODS[m].training
        return (t.optimizer, t.lr, t.weight_decay, t.schedule, t.batch_size, t.epochs, t.stages)

    assert training("umt") == ("sgd", 1e-3, 1e-4, "step:70:0.1", 64, 100, (33, 67))
    assert training("reconboost") == ("sgd", 0.01, 5e-4, "step:240:0.1", 64, 100, (4, 96))
    assert "ReconBoost official" in METHODS["reconboost"].training.source
    assert vars(METHODS["umt"].Options()) == {"lam": 10.0, "teacher_epochs": -1}
    assert vars(METHODS["reconboost"].Options()) == {
        "w1": 5.0, "w2": 1.0, "alpha": 0.5, "ga": "code", "e1": 4, "e2": 4, "boost_init": 1.0, "pretrain": True,
        "pretrain_epochs": 4, "head_hidden": 256}
    assert vars(METHODS["late"].Options()) == {"combine": "probs"}
    assert not METHODS["umt"].stackable and not METHODS["reconboost"].stackable
    model = build("reconboost")
    assert model.beta.item() == 1.0 and model.head[0].out_features == 256


STEPS = [("umt", SPEC2, 1, {}), ("umt", SPEC2, 2, {"teacher_epochs": 1}),
         ("reconboost", SPEC2, 1, {"pretrain_epochs": 1, "e1": 1, "e2": 1}),
         ("reconboost", SPEC3, 4, {"pretrain_epochs": 1, "e1": 1, "e2": 1, "ga": "paper"}),
         ("reconboost", SPEC2, 3, {"pretrain_epochs": 1, "e1": 1, "e2": 1}),
         ("reconboost", SPEC2, 1, {"pretrain": False})]


@pytest.mark.parametrize("method,spec,epoch,options", STEPS)
@fast
def test_steps_never_read_a_tensor_on_the_host(method, spec, epoch, options, monkeypatch):
    model = build(method, spec=spec, epochs=5, start=epoch, **options)
    b = make_batch(spec, n=8, absent={spec.modalities[0]: [1]})

    def refuse(*_a, **_k):
        raise AssertionError("a tensor was read on the host inside train_step")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    model.train_step(b)
    model.train_step(b)


# --- through the core ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin():
    root = Path(__file__).resolve().parent.parent / "data" / "builtin"
    return {name: load_head_data([builtin_cache(name, root)]) for name in ("av", "avt", "mv6")}


@pytest.mark.trains
@pytest.mark.parametrize("cache", ["av", "avt", "mv6"])
@pytest.mark.parametrize("method", ["umt", "reconboost"])
def test_each_method_trains_two_epochs(one_thread, builtin, method, cache):
    """Two epochs through the core with the method's defaults: every subset is scored, the loss is finite;
    umt selects its joint epoch."""
    result = fit(builtin[cache], TrainConfig(method=method, epochs=2, hidden=16, seed=0, device="cpu"), progress=False)
    assert len(result.epochs) == 2 and all(math.isfinite(r["train_loss"]) for r in result.epochs)
    assert len(result.test.v) == 2 ** len(builtin[cache].spec.modalities)
    if method == "umt":
        assert result.best_epoch == 2 and [r["umt_phase"] for r in result.epochs] == [1, 2]
    if cache == "av":
        assert result.test.acc > 100 / len(builtin[cache].spec.class_names)


@pytest.mark.trains
def test_reconboost_runs_every_phase_through_the_core(one_thread, builtin):
    cfg = TrainConfig(method="reconboost", epochs=6, hidden=16, seed=0, device="cpu",
                      options={"pretrain_epochs": 1, "e1": 1, "e2": 1})
    result = fit(builtin["avt"], cfg, progress=False)
    assert [r["reconboost_phase"] for r in result.epochs] == [0, 1, 2, 1, 2, 1]
    assert [r["reconboost_learner"] for r in result.epochs] == [-1, 0, -1, 1, -1, 2]
    assert result.epochs[2]["reconboost_beta"] != 1.0 and result.test.acc > 100 / 3
