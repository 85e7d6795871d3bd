"""``agm``, ``opm``, ``amco`` and the T-PAMI OGM options (METHODS-MORE.md §2, §4, §10): every test of
those sections with its hand-computed numbers, and for each method a test that fails when its defining
line is removed. Expected values are written out again from the model's own weights (the equations in
each module's docstring), never by calling the code under test a second time.

Gradients are read after ``train_step`` with the optimizer's step switched off (``frozen_step``), so
what is compared is exactly what the method leaves for the optimizer.
"""
import copy
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from cache.synthetic import builtin_cache
from heads.blocks.data import Batch, DataSpec
from heads.blocks.loading import load_head_data
from heads.methods import METHODS
from heads.metrics import all_subsets
from heads.methods.agm import coefficients
from heads.methods.amco import dependence_mass, masked_count
from heads.methods.opm import drop_probabilities
from heads.train.config import TrainConfig, build_model
from heads.train.trainer import fit

SPEC2 = DataSpec(["a", "v"], {"a": 6, "v": 4}, {"a": 1, "v": 1}, 3, ["x", "y", "z"], 0)
SPEC3 = DataSpec(["a", "v", "t"], {"a": 6, "v": 4, "t": 5}, dict.fromkeys("avt", 1), 3, ["x", "y", "z"], 0)
D = 8  # hidden width of the pinned models


def build(method, spec=SPEC2, hidden=D, epochs=10, **options):
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, hidden=hidden, epochs=epochs, optimizer="sgd", lr=1.0, weight_decay=0.0,
                      options=options)
    model = build_model(cfg, spec)
    model.optimizer = model.configure_optimizer()
    model.start_epoch(1)
    return model


def make_batch(spec=SPEC2, n=6, seed=0, absent=None):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, spec.dims[m], generator=g) for m in spec.modalities}
    present = {m: torch.ones(n, dtype=torch.bool) for m in x}
    for m, rows in (absent or {}).items():
        for i in rows:
            present[m][i] = False
            x[m][i] = 0
    counts = {m: int(present[m].sum()) for m in x}  # as the core's batches carry them (no host reads later)
    return Batch(x, {m: t[:, None] for m, t in x.items()}, present, torch.randint(0, spec.num_classes, (n,), generator=g),
                 counts)


def frozen_step(model, batch):
    """``train_step`` with the optimizer's step switched off: returns the loss and every parameter's gradient."""
    model.optimizer.step = lambda *a, **k: None
    loss = model.train_step(batch)
    return loss, {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def params(model):
    """The model's parameters as fresh leaves (a hand computation differentiates these, not the model)."""
    return {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}


def hidden(p, m, x):
    """``h_m = ReLU(W^P_m x + b^P_m)``."""
    return torch.relu(x @ p[f"proj.{m}.linear.weight"].T + p[f"proj.{m}.linear.bias"])


def head(p, spec, h, subset, d=D):
    """Concat's ``f(S) = Σ_{m∈S} W_m h_m + b`` (the modalities outside S absent)."""
    out = p["cls.bias"].expand(next(iter(h.values())).shape[0], -1)
    for i, m in enumerate(spec.modalities):
        if m in subset:
            out = out + h[m] @ p["cls.weight"][:, i * d:(i + 1) * d].T
    return out


def slice_logits(p, spec, h, d=D):
    """``z_m = W_m h_m + b/M``."""
    return {m: h[m] @ p["cls.weight"][:, i * d:(i + 1) * d].T + p["cls.bias"] / len(spec.modalities)
            for i, m in enumerate(spec.modalities)}


def grads_of(loss, p):
    loss.backward()
    return {n: t.grad if t.grad is not None else torch.zeros_like(t) for n, t in p.items()}


def concat_grads(model, batch, spec=SPEC2):
    """Plain concat's loss and gradients at the model's weights (projections and classifier only)."""
    p = params(model)
    h = {m: hidden(p, m, batch.x[m]) * batch.present[m][:, None] for m in spec.modalities}
    loss = F.cross_entropy(head(p, spec, h, spec.modalities), batch.y)
    return loss.detach(), grads_of(loss, p)


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-5), atol=kw.get("atol", 1e-6))


# === agm (§10) ====================================================================================
def test_agm_coefficients_are_the_official_numbers_and_balancemm_swaps_them():
    """§10 test 1: s = (0.5, 1.5), S̄ = (0.8, 1.2), α = 1: ratio_a = e, opt_a = e^0.4, k_a = exp(−1.226457)
    = 0.293330, k_v = exp(0.670320 − 0.367879) = 1.353157. BalanceMM's flipped sign (written out here:
    exp(2(s_m − mean s)) for ratio and opt) gives the swapped pair."""
    s, run = torch.tensor([0.5, 1.5]), torch.tensor([0.8, 1.2])
    k = coefficients(s, run, 1.0, 10.0)
    close(k, torch.tensor([0.293330, 1.353157]))
    assert float(k[0]) == pytest.approx(math.exp(math.exp(0.4) - math.e), rel=1e-6)
    flipped = torch.exp(torch.exp(2 * (run - run.mean())) - torch.exp(2 * (s - s.mean())))
    close(flipped, k.flip(0))
    assert 0.8 * 10 / 11 + 0.5 / 11 == pytest.approx(0.772727, abs=1e-6)  # the running-mean update at t = 11


