"""Pins of mechanisms that a one-line change could switch off while every other test stays green.

Each test names the mechanism it pins and derives its expected numbers by hand, or by writing the
method's equations out again from the model's own weights (METHODS.md), never by calling the code
under test a second time. The audit's mutations (a)–(g) and the test that kills each:

(a) EDM alignment skipped inside the chain            test_edm_chain_feeds_the_aligned_previous_state_to_the_cell
(b) EDM inference from zero instead of the inherited  test_edm_inference_starts_from_the_inherited_memory
(c) EDM one optimizer step per batch, not per step    test_edm_takes_one_sgd_step_per_chain_step
(d) CCAT stage-1 loss without λ·L_reg                 test_ccat_stage1_loss_is_ce_plus_lambda_reg
(e) MLA --no-dynamic-fusion without normalisation     test_mla_without_dynamic_fusion_averages_present_modalities
(f) v(∅) = 0 instead of the majority-class accuracy   test_v_empty_is_the_training_majority_class_accuracy
(g) subsets scored with every modality present        test_subset_values_use_only_their_modalities

The tests whose docstring says "found by mutation testing" pin what the mutmut trial run showed
unguarded (tests/MUTANTS.md). The tests call only the stable public pieces (``build_model``, ``train_step``, ``logits``,
``evaluate``, ``Batch``, ``SplitTensors``, ``DataSpec``) with explicit optimizer settings, and
evaluate with one batch holding the whole split, so that no result depends on evaluation batch order.
"""
import copy

import math

import pytest
import torch
from torch.nn import functional as F

from heads.train.config import build_model, TrainConfig
from heads.train.evaluation import evaluate
from heads.blocks.data import Batch, DataSpec, SplitTensors

SPEC2 = DataSpec(["a", "b"], {"a": 6, "b": 4}, {"a": 1, "b": 1}, 3, ["x", "y", "z"], 0)
SPEC3 = DataSpec(["a", "b", "c"], {"a": 6, "b": 4, "c": 5}, dict.fromkeys("abc", 1), 3, ["x", "y", "z"], 0)
TAU = 0.2  # low enough that, with ReLU features (cosines ≥ 0), alignment keeps off-diagonal entries


def build(method, spec, hidden=8, **options):
    """A seeded model with explicit SGD settings (the defaults per method may change)."""
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, hidden=hidden, optimizer="sgd", lr=0.1, weight_decay=0.0, options=options)
    return build_model(cfg, spec)


def make_batch(spec, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, spec.dims[m], generator=g) for m in spec.modalities}
    return Batch(x, {m: t[:, None] for m, t in x.items()}, {m: torch.ones(n, dtype=torch.bool) for m in x},
                 torch.randint(0, spec.num_classes, (n,), generator=g))


# --- EDM's chain written out (METHODS.md, "edm", eqs. 12–19) -------------------------------------
def projection(model, m, x):
    """``P_m(x) = ReLU(W_m x + b_m)``."""
    return torch.relu(x @ model.proj[m].linear.weight.T + model.proj[m].linear.bias)


def aligned(h_cur, h_prev, state, tau=TAU):
    """``a = S' H_prev``: S[i, j] = cos(h_cur_i, h_prev_j), kept where > τ, diagonal 1, rows summing to 1."""
    unit = lambda h: h / h.norm(dim=1, keepdim=True).clamp_min(1e-8)  # noqa: E731 (a zero row stays zero)
    s = unit(h_cur) @ unit(h_prev).T
    s = torch.where(s > tau, s, torch.zeros_like(s))
    s = s - torch.diag(s.diagonal()) + torch.eye(len(s))  # diagonal 1, and no gradient through it
    return (s / s.abs().sum(1, keepdim=True)) @ state


def cell(model, h, a, state_h, state_c):
    """The memory cell: ``u = W_u [h; a] + b_u``; f, i, o = σ(·) and C̃ = tanh(·) of ``W [u; H] + b``;
    ``C = f ⊙ C_prev + i ⊙ C̃``, ``H = o ⊙ tanh(C)``. Returns ``(H, C)``."""
    d, w = h.shape[1], state_h.shape[1]
    fuse, gates_u, gates_h = model.cell.fuse, model.cell.gates_u, model.cell.gates_h
    u = h @ fuse.weight[:, :d].T + a @ fuse.weight[:, d:].T + fuse.bias
    g = u @ gates_u.weight.T + gates_u.bias + state_h @ gates_h.weight.T
    f, i, o = torch.sigmoid(g[:, :w]), torch.sigmoid(g[:, w:2 * w]), torch.sigmoid(g[:, 2 * w:3 * w])
    c = f * state_c + i * torch.tanh(g[:, 3 * w:])
    return o * torch.tanh(c), c


