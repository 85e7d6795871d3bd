"""Mechanism pins for the objective-level methods ``mmcosine``, ``cml`` and ``mbsd`` (issue 22;
METHODS-MORE.md §5, §8, §7), and one short training smoke run each.

Each spec test of those sections is here with its hand-computed numbers; the other pins write the
method's equations out again from the model's own weights (plain loops over samples, never the code
under test a second time) and compare with what the method computes.
"""
import math
import random

import pytest
import torch
from torch.nn import functional as F

from heads.blocks.data import Batch, DataSpec
from heads.blocks.loading import load_head_data
from heads.methods.cml import CMLOptions, rank_penalty
from heads.methods.mbsd import MBSDOptions, pair_terms
from heads.methods.mmcosine import MMCosineOptions
from heads.methods import METHODS
from heads.train.config import TrainConfig, build_model
from heads.train.trainer import fit

SPEC = DataSpec(["a", "b"], {"a": 6, "b": 4}, {"a": 1, "b": 1}, 3, ["x", "y", "z"], 0)
SPEC3 = DataSpec(["a", "b", "c"], {"a": 6, "b": 4, "c": 5}, dict.fromkeys("abc", 1), 3, ["x", "y", "z"], 0)
HIDDEN = 5


def build(method, spec=SPEC, hidden=HIDDEN, **options):
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, hidden=hidden, epochs=30, optimizer="sgd", lr=0.1, weight_decay=0.0, options=options)
    model = build_model(cfg, spec)
    model.optimizer = model.configure_optimizer()
    return model


def make_batch(spec=SPEC, n=8, seed=0, absent=None):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, spec.dims[m], generator=g) for m in spec.modalities}
    present = {m: torch.ones(n, dtype=torch.bool) for m in x}
    for m, rows in (absent or {}).items():
        for i in rows:
            present[m][i] = False
            x[m][i] = 0
    return Batch(x, {m: t[:, None] for m, t in x.items()}, present, torch.randint(0, spec.num_classes, (n,), generator=g))


def features(model, b):
    """``h_m = ReLU(W_m x + b_m)``, zero where m is absent."""
    return {m: torch.relu(b.x[m] @ model.proj[m].linear.weight.T + model.proj[m].linear.bias) * b.present[m][:, None]
            for m in model.modalities}


def block(model, i, hidden=HIDDEN):
    """``W_m``: modality i's column block of the concat classifier."""
    return model.cls.weight[:, i * hidden:(i + 1) * hidden]


def test_the_three_methods_declare_the_specs_defaults():
    assert MMCosineOptions().scaling == 10
    assert (CMLOptions().lam, CMLOptions().form, CMLOptions().epsilon, CMLOptions().order) == (0.1, "official", 0.0, "per-epoch")
    assert (MBSDOptions().kl, MBSDOptions().modulation_start, MBSDOptions().modulation_end) == ("distill", 1, 81)
    t = METHODS["mmcosine"].training
    assert (t.optimizer, t.lr, t.weight_decay, t.schedule, t.batch_size) == ("sgd", 1e-3, 1e-4, "step:100:0.1", 32)
    assert "main_CD.py" in t.source
    for name in ("cml", "mbsd"):  # FIELD_PROTOCOL
        t = METHODS[name].training
        assert (t.optimizer, t.lr, t.weight_decay, t.schedule, t.batch_size) == ("sgd", 1e-3, 1e-4, "step:70:0.1", 64)
    assert (METHODS["mmcosine"].stackable, METHODS["mbsd"].stackable, METHODS["cml"].stackable) == (True, True, False)


@pytest.mark.parametrize("method", ["mmcosine", "cml", "mbsd"])
def test_one_modality_is_allowed_and_trains(method):
    """Any M: with one modality cml's chain and mbsd's pairs are empty, and a step still trains."""
    spec = DataSpec(["a"], {"a": 6}, {"a": 1}, 3, ["x", "y", "z"], 0)
    model, b = build(method, spec), make_batch(spec)
    model.start_epoch(1)
    with torch.no_grad():
        ce = float(F.cross_entropy(model.logits(b), b.y))
    loss = float(model.train_step(b))
    want = {"mmcosine": ce, "cml": ce, "mbsd": 2 * ce}[method]  # cml: no removal; mbsd: CE(f) + CE(z_a), z_a = f
    assert loss == pytest.approx(want, rel=1e-5)