def test_agm_coefficients_cap_alpha_and_three_modalities():
    """``min(·, cap)`` caps the exponent (cap inf: none); α multiplies it; M = 3 uses M/(M−1) = 1.5 and the
    mean of all three (s = 0.2, 0.5, 1.1, S̄ = 0.4 each: opt = 1, ratio_m = exp(1.5 (0.6 − s_m)))."""
    s, run = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 3.0])  # opt_a − ratio_a = e^3 − 1 = 19.09
    close(coefficients(s, run, 0.1, 10.0)[0], torch.tensor(math.exp(0.1 * 10)))
    close(coefficients(s, run, 0.1, float("inf"))[0], torch.tensor(math.exp(0.1 * (math.exp(3) - 1))))
    close(coefficients(s, run, 0.5, 10.0)[1], torch.tensor(math.exp(0.5 * (math.exp(-3) - 1))))
    s3 = torch.tensor([0.2, 0.5, 1.1])
    want = [math.exp(1 - math.exp(1.5 * (0.6 - v))) for v in (0.2, 0.5, 1.1)]
    close(coefficients(s3, torch.full((3,), 0.4), 1.0, 10.0), torch.tensor(want))


def agm_scores_by_hand(parts, batch, spec=SPEC2):
    """``s_m = mean over the samples that have m of −log max(softmax(m_m)[y], 1e-8)``."""
    out = []
    for m in spec.modalities:
        nll = -parts[m].detach().softmax(-1)[torch.arange(len(batch)), batch.y].clamp_min(1e-8).log()
        out.append(nll[batch.present[m]].mean())
    return torch.stack(out)


@pytest.mark.parametrize("decomposition", ["slices", "subsets"])
def test_agm_step_equals_gradmod_written_out(decomposition):
    """§10 test 2: the official GradMod — T, A = f({a}), V = f({v}) with gradient, m_a = ½(T − V + A),
    m_v = ½(T − A + V), hooks multiplying their gradients by k from the scores of m_a, m_v and the running
    means — gives the loss and every parameter's gradient of the fast path (and of the subset path) to
    1e-6; the running means then move to S̄ (t−1)/t + s/t with t = 11."""
    model, b = build("agm", grad_clip=0.0, decomposition=decomposition), make_batch(n=16)
    with torch.no_grad():
        model.cls.weight[:, :D] *= 4  # scores apart, so k is far from 1
        model.running.copy_(torch.tensor([0.8, 1.2]))
        model.steps.fill_(10)
    p = params(model)
    h = {m: hidden(p, m, b.x[m]) for m in "av"}
    T, A, V = (head(p, SPEC2, h, s) for s in ("av", "a", "v"))
    parts = {"a": 0.5 * (T - V + A), "v": 0.5 * (T - A + V)}
    s = agm_scores_by_hand(parts, b)
    c = 2.0  # M/(M−1)
    run = torch.tensor([0.8, 1.2])
    k = torch.exp(1.0 * (torch.exp(c * (run.mean() - run)) - torch.exp(c * (s.mean() - s))).clamp(max=10))
    assert float(k.min()) < 0.9 < 1.1 < float(k.max())  # both directions exercised
    parts["a"].register_hook(lambda g: g * k[0])
    parts["v"].register_hook(lambda g: g * k[1])
    want_loss = F.cross_entropy(parts["a"] + parts["v"], b.y)
    want = grads_of(want_loss, p)
    loss, got = frozen_step(model, b)
    close(loss, want_loss.detach())
    for n in want:
        close(got[n], want[n])
    close(model.running, run * 10 / 11 + s / 11)
    assert float(model.steps) == 11


def test_agm_subset_form_equals_the_slices_for_three_modalities():
    """The M > 2 choice: m_m = φ_m + f(∅)/M over all 2^3 subsets equals concat's slice z_m, in the loss and
    every gradient, with k computed by the method (so the Shapley weights and the f(∅)/M term are pinned)."""
    b = make_batch(SPEC3, n=12, seed=3, absent={"t": [0, 1]})
    results = {}
    for decomposition in ("slices", "subsets"):
        model = build("agm", SPEC3, grad_clip=0.0, decomposition=decomposition)
        with torch.no_grad():
            model.running.copy_(torch.tensor([0.3, 1.0, 2.0]))
            model.steps.fill_(4)
        results[decomposition] = frozen_step(model, b) + (model.running.clone(),)
    close(results["slices"][0], results["subsets"][0])
    for n in results["slices"][1]:
        close(results["slices"][1][n], results["subsets"][1][n])
    close(results["slices"][2], results["subsets"][2])


