"""Mechanism pins for ``mmpareto``, ``lfm`` and ``crmt`` (issue 14), and a short training smoke test.

Each pin writes the method's equations out again from the model's own weights (the module docstrings
name them) and compares with what the method computes; component gradients come from plain backward
passes on copies, never from the code under test.
"""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from heads.train.config import build_model, TrainConfig
from heads.train.trainer import fit
from heads.blocks.data import Batch, DataSpec
from heads.blocks.loading import load_head_data
from heads.methods import METHODS
from heads.methods.lfm import js_divergence
from heads.methods.mmpareto import pareto_weights

SPEC = DataSpec(["a", "b"], {"a": 6, "b": 4}, {"a": 1, "b": 1}, 3, ["x", "y", "z"], 0)
SPEC3 = DataSpec(["a", "b", "c"], {"a": 6, "b": 4, "c": 5}, dict.fromkeys("abc", 1), 3, ["x", "y", "z"], 0)


def build(method, spec=SPEC, hidden=5, epochs=100, **options):
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, hidden=hidden, epochs=epochs, optimizer="sgd", lr=0.1, weight_decay=0.0, options=options)
    model = build_model(cfg, spec)
    model.optimizer = model.configure_optimizer()
    return model


def make_batch(spec=SPEC, n=8, seed=0, absent=None, zero_absent=True):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, spec.dims[m], generator=g) for m in spec.modalities}
    present = {m: torch.ones(n, dtype=torch.bool) for m in x}
    for m, rows in (absent or {}).items():
        for i in rows:
            present[m][i] = False
            if zero_absent:
                x[m][i] = 0
    return Batch(x, {m: t[:, None] for m, t in x.items()}, present, torch.randint(0, spec.num_classes, (n,), generator=g))


def proj(model, m, x):
    """``P_m(x) = ReLU(W_m x + b_m)``."""
    return torch.relu(x @ model.proj[m].linear.weight.T + model.proj[m].linear.bias)


# --- mmpareto -------------------------------------------------------------------------------------
def test_mmpareto_weights_are_the_two_vector_min_norm_point_when_gradients_conflict():
    """Conflict (cos < 0): γ = (g2 − g1)·g2 / ‖g1 − g2‖² on the multimodal gradient g1; for g1 = (1, 0),
    g2 = (−1, 2): (−2, 2)·(−1, 2) / 8 = 6/8, and 0.75·g1 + 0.25·g2 = (0.5, 0.5) is orthogonal to g1 − g2.
    No conflict: ½, ½."""
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0])
    torch.testing.assert_close(pareto_weights(g1, g2), torch.tensor([0.75, 0.25]))
    point = 0.75 * g1 + 0.25 * g2
    assert float(point @ (g1 - g2)) == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(pareto_weights(g1, torch.tensor([1.0, 1.0])), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(pareto_weights(torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 0.5])),
                               torch.tensor([4.25 / 16.25, 12.0 / 16.25]))  # (−4, ½)·(−1, ½) = 4.25