# --- mmcosine (§5) --------------------------------------------------------------------------------
def test_mmcosine_spec_numbers_and_invariance_to_feature_and_row_scale():
    """h_a = [3, 4] (unit [0.6, 0.8]); W_a rows [1, 0], [0, 2] (unit [1, 0], [0, 1]) → ẑ_a = 10·[0.6, 0.8].
    Scaling h_a by 7, or W_a's rows by positive factors, leaves ẑ_a unchanged; an absent (zero) h adds 0."""
    spec = DataSpec(["a", "b"], {"a": 3, "b": 3}, {"a": 1, "b": 1}, 2, ["p", "q"], 0)
    model = build("mmcosine", spec, hidden=2)
    with torch.no_grad():
        model.cls.weight[:, :2] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        z = model.cosine_logits({"a": torch.tensor([[3.0, 4.0]]), "b": torch.zeros(1, 2)})
        torch.testing.assert_close(z["a"], torch.tensor([[6.0, 8.0]]))
        torch.testing.assert_close(z["b"], torch.zeros(1, 2))
        torch.testing.assert_close(model.cosine_logits({"a": torch.tensor([[21.0, 28.0]]), "b": torch.zeros(1, 2)})["a"],
                                   torch.tensor([[6.0, 8.0]]))
        model.cls.weight[:, :2] = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
        torch.testing.assert_close(model.cosine_logits({"a": torch.tensor([[3.0, 4.0]]), "b": torch.zeros(1, 2)})["a"],
                                   torch.tensor([[6.0, 8.0]]))


@pytest.mark.parametrize("scaling", [10.0, 15.0])
def test_mmcosine_logits_are_the_sum_of_scaled_cosines_without_bias(scaling):
    """o_c = Σ_m s · cos(h_m, w_{c,m}), written out per sample and class from the model's weights; the
    bias (set large here) plays no part; with b absent for two samples, theirs is the a-term alone."""
    model, b = build("mmcosine", scaling=scaling), make_batch(absent={"b": [1, 4]})
    with torch.no_grad():
        model.cls.bias.fill_(5.0)
        h = features(model, b)
        want = torch.zeros(8, 3)
        for i in range(8):
            for c in range(3):
                for k, m in enumerate("ab"):
                    w, v = block(model, k)[c], h[m][i]
                    if float(v.norm()) > 0:
                        want[i, c] += scaling * float(v @ w) / (float(v.norm()) * float(w.norm()))
        torch.testing.assert_close(model.logits(b), want)
        only_a = model.logits(b.only(["a"]))
        torch.testing.assert_close(model.logits(b)[[1, 4]], only_a[[1, 4]])
        assert float(model.loss(b)) == pytest.approx(float(F.cross_entropy(want, b.y)), rel=1e-5)


def test_mmcosine_is_invariant_to_the_scale_of_the_projections_and_class_rows():
    """The defining normalisation: scaling a projection (ReLU is positively homogeneous) or a class row
    of W changes no logit — concat's logits would scale with them."""
    model, b = build("mmcosine"), make_batch()
    with torch.no_grad():
        before = model.logits(b)
        model.proj["a"].linear.weight.mul_(7.0)
        model.proj["a"].linear.bias.mul_(7.0)
        model.cls.weight[1].mul_(0.25)
        torch.testing.assert_close(model.logits(b), before)


def test_mmcosine_bias_gets_no_gradient_and_never_moves():
    model, b = build("mmcosine"), make_batch()
    bias, weight = model.cls.bias.detach().clone(), model.cls.weight.detach().clone()
    model.train_step(b)
    assert model.cls.bias.grad is None or not model.cls.bias.grad.any()
    assert torch.equal(model.cls.bias.detach(), bias) and not torch.equal(model.cls.weight.detach(), weight)
    assert model.proj["a"].linear.weight.grad.abs().sum() > 0  # gradients reach the projections


