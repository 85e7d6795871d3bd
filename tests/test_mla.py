"""MLA: the RLS head-gradient projection, entropy-weighted fusion, missing modalities, end to end."""
import dataclasses
import math

import pytest
import torch

from heads.train.config import build_model, TrainConfig
from heads.train.trainer import fit
from heads.blocks.data import Batch, DataSpec
from heads.blocks.loading import load_head_data
from heads.methods.mla import entropy_weights

SPEC = DataSpec(modalities=["a", "v"], dims={"a": 5, "v": 3}, tokens={"a": 1, "v": 1}, num_classes=4,
                class_names=list("wxyz"), majority_class=0)
HIDDEN = 8


def random_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, SPEC.dims[m], generator=g) for m in SPEC.modalities}
    return Batch(x, {m: t[:, None] for m, t in x.items()}, {m: torch.ones(n, dtype=torch.bool) for m in x},
                 torch.randint(0, SPEC.num_classes, (n,), generator=g))


def mla(lr=0.5, **options):
    """An MLA head with plain SGD (no momentum, no weight decay): the update is exactly −lr × the gradient."""
    torch.manual_seed(0)
    model = build_model(TrainConfig(method="mla", hidden=HIDDEN, options=options), SPEC)
    model.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return model


def record_head_after_each_step(model):
    """Wrap ``model.step`` to keep the head's (weight, bias) after every optimizer step."""
    seen, plain_step = [], model.step

    def step(loss, before_step=None):
        plain_step(loss, before_step)
        seen.append((model.head.weight.detach().clone(), model.head.bias.detach().clone()))

    model.step = step
    return seen


def mean_feature(model, m, batch, rows=None):
    x = batch.x[m] if rows is None else batch.x[m][rows]
    return torch.relu(model.proj[m].linear(x)).mean(0).detach()


def test_head_update_is_orthogonal_to_the_previous_modalitys_mean_feature():
    batch = random_batch()
    model = mla(alpha=1e-9)  # α → 0: the projection is exact
    h_a = mean_feature(model, "a", batch)  # iteration 0 (modality a) uses the initial projection
    heads = record_head_after_each_step(model)
    model.train_step(batch)
    assert len(heads) == 2  # one step per modality
    delta = heads[1][0] - heads[0][0]  # iteration 1 (modality v), gradient right-multiplied by P
    assert delta.norm() > 1e-3
    assert (delta @ h_a).norm() / (delta.norm() * h_a.norm()) < 1e-5
    # Without the modification the same step is far from orthogonal.
    plain = mla(alpha=1e-9, modify_head=False)
    heads = record_head_after_each_step(plain)
    plain.train_step(batch)
    delta = heads[1][0] - heads[0][0]
    assert (delta @ h_a).norm() / (delta.norm() * h_a.norm()) > 1e-2


def test_head_step_is_the_gradient_times_P_by_hand_and_the_bias_is_untouched():
    batch, alpha, lr = random_batch(), 0.1, 0.5
    model = mla(lr=lr, alpha=alpha)
    h_a = mean_feature(model, "a", batch).double()
    h_v = torch.relu(model.proj["v"].linear(batch.x["v"])).detach()  # P_v is not touched by iteration 0
    heads = record_head_after_each_step(model)
    model.train_step(batch)
    (w0, b0), (w1, b1) = heads
    # Iteration 1 by hand: the plain gradient of modality v's loss at the head left by iteration 0 …
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    torch.nn.functional.cross_entropy(h_v @ w.T + b, batch.y).backward()
    # … times P_1 = I − h hᵀ / (α + hᵀh) (eq. 5 from P_0 = I), on the weight only.
    p1 = torch.eye(HIDDEN, dtype=torch.float64) - torch.outer(h_a, h_a) / (alpha + h_a @ h_a)
    torch.testing.assert_close(w1 - w0, -lr * (w.grad.double() @ p1).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b1 - b0, -lr * b.grad, rtol=1e-4, atol=1e-6)
    # The residual along h_a is the RLS factor α / (α + |h_a|²) of the plain step's, not zero.
    factor = alpha / (alpha + float(h_a @ h_a))
    torch.testing.assert_close((w1 - w0).double() @ h_a, factor * (-lr * w.grad.double() @ h_a), rtol=1e-3, atol=1e-7)