def test_edm_chain_feeds_the_aligned_previous_state_to_the_cell():
    """(a) Alignment inside the chain. Expected logits: step 1 (a) from the zero initial state with
    a_1 = 0; step 2 (b) with ``a_2 = S' H_1`` built from ``cos(h_b, h_a)``; logits ``cls(H_2)``.
    Without alignment step 2 would see a_2 = 0 and give other logits."""
    model = build("edm", SPEC2, tau=TAU)
    model.eval()
    b = make_batch(SPEC2)
    with torch.no_grad():
        h_a, h_b = projection(model, "a", b.x["a"]), projection(model, "b", b.x["b"])
        zero = torch.zeros(len(b), model.memory_h.numel())
        h1, c1 = cell(model, h_a, zero, zero, zero)
        a2 = aligned(h_b, h_a, h1)
        assert (a2 - h1).abs().max() > 1e-3  # off-diagonal similarities are kept: alignment mixes samples
        h2, _ = cell(model, h_b, a2, h1, c1)
        torch.testing.assert_close(model.logits(b), h2 @ model.cls.weight.T + model.cls.bias)


def test_edm_inference_starts_from_the_inherited_memory():
    """(b) Memory-guided inference from the stored state: with ``(H_0, C_0)`` set to known nonzero
    rows, the one-modality chain is ``H_1 = cell(h_a, 0, H_0, C_0)`` and the logits ``cls(H_1)``;
    from zeros both the gate term ``W_H H_0`` and ``f ⊙ C_0`` would vanish."""
    model = build("edm", SPEC2)
    model.eval()
    width = model.memory_h.numel()
    with torch.no_grad():
        model.memory_h.copy_(torch.linspace(-0.9, 0.9, width))
        model.memory_c.copy_(torch.linspace(1.5, -1.5, width))
    b = make_batch(SPEC2).only(["a"])
    n = len(b)
    with torch.no_grad():
        h_a = projection(model, "a", b.x["a"])
        state_h = torch.linspace(-0.9, 0.9, width).expand(n, -1)
        state_c = torch.linspace(1.5, -1.5, width).expand(n, -1)
        h1, _ = cell(model, h_a, torch.zeros(n, width), state_h, state_c)
        expect = h1 @ model.cls.weight.T + model.cls.bias
        torch.testing.assert_close(model.logits(b), expect)
        from_zero, _ = cell(model, h_a, torch.zeros(n, width), torch.zeros(n, width), torch.zeros(n, width))
        assert (from_zero @ model.cls.weight.T + model.cls.bias - expect).abs().max() > 1e-3  # the state matters


