"""The built-in data must show the problem the product exists for, deterministically."""
import numpy as np
import pytest
import torch

from cache import cache_info, load_split
from cache.synthetic import make_synthetic
from heads.train.config import TrainConfig
from heads.train.trainer import fit
from heads.blocks.loading import load_head_data


def test_generator_is_deterministic_and_shaped_like_its_preset(tmp_path):
    a = make_synthetic(tmp_path / "a", "avt", seed=5, scale=0.05)
    b = make_synthetic(tmp_path / "b", "avt", seed=5, scale=0.05)
    c = make_synthetic(tmp_path / "c", "avt", seed=6, scale=0.05)
    sa, sb, sc = (load_split(p, "train") for p in (a, b, c))
    assert sa.ids == sb.ids and all(np.array_equal(sa.features[m], sb.features[m]) for m in sa.features)
    assert not np.array_equal(sa.features["text"], sc.features["text"])
    info = cache_info(a)
    assert {m: s["dim"] for m, s in info["modalities"].items()} == {"audio": 1280, "visual": 768, "text": 768}
    assert len(info["class_names"]) == 4


def test_av_presets_sizes_match_cremad():
    from cache.synthetic import PRESETS

    for name in ("av", "av-saturated"):
        spec = PRESETS[name]
        assert (spec.n_trainval, spec.n_test, len(spec.classes)) == (6698, 744, 6)
        assert {m: s.dim for m, s in spec.modalities.items()} == {"audio": 1280, "visual": 768}


def test_strength_knob_moves_unimodal_accuracy(tmp_path):
    weak = load_head_data([make_synthetic(tmp_path / "w", "av-saturated", scale=0.3, strength={"audio": 0.3})], ["audio"])
    strong = load_head_data([make_synthetic(tmp_path / "s", "av-saturated", scale=0.3)], ["audio"])
    cfg = TrainConfig(method="concat", epochs=8)
    assert fit(strong, cfg, progress=False).test.acc > fit(weak, cfg, progress=False).test.acc + 20


def test_concat_starves_the_weak_modality_on_av_saturated(tmp_path):
    """With concat, visual's in-model accuracy is ≥ 10 points below a head trained on visual alone."""
    path = make_synthetic(tmp_path / "av", "av-saturated")
    cfg = TrainConfig(method="concat", epochs=20)
    joint = fit(load_head_data([path]), cfg, progress=False)
    alone = fit(load_head_data([path], ["visual"]), cfg, progress=False)
    assert joint.test.unimodal["visual"] <= alone.test.acc - 10
    assert joint.test.delta["visual"] > 5  # and the deviation metric says visual under-contributes


# --- the presets on which balancing matters (issue 25): the three properties, from the data -----
def _heads(path, epochs, modalities):
    """Late fusion of unimodal heads (``late``: independent heads, each on its own loss, i.e. trained
    apart) with Adam to convergence: each head's per-sample test correctness and the fused accuracy,
    plus each modality's validation curve."""
    from heads.train.trainer import Trainer

    data = load_head_data([path], modalities)
    cfg = TrainConfig(method="late", epochs=epochs, hidden=64, optimizer="adam", lr=1e-3, weight_decay=1e-4,
                      schedule="none", batch_size=64, threads=1, epoch_subsets=True)
    trainer = Trainer(data, cfg)
    trainer.run(epochs)
    result = trainer.finish()
    batch = trainer.ready["test"].batch(slice(0, len(trainer.ready["test"])))
    with torch.no_grad():
        correct = {m: (logit.argmax(-1) == batch.y).numpy() for m, logit in result.model.unimodal_logits(batch).items()}
    curves = {m: [row[f"val_acc_{m}"] for row in result.epochs] for m in data.spec.modalities}
    return result, correct, curves


@pytest.fixture(scope="module")
def new_av(tmp_path_factory):
    """The three tests below read one training: the new ``av`` at half size, 12 epochs."""
    return _heads(make_synthetic(tmp_path_factory.mktemp("c") / "av", "av", scale=0.5), 12, None)


@pytest.mark.trains
def test_new_av_each_modality_alone_is_moderate_and_errs_independently(new_av):
    """Each modality alone lands in a moderate band, and one modality's errors say little about the other's:
    P(both wrong) is within 5 points of P(audio wrong) · P(visual wrong)."""
    _, correct, _ = new_av
    alone = {m: 100 * c.mean() for m, c in correct.items()}
    assert all(45 <= a <= 70 for a in alone.values()), alone  # half size: visual ~52, audio ~62
    wrong = {m: 1 - c for m, c in correct.items()}
    both = (wrong["audio"] * wrong["visual"]).mean()
    assert abs(both - wrong["audio"].mean() * wrong["visual"].mean()) < 0.05


@pytest.mark.trains
def test_new_av_using_both_modalities_fully_beats_the_best_one_by_15_points(new_av):
    result, correct, _ = new_av
    assert result.test.acc >= max(100 * c.mean() for c in correct.values()) + 15


@pytest.mark.trains
def test_new_av_visual_is_slow_to_fit(new_av):
    """After one epoch audio alone is within 5 points of its best validation accuracy, visual alone
    more than 10 below its own: joint training sees audio's signal first."""
    _, _, curves = new_av
    assert max(curves["audio"]) - curves["audio"][0] < 5
    assert max(curves["visual"]) - curves["visual"][0] > 10


def test_a_builtin_cache_of_an_older_definition_is_regenerated(tmp_path, monkeypatch):
    """``av`` changed meaning in issue 25: a cache left under its name by the old definition is remade."""
    from cache import synthetic

    old = make_synthetic(tmp_path / "av", "av-saturated")
    assert not synthetic._current(old, "av") and synthetic._current(old, "av-saturated")
    path = synthetic.builtin_cache("av", tmp_path)
    assert synthetic._current(path, "av") and cache_info(path)["dataset"] == "synthetic-av"


def test_knobs_are_checked_and_recorded(tmp_path):
    from cache.store import CacheError

    path = make_synthetic(tmp_path / "k", "av", scale=0.05, modality_knobs={"confused": {"audio": "other-class"},
                          "noise": {"visual": 0.5}}, classes=3, n_test=100)
    info = cache_info(path)
    assert len(info["class_names"]) == 3 and info["counts"]["test"] == 5  # 100 × 0.05
    import json
    made = json.loads((path / "meta.json").read_text())["synthetic"]
    assert made["modalities"]["audio"]["confused"] == "other-class" and made["modalities"]["visual"]["noise"] == 0.5
    for knobs, says in (({"modality_knobs": {"confused": {"audio": "x"}}}, "confused"),
                        ({"val_fraction": 1.5}, "val-fraction"), ({"latent": 0}, "latent")):
        with pytest.raises(CacheError, match=says):
            make_synthetic(tmp_path / "bad", "av", scale=0.05, **knobs)
    assert not (tmp_path / "bad").exists()