# --- mbsd (§7) ------------------------------------------------------------------------------------
ZA, ZV, Y, BOTH = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]), torch.tensor([True])


def test_mbsd_spec_numbers_balancemm_kl():
    """y = 0, z_a = [2, 0], z_v = [0, 1]: P_a = 0.880797, P_v = 0.268941, audio right → w = 0.611856;
    RS = (4 + 1)/2 = 2.5; BalanceMM's kl_div(ps, pw) = 0.268941·(ln 0.268941 − 0.880797) = −0.590073."""
    w, rs, kl = pair_terms(ZA, ZV, Y, BOTH, "balancemm")
    assert float(w) == pytest.approx(0.611856, abs=1e-6)
    assert float(rs) == pytest.approx(2.5) and float(w * rs) == pytest.approx(1.529639, abs=1e-6)
    assert float(kl) == pytest.approx(-0.590073, abs=1e-6) and float(w * kl) == pytest.approx(-0.361040, abs=1e-6)


def test_mbsd_spec_numbers_distill_kl():
    """KL(p_a ‖ p_v) = 0.880797·ln(0.880797/0.268941) + 0.119203·ln(0.119203/0.731059) = 0.828725 (a is
    the stronger modality); the same with the roles of the two swapped."""
    w, rs, kl = pair_terms(ZA, ZV, Y, BOTH, "distill")
    assert float(w) == pytest.approx(0.611856, abs=1e-6) and float(rs) == pytest.approx(2.5)
    assert float(kl) == pytest.approx(0.828725, abs=1e-6)
    assert float(pair_terms(ZV, ZA, Y, BOTH, "distill")[2]) == pytest.approx(0.828725, abs=1e-6)


def test_mbsd_both_wrong_or_a_missing_modality_gives_zero_weight():
    """Both modalities wrong (y = 0, argmax 1 in both): w = 0 though the gap is not; a sample that lacks
    one of the pair: w = 0 too."""
    w, _, _ = pair_terms(torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 1.0]]), Y, BOTH, "balancemm")
    assert float(w) == 0.0
    for kl in ("distill", "balancemm"):
        assert float(pair_terms(ZA, ZV, Y, torch.tensor([False]), kl)[0]) == 0.0