def test_rls_update_options_by_hand():
    model = mla()
    model.P = torch.eye(3, dtype=torch.float64)  # a 3-d P for hand numbers
    h = torch.tensor([1.0, 2.0, 0.0])
    model.opts = dataclasses.replace(model.opts, alpha=0.5)
    model.update_P(h)  # q = h / (0.5 + 5), P = I − h hᵀ / 5.5
    expect = torch.tensor([[1 - 1 / 5.5, -2 / 5.5, 0], [-2 / 5.5, 1 - 4 / 5.5, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(model.P, expect)
    # Frobenius normalisation (public code): same direction, unit norm.
    model.P = torch.eye(3, dtype=torch.float64)
    model.opts = dataclasses.replace(model.opts, frobenius=True)
    model.update_P(h)
    torch.testing.assert_close(model.P, expect / expect.norm())
    # The public code's schedule: α · 0.1^(b / n_b), i.e. 0.1 → 0.01 over an epoch.
    model.opts = dataclasses.replace(model.opts, alpha=0.1, alpha_schedule="code")
    model.batches_per_epoch, model._batch_index = 4, 2
    assert model.current_alpha() == pytest.approx(0.1 * 10 ** -0.5)


@pytest.mark.parametrize("mode", ["add", "before"])
def test_gradient_options_add_and_update_before(mode):
    batch, lr, alpha = random_batch(), 0.5, 0.1
    options = {"gradient": "add"} if mode == "add" else {"p_update": "before"}
    model = mla(lr=lr, alpha=alpha, **options)
    h_a = mean_feature(model, "a", batch).double()
    h_v = torch.relu(model.proj["v"].linear(batch.x["v"])).detach()
    heads = record_head_after_each_step(model)
    model.train_step(batch)
    (w0, b0), (w1, _) = heads
    w = w0.clone().requires_grad_()
    torch.nn.functional.cross_entropy(h_v @ w.T + b0, batch.y).backward()
    g = w.grad.double()
    p1 = torch.eye(HIDDEN, dtype=torch.float64) - torch.outer(h_a, h_a) / (alpha + h_a @ h_a)
    if mode == "add":  # BalanceMM: G + G P
        expect = g + g @ p1
    else:  # public code: P updated with the current batch (h̄_v) before it is applied
        hv = h_v.mean(0).double()
        p2 = p1 - torch.outer(p1 @ hv / (alpha + hv @ p1 @ hv), hv @ p1)
        expect = g @ p2
    torch.testing.assert_close(w1 - w0, (-lr * expect).float(), rtol=1e-4, atol=1e-6)
    # In both modes the first step (iteration 0) is the plain gradient, even though P may differ from I.
    assert int(model.steps) == 2


def test_fusion_weights_are_eqs_7_8_by_hand():
    log = math.log
    logits = {  # three samples, three classes
        "a": torch.tensor([[log(0.5), log(0.25), log(0.25)], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0]]),
        "v": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1e4], [0.0, 2.0, 0.0]]),
    }
    present = {"a": torch.tensor([True, True, True]), "v": torch.tensor([True, True, False])}
    lam = entropy_weights(logits, present)
    # Sample 0: e_a = 1.5 ln 2, e_v = ln 3 → λ_a = e^(e_v − e_a) / (e^(e_v − e_a) + 1) = 3 / (3 + 2√2).
    # Sample 1: e_a = ln 3, e_v = ln 2 (p_v = ½, ½, 0; finite despite the −1e4 logit) → λ_v = 1.5 / 2.5.
    # Sample 2: v absent → all weight on a.
    expect = torch.tensor([[3 / (3 + 2 * math.sqrt(2)), 0.4, 1.0], [2 * math.sqrt(2) / (3 + 2 * math.sqrt(2)), 0.6, 0.0]])
    torch.testing.assert_close(lam, expect)