def test_mmpareto_step_replaces_each_projection_gradient_by_the_integrated_one():
    """One SGD step (lr 0.1, first momentum step = the gradient): the heads move by the plain gradient of
    L_mm + Σ L_m; each projection by γ · max(‖g_mm + g_m‖/‖ĝ‖, 1) · ĝ per tensor, ĝ = 2(k g_mm + (1−k) g_m),
    k = ½ when the modality's two flattened gradients agree, else (g_m − g_mm)·g_m / ‖g_mm − g_m‖².
    The batch is chosen so that modality a agrees and b conflicts (checked)."""
    model, b = build("mmpareto"), make_batch(seed=4)
    heads = {"cls": model.cls, "uni_a": model.uni["a"], "uni_b": model.uni["b"]}
    grads = {}
    for name in ("mm", "a", "b"):  # each loss's gradient, from a copy
        twin = copy.deepcopy(model)
        loss_mm, uni = twin.losses(b)
        (loss_mm if name == "mm" else uni[name]).backward()
        grads[name] = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in twin.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train_step(b)
    moved = {n: (before[n] - p.detach()) / 0.1 for n, p in model.named_parameters()}
    for n in moved:
        if n.startswith(("cls.", "uni.")):
            torch.testing.assert_close(moved[n], grads["mm"][n] + grads["a"][n] + grads["b"][n])
    signs = {}
    for m in "ab":
        names = [f"proj.{m}.linear.weight", f"proj.{m}.linear.bias"]
        g_mm = torch.cat([grads["mm"][n].flatten() for n in names])
        g_m = torch.cat([grads[m][n].flatten() for n in names])
        cos = float(g_mm @ g_m / (g_mm.norm() * g_m.norm()))
        signs[m] = cos > 0
        k = 0.5 if cos > 0 else float((g_m - g_mm) @ g_m / ((g_mm - g_m) @ (g_mm - g_m)))
        for n in names:
            new = 2 * (k * grads["mm"][n] + (1 - k) * grads[m][n])
            scale = max(float((grads["mm"][n] + grads[m][n]).norm() / new.norm()), 1.0)
            torch.testing.assert_close(moved[n], 1.5 * scale * new, rtol=1e-4, atol=1e-6)
    assert signs == {"a": True, "b": False}  # both branches are exercised
    assert model.end_epoch(None) == {"mmpareto_conflict_a": 0.0, "mmpareto_conflict_b": 1.0}


def test_mmpareto_rescales_per_tensor_and_doubles_the_weighted_sum():
    """A case where the per-tensor rescale and the factor 2 both show. Tensors t1: g_mm = (3, 0), g_m = (−1, 0);
    t2: g_mm = (0, 0.1), g_m = (0, −0.1). Flattened they conflict: k = (g_m − g_mm)·g_m / ‖g_mm − g_m‖²
    = 4.02 / 16.04. t1: ĝ = 2(3k − (1 − k)) > 0 is tiny, the plain sum (2, 0) is longer, so t1 is rescaled
    to norm 2: 1.5 · (2, 0) = (3, 0). t2: the plain sum is 0, no rescale, so 1.5 · 2 · 0.1 · (2k − 1)
    = −2.4 / 16.04 — half that without the factor 2; one flattened rescale would give neither."""
    model = build("mmpareto")
    g_mm = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 0.1])]
    g_m = [torch.tensor([-1.0, 0.0]), torch.tensor([0.0, -0.1])]
    out, conflict = model.integrate(g_mm, g_m)
    assert bool(conflict)
    torch.testing.assert_close(out[0], torch.tensor([3.0, 0.0]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[1], torch.tensor([0.0, -2.4 / 16.04]), rtol=1e-4, atol=1e-7)


def test_mmpareto_predicts_with_the_concat_classifier_of_the_present_modalities():
    model, b = build("mmpareto"), make_batch()
    with torch.no_grad():
        ha = proj(model, "a", b.x["a"])
        want = ha @ model.cls.weight[:, :5].T + model.cls.bias
        torch.testing.assert_close(model.logits(b.only(["a"])), want)


# --- lfm ------------------------------------------------------------------------------------------
def test_lfm_contrastive_weight_decays_from_095_to_its_floor():
    model = build("lfm")
    seen = {}
    for epoch in (1, 2, 3, 11, 40):
        model.start_epoch(epoch)
        seen[epoch] = model.alpha()
    assert seen == pytest.approx({1: 0.95, 2: math.exp(-0.3), 3: math.exp(-0.6), 11: 0.05, 40: 0.05})


def info_nce_by_hand(ha, hb, tau=0.07):
    """½ [mean_i −log e^{S_ii}/Σ_j e^{S_ij} + mean_j −log e^{S_jj}/Σ_i e^{S_ij}], S = cos(ha_i, hb_j)/τ
    (an all-zero ReLU feature has cosine 0 with everything, as L2 normalisation with an ε leaves it 0)."""
    n = len(ha)
    norm = lambda v: max(float(v.norm()), 1e-12)  # noqa: E731
    s = [[float(ha[i] @ hb[j]) / (norm(ha[i]) * norm(hb[j])) / tau for j in range(n)] for i in range(n)]
    rows = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    cols = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(n))) for j in range(n)) / n
    return 0.5 * (rows + cols)