def test_edm_takes_one_sgd_step_per_chain_step():
    """(c) "First update with m_i, then use the past state to guide m_j": one optimizer step per chain
    step. With plain SGD (each step exactly −lr × gradient) the parameters after one ``train_step`` on
    two modalities equal two hand steps: step 1 on ``CE(cls(H_1), y)`` at θ_0, step 2 on
    ``CE(cls(H_2), y)`` at θ_1 with h_a, H_1, C_1 from step 1 detached; the inherited state then
    moves to ``0.9·0 + 0.1·mean_i H_2``. The step counter must read 2 (and 3 for three modalities)."""
    lr = 0.5
    model = build("edm", SPEC2, tau=TAU)
    model.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    ref = copy.deepcopy(model)
    b = make_batch(SPEC2)
    steps, plain = [], model.optimizer.step
    model.optimizer.step = lambda *a, **k: (steps.append(1), plain(*a, **k))[1]
    model.start_epoch(1)
    model.train_step(b)
    assert len(steps) == 2

    params = list(ref.parameters())

    def sgd(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= lr * g

    zero = torch.zeros(len(b), ref.memory_h.numel())
    h_a = projection(ref, "a", b.x["a"])
    h1, c1 = cell(ref, h_a, zero, zero, zero)
    sgd(F.cross_entropy(h1 @ ref.cls.weight.T + ref.cls.bias, b.y))
    h_a, h1, c1 = h_a.detach(), h1.detach(), c1.detach()
    h_b = projection(ref, "b", b.x["b"])
    h2, _ = cell(ref, h_b, aligned(h_b, h_a, h1), h1, c1)
    sgd(F.cross_entropy(h2 @ ref.cls.weight.T + ref.cls.bias, b.y))
    for (name, got), want in zip(model.named_parameters(), params):
        torch.testing.assert_close(got, want, msg=lambda text: f"{name}: {text}")
    torch.testing.assert_close(model.memory_h, 0.1 * h2.detach().mean(0))

    three = build("edm", SPEC3)
    three.optimizer = torch.optim.SGD(three.parameters(), lr=lr)  # (the fused momentum SGD of make_optimizer
    # fails once a later chain step brings parameters without a momentum buffer: see tests/MUTANTS.md)
    steps, plain = [], three.optimizer.step
    three.optimizer.step = lambda *a, **k: (steps.append(1), plain(*a, **k))[1]
    three.start_epoch(1)
    three.train_step(make_batch(SPEC3))
    assert len(steps) == 3


def test_edm_chain_with_a_missing_first_modality_by_hand():
    """Found by mutation testing (not one of the audit's seven). Order b, a; sample 0 lacks b. Step b:
    samples 1–5 get ``cell(h_b, 0, H_0, C_0)``, sample 0 keeps ``(H_0, C_0)`` (a nonzero inherited
    state). Step a: ``a = S' H`` with sample 0's previous projection zero (so nobody aligns to it) and
    sample 0's own row set to 0 (its first step); the others align."""
    model = build("edm", SPEC2, tau=TAU, initial_order="b,a")
    model.eval()
    width = model.memory_h.numel()
    with torch.no_grad():
        model.memory_h.copy_(torch.linspace(-0.9, 0.9, width))
        model.memory_c.copy_(torch.linspace(1.5, -1.5, width))
    b = make_batch(SPEC2)
    b.present["b"][0] = False
    b.x["b"][0] = 0
    n, keep = len(b), b.present["b"].unsqueeze(1)
    with torch.no_grad():
        h0, c0 = model.memory_h.expand(n, -1), model.memory_c.expand(n, -1)
        h_b = projection(model, "b", b.x["b"]) * keep
        h1, c1 = cell(model, h_b, torch.zeros(n, width), h0, c0)
        h1, c1 = torch.where(keep, h1, h0), torch.where(keep, c1, c0)
        h_a = projection(model, "a", b.x["a"])
        a2 = aligned(h_a, h_b, h1) * keep
        assert a2[1:].abs().min() > 0
        h2, _ = cell(model, h_a, a2, h1, c1)
        torch.testing.assert_close(model.logits(b), h2 @ model.cls.weight.T + model.cls.bias)


def test_edm_without_memory_adds_the_aligned_state():
    """Found by mutation testing: ``--no-memory`` replaces the cell by ``H_k = h_k + a_k``; with two
    modalities ``H_1 = h_a``, ``H_2 = h_b + S' h_a`` and the logits ``cls(H_2)``."""
    model = build("edm", SPEC2, tau=TAU, memory=False)
    model.eval()
    b = make_batch(SPEC2)
    with torch.no_grad():
        h_a, h_b = projection(model, "a", b.x["a"]), projection(model, "b", b.x["b"])
        h2 = h_b + aligned(h_b, h_a, h_a)
        torch.testing.assert_close(model.logits(b), h2 @ model.cls.weight.T + model.cls.bias)


def test_ccat_stage1_loss_is_ce_plus_lambda_reg():
    """(d) CCAT's stage-1 objective ``CE(Cls(f), y) + λ L_reg``. The CE is recomputed from the fusion
    ``f`` (cross-attention of the projected tokens); ``L_reg`` is the value the method reports. The
    loss must equal ``CE + λ·L_reg`` and its gradient ``∇CE + λ ∇L_reg`` on every parameter, with λ = 2
    so that the term is far above rounding (L_reg itself is pinned in test_ccat)."""
    lam = 2.0
    model = build("ccat", SPEC2, lambda_reg=lam)
    b = make_batch(SPEC2, n=8)
    loss, reg = model.pretrain_loss(b)
    z = {m: model.proj[m](b.tokens[m]) for m in SPEC2.modalities}
    fused, _ = model.fusion(z, b.present)
    ce = F.cross_entropy(model.cls(fused), b.y)
    assert float(reg.detach()) > 1e-3
    torch.testing.assert_close(loss, ce + lam * reg)
    params = [p for p in model.parameters() if p.requires_grad]
    grad = lambda t: torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)  # noqa: E731
    g_loss, g_ce, g_reg = grad(loss), grad(ce), grad(reg)
    moved = 0.0
    for gl, gc, gr, p in zip(g_loss, g_ce, g_reg, params):
        zeros = torch.zeros_like(p)
        gl, gc, gr = (zeros if g is None else g for g in (gl, gc, gr))
        torch.testing.assert_close(gl, gc + lam * gr, rtol=1e-4, atol=1e-6)
        moved = max(moved, float((lam * gr).abs().max()))
    assert moved > 1e-3  # the regulariser does change the gradient


