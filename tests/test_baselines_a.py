"""The issue-14 baselines ``ogm``, ``film``, ``bigated`` and ``qmf``: each mechanism pinned by a hand
computation from the model's own weights (never by calling the code under test a second time), and a
short training run of each on the built-in ``av``/``avt`` caches and on a generated 4-modality cache."""
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

SPEC2 = DataSpec(["a", "v"], {"a": 6, "v": 4}, {"a": 1, "v": 1}, 3, ["x", "y", "z"], 0)
SPEC3 = DataSpec(["a", "v", "t"], {"a": 6, "v": 4, "t": 5}, dict.fromkeys("avt", 1), 3, ["x", "y", "z"], 0)
D = 8  # hidden width of the pinned models


def build(method, spec=SPEC2, **options):
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, hidden=D, optimizer="sgd", lr=1.0, weight_decay=0.0, options=options)
    return build_model(cfg, spec)


def make_batch(spec=SPEC2, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, spec.dims[m], generator=g) for m in spec.modalities}
    return Batch(x, {m: t[:, None] for m, t in x.items()}, {m: torch.ones(n, dtype=torch.bool) for m in x},
                 torch.randint(0, spec.num_classes, (n,), generator=g))


def proj(model, m, x):
    """``P_m(x) = ReLU(W_m x + b_m)`` from the model's weights."""
    with torch.no_grad():
        return torch.relu(x @ model.proj[m].linear.weight.T + model.proj[m].linear.bias)


def linear(layer, x):
    with torch.no_grad():
        return x @ layer.weight.T + layer.bias


# --- ogm: the modulation alone --------------------------------------------------------------------
def test_ogm_projection_gradient_is_exactly_k_times_the_plain_gradient_inside_the_window():
    """``ogm`` (no options given): inside the modulation window each projection's weight gradient is
    ``k_m · g`` with k from eq. 10 computed here by hand (``1 − tanh(α·ρ)`` for the dominant modality,
    1 for the other) and **no noise**; outside the window it is g. SGD lr 1, no momentum, no decay."""
    model, b = build("ogm"), make_batch(n=16)
    with torch.no_grad():
        model.cls.weight[:, :D] *= 10  # the modalities' scores clearly apart
    h = {m: proj(model, m, b.x[m]) for m in "av"}
    score = {m: (h[m] @ model.cls.weight[:, i * D:(i + 1) * D].detach().T + model.cls.bias.detach() / 2)
             .softmax(-1)[torch.arange(16), b.y].sum() for i, m in enumerate("av")}
    rho = {"a": float(score["a"] / score["v"]), "v": float(score["v"] / score["a"])}
    k = {m: 1 - math.tanh(0.8 * rho[m]) if rho[m] > 1 else 1.0 for m in "av"}
    assert min(k.values()) < 0.9  # one modality dominant, its gradient visibly scaled
    plain = build("concat")
    plain.load_state_dict(model.state_dict(), strict=False)
    F.cross_entropy(plain.logits(b), b.y).backward()
    state = {key: t.clone() for key, t in model.state_dict().items()}
    for epoch, inside in ((1, True), (52, False)):
        model.load_state_dict(state)
        model.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model.epoch = epoch
        before = {m: model.proj[m].linear.weight.detach().clone() for m in "av"}
        model.train_step(b)
        for m in "av":
            want = plain.proj[m].linear.weight.grad * (k[m] if inside else 1.0)
            torch.testing.assert_close(before[m] - model.proj[m].linear.weight.detach(), want)