@pytest.mark.parametrize("missing", [False, True])
def test_lfm_loss_is_alpha_infonce_plus_one_minus_alpha_ce_of_the_mean_logits(missing):
    """Epoch 3: α = e^{−0.6}. L = α · InfoNCE(P_a, P_b) + (1 − α) · CE(mean of the present logits).
    With b missing for samples 0 and 1, the InfoNCE uses samples 2… only (as rows and as negatives) and
    those two samples' prediction is their a-logits alone."""
    model = build("lfm", matching="infonce")
    b = make_batch(absent={"b": [0, 1]} if missing else None)
    model.start_epoch(3)
    with torch.no_grad():
        ha, hb = proj(model, "a", b.x["a"]), proj(model, "b", b.x["b"]) * b.present["b"][:, None]
        la, lb = model.cls["a"](ha), model.cls["b"](hb)
        keep = slice(2, None) if missing else slice(None)
        ctr = info_nce_by_hand(ha[keep], hb[keep])
        fused = (la + lb) / 2
        if missing:
            fused[:2] = la[:2]
        ce = float(F.cross_entropy(fused, b.y))
        alpha = math.exp(-0.6)
        assert float(model.loss(b)) == pytest.approx(alpha * ctr + (1 - alpha) * ce, rel=1e-5)
        torch.testing.assert_close(model.logits(b), fused)


def test_lfm_js_matching_is_the_jensen_shannon_divergence_of_the_unimodal_predictions():
    model, b = build("lfm", matching="js"), make_batch()
    model.start_epoch(1)
    with torch.no_grad():
        p = model.cls["a"](proj(model, "a", b.x["a"])).softmax(-1)
        q = model.cls["b"](proj(model, "b", b.x["b"])).softmax(-1)
        m = (p + q) / 2
        js = float((0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)).mean())
        ce = float(F.cross_entropy((model.cls["a"](proj(model, "a", b.x["a"])) + model.cls["b"](proj(model, "b", b.x["b"]))) / 2, b.y))
        assert float(model.loss(b)) == pytest.approx(0.95 * js + 0.05 * ce, rel=1e-5)


@pytest.mark.parametrize("missing", [False, True])
def test_lfm_default_alignment_is_the_codes_kl_from_the_mean_prediction(missing):
    """The default (``matching`` unset) is what the official ``Alignment(o_a, o_v)`` executes:
    ``½ [kl_div(p.log(), m) + kl_div(q.log(), m)]`` (torch's ``kl_div(input, target)`` is KL(target‖·)),
    i.e. ½ [KL(m‖p) + KL(m‖q)], batch mean over the samples that have both modalities. Epoch 1: α = 0.95.
    It is not InfoNCE nor JS: on this batch the three differ by more than 1%."""
    model, b = build("lfm"), make_batch(absent={"b": [0, 1]} if missing else None)
    assert model.opts.matching == "code"
    model.start_epoch(1)
    with torch.no_grad():
        ha, hb = proj(model, "a", b.x["a"]), proj(model, "b", b.x["b"]) * b.present["b"][:, None]
        la, lb = model.cls["a"](ha), model.cls["b"](hb)
        keep = slice(2, None) if missing else slice(None)
        p, q = la[keep].softmax(-1), lb[keep].softmax(-1)
        m = (p + q) / 2
        code = 0.5 * (float(F.kl_div(p.log(), m, reduction="batchmean")) + float(F.kl_div(q.log(), m, reduction="batchmean")))
        js = float((0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)).mean())
        fused = (la + lb) / 2
        if missing:
            fused[:2] = la[:2]
        ce = float(F.cross_entropy(fused, b.y))
        assert float(model.loss(b)) == pytest.approx(0.95 * code + 0.05 * ce, rel=1e-5)
        ctr = info_nce_by_hand(ha[keep], hb[keep])
        assert abs(code - js) > 1e-2 * code and abs(code - ctr) > 1e-2 * code  # far beyond the 1e-5 tolerance