def test_mla_without_dynamic_fusion_averages_present_modalities():
    """(e) ``--no-dynamic-fusion``: equal weights 1/k over a sample's k present modalities, 0 for the
    absent ones, and the prediction the plain mean of the present ``f_m = g(P_m(x_m))``."""
    model = build("mla", SPEC3, dynamic_fusion=False)
    b = make_batch(SPEC3, n=4)
    b.present = {"a": torch.tensor([True, True, False, True]), "b": torch.tensor([True, True, False, False]),
                 "c": torch.tensor([True, False, True, True])}
    expect = torch.tensor([[1 / 3, 1 / 2, 0, 1 / 2], [1 / 3, 1 / 2, 0, 0], [1 / 3, 0, 1, 1 / 2]])
    with torch.no_grad():
        torch.testing.assert_close(model.fusion_weights(b), expect)
        f = {m: projection(model, m, b.x[m]) @ model.head.weight.T + model.head.bias for m in "abc"}
        by_hand = torch.stack([
            (f["a"][0] + f["b"][0] + f["c"][0]) / 3,
            (f["a"][1] + f["b"][1]) / 2,
            f["c"][2],
            (f["a"][3] + f["c"][3]) / 2,
        ])
        torch.testing.assert_close(model.logits(b), by_hand)


def split_of(x, y):
    """A split from ``x[m]`` ``[N, D_m]`` and labels, every modality present."""
    return SplitTensors([f"s{i}" for i in range(len(y))], x, {m: t[:, None] for m, t in x.items()},
                        {m: torch.ones(len(y), dtype=torch.bool) for m in x}, y)


@pytest.mark.parametrize("majority, expected", [(0, 30.0), (2, 60.0), (1, 10.0)])
def test_v_empty_is_the_training_majority_class_accuracy(majority, expected):
    """(f) ``v(∅)`` is the accuracy of always predicting the *training* set's majority class
    (``spec.majority_class``), whatever the model does: labels 3×0, 1×1, 6×2 give 30, 10 or 60 %.
    φ, δ and EDM must use it: ``δ_m = (v(M) − v(∅))/M − φ_m``."""
    spec = DataSpec(["a", "b"], {"a": 3, "b": 2}, {"a": 1, "b": 1}, 3, ["x", "y", "z"], majority)
    y = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 2])
    g = torch.Generator().manual_seed(1)
    split = split_of({"a": torch.randn(10, 3, generator=g), "b": torch.randn(10, 2, generator=g)}, y)
    model = build("concat", spec)
    report = evaluate(model, split, spec, batch_size=len(split))
    assert report.v[frozenset()] == pytest.approx(expected)
    full = report.v[frozenset("ab")]
    for m in "ab":  # (accuracies come from float32 means: compare to 1e-4, not relative to a δ near 0)
        assert report.delta[m] == pytest.approx((full - expected) / 2 - report.phi[m], abs=1e-4)


def hand_set_concat():
    """The concat head of the two tests below: P = ReLU(identity), classifier [[1, 0 | 10, 0], [0, 0 | 0, 10]]."""
    spec = DataSpec(["a", "v"], {"a": 2, "v": 2}, {"a": 1, "v": 1}, 2, ["n", "y"], 1)
    model = build("concat", spec, hidden=2)
    with torch.no_grad():
        for m in "av":
            model.proj[m].linear.weight.copy_(torch.eye(2))
            model.proj[m].linear.bias.zero_()
        model.cls.weight.copy_(torch.tensor([[1.0, 0.0, 10.0, 0.0], [0.0, 0.0, 0.0, 10.0]]))
        model.cls.bias.zero_()
    return spec, model


