"""Stacked training (``heads/sweeps/stacked.py``) gives what the runs give alone, here on the CPU (``--stack on``).

The stacked runner replaces the batch loop and the optimizer of K runs by batched tensors; these
tests hold it to the plain ``Trainer``: the same per-epoch validation accuracy, the same selected
epochs and configs, parameters within float tolerance, for each optimizer, and with per-run data
(masks drawn per seed)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from heads.sweeps import grid
from heads.train.config import TrainConfig
from heads.train.trainer import Trainer
from heads.blocks.loading import load_head_data
from heads.sweeps.stacked import can_stack, stack_key, StackedTrainer

pytestmark = pytest.mark.trains


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from cache.synthetic import make_synthetic

    return load_head_data([make_synthetic(tmp_path_factory.mktemp("c") / "av", "av-saturated", seed=0, scale=0.05)])


def configs(method="concat", **extra):
    base = TrainConfig(method=method, epochs=3, hidden=16, device="cpu", threads=1, **extra)
    return [dataclasses.replace(base, seed=s, lr=lr, weight_decay=wd)
            for s, lr, wd in ((0, 1e-3, 1e-4), (1, 1e-3, 1e-4), (0, 3e-3, 0.0), (1, 1e-2, 1e-3))]


def assert_same(alone: list[Trainer], stacked: list[Trainer]) -> None:
    for a, b in zip(alone, stacked):
        assert [r["val_acc"] for r in a.rows] == [r["val_acc"] for r in b.rows]
        assert [r["train_loss"] for r in a.rows] == pytest.approx([r["train_loss"] for r in b.rows], rel=1e-4)
        assert a.best_epoch == b.best_epoch
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)


def alone_and_stacked(data, cfgs, epochs: int) -> tuple[list[Trainer], StackedTrainer]:
    """The runs of ``cfgs`` trained one by one, and the same runs trained stacked, to ``epochs``."""
    alone = []
    for c in cfgs:
        t = Trainer(data, c)
        t.run(epochs)
        alone.append(t)
    stack = StackedTrainer([Trainer(data, c) for c in cfgs])
    stack.run(epochs)
    return alone, stack


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_stacked_runs_train_as_they_do_alone(data, optimizer):
    cfgs = [dataclasses.replace(c, optimizer=optimizer) for c in configs()]
    alone, stack = alone_and_stacked(data, cfgs, 3)
    assert_same(alone, stack.trainers)
    assert all(t.stacked_with == 4 for t in stack.trainers)


@pytest.mark.parametrize("method", ["late", "concat"])
def test_stacked_runs_with_their_own_masks_train_as_alone(data, method):
    """``--missing-train``: each seed masks other samples, so each run reads its own data copy, and a
    batch is complete for one run and not for another (concat then must take its masked path)."""
    cfgs = configs(method, missing_train=0.3)
    alone, stack = alone_and_stacked(data, cfgs, 2)
    assert not stack.shared
    assert_same(alone, stack.trainers)


def test_stacked_training_resumes_in_stages(data):
    """``run(1)`` then ``run(3)`` (what a pruned grid does) equals ``run(3)``."""
    one = StackedTrainer([Trainer(data, c) for c in configs()])
    one.run(3)
    two = StackedTrainer([Trainer(data, c) for c in configs()])
    two.run(1)
    two.run(3)
    assert_same(one.trainers, two.trainers)


def test_what_may_be_stacked():
    assert can_stack(TrainConfig(method="concat")) and can_stack(TrainConfig(method="late"))
    for method in ("mla", "ccat", "ogm-ge"):  # their own update: one run at a time
        assert not can_stack(TrainConfig(method=method))
    assert can_stack(TrainConfig(method="edm")) and not can_stack(TrainConfig(method="edm", missing_train=0.2))
    edm = TrainConfig(method="edm", options={"tau": 0.2})
    assert stack_key(edm) == stack_key(dataclasses.replace(edm, options={"tau": 0.7}))  # τ may differ in a stack
    assert stack_key(edm) != stack_key(dataclasses.replace(edm, options={"tau": 0.2, "gate": "learnable"}))
    a, b = TrainConfig(method="concat", seed=1, lr=0.1), TrainConfig(method="concat", seed=2, lr=0.3, weight_decay=0.5)
    assert stack_key(a) == stack_key(b)
    assert stack_key(a) != stack_key(dataclasses.replace(a, hidden=8))
    assert stack_key(a) != stack_key(dataclasses.replace(a, batch_size=8))
    with pytest.raises(ValueError, match="share every setting"):
        StackedTrainer([_fake(a), _fake(dataclasses.replace(a, hidden=8))])


def _fake(cfg):
    t = Trainer.__new__(Trainer)
    t.cfg, t.epoch = cfg, 0
    return t


@pytest.mark.parametrize("method,axes,prune", [("concat", {"lr": [1e-3, 1e-2, 3e-2], "weight_decay": [1e-4]}, False),
                                               ("concat", {"lr": [1e-3, 1e-2, 3e-2], "weight_decay": [1e-4]}, True),
                                               ("edm", {"tau": [0.0, 0.5, 0.9]}, True)])
def test_a_stacked_grid_selects_what_the_one_by_one_grid_selects(data, tmp_path, method, axes, prune):
    base = TrainConfig(method=method, epochs=4, hidden=16, device="cpu")
    one = grid.run_grid(data, method, axes, [0, 1], base, tmp_path / "one", prune=prune, workers=1, progress=False,
                        stack="off")
    stacked = grid.run_grid(data, method, axes, [0, 1], base, tmp_path / "stacked", prune=prune, workers=1,
                            progress=False, stack="on")
    assert one.selection.config == stacked.selection.config
    by_run = {r["run"]: r for r in one.records}
    for r in stacked.records:
        alone = by_run[r["run"]]
        assert r["stacked_with"] >= 2 and "stacked_with" not in alone
        assert (r["best_epoch"], r["epochs_run"], r.get("stopped_at")) == (alone["best_epoch"], alone["epochs_run"],
                                                                          alone.get("stopped_at"))
        for split in ("val", "test"):
            assert r[split]["acc"] == pytest.approx(alone[split]["acc"], abs=1e-9)
            assert r[split]["loss"] == pytest.approx(alone[split]["loss"], rel=1e-4)


STACKABLE = sorted(m for m in __import__("heads.methods").methods.METHODS if can_stack(TrainConfig(method=m)))


@pytest.mark.parametrize("method", STACKABLE)
def test_every_stackable_method_trains_stacked_as_alone(data, method):
    """Each method that declares itself stackable really is: vmap runs its loss, and the result is
    the runs' own (this is what keeps a new method's ``stackable = True`` honest)."""
    cfgs = configs(method)[:2]
    alone, stack = alone_and_stacked(data, [dataclasses.replace(c, epochs=2) for c in cfgs], 2)
    assert_same(alone, stack.trainers)


@pytest.mark.parametrize("options", [{}, {"gate": "learnable"}, {"order": "random"}, {"memory": False, "inherit": False}])
def test_stacked_edm_runs_train_as_alone(data, options):
    """edm's chain stacked: one vmapped step per modality, runs grouped by their epoch's order, τ per
    run, the inherited memory per run; over three epochs the orders are re-chosen from δ (or drawn
    from each run's own RNG stream) and must match the runs alone."""
    base = TrainConfig(method="edm", epochs=3, hidden=16, device="cpu", threads=1)
    cfgs = [dataclasses.replace(base, seed=s, lr=lr, options={**options, "tau": tau})
            for s, lr, tau in ((0, 1e-3, 0.3), (1, 1e-3, 0.6), (0, 3e-3, 0.0))]
    alone, stack = alone_and_stacked(data, cfgs, 3)
    assert_same(alone, stack.trainers)
    for a, b in zip(alone, stack.trainers):
        assert [r["order"] for r in a.rows] == [r["order"] for r in b.rows]
        torch.testing.assert_close(a.model.memory_h, b.model.memory_h, atol=2e-5, rtol=1e-4)
        assert [r.get("val_edm") for r in a.rows] == pytest.approx([r.get("val_edm") for r in b.rows])
    assert ("val_edm" in alone[0].rows[0]) == (options.get("order", "weak-to-strong") == "weak-to-strong")


def test_stacked_edm_validation_scores_subsets_through_its_prefix_tree(data, monkeypatch):
    """The stacked runner's per-epoch validation calls edm's ``subset_logits`` once per evaluation batch
    (vmapped over the runs), not ``logits`` once per subset, and gets the runs' own numbers."""
    from heads.methods.edm import EDM

    calls, plain = [], EDM.subset_logits
    vmapped = torch._C._functorch.is_batchedtensor  # True inside the stacked runner's vmap

    def counted(self, batch, subsets):
        if vmapped(batch.y):
            calls.append(len(subsets))
        return plain(self, batch, subsets)

    monkeypatch.setattr(EDM, "subset_logits", counted)
    base = TrainConfig(method="edm", epochs=1, hidden=16, device="cpu", threads=1)
    cfgs = [dataclasses.replace(base, seed=s) for s in (0, 1)]
    alone, stack = alone_and_stacked(data, cfgs, 1)
    assert_same(alone, stack.trainers)
    subsets = 2 ** len(data.spec.modalities) - 1
    assert calls and set(calls) == {subsets}
