"""The training core and the baselines: inference paths, selection on validation, determinism, masks."""
import dataclasses

import pytest
import torch

from heads.errors import OptionError
from heads.train.config import build_model, TrainConfig
from heads.train.options import parse_option_args
from heads.train.rundir import load_run
from heads.train.trainer import fit
from heads.train.evaluation import evaluate
from heads.blocks.data import Batch, DataSpec
from heads.blocks.loading import load_head_data

SPEC = DataSpec(modalities=["a", "v"], dims={"a": 5, "v": 3}, tokens={"a": 1, "v": 1}, num_classes=4,
                class_names=list("wxyz"), majority_class=0)


def random_batch(n=6, seed=0, spec=SPEC):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, spec.dims[m], generator=g) for m in spec.modalities}
    return Batch(x, {m: t[:, None] for m, t in x.items()}, {m: torch.ones(n, dtype=torch.bool) for m in x},
                 torch.randint(0, spec.num_classes, (n,), generator=g))


def model(method, **options):
    torch.manual_seed(0)
    return build_model(TrainConfig(method=method, hidden=8, options=options), SPEC)


def test_concat_unimodal_path_is_its_column_slice_plus_bias():
    m, b = model("concat"), random_batch()
    h_a = torch.relu(m.proj["a"].linear(b.x["a"]))
    expect = h_a @ m.cls.weight[:, :8].T + m.cls.bias
    torch.testing.assert_close(m.logits(b.only(["a"])), expect)


def test_sum_unimodal_path_feeds_the_single_feature_to_the_shared_head():
    m, b = model("sum"), random_batch()
    h_v = torch.relu(m.proj["v"].linear(b.x["v"]))
    torch.testing.assert_close(m.logits(b.only(["v"])), m.cls(h_v))


def test_late_fusion_averages_probabilities_of_present_modalities():
    m, b = model("late"), random_batch()
    pa = m.cls["a"](torch.relu(m.proj["a"].linear(b.x["a"]))).softmax(-1)
    pv = m.cls["v"](torch.relu(m.proj["v"].linear(b.x["v"]))).softmax(-1)
    torch.testing.assert_close(m.logits(b).exp(), (pa + pv) / 2)
    torch.testing.assert_close(m.logits(b.only(["v"])).exp(), pv)


def test_absent_modality_contributes_exactly_nothing():
    m, b = model("concat"), random_batch()
    b.present["a"][:3] = False
    b.x["a"][:3] = 0
    out = m.logits(b)
    torch.testing.assert_close(out[:3], m.logits(b.only(["v"]))[:3])


def test_ogm_ge_coefficients_and_gradient_modulation_by_hand():
    m, b = model("ogm-ge", alpha=0.8, ge=False), random_batch(n=16)
    with torch.no_grad():  # make modality a clearly dominant
        m.cls.weight[:, :8] *= 10
    h = {k: torch.relu(m.proj[k].linear(b.x[k])) for k in "av"}
    score = {k: (h[k] @ m.cls.weight[:, i * 8:(i + 1) * 8].T + m.cls.bias / 2).softmax(-1)[torch.arange(16), b.y].sum()
             for i, k in enumerate("av")}
    ratio = float(score["a"].detach() / score["v"].detach())
    coeff = m.coefficients(b)
    # Eq. 10 as the authors' code quotes it: k = 1 − tanh(α·ρ) for the dominant modality (not ρ − 1).
    if ratio > 1:
        assert coeff["a"] == pytest.approx(1 - torch.tanh(torch.tensor(0.8 * ratio)).item(), rel=1e-5)
        assert coeff["v"] == 1.0
    else:
        assert coeff["v"] == pytest.approx(1 - torch.tanh(torch.tensor(0.8 / ratio)).item(), rel=1e-5)
    # The step uses exactly k_m × the plain gradient on each projection weight (SGD without momentum).
    m.optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
    m.epoch = 1
    plain = model("ogm-ge", alpha=0.8, ge=False)
    plain.load_state_dict(m.state_dict())
    loss = torch.nn.functional.cross_entropy(plain.logits(b), b.y)
    loss.backward()
    before = {k: m.proj[k].linear.weight.detach().clone() for k in "av"}
    m.train_step(b)
    for k in "av":
        torch.testing.assert_close(before[k] - m.proj[k].linear.weight, coeff[k] * plain.proj[k].linear.weight.grad)


def test_option_parsing_and_errors():
    assert parse_option_args("ogm-ge", ["--alpha", "0.1", "--no-ge", "--coeff-form=shifted"]) == {
        "alpha": 0.1, "coeff_form": "shifted", "modulation_start": 1, "modulation_end": 51, "ge": False,
        "noise_std": "unscaled", "ratio": "mean", "plus": 0.0}
    with pytest.raises(OptionError, match="has no option --tau"):
        parse_option_args("ogm-ge", ["--tau", "0.3"])
    with pytest.raises(OptionError, match="must be one of paper, shifted"):
        parse_option_args("ogm-ge", ["--coeff-form", "both"])
    with pytest.raises(OptionError, match="unknown method"):
        parse_option_args("nope", [])


def test_selection_uses_validation_and_restores_that_epoch(small_av, tmp_path):
    data = load_head_data([small_av])
    result = fit(data, TrainConfig(method="concat", epochs=6, batch_size=64, lr=3e-3), tmp_path, progress=False)
    val_curve = [r["val_acc"] for r in result.epochs]
    # The best validation accuracy; among tied epochs the last one.
    assert result.best_epoch == len(val_curve) - val_curve[::-1].index(max(val_curve))
    assert result.val.acc == pytest.approx(max(val_curve))  # the restored model is that epoch's model
    assert "test_acc" not in result.epochs[0]  # test is never looked at during training
    reloaded, cfg = load_run(tmp_path)
    again = evaluate(reloaded, data.test, data.spec, cfg.batch_size)
    assert torch.equal(again.pred, result.test.pred)
    assert (tmp_path / "config.json").exists() and (tmp_path / "epochs.csv").read_text().count("\n") == 7


@pytest.mark.parametrize("method", ["concat", "sum", "late", "ogm-ge"])
def test_each_baseline_learns_and_is_deterministic(small_av, method):
    data = load_head_data([small_av])
    cfg = TrainConfig(method=method, epochs=3, batch_size=64, seed=3)
    a, b = fit(data, cfg, progress=False), fit(data, cfg, progress=False)
    assert a.test.acc == b.test.acc and a.epochs == b.epochs
    assert a.test.acc > 100 / len(data.spec.class_names) + 20  # well above chance
    c = fit(data, dataclasses.replace(cfg, seed=4), progress=False)
    assert c.epochs != a.epochs


def test_missing_masks_hold_the_rate_and_keep_a_modality(small_avt):
    data = load_head_data([small_avt])
    split = data.train
    for rate in (0.3, 0.6):
        masked = split.with_missing(rate, seed=1)
        keep = torch.stack(list(masked.present.values()), 1)
        assert keep.any(1).all()
        for m in masked.present:  # exactly round(η·n) of each modality's samples removed
            assert int((~masked.present[m]).sum()) == round(rate * len(split))
        for m in masked.present:  # masked features are zeros
            assert masked.x[m][~masked.present[m]].abs().sum() == 0
        again = split.with_missing(rate, seed=1)
        assert all(torch.equal(again.present[m], masked.present[m]) for m in masked.present)