def test_lfm_kl_from_the_mean_and_js_differ_on_a_hand_example():
    """p = (0.9, 0.1), q = (0.1, 0.9), m = (½, ½): KL(m‖p) = KL(m‖q) = ½ ln(0.25/0.09) = ln(5/3),
    so the code's term is ln(5/3) ≈ 0.5108, while JS = 0.9 ln 1.8 + 0.1 ln 0.2 ≈ 0.3681."""
    p, q = torch.tensor([[0.9, 0.1]]).log(), torch.tensor([[0.1, 0.9]]).log()
    both = torch.ones(1, dtype=torch.bool)
    assert float(js_divergence(p, q, both, mean_first=True)) == pytest.approx(math.log(5 / 3), rel=1e-5)
    assert float(js_divergence(p, q, both)) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-5)


# --- crmt -----------------------------------------------------------------------------------------
def crmt_scores(model, b, hidden=5):
    """``s_m = W̃_m h_m`` with each row of W_m centred and scaled to unit norm."""
    out = {}
    for i, m in enumerate(model.modalities):
        w = model.cls.weight[:, i * hidden:(i + 1) * hidden]
        c = w - w.mean(1, keepdim=True)
        out[m] = (proj(model, m, b.x[m]) * b.present[m][:, None]) @ (c / c.norm(dim=1, keepdim=True)).T
    return out


def set_a(model):
    with torch.no_grad():
        model.a["a"].copy_(torch.tensor([0.3, 0.1, 0.2]))
        model.a["b"].copy_(torch.tensor([0.05, 0.4, 0.15]))


@pytest.mark.parametrize("missing", [False, True])
def test_crmt_step1_loss_is_ce_of_a_weighted_scores_plus_rho_unimodal_margins(missing):
    """z = Σ_m a_m ⊙ s_m + b; L_1 = CE(z, y) + ρ · mean_i log(Σ_m Σ_{k≠y} e^{s_m,k} / e^{s_m,y} + 1e-5) (the
    README's form with the code's ε), the sum over a sample's present modalities."""
    model, b = build("crmt", rho=0.7), make_batch(absent={"b": [0, 3]} if missing else None)
    set_a(model)
    with torch.no_grad():
        s = crmt_scores(model, b)
        z = model.a["a"] * s["a"] + model.a["b"] * s["b"] + model.cls.bias
        margins = []
        for i, y in enumerate(b.y.tolist()):
            total = 0.0
            for m in "ab":
                if bool(b.present[m][i]):
                    total += sum(math.exp(float(s[m][i, k] - s[m][i, y])) for k in range(3) if k != y)
            margins.append(math.log(total + 1e-5))
        want = float(F.cross_entropy(z, b.y)) + 0.7 * sum(margins) / len(margins)
        assert float(model.loss(b)) == pytest.approx(want, rel=1e-5)
        torch.testing.assert_close(model.logits(b), z)


def test_crmt_margin_term_stops_at_the_codes_epsilon():
    """Margins of 40 in both modalities: log(2·2·e^{−40} + 1e-5) ≈ log 1e-5, not log(4e^{−40}) ≈ −38.6."""
    model, b = build("crmt"), make_batch(n=2)
    s = torch.zeros(2, 3)
    s[torch.arange(2), b.y] = 40.0
    assert float(model.margin_term(b, {"a": s, "b": s})) == pytest.approx(math.log(4 * math.exp(-40) + 1e-5))