def test_agm_slices_take_one_pass_and_subsets_one_per_subset(monkeypatch):
    """``--decomposition slices`` never scores a subset (one forward pass); ``subsets`` scores all 2^M."""
    b = make_batch(SPEC3, n=6)
    fast = build("agm", SPEC3)
    monkeypatch.setattr(fast, "logits", lambda batch: pytest.fail("slices scored a subset"))
    fast.train_step(b)
    slow = build("agm", SPEC3, decomposition="subsets")
    seen = []
    real = slow.logits
    monkeypatch.setattr(slow, "logits", lambda batch: seen.append(frozenset(m for m in "avt" if batch.has(m))) or real(batch))
    slow.train_step(b)
    assert sorted(seen, key=sorted) == sorted(all_subsets(["a", "v", "t"]), key=sorted)


def test_agm_scores_floor_the_true_class_probability_at_1e_8():
    """``s_m = mean −log max(p[y], 1e-8)``: a true-class logit 40 below the others scores −log 1e-8 = 18.420681,
    a uniform one log 3; only the samples that have m count."""
    model = build("agm")
    b = make_batch(n=2, absent={"v": [1]})
    b.y = torch.tensor([0, 0])
    far = torch.tensor([[-40.0, 0.0, 0.0], [-40.0, 0.0, 0.0]])
    flat = torch.tensor([[0.0, 0.0, 0.0], [-40.0, 0.0, 0.0]])
    close(model.scores([far, flat], b), torch.tensor([-math.log(1e-8), math.log(3)]))


def test_agm_clip_by_hand():
    """Gradients set by hand: every entry 1e-3 except one classifier entry of 2c (norm ‖g‖ small, so the
    1e-6 of clip_grad_norm_'s factor c / (‖g‖ + 1e-6) shows); an entry of exactly c does not clip."""
    model = build("agm", grad_clip=0.01)
    for peak, clipped in ((0.02, True), (0.01, False)):
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        model.cls.weight.grad[0, 0] = peak
        grads = [p.grad.clone() for p in model.parameters()]
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        model.clip_gradients()
        factor = 0.01 / (norm + 1e-6) if clipped else 1.0
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad, g * factor, rtol=1e-6, atol=0)


def test_agm_scales_each_modalitys_gradient_path_by_its_coefficient():
    """§10 test 3 (the defining line): with k = (2, 0.5) forced, the gradients of P_a and W_a are exactly 2×
    and those of P_v and W_v 0.5× concat's, the bias's (2 + 0.5)/2 = 1.25×."""
    model, b = build("agm", grad_clip=0.0), make_batch(n=10)
    model.coefficient_tensor = lambda score: torch.tensor([2.0, 0.5])
    want_loss, want = concat_grads(model, b)
    loss, got = frozen_step(model, b)
    close(loss, want_loss)
    for m, k in (("a", 2.0), ("v", 0.5)):
        for n in (f"proj.{m}.linear.weight", f"proj.{m}.linear.bias"):
            close(got[n], k * want[n])
    close(got["cls.weight"][:, :D], 2.0 * want["cls.weight"][:, :D])
    close(got["cls.weight"][:, D:], 0.5 * want["cls.weight"][:, D:])
    close(got["cls.bias"], 1.25 * want["cls.bias"])


def test_agm_clips_the_global_norm_only_when_a_classifier_gradient_entry_exceeds_c():
    """Clipping (the code's): the global norm goes to c when max |∇W_cls| > c; with max |∇W_cls| < c the
    gradients stay, even when the global norm is above c; c = 0 switches it off."""
    b = make_batch(n=10)
    model = build("agm", grad_clip=0.0)
    model.coefficient_tensor = lambda score: torch.ones(2)
    _, plain = frozen_step(model, b)
    top = float(plain["cls.weight"].abs().max())
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in plain.values()])))
    assert top < norm
    for c, factor in ((top / 2, (top / 2) / (norm + 1e-6)), ((top + norm) / 2, 1.0)):
        clipped = build("agm", grad_clip=c)
        clipped.coefficient_tensor = lambda score: torch.ones(2)
        _, got = frozen_step(clipped, b)
        for n in plain:
            close(got[n], factor * plain[n])


def test_agm_outside_its_window_trains_as_concat_but_tracks_the_scores():
    """Before ``--modulation-start`` k = 1 (concat's gradients) while S̄ and t still move; end 0 = the run's
    last epoch, so the last epoch modulates; after ``--modulation-end`` k = 1 again."""
    b = make_batch(n=10)
    model = build("agm", grad_clip=0.0, modulation_start=2, modulation_end=3, epochs=5)
    with torch.no_grad():
        model.cls.weight[:, :D] *= 4
    want_loss, want = concat_grads(model, b)
    _, got = frozen_step(model, b)  # epoch 1: before the window
    for n in want:
        close(got[n], want[n])
    assert float(model.steps) == 1 and float(model.running.abs().sum()) > 0
    for epoch, on in ((2, True), (3, True), (4, False)):
        model.start_epoch(epoch)
        assert model.modulating() is on
    whole = build("agm", epochs=5)
    whole.start_epoch(5)
    assert whole.modulating()
    whole.start_epoch(6)
    assert not whole.modulating()