@pytest.mark.parametrize("noise_std", ["unscaled", "scaled"])
def test_ogm_ge_noise_std_is_the_gradients_before_scaling_by_default(noise_std, monkeypatch):
    """GE: ``g ← g·k + N(0, σ²)``. Default (the authors' current code, METHODS.md's correction): σ = std(g)
    before scaling; ``--noise-std scaled`` (their earlier commit 65b81b1): σ = std(g·k). The draw is
    replaced by ones, so the step is exactly ``g·k + σ + 1e-8``; k fixed at (0.5, 1)."""
    model, b = build("ogm-ge", **({} if noise_std == "unscaled" else {"noise_std": noise_std})), make_batch(n=16)
    assert model.opts.noise_std == noise_std
    plain = build("concat")
    plain.load_state_dict(model.state_dict(), strict=False)
    F.cross_entropy(plain.logits(b), b.y).backward()
    monkeypatch.setattr(model, "coefficient_tensor", lambda batch: torch.tensor([0.5, 1.0]))
    monkeypatch.setattr(torch, "randn_like", torch.ones_like)
    model.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.epoch = 1
    before = {m: model.proj[m].linear.weight.detach().clone() for m in "av"}
    model.train_step(b)
    for m, k in (("a", 0.5), ("v", 1.0)):
        g = plain.proj[m].linear.weight.grad
        sigma = float(g.std()) if noise_std == "unscaled" else float((g * k).std())
        torch.testing.assert_close(before[m] - model.proj[m].linear.weight.detach(), g * k + sigma + 1e-8)
    assert float(plain.proj["a"].linear.weight.grad.std()) > 1e-4  # the two σ differ visibly for a


# --- film ---------------------------------------------------------------------------------------
def film_by_hand(model, h_cond, h_mod, m):
    out = linear(model.film[m], h_cond)
    gamma, beta = out[:, :D], out[:, D:]
    return gamma * h_mod + beta


@pytest.mark.parametrize("scores, mean_k, sum_k", [
    # ρ (mean) = (0.5, 2, 0.86): v modulated. ρ (sum) = (0.25, 1, 0.43): nobody above 1, so MLA's
    # fallback modulates the first modality with 1 − tanh(α · 0.25).
    ((0.2, 0.5, 0.3), (1, 1 - math.tanh(0.8 * 2), 1), (1 - math.tanh(0.8 * 0.25), 1, 1)),
    # ρ_v = 0.6 / 0.2 = 3 (mean) or 0.6 / 0.4 = 1.5 (sum): v modulated under both, by different k.
    ((0.1, 0.6, 0.3), (1, 1 - math.tanh(0.8 * 3), 1), (1, 1 - math.tanh(0.8 * 1.5), 1)),
])
def test_ogm_ge_ratio_mean_or_sum_of_the_other_scores_for_three_modalities(scores, mean_k, sum_k, monkeypatch):
    """``--ratio mean`` (default, choice): ρ_m = s_m / mean of the others; ``--ratio sum`` (MLA's code):
    ρ_m = s_m / Σ others, and when no ρ exceeds 1 the first modality (MLA's audio) is modulated anyway."""
    for rule, want in (("mean", mean_k), ("sum", sum_k)):
        model = build("ogm-ge", SPEC3, **({} if rule == "mean" else {"ratio": rule}))
        assert model.opts.ratio == rule
        monkeypatch.setattr(model, "score_tensor", lambda batch: torch.tensor(scores))
        assert model.coefficient_tensor(None).tolist() == pytest.approx(list(want), rel=1e-5, abs=1e-6), rule


def test_ogm_ge_ratio_sum_is_the_paper_rule_for_two_modalities(monkeypatch):
    for rule in ("mean", "sum"):
        model = build("ogm-ge", ratio=rule)
        monkeypatch.setattr(model, "score_tensor", lambda batch: torch.tensor([0.2, 0.5]))
        assert model.coefficient_tensor(None).tolist() == pytest.approx([1, 1 - math.tanh(0.8 * 2.5)], rel=1e-6)


def test_film_first_modality_conditions_the_other_and_missing_ones_follow_the_network():
    """``γ, β = split(W_f h_a + b_f)`` (γ first), ``logits = W_o(γ ⊙ h_v + β) + b_o`` (audio conditions
    visual, as the official x_film=True). Visual alone: γ = b_γ, β = b_β. Audio alone: W_o β(h_a) + b_o."""
    model, b = build("film"), make_batch()
    h = {m: proj(model, m, b.x[m]) for m in "av"}
    want = linear(model.cls, film_by_hand(model, h["a"], h["v"], "v"))
    torch.testing.assert_close(model.logits(b).detach(), want)
    zeros = torch.zeros_like(h["a"])
    torch.testing.assert_close(model.logits(b.only(["v"])).detach(), linear(model.cls, film_by_hand(model, zeros, h["v"], "v")))
    beta_only = linear(model.film["v"], h["a"])[:, D:]
    torch.testing.assert_close(model.logits(b.only(["a"])).detach(), linear(model.cls, beta_only))