def test_fused_logits_are_per_sample_and_do_not_depend_on_the_batch():
    model = mla()
    batch = random_batch(n=8)
    logits = model.unimodal_logits(batch)
    lam = entropy_weights(logits, batch.present)
    torch.testing.assert_close(model.logits(batch), lam[0, :, None] * logits["a"] + lam[1, :, None] * logits["v"])
    # The first three samples scored alone, or beside other samples, give the same scores.
    other = random_batch(n=8, seed=5)
    mixed = Batch({m: torch.cat([batch.x[m][:3], other.x[m][3:]]) for m in batch.x},
                  {m: torch.cat([batch.tokens[m][:3], other.tokens[m][3:]]) for m in batch.x},
                  {m: torch.ones(8, dtype=torch.bool) for m in batch.x}, batch.y)
    alone = Batch({m: t[:3] for m, t in batch.x.items()}, {m: t[:3] for m, t in batch.tokens.items()},
                  {m: p[:3] for m, p in batch.present.items()}, batch.y[:3])
    torch.testing.assert_close(model.logits(mixed)[:3], model.logits(batch)[:3])
    torch.testing.assert_close(model.logits(alone), model.logits(batch)[:3])
    # One present modality: exactly that modality's own predictor f_m (its unimodal accuracy path).
    torch.testing.assert_close(model.logits(batch.only(["v"])), logits["v"])


def test_a_missing_modality_is_skipped_in_its_own_iteration():
    batch = random_batch()
    batch.present["a"][:6] = False
    batch.x["a"][:6] = 0
    model = mla(alpha=0.1)
    before = model.proj["a"].linear.weight.detach().clone()
    h_a = mean_feature(model, "a", batch, rows=batch.present["a"]).double()
    h_v = mean_feature(model, "v", batch).double()  # P_v is not touched by a's iteration
    model.train_step(batch)
    update = model.proj["a"].linear.weight.detach() - before
    assert update.norm() > 0
    # Other labels for the samples without modality a leave a's update unchanged …
    relabelled = Batch(batch.x, batch.tokens, batch.present, batch.y.clone())
    relabelled.y[:6] = (relabelled.y[:6] + 1) % SPEC.num_classes
    again = mla(alpha=0.1)
    again.train_step(relabelled)
    torch.testing.assert_close(again.proj["a"].linear.weight.detach() - before, update)
    # … and P was updated with the mean over the present samples only (then with v's mean).
    p1 = torch.eye(HIDDEN, dtype=torch.float64) - torch.outer(h_a, h_a) / (0.1 + h_a @ h_a)
    p2 = p1 - torch.outer(p1 @ h_v / (0.1 + h_v @ p1 @ h_v), h_v @ p1)
    torch.testing.assert_close(model.P, p2)


def test_mla_learns_and_is_deterministic(small_av):
    data = load_head_data([small_av])
    cfg = TrainConfig(method="mla", epochs=3, batch_size=64, seed=3)
    a, b = fit(data, cfg, progress=False), fit(data, cfg, progress=False)
    assert a.test.acc == b.test.acc and a.epochs == b.epochs
    assert a.test.acc > 100 / len(data.spec.class_names) + 20  # well above chance
    assert {"mla_grad_ratio", "mla_grad_cos"} <= set(a.epochs[-1])
    c = fit(data, dataclasses.replace(cfg, seed=4), progress=False)
    assert c.epochs != a.epochs