def test_subset_values_use_only_their_modalities():
    """(g) ``v(S)`` treats the modalities outside S as missing. A concat head set by hand: P = ReLU
    (identity weights), classifier ``[[1, 0 | 10, 0], [0, 0 | 0, 10]]``, x_a = (1, 0) for everyone
    (it pushes class 0), x_v = one-hot(y). Labels 0, 1, 1, 1 (training majority 1):
    v(∅) = 75, v({a}) = 25 (always class 0), v({v}) = 100, v({a, v}) = 100 (10 beats 1);
    φ_a = ½(25 − 75) + ½(100 − 100) = −25, φ_v = ½(100 − 75) + ½(100 − 25) = 50; φ* = 12.5,
    δ_a = 37.5, δ_v = −37.5, EDM = 75. Scoring {a} with v present would give 100."""
    spec, model = hand_set_concat()
    y = torch.tensor([0, 1, 1, 1])
    split = split_of({"a": torch.tensor([[1.0, 0.0]]).repeat(4, 1), "v": F.one_hot(y, 2).float()}, y)
    report = evaluate(model, split, spec, batch_size=len(split))
    assert report.v == pytest.approx({frozenset(): 75.0, frozenset("a"): 25.0, frozenset("v"): 100.0,
                                      frozenset("av"): 100.0})
    assert report.unimodal == pytest.approx({"a": 25.0, "v": 100.0})
    assert report.phi == pytest.approx({"a": -25.0, "v": 50.0})
    assert report.delta == pytest.approx({"a": 37.5, "v": -37.5})
    assert report.edm == pytest.approx(75.0) and report.acc == pytest.approx(100.0)
    assert torch.equal(report.pred, y) and report.f1 == pytest.approx(100.0)  # every full prediction right


def test_report_rows_and_evaluation_without_subsets():
    """Found by mutation testing. The same hand-set concat head as above: ``Report.row`` and
    ``to_json`` carry its numbers under their names; ``subsets=False`` scores only ∅ and the full set
    and leaves φ, δ, the unimodal accuracies and EDM as NaN. Predictions 0, 1, 1, 1 against labels
    1, 1, 1, 1 (a relabelled split): accuracy 75; macro-F1 over classes 0 (F1 0) and 1 (F1 6/7) 300/7."""
    spec, model = hand_set_concat()
    y = torch.tensor([0, 1, 1, 1])
    x = {"a": torch.tensor([[1.0, 0.0]]).repeat(4, 1), "v": F.one_hot(y, 2).float()}
    split = split_of(x, torch.ones(4, dtype=torch.long))
    full = evaluate(model, split, spec, batch_size=len(split))
    # Cross-entropy against label 1: logits (11, 0) for the first sample, (1, 10) for the other three.
    loss = (math.log(1 + math.exp(11)) + 3 * math.log(1 + math.exp(-9))) / 4
    assert full.row("val_") == pytest.approx({
        "val_acc": 75.0, "val_f1": 300 / 7, "val_loss": loss, "val_edm": full.edm, "val_acc_a": 0.0, "val_phi_a": full.phi["a"],
        "val_delta_a": full.delta["a"], "val_acc_v": 75.0, "val_phi_v": full.phi["v"], "val_delta_v": full.delta["v"]})
    assert full.to_json()["v"] == pytest.approx({"∅": 100.0, "a": 0.0, "v": 75.0, "a+v": 75.0})
    assert full.to_json()["acc"] == 75.0
    only = evaluate(model, split, spec, batch_size=len(split), subsets=False)
    assert only.v == pytest.approx({frozenset(): 100.0, frozenset("av"): 75.0})
    assert torch.equal(only.pred, y) and only.acc == 75.0 and only.f1 == pytest.approx(300 / 7)
    nan = float("nan")
    assert only.phi == pytest.approx({"a": nan, "v": nan}, nan_ok=True)
    assert only.delta == pytest.approx({"a": nan, "v": nan}, nan_ok=True)
    assert only.unimodal == pytest.approx({"a": nan, "v": nan}, nan_ok=True) and only.edm != only.edm


# --- found by the full mutation run (tests/MUTANTS.md) ---------------------------------------------
def test_evaluation_order_is_the_seeded_projection_of_every_modality_and_is_kept():
    """``evaluation_order``: samples sorted by Σ_m x_m · r_m, one float64 N(0, 1) direction r_m per
    modality drawn in sorted-name order from a generator seeded with EVAL_ORDER_SEED; computed once
    per split (the same tensor object on the next call)."""
    from heads.blocks.order import EVAL_ORDER_SEED, evaluation_order

    g = torch.Generator().manual_seed(3)
    x = {"v": torch.randn(200, 3, generator=g), "a": torch.randn(200, 5, generator=g)}
    split = split_of(x, torch.zeros(200, dtype=torch.long))
    gen = torch.Generator().manual_seed(EVAL_ORDER_SEED)
    key = torch.zeros(200, dtype=torch.float64)
    for m in ("a", "v"):
        r = torch.randn(x[m].shape[1], generator=gen, dtype=torch.float64)
        key = key + (x[m].double() * r).sum(1)
    order = evaluation_order(split)
    assert torch.equal(order, torch.argsort(key, stable=True))
    assert evaluation_order(split) is order