def test_agm_scores_count_present_samples_and_a_missing_modality_skips_the_modulation():
    """Missing data (choice): s_m averages the samples that have m; a batch where nobody has v trains as
    concat and leaves S̄ and t alone."""
    model, b = build("agm", grad_clip=0.0), make_batch(n=10, absent={"v": [0, 1, 2]})
    p = params(model)
    h = {m: hidden(p, m, b.x[m]) * b.present[m][:, None] for m in "av"}
    frozen_step(model, b)
    close(model.running, agm_scores_by_hand(slice_logits(p, SPEC2, h), b))  # t = 1: S̄ = s
    nobody = make_batch(n=6, absent={"v": range(6)})
    fresh = build("agm", grad_clip=0.0)
    fresh.coefficient_tensor = lambda score: pytest.fail("no coefficient without every modality")
    want_loss, want = concat_grads(fresh, nobody)
    loss, got = frozen_step(fresh, nobody)
    close(loss, want_loss)
    for n in want:
        close(got[n], want[n])
    assert float(fresh.steps) == 0 and float(fresh.running.abs().sum()) == 0


def test_agm_logs_the_epochs_mean_coefficient_and_refuses_one_modality():
    model, b = build("agm"), make_batch(n=10)
    assert model.end_epoch(None) == {}
    ks = iter([torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])])
    model.coefficient_tensor = lambda score: next(ks)
    model.train_step(b)
    model.train_step(b)
    assert model.end_epoch(None) == pytest.approx({"agm_k_a": 1.5, "agm_k_v": 1.0})
    model.start_epoch(2)
    assert model.end_epoch(None) == {}
    one = DataSpec(["a"], {"a": 6}, {"a": 1}, 3, ["x", "y", "z"], 0)
    for method in ("agm", "opm", "amco"):
        with pytest.raises(ValueError, match=f"^{method} .* needs at least two modalities; this data has 1: a$"):
            build(method, one)


# === opm (§2) =====================================================================================
def test_opm_drop_probabilities_are_the_sections_numbers():
    """§2 test 1: s = (30, 20), q_base = λ = 0.5: r_a = tanh(0.5) = 0.462117, q_a = 0.615529, q_v = 0; θ =
    0.307765, 1/(1−θ) = 1.444595. M = 3 (choice, mean of the others): two leaders both drop, the last never."""
    q = drop_probabilities(torch.tensor([30.0, 20.0]), 0.5, 0.5)
    close(q, torch.tensor([0.615529, 0.0]))
    assert float(q.mean()) == pytest.approx(0.307765, abs=1e-6) and float(1 / (1 - q.mean())) == pytest.approx(1.444595, abs=1e-5)
    rho = 0.6 / 0.35
    q3 = drop_probabilities(torch.tensor([0.6, 0.6, 0.1]), 0.4, 2.0)
    close(q3, torch.tensor([0.4 * (1 + 2 * math.tanh(rho - 1))] * 2 + [0.0]))
    close(drop_probabilities(torch.tensor([0.9, 0.05]), 0.8, 1.0), torch.tensor([1.0, 0.0]))  # clipped to 1
    close(drop_probabilities(torch.tensor([0.5, float("nan")]), 0.5, 0.5), torch.zeros(2))  # nobody to compare with


def opm_setup(absent=None, n=6):
    model, b = build("opm", warmup=0), make_batch(n=n, absent=absent)
    with torch.no_grad():
        model.cls.weight[:, :D] *= 6  # audio clearly dominant
    p = params(model)
    h = {m: hidden(p, m, b.x[m]) * b.present[m][:, None] for m in "av"}
    z = slice_logits(p, SPEC2, h)
    s = torch.stack([z[m].detach().softmax(-1)[torch.arange(n), b.y][b.present[m]].mean() for m in "av"])
    rho = s / s.flip(0)
    q = torch.where(rho > 1, (0.5 * (1 + 0.5 * torch.tanh(rho - 1))).clamp(0, 1), torch.zeros(2))
    return model, b, p, h, q