def test_a_sample_without_any_modality_gets_zero_weights_not_nan():
    # Sample 0 has only a (weight 1); sample 1 has nothing: all weights 0, not the NaN of a softmax over −inf.
    logits = {"a": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "v": torch.tensor([[0.0, 0.0], [1.0, 1.0]])}
    present = {"a": torch.tensor([True, False]), "v": torch.tensor([False, False])}
    assert torch.equal(entropy_weights(logits, present), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_epoch_hooks_count_batches_and_average_the_gradient_statistics():
    """``end_epoch``: n_b (the code α schedule's batches per epoch) is counted in epoch 1 only, and
    ``mla_grad_ratio`` / ``mla_grad_cos`` are the means of ‖G′‖/‖G‖ and cos(G′, G) over the epoch's
    modified steps (recomputed here from the gradient before and after); ``start_epoch`` resets both."""
    model = mla(alpha_schedule="code")
    seen, modify = [], model.modify_head_gradient

    def record():
        before = model.head.weight.grad.clone()
        modify()
        after = model.head.weight.grad
        if int(model.steps) > 0:  # the very first step is left as it is
            seen.append((float(after.norm() / before.norm()), float(torch.dot(after.flatten(), before.flatten())
                                                                       / (after.norm() * before.norm()))))

    model.modify_head_gradient = record
    model.start_epoch(1)
    for seed in range(3):
        model.train_step(random_batch(seed=seed))
    assert model.current_alpha() == 0.1  # epoch 1: n_b not known yet, α stays at its base value
    logged = model.end_epoch(None)
    assert model.batches_per_epoch == 3 and len(seen) == 5  # 3 batches × 2 modalities, the first unmodified
    assert logged["mla_grad_ratio"] == pytest.approx(sum(r for r, _ in seen) / 5, rel=1e-5)
    assert logged["mla_grad_cos"] == pytest.approx(sum(c for _, c in seen) / 5, rel=1e-5)
    assert 0 < logged["mla_grad_ratio"] < 1 and 0 < logged["mla_grad_cos"] < 1
    seen.clear()
    model.start_epoch(2)
    assert model.current_alpha() == 0.1  # batch 0 of the epoch: 0.1 · 0.1^(0/3)
    model.train_step(random_batch(seed=7))
    assert model.current_alpha() == pytest.approx(0.1 * 0.1 ** (1 / 3))
    logged = model.end_epoch(None)
    assert model.batches_per_epoch == 3 and len(seen) == 2
    assert logged["mla_grad_ratio"] == pytest.approx(sum(r for r, _ in seen) / 2, rel=1e-5)
    assert logged["mla_grad_cos"] == pytest.approx(sum(c for _, c in seen) / 2, rel=1e-5)
    # An epoch of one modified step (nobody has a): the mean is that step's value.
    seen.clear()
    model.start_epoch(3)
    only_v = random_batch(seed=8)
    only_v.present["a"][:] = False
    model.train_step(only_v)
    logged = model.end_epoch(None)
    assert len(seen) == 1 and logged["mla_grad_ratio"] == pytest.approx(seen[0][0], rel=1e-5)


def test_train_step_returns_the_mean_of_its_modality_losses():
    # Iteration 0 (a) at the initial head, iteration 1 (v) at the head left by iteration 0: the logged
    # loss is the mean of the two cross-entropies, one per optimizer step.
    batch = random_batch()
    model = mla()
    with torch.no_grad():
        ce_a = torch.nn.functional.cross_entropy(model.head(torch.relu(model.proj["a"].linear(batch.x["a"]))), batch.y)
        h_v = torch.relu(model.proj["v"].linear(batch.x["v"]))
    heads = record_head_after_each_step(model)
    loss = model.train_step(batch)
    w0, b0 = heads[0]
    ce_v = torch.nn.functional.cross_entropy(h_v @ w0.T + b0, batch.y)
    torch.testing.assert_close(loss, (ce_a + ce_v) / 2)


def test_a_modality_absent_from_the_whole_batch_gets_no_iteration():
    # Nobody has a: one step (v's) at the initial head, and the logged loss is that step's loss alone.
    batch = random_batch()
    batch.present["a"][:] = False
    batch.x["a"][:] = 0
    model = mla()
    with torch.no_grad():
        ce_v = torch.nn.functional.cross_entropy(model.head(torch.relu(model.proj["v"].linear(batch.x["v"]))), batch.y)
    heads = record_head_after_each_step(model)
    torch.testing.assert_close(model.train_step(batch), ce_v)
    assert len(heads) == 1 and int(model.steps) == 1


def test_constant_alpha_ignores_the_position_in_the_epoch():
    model = mla(alpha=0.3)  # the paper's default schedule: α fixed, even once n_b is known
    model.batches_per_epoch, model._batch_index = 4, 2
    assert model.current_alpha() == 0.3