def test_mbsd_gradients_flow_through_the_weight_only_in_balancemms_form():
    """∂(w·RS)/∂z_a = w·2(z_a − z_v)/C + RS·∂w/∂z_a, ∂w/∂z_a = P_a(e_y − p_a) = [0.104994, −0.104994]:
    balancemm [1.486197, −0.874341] (nothing detached); distill [1.223712, −0.611856] (w detached).
    distill's KL moves only the weaker modality: ∂(w·KL)/∂z_v = w(p_v − p_a) = [−0.374368, 0.374368], 0 for z_a."""
    grads = {}
    for kl in ("balancemm", "distill"):
        za, zv = ZA.clone().requires_grad_(), ZV.clone().requires_grad_()
        w, rs, _ = pair_terms(za, zv, Y, BOTH, kl)
        (w * rs).sum().backward()
        grads[kl] = za.grad
    torch.testing.assert_close(grads["balancemm"], torch.tensor([[1.486197, -0.874341]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grads["distill"], torch.tensor([[1.223712, -0.611856]]), atol=1e-5, rtol=0)
    za, zv = ZA.clone().requires_grad_(), ZV.clone().requires_grad_()
    w, _, kl = pair_terms(za, zv, Y, BOTH, "distill")
    (w * kl).sum().backward()
    torch.testing.assert_close(za.grad, torch.zeros(1, 2))
    torch.testing.assert_close(zv.grad, torch.tensor([[-0.374368, 0.374368]]), atol=1e-5, rtol=0)
    za, zv = ZA.clone().requires_grad_(), ZV.clone().requires_grad_()
    w, _, kl = pair_terms(za, zv, Y, BOTH, "balancemm")
    (w * kl).sum().backward()
    assert za.grad.abs().sum() > 0.1  # BalanceMM's term reaches the stronger modality too


def mbsd_by_hand(model, b, kl):
    """L = CE(f) + Σ_m CE(z_m | rows with m) + mean over pairs of (1/B)Σ_i w_i (RS_i + KL_i), one sample at a time."""
    h, mods, n = features(model, b), model.modalities, len(b)
    z = {m: h[m] @ block(model, k).T + model.cls.bias / len(mods) for k, m in enumerate(mods)}
    total = float(F.cross_entropy(sum(h[m] @ block(model, k).T for k, m in enumerate(mods)) + model.cls.bias, b.y))
    for m in mods:
        rows = [i for i in range(n) if bool(b.present[m][i])]
        total += sum(float(F.cross_entropy(z[m][i:i + 1], b.y[i:i + 1])) for i in rows) / max(len(rows), 1)
    pairs = [(p, q) for k, p in enumerate(mods) for q in mods[k + 1:]]
    for p, q in pairs:
        for i in range(n):
            y = int(b.y[i])
            pp, pq = z[p][i].softmax(0), z[q][i].softmax(0)
            right = int(z[p][i].argmax()) == y or int(z[q][i].argmax()) == y
            if not (right and bool(b.present[p][i]) and bool(b.present[q][i])):
                continue
            w = abs(float(pp[y] - pq[y]))
            rs = float(((z[p][i] - z[q][i]) ** 2).sum()) / len(pp)
            strong, weak = (float(max(pp[y], pq[y])), float(min(pp[y], pq[y])))
            if kl == "balancemm":
                k_i = weak * (math.log(weak) - strong)
            else:
                s, t = (pp, pq) if float(pp[y]) >= float(pq[y]) else (pq, pp)
                k_i = sum(float(s[c]) * math.log(float(s[c]) / float(t[c])) for c in range(len(s)))
            total += w * (rs + k_i) / (n * len(pairs))
    return total


@pytest.mark.parametrize("kl", ["distill", "balancemm"])
@pytest.mark.parametrize("spec,absent", [(SPEC, None), (SPEC, {"b": [0, 2, 3, 4, 5, 6, 7]}), (SPEC3, {"c": [1]})])
def test_mbsd_loss_is_concat_ce_plus_unimodal_ce_plus_gap_weighted_terms(kl, spec, absent):
    """The whole objective from the model's weights (b present for one sample only in the second case:
    its CE is that sample's; three modalities: the three pairs averaged)."""
    model, b = build("mbsd", spec, kl=kl), make_batch(spec, absent=absent)
    with torch.no_grad():
        for m in model.modalities:  # larger weights: more samples with a right modality and a real gap
            model.proj[m].linear.weight.mul_(3.0)
    model.start_epoch(1)
    with torch.no_grad():
        want = mbsd_by_hand(model, b, kl)
        got = float(model.loss(b))
    assert got == pytest.approx(want, rel=1e-5)
    model.opts.modulation_end = 0  # outside the window: CE(f) alone
    with torch.no_grad():
        assert float(model.loss(b)) == pytest.approx(float(F.cross_entropy(model.logits(b), b.y)), rel=1e-6)
    assert got > float(F.cross_entropy(model.logits(b), b.y)) + 0.5


def test_mbsd_window_is_inclusive_on_both_ends():
    model, b = build("mbsd", modulation_start=2, modulation_end=3), make_batch()
    ce = float(F.cross_entropy(model.logits(b), b.y).detach())
    on = []
    for epoch in (1, 2, 3, 4):
        model.start_epoch(epoch)
        on.append(float(model.loss(b).detach()) > ce + 1e-4)
    assert on == [False, True, True, False]


def test_mbsd_predicts_with_concat():
    model, b = build("mbsd"), make_batch()
    with torch.no_grad():
        h = features(model, b)
        torch.testing.assert_close(model.logits(b.only(["b"])), h["b"] @ block(model, 1).T + model.cls.bias)


# --- cml (§8) -------------------------------------------------------------------------------------
def two_class_logits(conf, predicted):
    """Logits ``[n, 2]`` whose softmax has maximum ``conf[i]`` at class ``predicted[i]``."""
    out = torch.zeros(len(conf), 2)
    for i, (c, k) in enumerate(zip(conf, predicted)):
        out[i, k] = math.log(c / (1 - c))
    return out


def test_cml_spec_numbers_official_and_balancemm():
    """conf(S) = [0.9, 0.6], conf(S') = [0.7, 0.8], both inputs right (sign = 1): official
    R = ReLU(−0.2) + ReLU(0.2) = 0.2; BalanceMM max(0, −0.2 + 0.2) = 0."""
    y = torch.tensor([1, 1])
    big, small = two_class_logits([0.9, 0.6], [1, 1]), two_class_logits([0.7, 0.8], [1, 1])
    assert float(rank_penalty(big, small, y, "official", 0.0)) == pytest.approx(0.2, abs=1e-6)
    assert float(rank_penalty(big, small, y, "balancemm", 0.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(rank_penalty(big, small, y, "official", 0.05)) == pytest.approx(0.15, abs=1e-6)  # ReLU(0.2 − ε)
    both_wrong = torch.tensor([0, 0])  # sign = 1 as well (trick 1 spares only "smaller right, larger wrong")
    assert float(rank_penalty(big, small, both_wrong, "official", 0.0)) == pytest.approx(0.2, abs=1e-6)


def test_cml_sign_spares_a_sample_whose_smaller_input_is_right_and_larger_wrong():
    """Sample 2: ŷ(S') = y, ŷ(S) ≠ y → sign 0, so official R = 0; BalanceMM's sum ignores the sign."""
    y = torch.tensor([1, 1])
    big, small = two_class_logits([0.9, 0.6], [1, 0]), two_class_logits([0.7, 0.8], [1, 1])
    assert float(rank_penalty(big, small, y, "official", 0.0)) == pytest.approx(0.0, abs=1e-7)
    big, small = two_class_logits([0.9, 0.6], [1, 0]), two_class_logits([0.95, 0.8], [1, 1])
    assert float(rank_penalty(big, small, y, "balancemm", 0.0)) == pytest.approx(0.25, abs=1e-6)
    # the reverse (larger right, smaller wrong) is penalised
    big, small = two_class_logits([0.9, 0.6], [1, 1]), two_class_logits([0.7, 0.8], [1, 0])
    assert float(rank_penalty(big, small, y, "official", 0.0)) == pytest.approx(0.2, abs=1e-6)


def penalty_by_hand(big, small, y, form, eps=0.0):
    """R(S, S') one sample at a time."""
    pb, ps = big.softmax(-1), small.softmax(-1)
    terms = []
    for i in range(len(y)):
        cb, cs = float(pb[i].max()), float(ps[i].max())
        spared = int(ps[i].argmax()) == int(y[i]) and int(pb[i].argmax()) != int(y[i])
        terms.append((cs - cb, spared))
    if form == "balancemm":
        return max(0.0, sum(d for d, _ in terms))
    return sum(max(0.0, (0.0 if spared else d) - eps) for d, spared in terms)


@pytest.mark.parametrize("form", ["official", "balancemm"])
def test_cml_two_modality_loss_removes_the_last_of_the_order(form):
    """order [a, b]: b is removed, L = (CE(f(ab)) + CE(f(a)))/2 + λ R(ab, a), f(a) the concat with b absent
    (the model's own subset logits); λ = 2 so the term counts. Samples 2 and 5 lack b: R adds 0 for them.
    The two modalities are made to disagree (b's block negated), so removing either raises confidence."""
    model, b = build("cml", lam=2.0, form=form), make_batch(seed=3, absent={"b": [2, 5]})
    with torch.no_grad():
        for m in "ab":
            model.proj[m].linear.weight.mul_(4.0)
        model.cls.weight[:, HIDDEN:] *= -1
        model.start_epoch(1)
        model.order = ["a", "b"]
        full, only_a = model.logits(b), model.logits(b.only(["a"]))
        r = penalty_by_hand(full, only_a, b.y, form)
        want = (float(F.cross_entropy(full, b.y)) + float(F.cross_entropy(only_a, b.y))) / 2 + 2.0 * r
        assert float(model.loss(b)) == pytest.approx(want, rel=1e-5)
        assert penalty_by_hand(full[[2, 5]], only_a[[2, 5]], b.y[[2, 5]], form) == 0.0
        model.order = ["b", "a"]  # now a is removed
        only_b = model.logits(b.only(["b"]))
        want = (float(F.cross_entropy(full, b.y)) + float(F.cross_entropy(only_b, b.y))) / 2 \
            + 2.0 * penalty_by_hand(full, only_b, b.y, form)
        assert float(model.loss(b)) == pytest.approx(want, rel=1e-5)
    assert r > 0.02 and penalty_by_hand(full, only_b, b.y, form) > 0.02  # the penalty is not vanishing here


def test_cml_three_modalities_chain_two_removals():
    """order [b, c, a]: S_0 = abc, S_1 = bc (a popped), S_2 = b (c popped);
    L = (CE_0 + CE_1 + CE_2)/3 + λ (R(S_0, S_1) + R(S_1, S_2))."""
    model, b = build("cml", SPEC3, lam=1.5, epsilon=0.01), make_batch(SPEC3, absent={"a": [0]})
    with torch.no_grad():
        for m in "abc":
            model.proj[m].linear.weight.mul_(4.0)
        model.start_epoch(1)
        model.order = ["b", "c", "a"]
        s0, s1, s2 = model.logits(b), model.logits(b.only(["b", "c"])), model.logits(b.only(["b"]))
        r = penalty_by_hand(s0, s1, b.y, "official", 0.01) + penalty_by_hand(s1, s2, b.y, "official", 0.01)
        ce = sum(float(F.cross_entropy(s, b.y)) for s in (s0, s1, s2)) / 3
        assert float(model.loss(b)) == pytest.approx(ce + 1.5 * r, rel=1e-5)
    assert r > 0.05


def test_cml_before_any_epoch_removes_the_last_modality():
    model, b = build("cml"), make_batch()
    assert model.order == ["a", "b"]
    with torch.no_grad():
        full, only_a = model.logits(b), model.logits(b.only(["a"]))
        want = (float(F.cross_entropy(full, b.y)) + float(F.cross_entropy(only_a, b.y))) / 2 \
            + 0.1 * penalty_by_hand(full, only_a, b.y, "official")
        assert float(model.loss(b)) == pytest.approx(want, rel=1e-5)


def test_cml_orders_come_from_the_saved_torch_rng():
    """start_epoch draws the epoch's order with torch.randperm and seeds the per-batch generator with
    one torch draw, so a run's seed (and a restored RNG state) fixes every order."""
    model = build("cml", SPEC3, order="per-batch")
    torch.manual_seed(7)
    model.start_epoch(3)
    assert model.epoch == 3
    torch.manual_seed(7)
    perm = torch.randperm(3).tolist()
    seed = int(torch.randint(2 ** 62, ()))
    assert model.order == [SPEC3.modalities[i] for i in perm]
    assert model.draws.random() == random.Random(seed).random()
    seen = set()
    for s in range(12):
        torch.manual_seed(s)
        model.start_epoch(1)
        seen.add(tuple(model.order))
    assert len(seen) > 3  # the order changes from epoch to epoch


def test_cml_per_batch_order_changes_between_steps_and_per_epoch_does_not():
    b = make_batch(SPEC3)
    values = {}
    for order in ("per-epoch", "per-batch"):
        model = build("cml", SPEC3, order=order, lam=1.0)
        with torch.no_grad():
            for m in "abc":
                model.proj[m].linear.weight.mul_(4.0)
        torch.manual_seed(1)
        model.start_epoch(1)
        with torch.no_grad():
            values[order] = {round(float(model.loss(b)), 6) for _ in range(12)}
    assert len(values["per-epoch"]) == 1 and len(values["per-batch"]) > 1


# --- training smoke -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mmcosine", "cml", "mbsd"])
def test_each_method_trains_two_epochs(one_thread, small_av, method):
    """Two epochs through the core with the method's own settings: finite losses, every subset scored,
    better than chance."""
    data = load_head_data([small_av])
    result = fit(data, TrainConfig(method=method, epochs=2, hidden=16, seed=0), progress=False)
    assert len(result.epochs) == 2 and all(math.isfinite(r["train_loss"]) for r in result.epochs)
    assert len(result.test.v) == 4 and result.test.acc > 100 / data.spec.num_classes