def test_film_condition_option_and_three_modalities_concatenate_each_modulated_feature():
    model, b = build("film", SPEC3, condition="t"), make_batch(SPEC3)
    assert model.modulated == ["a", "v"] and set(model.film) == {"a", "v"}
    h = {m: proj(model, m, b.x[m]) for m in "avt"}
    fused = torch.cat([film_by_hand(model, h["t"], h["a"], "a"), film_by_hand(model, h["t"], h["v"], "v")], 1)
    torch.testing.assert_close(model.logits(b).detach(), linear(model.cls, fused))
    with pytest.raises(ValueError, match="film --condition 'x': this data has no such modality; choose one of a, v, t"):
        build("film", SPEC3, condition="x")
    with pytest.raises(ValueError, match="film fuses two or more modalities; this data has 1"):
        build("film", DataSpec(["a"], {"a": 6}, {"a": 1}, 3, ["x", "y", "z"], 0))


# --- bigated ------------------------------------------------------------------------------------
def test_bigated_audio_gates_visual_and_missing_ones_follow_the_network():
    """``u_m = W_m h_m + b_m``; ``logits = W_o(σ(u_a) ⊙ u_v) + b_o`` (the official GatedFusion, x_gate=True).
    Visual alone: the gate is σ(b_a). Audio alone: σ(u_a) ⊙ b_v."""
    model, b = build("bigated"), make_batch()
    h = {m: proj(model, m, b.x[m]) for m in "av"}
    u = {m: linear(model.fc[m], h[m]) for m in "av"}
    torch.testing.assert_close(model.logits(b).detach(), linear(model.cls, torch.sigmoid(u["a"]) * u["v"]))
    gate_off = torch.sigmoid(model.fc["a"].bias.detach()) * u["v"]
    torch.testing.assert_close(model.logits(b.only(["v"])).detach(), linear(model.cls, gate_off))
    torch.testing.assert_close(model.logits(b.only(["a"])).detach(),
                               linear(model.cls, torch.sigmoid(u["a"]) * model.fc["v"].bias.detach()))


def test_bigated_gate_option_and_bidirectional_pairs():
    model, b = build("bigated", SPEC3, gate="v"), make_batch(SPEC3)
    h = {m: proj(model, m, b.x[m]) for m in "avt"}
    u = {m: linear(model.fc[m], h[m]) for m in "avt"}
    gated = torch.cat([torch.sigmoid(u["v"]) * u["a"], torch.sigmoid(u["v"]) * u["t"]], 1)
    torch.testing.assert_close(model.logits(b).detach(), linear(model.cls, gated))
    both = build("bigated", SPEC2, bidirectional=True)
    b2 = make_batch()
    u2 = {m: linear(both.fc[m], proj(both, m, b2.x[m])) for m in "av"}
    gated2 = torch.cat([torch.sigmoid(u2["a"]) * u2["v"], torch.sigmoid(u2["v"]) * u2["a"]], 1)
    torch.testing.assert_close(both.logits(b2).detach(), linear(both.cls, gated2))
    assert len(build("bigated", SPEC3, bidirectional=True).pairs) == 6