def test_opm_drops_rows_and_modalities_as_drawn_and_rescales_the_survivors():
    """§2 test 2 (the defining line): the coin forced to execute and μ = [[1,1],[0,1],[0,0],[1,0],[1,1],[0,1]]:
    every kept feature is μ h / (1 − θ) with θ = mean q (q from the scores written out here), row 2 (both
    dropped) leaves the loss, which is the mean CE of the five others."""
    model, b, p, h, q = opm_setup()
    assert float(q[0]) > 0.5 and float(q[1]) == 0
    mu = torch.tensor([[1, 1], [0, 1], [0, 0], [1, 0], [1, 1], [0, 1]], dtype=torch.float32)
    seen = {}
    model.draws = lambda q_, n: seen.setdefault("q", q_) is not None and (torch.tensor(True), mu)
    scale = 1 / (1 - q.mean())
    dropped = {m: h[m] * mu[:, i:i + 1] * scale for i, m in enumerate("av")}
    per = F.cross_entropy(head(p, SPEC2, dropped, "av"), b.y, reduction="none")
    want_loss = per[[0, 1, 3, 4, 5]].mean()
    want = grads_of(want_loss, p)
    loss, got = frozen_step(model, b)
    close(seen["q"], q)
    close(loss, want_loss.detach())
    for n in want:
        close(got[n], want[n])


def test_opm_takes_no_step_when_every_row_is_dropped():
    """§2 test 2, end: with every row dropped (possible only when some sample lacks a modality) the batch
    changes no parameter and leaves the optimizer without state."""
    model, b, *_ = opm_setup(absent={"v": [0, 1]})
    model.draws = lambda q, n: (torch.tensor(True), torch.zeros(n, 2))
    before = copy.deepcopy(model.state_dict())
    loss = model.train_step(b)
    assert float(loss) == 0 and not model.optimizer.state
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_opm_one_kept_row_is_the_loss_and_an_incomplete_batch_with_kept_rows_steps():
    """The loss averages the kept rows only (one kept: its own CE); a batch where some sample lacks a
    modality but some row survives takes its step."""
    model, b, p, h, q = opm_setup(absent={"v": [0]})
    mu = torch.zeros(6, 2)
    mu[3] = torch.tensor([1.0, 0.0])
    model.draws = lambda q_, n: (torch.tensor(True), mu)
    dropped = {m: h[m] * mu[:, i:i + 1] / (1 - q.mean()) for i, m in enumerate("av")}
    want = F.cross_entropy(head(p, SPEC2, dropped, "av")[3:4], b.y[3:4])
    before = model.proj["a"].linear.weight.detach().clone()
    close(model.train_step(b), want.detach())
    assert not torch.equal(model.proj["a"].linear.weight, before)


def test_opm_without_execution_or_with_balanced_scores_is_concat_and_still_draws():
    """§2 test 4: balanced scores (two identical modalities) give q = 0, θ = 0 and no removed row: the loss
    and gradients are concat's, and the random draws are still consumed. A coin that does not execute
    (p_exe = 0) leaves h as it is, whatever μ says."""
    spec = DataSpec(["a", "v"], {"a": 5, "v": 5}, {"a": 1, "v": 1}, 3, ["x", "y", "z"], 0)
    model = build("opm", spec, warmup=0, p_exe=1.0)
    with torch.no_grad():
        model.proj["v"].linear.weight.copy_(model.proj["a"].linear.weight)
        model.proj["v"].linear.bias.copy_(model.proj["a"].linear.bias)
        model.cls.weight[:, D:] = model.cls.weight[:, :D]
    b = make_batch(spec, n=8)
    b.x["v"] = b.x["a"].clone()
    want_loss, want = concat_grads(model, b, spec)
    state = torch.get_rng_state()
    loss, got = frozen_step(model, b)
    assert not torch.equal(torch.get_rng_state(), state)
    close(loss, want_loss)
    for n in want:
        close(got[n], want[n])
    model, b, p, h, q = opm_setup()
    model.opts.p_exe = 0.0
    real = model.draws
    model.draws = lambda q_, n: (real(q_, n)[0], torch.zeros(n, 2))
    want_loss, want = concat_grads(model, b)
    loss, got = frozen_step(model, b)
    close(loss, want_loss)
    for n in want:
        close(got[n], want[n])


def test_opm_never_drops_during_its_warm_up():
    """§2 test 3: epochs 1–6 (the code's 0–5) are plain concat, the drop is not even drawn; epoch 7 drops."""
    model = build("opm")
    b = make_batch(n=6)
    model.draws = lambda q, n: pytest.fail("drawn during the warm-up")
    for epoch in range(1, 7):
        model.start_epoch(epoch)
        want_loss, want = concat_grads(model, b)
        loss, got = frozen_step(model, b)
        close(loss, want_loss)
        close(got["proj.a.linear.weight"], want["proj.a.linear.weight"])
    model.start_epoch(7)
    with pytest.raises(pytest.fail.Exception, match="drawn"):
        model.train_step(b)