def test_crmt_certified_bound_is_eq_10_with_the_runner_up_class():
    """r = (Σ_m a_m,y s_m,y − a_m,j s_m,j + b_y − b_j) / sqrt(Σ_m (a_m,y τ_m,y + a_m,j τ_m,j)²), j the
    highest wrong class of z."""
    model, b = build("crmt"), make_batch()
    set_a(model)
    tau = torch.tensor([[1.0, 2.0, 0.5], [0.7, 0.3, 1.5]])
    model.lipschitz.copy_(tau)
    with torch.no_grad():
        s = crmt_scores(model, b)
        a, bias = model.a, model.cls.bias
        z = a["a"] * s["a"] + a["b"] * s["b"] + bias
        want = []
        for i, y in enumerate(b.y.tolist()):
            j = max((k for k in range(3) if k != y), key=lambda k: float(z[i, k]))
            num = float(bias[y] - bias[j]) + sum(float(a[m][y] * s[m][i, y] - a[m][j] * s[m][i, j]) for m in "ab")
            den = math.sqrt(sum(float(a[m][y] * tau[r, y] + a[m][j] * tau[r, j]) ** 2 for r, m in enumerate("ab")))
            want.append(num / den)
        torch.testing.assert_close(model.certified_bound(b).detach(), torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_crmt_lipschitz_sweep_is_the_largest_per_sample_score_gradient_norm():
    """∂ s_m,k / ∂ x = W_mᵀ (1[W_m x + b_m > 0] ⊙ W̃_m[k]) for a ReLU projection; τ_m,k is its largest norm
    over the samples that have m. Sample 2 lacks b but keeps a feature vector that would set τ_b,0."""
    model, b = build("crmt", epochs=8, second_step_epochs=2), make_batch(absent={"b": [2]}, zero_absent=False)
    model.start_epoch(7)  # first epoch of step 2: the sweep
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train_step(b)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n  # the sweep trains nothing
    with torch.no_grad():
        want, everyone = torch.zeros(2, 3), torch.zeros(2, 3)
        for r, m in enumerate("ab"):
            w, bb = model.proj[m].linear.weight, model.proj[m].linear.bias
            c = model.cls.weight[:, r * 5:(r + 1) * 5]
            c = c - c.mean(1, keepdim=True)
            rows = c / c.norm(dim=1, keepdim=True)
            for i in range(8):
                active = (b.x[m][i] @ w.T + bb > 0).float()
                for k in range(3):
                    norm = float((w.T @ (active * rows[k])).norm())
                    everyone[r, k] = max(float(everyone[r, k]), norm)
                    if bool(b.present[m][i]):
                        want[r, k] = max(float(want[r, k]), norm)
    assert float(everyone[1, 0]) > float(want[1, 0])  # the absent sample matters here
    torch.testing.assert_close(model.lipschitz, want, rtol=1e-5, atol=1e-6)


def score_gradient_norms(model, b):
    """``[B, M, C]``: ‖∂ s_m,k(x_i) / ∂ x_i,m‖ = ‖W_mᵀ (1[W_m x + b_m > 0] ⊙ W̃_m[k])‖ for each sample, by hand."""
    out = torch.zeros(len(b.y), 2, 3)
    with torch.no_grad():
        for r, m in enumerate("ab"):
            w, bb = model.proj[m].linear.weight, model.proj[m].linear.bias
            c = model.cls.weight[:, r * 5:(r + 1) * 5]
            c = c - c.mean(1, keepdim=True)
            rows = c / c.norm(dim=1, keepdim=True)
            for i in range(len(b.y)):
                active = (b.x[m][i] @ w.T + bb > 0).float()
                for k in range(3):
                    out[i, r, k] = (w.T @ (active * rows[k])).norm()
    return out


def test_crmt_lipschitz_constant_is_the_maximum_over_every_batch_of_the_sweep():
    """τ is the maximum over the whole training set, not the last batch's (nor the first's): two batches
    whose maxima win in different entries, swept in turn. A stale τ from before the sweep is cleared."""
    model = build("crmt", epochs=8, second_step_epochs=2)
    first, second = make_batch(seed=0), make_batch(seed=1)
    with torch.no_grad():
        model.lipschitz.fill_(100.0)
    model.start_epoch(7)
    model.train_step(first)
    model.train_step(second)
    n1, n2 = score_gradient_norms(model, first).amax(0), score_gradient_norms(model, second).amax(0)
    assert bool((n1 > n2).any()) and bool((n2 > n1).any())  # each batch holds some entry's maximum
    torch.testing.assert_close(model.lipschitz, torch.maximum(n1, n2), rtol=1e-5, atol=1e-6)


def test_crmt_defaults_follow_the_authors_updated_configs():
    """Commit 9f42759 "Update the configs." of GeWu-Lab/Certifiable-Robust-Multi-modal-Training: ρ = 2.0,
    StepLR(60, 0.1), 140 epochs of step 1, then range(1, 140 // 3) = 45 of step 2 (the initial commit
    had ρ = 1, StepLR 40, 100 epochs). A run of another length keeps step 2's share, 45/185."""
    declared = METHODS["crmt"].training
    assert (declared.schedule, declared.epochs, declared.stages) == ("step:60:0.1", 185, (140, 45))
    cfg = TrainConfig(method="crmt", hidden=5)
    model = build_model(cfg, SPEC)
    assert model.opts.rho == 2.0 and (model.first_step_epochs, model.second_step_epochs) == (140, 45)
    assert (model.cfg.epochs, model.cfg.schedule) == (185, "step:60:0.1")
    short = build("crmt", epochs=100)
    assert (short.first_step_epochs, short.second_step_epochs) == (76, 24)


def test_crmt_second_step_moves_only_the_integration_weights_and_raises_the_bound():
    model, b = build("crmt", epochs=8, second_step_epochs=2), make_batch()
    assert (model.first_step_epochs, model.second_step_epochs) == (6, 2)
    model.start_epoch(7)
    model.train_step(b)
    model.start_epoch(8)
    assert model.a_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.03)
    with torch.no_grad():
        model.a["a"].mul_(0).add_(1.0)  # room to move
        model.a["b"].mul_(0).add_(1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bound = float(model.certified_bound(b).mean().detach())
    for _ in range(20):
        model.train_step(b)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) == (not n.startswith("a.")), n
    assert float(model.certified_bound(b).mean().detach()) > bound