def test_predict_loss_is_the_mean_cross_entropy_over_all_batches():
    """``predict(with_loss=True)`` sums the per-sample cross-entropy over every batch and divides by N
    (also for N = 1). The hand-set concat head gives logits (11, 0) for a sample with v = (1, 0) and
    (1, 10) for v = (0, 1)."""
    from heads.train.evaluation import predict

    spec, model = hand_set_concat()
    y = torch.tensor([0, 1, 1, 1])
    split = split_of({"a": torch.tensor([[1.0, 0.0]]).repeat(4, 1), "v": F.one_hot(y, 2).float()}, y)
    ce = [math.log(1 + math.exp(-11)), *[math.log(1 + math.exp(-9))] * 3]
    preds, loss = predict(model, split, ["a", "v"], batch_size=3, with_loss=True)  # batches of 3 and 1
    assert torch.equal(preds, y) and loss == pytest.approx(sum(ce) / 4, rel=1e-3)  # float32 logits
    one = split_of({"a": torch.tensor([[1.0, 0.0]]), "v": torch.tensor([[1.0, 0.0]])}, torch.tensor([0]))
    assert predict(model, one, ["a", "v"], batch_size=1, with_loss=True)[1] == pytest.approx(ce[0], rel=1e-3)


def test_ogm_coefficients_skip_a_modality_absent_from_the_batch_and_compare_to_the_others_mean():
    """Three modalities, a absent from the whole batch: k_a = 1 (no score), and b, c each compare their
    mean true-class confidence with the mean of the *present* others only (ρ_b = s_b / s_c). With all
    three present, ρ_m = s_m / mean of the other two, for every m."""
    from heads.methods.ogm_ge import coefficient

    spec = DataSpec(["a", "b", "c"], {"a": 6, "b": 4, "c": 5}, dict.fromkeys("abc", 1), 3, ["x", "y", "z"], 0)
    model = build("ogm-ge", spec, hidden=8)
    with torch.no_grad():
        model.cls.weight[:, 8:16] *= 6  # make b dominant
    batch = make_batch(spec, n=12)
    batch.present["a"][:] = False
    batch.x["a"].zero_()
    s = model.scores(batch)
    coeff = model.coefficients(batch)
    assert coeff["a"] == 1.0 and math.isnan(s["a"])
    assert coeff["b"] == pytest.approx(coefficient(s["b"] / s["c"], 0.8)) and coeff["b"] < 1
    assert coeff["c"] == pytest.approx(coefficient(s["c"] / s["b"], 0.8))
    full = make_batch(spec, n=12)
    s3, k3 = model.scores(full), model.coefficients(full)
    for m in "abc":
        others = [s3[o] for o in "abc" if o != m]
        assert k3[m] == pytest.approx(coefficient(s3[m] / (sum(others) / 2), 0.8))
    assert min(k3.values()) < 1


def test_late_loss_sums_each_modalitys_mean_over_its_present_samples():
    """``late``: Σ_m mean over the samples that have m of CE(head_m(P_m(x_m)), y)."""
    model = build("late", SPEC2)
    batch = make_batch(SPEC2, n=6)
    batch.present["b"][1:] = False  # b on one sample only: its mean is over that one sample
    batch.x["b"][1:] = 0
    want = 0.0
    for m in ("a", "b"):
        rows = batch.present[m]
        logits = model.cls[m](torch.relu(model.proj[m].linear(batch.x[m][rows])))
        want += float(F.cross_entropy(logits, batch.y[rows]).detach())
    assert float(model.loss(batch)) == pytest.approx(want, rel=1e-6)