def test_opm_draws_execute_with_probability_p_exe_and_keep_with_one_minus_q():
    """The coin is ``u ≥ 1 − p_exe`` for u ~ U(0, 1) from torch's RNG (u itself as the threshold: executes;
    just above it: does not); μ ~ Bernoulli(1 − q) per sample: q = 1 always drops, q = 0 never."""
    model = build("opm")
    torch.manual_seed(5)
    u = float(torch.rand(()))
    for p_exe, want in ((1 - u, True), (1 - u - 1e-6, False), (1.0, True), (0.0, False)):
        model.opts.p_exe = p_exe
        torch.manual_seed(5)
        execute, mu = model.draws(torch.tensor([1.0, 0.0]), 4)
        assert bool(execute) is want
        assert torch.equal(mu, torch.tensor([[0.0, 1.0]] * 4))
    torch.manual_seed(0)
    _, mu = model.draws(torch.tensor([0.3, 0.0]), 4000)
    assert float(mu[:, 0].mean()) == pytest.approx(0.7, abs=0.03)


def test_opm_keeps_every_row_of_a_complete_batch():
    """Why a complete batch needs no host read: the lowest-scoring modality has q = 0, so μ keeps it."""
    for seed in range(20):
        s = torch.rand(3, generator=torch.Generator().manual_seed(seed))
        q = drop_probabilities(s, 0.9, 1.0)
        assert float(q[s.argmin()]) == 0 and float(q.max()) > 0


# === amco (§4) ====================================================================================
def test_amco_schedule_masks_0_128_221_256_units_in_the_second_epoch():
    """§4 test 1: e = 1 (our epoch 2), ε = 0.3, K = 256 (``--mask-on features``, hidden 256): batches 0–3
    mask N = 0, 128, 221, 256 units; in the first epoch (e = 0) nothing is ever masked; the counter
    restarts each epoch."""
    assert [masked_count(l, 0.3, 256) for l in (0.0, 0.1, 0.2, 0.1 + 0.1 + 0.1, 0.4)] == [0, 128, 221, 256, 256]
    model = build("amco", hidden=256)
    b = make_batch(n=4)
    zeros = []
    real = model.draw_mask
    model.draw_mask = lambda k: zeros.append((k, int((real(k) == 0).sum()))) or real(k)
    for epoch in (1, 2, 4):
        model.start_epoch(epoch)
        for _ in range(4):
            model.train_step(b)
    assert [n for _, n in zeros] == [0, 0, 0, 0, 0, 128, 221, 256, 0, 256, 256, 256]
    assert {k for k, _ in zeros} == {256}
    logits_mode = build("amco", mask_on="logits")
    logits_mode.start_epoch(2)
    logits_mode.counter = 0.3
    assert int((logits_mode.draw_mask(3) == 0).sum()) == 3


def test_amco_dependence_mass_is_the_share_of_the_softmax_over_all_unimodal_logits():
    """§4 test 2: one sample, z_a = [2, 0], z_v = [0, 0]: audio's mass (e² + 1)/(e² + 3) = 0.8075 > 0.5."""
    mass = dependence_mass([torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])])
    e2 = math.exp(2)
    close(mass, torch.tensor([(e2 + 1) / (e2 + 3), 2 / (e2 + 3)]))
    assert float(mass[0]) == pytest.approx(0.8075, abs=1e-4)
    two = dependence_mass([torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])])
    close(two[0], torch.tensor(((e2 + 1) / (e2 + 3) + 0.5) / 2))  # the mean over the batch


@pytest.mark.parametrize("mask_on", ["logits", "features"])
def test_amco_fully_masked_dependent_modality_gets_exactly_zero_gradient(mask_on):
    """§4 test 3 (the defining line): with p_t = 1 and audio dependent, audio's projection gets exactly zero
    gradient (from both losses), and so does its classifier slice; video's does not."""
    model, b = build("amco", mask_on=mask_on), make_batch(n=8)
    model.start_epoch(4)
    model.counter = 0.3  # p_t = 1
    model.dependent.copy_(torch.tensor([True, False]))
    _, got = frozen_step(model, b)
    for n in ("proj.a.linear.weight", "proj.a.linear.bias"):
        assert torch.count_nonzero(got[n]) == 0, n
    assert torch.count_nonzero(got["cls.weight"][:, :D]) == 0
    assert torch.count_nonzero(got["proj.v.linear.weight"]) > 0 and torch.count_nonzero(got["cls.weight"][:, D:]) > 0


def amco_forward_by_hand(model, b, gate=None, mask_on="features"):
    """``z̃_m`` (``gate[m]`` multiplies h_m or z_m) and the loss CE(L*(Σ z̃), y) + Σ_m CE(z̃_m, y) over present rows."""
    p = params(model)
    h = {m: hidden(p, m, b.x[m]) * b.present[m][:, None] for m in "av"}
    gate = gate or {}
    if mask_on == "features":
        h = {m: h[m] * gate.get(m, 1.0) for m in h}
    z = slice_logits(p, SPEC2, h)
    if mask_on == "logits":
        z = {m: z[m] * gate.get(m, 1.0) for m in z}
    o = (z["a"] + z["v"]) @ p["star.weight"].T + p["star.bias"]
    loss = F.cross_entropy(o, b.y) + sum(F.cross_entropy(z[m][b.present[m]], b.y[b.present[m]]) for m in "av")
    return loss, p, z