# --- qmf ----------------------------------------------------------------------------------------
def test_qmf_energy_weights_by_hand():
    """``w_m = 0.1 · T · log Σ_c exp(f_mc / T)`` (= −E/10), zero where m is absent."""
    model = build("qmf")
    f = {"a": torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]), "v": torch.tensor([[1.0, 1.0, 1.0], [0.0, 3.0, 0.0]])}
    present = {"a": torch.tensor([True, True]), "v": torch.tensor([True, False])}
    want = torch.tensor([[0.1 * math.log(3), 0.1 * math.log(math.exp(2) + 1 + math.exp(-1))],
                         [0.1 * (1 + math.log(3)), 0.0]])
    torch.testing.assert_close(model.confidence(f, present), want)
    hot = build("qmf", temperature=2.0)
    want_t = 0.1 * 2 * math.log(math.exp(1) + 1 + math.exp(-0.5))
    assert float(hot.confidence(f, present)[0, 1]) == pytest.approx(want_t, rel=1e-6)


def test_qmf_prediction_is_the_confidence_weighted_sum_and_an_absent_modality_has_no_vote():
    model, b = build("qmf"), make_batch()
    f = {m: linear(model.cls[m], proj(model, m, b.x[m])) for m in "av"}
    w = {m: 0.1 * torch.logsumexp(f[m], -1, keepdim=True) for m in "av"}
    torch.testing.assert_close(model.logits(b).detach(), w["a"] * f["a"] + w["v"] * f["v"])
    torch.testing.assert_close(model.logits(b.only(["v"])).detach(), w["v"] * f["v"])


def rank_by_hand(conf, own, present, lo, hi):
    """The official ``rank_loss`` (MarginRankingLoss(margin 0), target −sign) written out over cyclic
    neighbours i → i + 1: ``own`` is the batch's loss histories, ``lo``/``hi`` the whole training
    set's smallest and largest history (the code's ``History.correctness_normalize``)."""
    terms = []
    for i in range(len(conf)):
        j = (i + 1) % len(conf)
        if not (present[i] and present[j]):
            continue
        t = (own[i] > own[j]) - (own[i] < own[j])
        margin = abs(own[i] - own[j]) / (hi - lo)
        x2 = conf[j] + margin / (t if t else 1)
        terms.append(max(0.0, t * (conf[i] - x2)))  # max(0, −y·(x1 − x2)) with y = −t
    return sum(terms) / len(terms)


def test_qmf_ranking_term_by_hand():
    """Harder samples (larger history) may not be more confident than easier ones by more than the gap.
    conf (3, .5, 2), history (1, .2, .6) of a 3-sample training set: span .8; pairs (0,1): 2.5 − 1 = 1.5;
    (1,2): 1.5 − .5 = 1; (2,0): 1 − .5 = .5."""
    model = build("qmf")
    conf, history = torch.tensor([3.0, 0.5, 2.0]), torch.tensor([1.0, 0.2, 0.6])
    everyone = torch.ones(3, dtype=torch.bool)
    assert rank_by_hand(conf.tolist(), history.tolist(), [True] * 3, 0.2, 1.0) == pytest.approx(1.0)
    assert float(model.rank_loss(conf, torch.arange(3), everyone, history)) == pytest.approx(1.0)
    # The batch is rows (0, 1, 2, 3, 4) of a six-sample training set whose history spans 0 … 10 (row 5,
    # not in the batch, holds the maximum): span 10. Rows 3 and 4 lack the modality: no pair with them.
    # (0,1): t = 1, 2.5 − .08 = 2.42; (1,2): t = −1, 1.5 − .04 = 1.46.
    history6 = torch.tensor([1.0, 0.2, 0.6, 5.0, 0.0, 10.0])
    conf5, present5 = torch.tensor([3.0, 0.5, 2.0, 7.0, 9.0]), torch.tensor([True, True, True, False, False])
    assert float(model.rank_loss(conf5, torch.arange(5), present5, history6)) == pytest.approx((2.42 + 1.46) / 2)


