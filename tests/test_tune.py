"""``compare --tune``: a grid per method on validation, the test figures of the selected setting only."""
import json
from dataclasses import replace

import pytest
import torch

from heads.blocks.loading import load_head_data
from heads.errors import OptionError
from heads.sweeps.compare import compare_tune
from heads.sweeps.tune import parse_tune, tune_axes, tuned_runs
from heads.train.config import TrainConfig


def test_parse_tune_reads_settings_and_their_values():
    assert parse_tune("lr") == {"lr": []}
    assert parse_tune("lr=1e-4,1e-3,epochs=50,100") == {"lr": ["1e-4", "1e-3"], "epochs": ["50", "100"]}
    assert parse_tune("lr=x0.1,x1,x10") == {"lr": ["x0.1", "x1", "x10"]}
    for bad, says in (("", "empty"), ("tau=0.1", "not a training setting"), ("epochs", "needs values"),
                      ("lr=1e-3,lr=1e-2", "given twice"), ("1e-3", "start with a setting")):
        with pytest.raises(OptionError, match=says):
            parse_tune(bad)


def test_default_grid_is_the_methods_own_rate_times_a_decade_each_way():
    base = TrainConfig()
    assert tune_axes("concat", {"lr": []}, base) == {"lr": [1e-4, 1e-3, 1e-2]}  # concat's paper SGD lr 1e-3
    assert tune_axes("edm", {"lr": []}, base) == {"lr": [1e-5, 1e-4, 1e-3]}  # edm's paper AdamW lr 1e-4
    assert tune_axes("concat", {"lr": ["x2"], "epochs": ["5", "10"]}, base) == {"lr": [2e-3], "epochs": [5, 10]}
    with pytest.raises(OptionError, match="factors"):
        tune_axes("concat", {"epochs": ["x2"]}, base)
    with pytest.raises(OptionError, match="--lr must lie in"):
        tune_axes("concat", {"lr": ["-1"]}, base)


def test_runs_of_each_method_are_named_apart_and_epochs_expand():
    runs = tuned_runs("edm[tau=0.3]", {"lr": [1e-4, 1e-3], "epochs": [2, 4]}, TrainConfig(), [0, 1])
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert {r.cfg.epochs for r in runs} == {2, 4} and {r.cfg.lr for r in runs} == {1e-4, 1e-3}
    assert all(r.cfg.options["tau"] == 0.3 and r.record["spec"] == "edm[tau=0.3]" for r in runs)
    assert runs[0].record["values"] == {"epochs": 2, "lr": 1e-4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cache.synthetic import make_synthetic

    return load_head_data([make_synthetic(tmp_path_factory.mktemp("c") / "av", "av-saturated", seed=0, scale=0.05)])


@pytest.mark.trains
def test_tune_selects_on_validation_only(tiny, tmp_path):
    """Shuffling the test labels changes the test figures but not one selected setting."""
    base = TrainConfig(epochs=3, hidden=16, threads=1)
    specs = ["concat", "late"]
    _, results, chosen = compare_tune(tiny, specs, [0], base, tmp_path / "a", "lr=1e-4,1e-2,1", workers=1, progress=False)
    perm = torch.randperm(len(tiny.test.y), generator=torch.Generator().manual_seed(0))
    shuffled = replace(tiny, test=replace(tiny.test, y=tiny.test.y[perm]))
    _, results_s, chosen_s = compare_tune(shuffled, specs, [0], base, tmp_path / "b", "lr=1e-4,1e-2,1", workers=1,
                                       progress=False)
    assert {s: c["values"] for s, c in chosen.items()} == {s: c["values"] for s, c in chosen_s.items()}
    assert [r["test"]["acc"] for r in results] != [r["test"]["acc"] for r in results_s]
    # The selected setting is the one with the best validation accuracy (the grid's rule), per method.
    info = json.loads((tmp_path / "a" / "tuned.json").read_text())
    for spec in specs:
        runs = [json.loads(p.read_text()) for p in (tmp_path / "a").glob(f"{spec}-*/results.json")]
        assert len(runs) == 3
        best = max(r["val"]["acc"] for r in runs)
        assert info["selected"][spec]["val_mean"] == best
    # The table holds one row per method, its "trained with" the selected value and the grid.
    table = (tmp_path / "a" / "table.md").read_text()
    lr = chosen["concat"]["values"]["lr"]
    assert f"tuned: lr {lr:g} (of lr 0.0001|0.01|1)" in table
    assert [r["label"] for r in results] == specs