def test_amco_loss_adds_each_modalitys_ce_and_the_flags_come_from_this_steps_slices():
    """Loss = CE(L*(Σ z̃), y) + Σ_m CE(z̃_m, y) (the unimodal CE over the samples that have m), gradients
    included; after the step the flags are mass_m > σ of this step's slices (audio made dominant: True)."""
    model, b = build("amco"), make_batch(n=8, absent={"v": [0, 3]})
    with torch.no_grad():
        model.cls.weight[:, :D] *= 8
    want_loss, p, z = amco_forward_by_hand(model, b)
    want = grads_of(want_loss, p)
    loss, got = frozen_step(model, b)
    close(loss, want_loss.detach())
    for n in want:
        close(got[n], want[n])
    mass = torch.cat([z["a"], z["v"]], 1).detach().softmax(1).reshape(8, 2, 3).sum(2).mean(0)
    assert float(mass[0]) > 0.5
    assert model.dependent.tolist() == (mass > 0.5).tolist() == [True, False]
    model.opts.sigma = 0.99
    model.train_step(b)
    assert model.dependent.tolist() == [False, False]


@pytest.mark.parametrize("mask_on", ["features", "logits"])
def test_amco_masks_only_the_dependent_modality_with_the_drawn_mask(mask_on):
    """With video flagged dependent and a known mask, z̃_v is video's masked slice (units or logits) and
    audio's is untouched; the flags reset to False at each epoch's start, with the counter."""
    model, b = build("amco", mask_on=mask_on), make_batch(n=8)
    model.start_epoch(2)
    k = D if mask_on == "features" else 3
    mask = (torch.arange(k) % 2).float()
    model.draw_mask = lambda size: mask if size == k else pytest.fail(f"mask of width {size}")
    model.dependent.copy_(torch.tensor([False, True]))
    want_loss, p, _ = amco_forward_by_hand(model, b, {"v": mask}, mask_on)
    want = grads_of(want_loss, p)
    loss, got = frozen_step(model, b)
    close(loss, want_loss.detach())
    for n in want:
        close(got[n], want[n])
    assert model.counter == pytest.approx(0.1) and model.steps == 1
    model.start_epoch(3)
    assert model.dependent.tolist() == [False, False] and model.counter == 0 and model.steps == 0


def test_amco_predicts_through_its_output_layer_and_logs_how_often_each_was_dependent(monkeypatch):
    """Inference: o = L*(concat logits) of the present modalities, no mask; ``amco_dependent_<m>`` is the
    share of the epoch's steps after which m was flagged."""
    model, b = build("amco"), make_batch(n=6)
    p = params(model)
    h = {m: hidden(p, m, b.x[m]) for m in "av"}
    with torch.no_grad():
        close(model.logits(b.only(["a"])), head(p, SPEC2, h, "a") @ p["star.weight"].T + p["star.bias"])
    flags = iter([torch.tensor([0.9, 0.1]), torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])])
    monkeypatch.setattr("heads.methods.amco.dependence_mass", lambda z: next(flags))
    model.train_step(b)
    assert model.end_epoch(None) == {"amco_dependent_a": 1.0, "amco_dependent_v": 0.0}
    for _ in range(3):
        model.train_step(b)  # mass exactly σ = 0.5 is not dependent
    assert model.end_epoch(None) == pytest.approx({"amco_dependent_a": 2 / 4, "amco_dependent_v": 1 / 4})
    model.start_epoch(2)
    assert model.end_epoch(None) == {"amco_dependent_a": 0.0, "amco_dependent_v": 0.0}
    assert "dependent" not in model.state_dict() and "star.weight" in model.state_dict()  # flags: training state only


# === ogm: the T-PAMI options =======================================================================
def plus_by_hand(model, b, spec, plus):
    """OGM+'s coefficients from the scores written out here: 1 where ρ_m > 1 (or m unscored), else ``plus``."""
    p = params(model)
    h = {m: hidden(p, m, b.x[m]) * b.present[m][:, None] for m in spec.modalities}
    z = slice_logits(p, spec, h)
    s = {m: float(z[m].detach().softmax(-1)[torch.arange(len(b)), b.y][b.present[m]].mean()) for m in spec.modalities
         if b.has(m)}
    rho = {m: s[m] / (sum(s.values()) - s[m]) * (len(s) - 1) for m in s}
    return {m: 1.0 if m not in rho or rho[m] > 1 else plus for m in spec.modalities}