def test_crmt_refuses_a_second_step_as_long_as_the_run():
    with pytest.raises(ValueError, match="no joint training"):
        build("crmt", epochs=4, second_step_epochs=4)


# --- training smoke -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_modalities(tmp_path_factory) -> Path:
    """A generated cache with four modalities (labels shown in each with a little noise)."""
    from cache import write_arrays

    rng = np.random.default_rng(0)
    n, classes = 240, 3
    labels = np.arange(n) % classes
    features = {}
    for m, dim in zip("wxyz", (12, 10, 8, 6)):
        prototypes = rng.standard_normal((classes, dim))
        features[m] = (prototypes[labels] + rng.standard_normal((n, dim))).astype(np.float32)
    splits = (["train"] * 6 + ["val", "test"]) * (n // 8)
    return write_arrays(tmp_path_factory.mktemp("c4") / "c", dataset="four", backbone="b", features=features,
                        labels=labels, splits=splits, class_names=["p", "q", "r"])


@pytest.fixture(scope="module")
def smoke_data(four_modalities):
    """The built-in ``av`` and ``avt`` caches (training split cut to its first 1024 samples, to keep the
    smoke test short; validation and test whole) and the four-modality cache, each loaded once."""
    from dataclasses import replace

    from cache.synthetic import builtin_cache

    root = Path(__file__).resolve().parent.parent / "data" / "builtin"
    out = {"four": load_head_data([four_modalities])}
    for preset in ("av", "avt"):
        data = load_head_data([builtin_cache(f"{preset}-saturated", root)])
        out[preset] = replace(data, train=data.train.subset(torch.arange(1024)))
    return out


SMOKE = {"mmpareto": {}, "lfm": {}, "crmt": {"second_step_epochs": 1}}  # crmt: one joint epoch, then the sweep


@pytest.mark.trains
@pytest.mark.parametrize("preset", ["av", "avt", "four"])
@pytest.mark.parametrize("method", list(SMOKE))
def test_each_method_trains_two_epochs(method, preset, smoke_data):
    """Two epochs through the core with the method's paper settings (hidden width 16): finite losses,
    every subset evaluated, and on the built-in presets better than chance."""
    data, threads = smoke_data[preset], torch.get_num_threads()
    try:  # one thread: on a shared machine more threads only wait for each other
        result = fit(data, TrainConfig(method=method, epochs=2, hidden=16, seed=0, threads=1, options=SMOKE[method]),
                     progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(result.epochs) == 2 and all(math.isfinite(r["train_loss"]) for r in result.epochs)
    assert len(result.test.v) == 2 ** len(data.spec.modalities)
    if preset != "four":  # 180 training samples and SGD at 1e-3: two epochs are not enough there
        assert result.test.acc > 100.0 / data.spec.num_classes