def test_qmf_loss_is_fused_ce_plus_unimodal_ce_plus_lambda_ranking():
    """``CE(Σ w f) + Σ_m CE(f_m) + λ Σ_m L_rank(w_m, ℓ_m)``, λ = 0.1, v absent on two samples; the batch is
    rows 9, 2, … of a 12-sample training set whose history already holds earlier visits."""
    model, b = build("qmf"), make_batch(n=8)
    with torch.no_grad():  # confidences far enough apart that the ranking term is not zero
        for m in "av":
            model.cls[m].weight *= 20
    b.present["v"][2:4] = False
    b.x["v"][2:4] = 0
    b.index = torch.tensor([9, 2, 5, 0, 11, 7, 3, 6])
    model.history = torch.rand(2, 12, generator=torch.Generator().manual_seed(1))
    before = model.history.clone()
    f = {m: linear(model.cls[m], proj(model, m, b.x[m])) for m in "av"}
    w = {m: 0.1 * torch.logsumexp(f[m], -1) * b.present[m] for m in "av"}
    fused = w["a"][:, None] * f["a"] + w["v"][:, None] * f["v"]
    want, rank = F.cross_entropy(fused, b.y).item(), 0.0
    for i, m in enumerate("av"):
        rows = b.present[m]
        per = F.cross_entropy(f[m], b.y, reduction="none")
        want += per[rows].mean().item()
        after = before[i].clone()
        after[b.index] += per * rows  # the code adds the batch's losses before it ranks
        rank += rank_by_hand(w[m].tolist(), after[b.index].tolist(), rows.tolist(), float(after.min()),
                             float(after.max()))
    assert rank > 0.05  # the term this test pins is not vanishing
    assert float(model.loss(b).detach()) == pytest.approx(want + 0.1 * rank, rel=1e-5)


# --- training runs ------------------------------------------------------------------------------
METHODS_A = ["ogm", "film", "bigated", "qmf"]


def four_modality_cache(path: Path) -> Path:
    """A small generated cache with four modalities of different strength (written by the cache writer)."""
    from cache.writer import write_arrays

    rng = np.random.default_rng(0)
    n, classes = 240, 3
    y = rng.integers(0, classes, n)
    features = {}
    for k, (m, strength) in enumerate({"audio": 2.0, "visual": 0.5, "text": 1.0, "depth": 0.2}.items()):
        protos = rng.standard_normal((classes, 12))
        features[m] = (strength * protos[y] + rng.standard_normal((n, 12))).astype(np.float32)
    splits = ["train"] * 160 + ["val"] * 40 + ["test"] * 40
    return write_arrays(path, dataset="synthetic-4m", backbone="synthetic", features=features, labels=y,
                        splits=splits, class_names=["p", "q", "r"])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from cache.synthetic import builtin_cache

    root = Path(__file__).resolve().parent.parent / "data" / "builtin"
    return {"av": load_head_data([builtin_cache("av-saturated", root)]), "avt": load_head_data([builtin_cache("avt-saturated", root)]),
            "4m": load_head_data([four_modality_cache(tmp_path_factory.mktemp("c4") / "four")])}


@pytest.mark.trains
@pytest.mark.parametrize("cache", ["av", "avt", "4m"])
@pytest.mark.parametrize("method", METHODS_A)
def test_each_method_trains_two_epochs(one_thread, caches, method, cache):
    """Two epochs through the core with the method's paper settings (hidden 16 to stay fast): every
    subset gets a finite accuracy and the full set beats chance on the built-in data."""
    data = caches[cache]
    result = fit(data, TrainConfig(method=method, epochs=2, hidden=16, seed=0), progress=False)
    assert len(result.epochs) == 2 and all(math.isfinite(r["train_loss"]) for r in result.epochs)
    assert len(result.test.v) == 2 ** len(data.spec.modalities)  # every subset, ∅ included
    assert all(math.isfinite(a) for a in result.test.v.values())
    if cache != "4m":
        assert result.test.acc > 100 / len(data.spec.class_names)


def test_film_and_bigated_say_which_modality_conditions_or_gates():
    """The tables' "trained with" column names the role (default: the cache's first modality)."""
    assert build("film").trained_with() == "condition a" and build("film", condition="v").trained_with() == "condition v"
    assert build("bigated").trained_with() == "gate a" and build("bigated", gate="v").trained_with() == "gate v"
    assert build("bigated", bidirectional=True).trained_with() == "gate every pair"
    assert build("concat").trained_with() == ""