def test_ccat_logs_the_stage_1_regulariser_and_the_stage_2_secondary_shares():
    """``end_epoch``: stage 1 logs the mean L_reg over the epoch's batches; stage 2 the share of the
    epoch's samples that got the secondary update, per modality."""
    model = build("ccat", SPEC2, pretrain_epochs=1, beta=0.99)
    model.optimizer = model.configure_optimizer()
    model.start_epoch(1)
    regs = []
    for seed in (0, 1):
        batch = make_batch(SPEC2, n=6, seed=seed)
        regs.append(float(model.pretrain_loss(batch)[1]))
        model.train_step(batch)
    logged = model.end_epoch(None)
    assert logged["ccat_stage"] == 1 and logged["ccat_reg"] == pytest.approx(sum(regs) / 2, rel=1e-4)
    single = build("ccat", SPEC2, pretrain_epochs=1)
    single.optimizer = single.configure_optimizer()
    single.start_epoch(1)
    batch = make_batch(SPEC2, n=6, seed=5)
    reg = float(single.pretrain_loss(batch)[1])
    single.train_step(batch)
    assert single.end_epoch(None)["ccat_reg"] == pytest.approx(reg, rel=1e-4)  # one batch: divided by 1
    model.start_epoch(2)
    for seed in (2, 3):
        model.train_step(make_batch(SPEC2, n=6, seed=seed))
    logged = model.end_epoch(None)
    assert logged["ccat_stage"] == 2 and "ccat_reg" not in logged
    # β = 0.99: every present sample has c < β for both modalities of two (c's sum to 1, both > 0.01 here).
    assert logged["ccat_secondary_a"] == pytest.approx(1.0) and logged["ccat_secondary_b"] == pytest.approx(1.0)


def test_ccat_stages_switch_after_the_pretraining_epochs_with_the_right_parameters():
    """Stage 1 (epochs 1…E_pre) optimises P_m, the cross-attention and Cls; stage 2 (from E_pre + 1)
    only P_m and LoRA_m, with Cls frozen (``requires_grad`` off) unless ``--no-freeze``. E_pre = −1 means
    round(0.3·E), at least 1; 0 starts in stage 2."""
    def params(model):
        return {id(p) for group in model.optimizer.param_groups for p in group["params"]}

    model = build("ccat", SPEC2, pretrain_epochs=2)
    model.optimizer = model.configure_optimizer()
    stage1 = {id(p) for p in [*model.proj.parameters(), *model.fusion.parameters(), *model.cls.parameters()]}
    assert model.stage == 1 and params(model) == stage1
    assert all(p.requires_grad for p in [*model.cls.parameters(), *model.fusion.parameters()])
    assert not any(p.requires_grad for p in model.lora.parameters())
    for epoch in (1, 2):
        model.start_epoch(epoch)
        assert model.stage == 1 and params(model) == stage1
    model.start_epoch(3)
    stage2 = {id(p) for p in [*model.proj.parameters(), *model.lora.parameters()]}
    assert model.stage == 2 and params(model) == stage2
    assert not any(p.requires_grad for p in [*model.cls.parameters(), *model.fusion.parameters()])
    assert all(p.requires_grad for p in model.proj.parameters())
    assert model.optimizer.param_groups[0]["lr"] == model.cfg.lr
    loose = build("ccat", SPEC2, pretrain_epochs=1, freeze=False)
    loose.optimizer = loose.configure_optimizer()
    loose.start_epoch(2)
    assert params(loose) == {id(p) for p in [*loose.proj.parameters(), *loose.lora.parameters(), *loose.cls.parameters()]}
    assert all(p.requires_grad for p in loose.cls.parameters())
    direct = build("ccat", SPEC2, pretrain_epochs=0)
    direct.optimizer = direct.configure_optimizer()
    assert direct.stage == 2 and params(direct) == {id(p) for p in [*direct.proj.parameters(), *direct.lora.parameters()]}
    for epochs, expected in ((10, 3), (1, 1), (2, 1), (5, 2)):
        torch.manual_seed(0)
        cfg = TrainConfig(method="ccat", hidden=8, epochs=epochs, optimizer="sgd", lr=0.1, weight_decay=0.0)
        assert build_model(cfg, SPEC2).pretrain_epochs == expected
    with pytest.raises(ValueError, match="at least two modalities"):
        build("ccat", DataSpec(["a"], {"a": 6}, {"a": 1}, 3, ["x", "y", "z"], 0))


def test_the_model_standardises_as_its_config_says():
    """The standardiser a method builds follows ``cfg.standardize`` (default: per feature)."""
    assert build("concat", SPEC2).standardizer.mode == "feature"
    torch.manual_seed(0)
    cfg = TrainConfig(method="concat", hidden=8, optimizer="sgd", lr=0.1, weight_decay=0.0, standardize="modality")
    assert build_model(cfg, SPEC2).standardizer.mode == "modality"