def test_ogm_plus_boosts_the_weak_modality_instead_of_damping_the_strong_one():
    """``--plus 4`` (T-PAMI code's --use_OGM_plus): the dominant modality keeps k = 1, the other gets 4, and
    its projection weight gradient is exactly 4× the plain one (``ogm``, no noise); M = 3: every scored
    modality with ρ ≤ 1 gets 4, one absent from the batch keeps 1; off (0) it is eq. 10."""
    model, b = build("ogm", plus=4.0), make_batch(n=16)
    want_k = plus_by_hand(model, b, SPEC2, 4.0)
    assert sorted(want_k.values()) == [1.0, 4.0]
    assert model.coefficients(b) == want_k
    want_loss, want = concat_grads(model, b)
    _, got = frozen_step(model, b)
    for m in "av":
        close(got[f"proj.{m}.linear.weight"], want_k[m] * want[f"proj.{m}.linear.weight"])
    model.opts.plus = 0.0
    assert sorted(model.coefficients(b).values())[1] == 1.0 and min(model.coefficients(b).values()) < 1
    three = build("ogm-ge", SPEC3, plus=2.5)
    model.opts.plus = 1.0  # on, and a no-op: nobody is damped
    assert model.coefficients(b) == {"a": 1.0, "v": 1.0}
    seen = []
    for batch in (make_batch(SPEC3, n=16), make_batch(SPEC3, n=6, absent={"t": range(6)})):
        want_k = plus_by_hand(three, batch, SPEC3, 2.5)
        assert three.coefficients(batch) == pytest.approx(want_k)
        seen.append(sorted(want_k.values()))
    assert seen[0].count(2.5) >= 1 and seen[1] == [1.0, 1.0, 2.5]  # t absent: 1; of a and v one leads


# === all three: device-clean modulated steps, training runs ========================================
MODULATED = [("agm", 1, {}), ("agm", 1, {"decomposition": "subsets"}), ("opm", 1, {"warmup": 0}),
             ("amco", 2, {}), ("amco", 2, {"mask_on": "logits"}), ("ogm", 1, {"plus": 4.0})]


@pytest.mark.parametrize("method,epoch,options", MODULATED)
def test_modulated_steps_never_read_a_tensor_on_the_host(method, epoch, options, monkeypatch):
    """tests/test_device.py checks the first epoch with default options; here the modulating paths (opm
    after its warm-up, amco once masks are drawn) run twice with every host read made to fail."""
    model = build(method, **options)
    model.start_epoch(epoch)
    b = make_batch(n=8)
    model.train_step(b)  # one step outside the guard: amco's flags and agm's history are then set

    def refuse(*_a, **_k):
        raise AssertionError("a tensor was read on the host inside train_step")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    model.train_step(b)
    model.train_step(b)


@pytest.fixture(scope="module")
def builtin():
    root = Path(__file__).resolve().parent.parent / "data" / "builtin"
    return {name: load_head_data([builtin_cache(name, root)]) for name in ("av", "mv6")}


@pytest.mark.trains
@pytest.mark.parametrize("cache", ["av", "mv6"])
@pytest.mark.parametrize("method", ["agm", "opm", "amco"])
def test_each_method_trains_two_epochs(one_thread, builtin, method, cache):
    """Two epochs through the core with the method's own settings (opm with its warm-up off, so it drops):
    every subset is scored and the loss is finite."""
    options = {"warmup": 0} if method == "opm" else {}
    result = fit(builtin[cache], TrainConfig(method=method, epochs=2, hidden=16, seed=0, device="cpu", options=options),
                 progress=False)
    assert len(result.epochs) == 2 and all(math.isfinite(r["train_loss"]) for r in result.epochs)
    assert len(result.test.v) == 2 ** len(builtin[cache].spec.modalities)
    if cache == "av":
        assert result.test.acc > 100 / len(builtin[cache].spec.class_names)


def test_defaults_are_the_ones_the_sections_say_to_use():
    """The tool-default columns of §2, §4, §10 (training with its source; options with their defaults)."""
    def training(m):
        t = METHODS[m].training
        return (t.optimizer, t.lr, t.weight_decay, t.schedule, t.batch_size)

    assert training("agm") == ("sgd", 1e-3, 1e-4, "step:70:0.1", 64) and "AGM official" in METHODS["agm"].training.source
    assert training("opm") == ("adamw", 5e-5, 0.01, "step:40:0.1", 32) and "OPM official" in METHODS["opm"].training.source
    assert training("amco") == training("concat") and "no official code" in METHODS["amco"].training.source
    defaults = {m: vars(METHODS[m].Options()) for m in ("agm", "opm", "amco")}
    assert defaults == {
        "agm": {"alpha": 1.0, "clip_cap": 10.0, "grad_clip": 1.0, "modulation_start": 1, "modulation_end": 0,
                "decomposition": "slices"},
        "opm": {"q_base": 0.5, "lam": 0.5, "p_exe": 0.7, "warmup": 6},
        "amco": {"sigma": 0.5, "eps": 0.3, "mask_on": "features"}}
    assert METHODS["ogm"].Options().plus == 0.0 and METHODS["ogm-ge"].Options().plus == 0.0
    assert not any(METHODS[m].stackable for m in ("agm", "opm", "amco"))