def test_decision_level_fusion_averages_present_probabilities_and_is_uniform_without_any():
    """``mean_probability_logits``: log of the mean class probability over a sample's present
    modalities; a sample with none gets log(1/C) for every class."""
    from heads.methods.base import mean_probability_logits

    logits = {"a": torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 5.0], [0.0, 0.0, 0.0]]),
              "b": torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])}
    present = {"a": torch.tensor([True, True, False, True]), "b": torch.tensor([True, False, False, False])}  # B ≠ C
    out = mean_probability_logits(logits, present)
    torch.testing.assert_close(out[0], ((logits["a"][0].softmax(-1) + logits["b"][0].softmax(-1)) / 2).log())
    torch.testing.assert_close(out[1], logits["a"][1].log_softmax(-1))
    torch.testing.assert_close(out[2], torch.full((3,), math.log(1 / 3)))


def test_ogm_shifted_coefficient_form_reaches_the_model():
    """``--coeff-form shifted`` changes the coefficient the method uses (1 − tanh(α·(ρ − 1)))."""
    from heads.methods.ogm_ge import coefficient

    model = build("ogm-ge", SPEC2, coeff_form="shifted")
    with torch.no_grad():
        model.cls.weight[:, :8] *= 6
    batch = make_batch(SPEC2, n=12)
    s = model.scores(batch)
    k = model.coefficients(batch)
    strong, weak = ("a", "b") if s["a"] > s["b"] else ("b", "a")
    assert k[strong] == pytest.approx(coefficient(s[strong] / s[weak], 0.8, "shifted")) and k[weak] == 1.0


def test_mla_leaves_a_modality_absent_from_the_batch_exactly_as_it_was():
    """A modality nobody in the batch has takes no step: its projection does not move, even under SGD
    with momentum (the gradients are reset to None, not to zero, so momentum cannot carry it)."""
    torch.manual_seed(0)
    cfg = TrainConfig(method="mla", hidden=8, optimizer="sgd", lr=0.1, weight_decay=0.0)
    model = build_model(cfg, SPEC2)
    model.optimizer = model.configure_optimizer()  # SGD with momentum 0.9
    model.start_epoch(1)
    model.train_step(make_batch(SPEC2, n=6, seed=0))  # both modalities: momentum buffers exist
    batch = make_batch(SPEC2, n=6, seed=1)
    batch.present["b"][:] = False
    batch.x["b"].zero_()
    before = model.proj["b"].linear.weight.detach().clone()
    model.train_step(batch)
    assert torch.equal(model.proj["b"].linear.weight, before)


def test_ccat_contributions_edge_cases():
    """Cosines along each vector (not across the batch); a modality absent from the whole batch gets
    c = 0 and the other c = 1; a sample with no modality gets c = 0 everywhere, never NaN; a stage-1
    batch where no sample has two modalities has loss 0 (and a finite gradient)."""
    from heads.methods.ccat import contributions

    fused = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.5, -1.0]])
    parts = {"a": torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]]), "v": torch.tensor([[0.0, 1.0], [1.0, 3.0], [1.0, 1.0]])}
    every = {m: torch.ones(3, dtype=torch.bool) for m in parts}
    unit = lambda t: t / t.norm(dim=1, keepdim=True)
    mi = {m: math.log(3) + (unit(fused) @ unit(z).T).log_softmax(1).diagonal() for m, z in parts.items()}
    torch.testing.assert_close(contributions(fused, parts, every)[0], torch.sigmoid(mi["a"] - mi["v"]))
    gone = {"a": torch.ones(3, dtype=torch.bool), "v": torch.zeros(3, dtype=torch.bool)}
    torch.testing.assert_close(contributions(fused, parts, gone), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    gone = {"a": torch.zeros(3, dtype=torch.bool), "v": torch.ones(3, dtype=torch.bool)}
    torch.testing.assert_close(contributions(fused, parts, gone), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    nobody = {"a": torch.tensor([True, True, False]), "v": torch.tensor([True, False, False])}
    c = contributions(fused, parts, nobody)
    assert not bool(c.isnan().any()) and torch.equal(c[:, 2], torch.zeros(2)) and torch.equal(c[:, 1], torch.tensor([1.0, 0.0]))
    model = build("ccat", SPEC2, pretrain_epochs=1)
    batch = make_batch(SPEC2, n=4)
    batch.present["a"][:2] = False
    batch.present["b"][2:] = False
    loss, reg = model.pretrain_loss(batch)
    assert float(loss) == 0.0 and float(reg) == 0.0
    loss.backward()
    assert all(p.grad is None or bool(p.grad.isfinite().all()) for p in model.parameters())
