"""The core's hooks for methods that act between epochs (METHODS-MORE.md §0.4, ``heads/methods/base.py``):
the attached splits (H1), the epoch's rows (H2), the order of an epoch's calls (H3), rollback and
per-modality rates (H4), per-run randomness (H5), and ``Batch.index`` on every batch. Small random
data, no cache: these run in the fast subset."""
from __future__ import annotations

import dataclasses
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from heads.blocks.data import DataSpec, HeadData, SplitTensors
from heads import methods
from heads.blocks.optim import make_optimizer, set_lr
from heads.blocks.order import evaluation_order
from heads.methods.base import modality_param_groups
from heads.methods.concat import Concat
from heads.sweeps.stacked import StackedTrainer, can_stack
from heads.train.config import TrainConfig, build_model
from heads.train.evaluation import _stack_subsets, predict
from heads.train.trainer import Trainer

MODS = ["a", "v"]


def split_of(n: int, seed: int, dim: int = 4, classes: int = 3) -> SplitTensors:
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, dim, generator=g) for m in MODS}
    return SplitTensors([f"s{seed}_{i}" for i in range(n)], x, {m: t[:, None] for m, t in x.items()},
                        {m: torch.ones(n, dtype=torch.bool) for m in MODS}, torch.randint(0, classes, (n,), generator=g))


def data_of(n: int = 20) -> HeadData:
    spec = DataSpec(MODS, dict.fromkeys(MODS, 4), dict.fromkeys(MODS, 1), 3, ["p", "q", "r"], 0)
    return HeadData(spec, split_of(n, 0), split_of(n // 2, 1), split_of(n // 2, 2), {"caches": ["random"]})


def cfg_of(**kw) -> TrainConfig:
    base = dict(method="concat", epochs=3, hidden=8, device="cpu", batch_size=6, optimizer="sgd", lr=0.1,
                weight_decay=0.0, schedule="none")
    return TrainConfig(**{**base, **kw})


# --- Batch.index ---------------------------------------------------------------------------------
def test_training_batches_carry_the_rows_they_were_cut_from():
    split = split_of(10, 0)
    batches = list(split.batches(4, torch.Generator().manual_seed(3)))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([b.index for b in batches]), order)
    for b in batches:
        assert torch.equal(b.y, split.y[b.index]) and torch.equal(b.x["a"], split.x["a"][b.index])
    in_order = list(split.batches(4))  # evaluation order of a slice: its rows
    assert [b.index.tolist() for b in in_order] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_only_the_standardiser_and_stacked_subsets_keep_the_index():
    split = split_of(6, 0)
    batch = split.batch(torch.tensor([5, 1, 3]))
    assert batch.only(["a"]).index.tolist() == [5, 1, 3]
    model = build_model(cfg_of(), data_of().spec)
    model.standardizer.fit(split)
    assert model.standardizer(batch).index.tolist() == [5, 1, 3]
    assert model.standardizer.apply_split(split.take(torch.tensor([4, 4]))).index.tolist() == [4, 4]
    assert _stack_subsets(batch, [frozenset("a"), frozenset("av")]).index.tolist() == [5, 1, 3, 5, 1, 3]
    assert split.to("meta").batch(slice(0, 2)).index.device.type == "meta"


def test_evaluation_batches_carry_their_rows(monkeypatch):
    """``predict`` cuts batches in the fixed evaluation order; each carries those rows."""
    data = data_of()
    model = build_model(cfg_of(), data.spec)
    seen = []
    real = Concat.logits
    monkeypatch.setattr(Concat, "logits", lambda self, b: seen.append(b.index.clone()) or real(self, b))
    predict(model, data.val, MODS, 4)
    assert torch.equal(torch.cat(seen), evaluation_order(data.val))


def test_derived_splits_keep_each_rows_original_row():
    split = split_of(6, 0)
    copies = split.take(torch.tensor([4, 4, 1])).only(["a"])
    assert copies.index.tolist() == [4, 4, 1] and copies.ids == ["s0_4", "s0_4", "s0_1"]
    assert not copies.present["v"].any() and copies.x["v"].abs().sum() == 0 and copies.tokens["v"].abs().sum() == 0
    assert torch.equal(copies.x["a"], split.x["a"][[4, 4, 1]])
    epoch = SplitTensors.cat([split, copies])
    assert epoch.index.tolist() == [0, 1, 2, 3, 4, 5, 4, 4, 1] and len(epoch.ids) == 9
    assert epoch.batch(torch.tensor([7, 0])).index.tolist() == [4, 0]
    held_out = split.take(torch.tensor([3, 0])).take(torch.tensor([1]))
    assert held_out.index.tolist() == [0]  # a split derived twice still names the original row
    edited = split.with_present({"v": torch.tensor([True, False, True, True, True, False])})
    assert edited.x["v"][1].abs().sum() == 0 and torch.equal(edited.x["v"][0], split.x["v"][0])
    assert edited.index is None and split.subset(torch.tensor([3, 0])).index is None  # splits of their own


def test_stacked_batches_carry_each_runs_rows():
    data = data_of()
    trainers = [Trainer(data, cfg_of(seed=s)) for s in (0, 1)]
    stack = StackedTrainer(trainers)
    rows = torch.tensor([[3, 1], [0, 2]])
    assert torch.equal(stack._gather(stack.train, rows, [0, 1])["index"], rows)


# --- H1: the attached splits ---------------------------------------------------------------------
class Spy(Concat):
    """Records what the core hands it and what each epoch trains on."""

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.calls, self.rows = [], []

    def attach(self, train, val):
        super().attach(train, val)
        self.calls.append("attach")

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self.calls.append(f"start {epoch}")

    def epoch_split(self, epoch, train):
        self.calls.append(f"split {epoch}")
        return train.take(torch.tensor([1, 1, 7], device=train.device)) if epoch == 2 else train

    def train_step(self, batch):
        self.rows.append((self.epoch, batch.index.tolist()))
        return super().train_step(batch)

    def end_epoch(self, report):
        self.calls.append(f"end {self.epoch}")
        return {}


def spy_trainer(data=None, **kw):
    data = data or data_of()
    cfg = cfg_of(**kw)
    return Trainer(data, cfg, model=Spy(data.spec, cfg, None))


def test_the_core_attaches_train_and_val_prepared_never_test():
    trainer = spy_trainer()
    model = trainer.model
    assert model.attached("train") is trainer.ready["train"] and model.attached("val") is trainer.ready["val"]
    assert all(model.attached(s) is not trainer.ready["test"] for s in ("train", "val"))
    with pytest.raises(KeyError):
        model.attached("test")
    fresh = build_model(cfg_of(), data_of().spec)
    with pytest.raises(RuntimeError, match="attach"):
        fresh.attached("train")


def test_attached_splits_travel_in_no_checkpoint_or_copy_and_are_attached_again_after_restore():
    trainer = spy_trainer()
    trainer.run(1)
    buffer = io.BytesIO()
    torch.save(trainer.checkpoint(), buffer)
    assert b"_attached" not in pickle.dumps(trainer.model)
    assert "_attached" not in copy.deepcopy(trainer.model).__dict__
    again = spy_trainer()
    buffer.seek(0)
    again.restore(torch.load(buffer, weights_only=False))
    assert again.model.attached("train") is again.ready["train"]
    assert again.model.calls[-1] == "attach"


# --- H2 and H3: the epoch's rows and the order of its calls --------------------------------------
def test_the_epoch_trains_on_the_rows_the_method_chose():
    trainer = spy_trainer()
    trainer.run(3)
    model = trainer.model
    assert model.calls == ["attach", "start 1", "split 1", "end 1", "start 2", "split 2", "end 2", "start 3",
                           "split 3", "end 3"]
    by_epoch = {e: sorted(i for ep, rows in model.rows if ep == e for i in rows) for e in (1, 2, 3)}
    assert by_epoch[1] == list(range(20)) == by_epoch[3] and by_epoch[2] == [1, 1, 7]
    assert len([r for r in model.rows if r[0] == 2]) == 1  # three rows: one batch of six


class Rebuilds(Concat):
    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        if epoch == 2:  # a phase switch: a new optimizer made at some other rate
            self.optimizer = torch.optim.SGD(self.parameters(), lr=999.0)


def test_the_scheduled_rate_is_set_after_start_epoch_rebuilds_the_optimizer():
    data = data_of()
    cfg = cfg_of(schedule="step:1:0.5")
    trainer = Trainer(data, cfg, model=Rebuilds(data.spec, cfg, None))
    trainer.run(2)
    assert trainer.model.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


# --- H4: rollback and per-modality rates ----------------------------------------------------------
def test_rollback_restores_parameters_buffers_and_optimizer_state_in_place():
    trainer = spy_trainer()
    model = trainer.model
    model.register_buffer("scratch", torch.zeros(3), persistent=False)
    trainer.run(1)
    snap = model.snapshot()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in model.optimizer.state.items()}
    weight = model.cls.weight
    model.scratch += 5
    trainer.run(2)
    assert not torch.equal(model.cls.weight, before["cls.weight"])
    model.rollback(snap)
    assert model.cls.weight is weight  # in place: the optimizer still holds these parameters
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert model.scratch.tolist() == [0.0, 0.0, 0.0]
    assert {id(p): s["momentum_buffer"] for p, s in model.optimizer.state.items()}.keys() == momentum.keys()
    for p, s in model.optimizer.state.items():
        assert torch.equal(s["momentum_buffer"], momentum[id(p)])
    model.cls.weight.data += 1  # the snapshot is a copy, not a view
    assert torch.equal(snap["tensors"]["cls.weight"], before["cls.weight"])


class Rated(Concat):
    def configure_optimizer(self):
        return make_optimizer(modality_param_groups(self, {m: list(self.proj[m].parameters()) for m in MODS}),
                              self.cfg)

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self.set_lr_factor("v", 0.25 * epoch)


def test_modality_groups_train_at_the_scheduled_rate_times_their_factor():
    data = data_of()
    cfg = cfg_of(schedule="step:1:0.5")
    model = Rated(data.spec, cfg, None)
    groups = modality_param_groups(model, {m: list(model.proj[m].parameters()) for m in MODS})
    assert [g.get("modality") for g in groups] == ["a", "v", None]
    assert groups[2]["params"] == list(model.cls.parameters())
    trainer = Trainer(data, cfg, model=model)
    trainer.run(2)
    lrs = {g.get("modality"): g["lr"] for g in model.optimizer.param_groups}
    assert lrs == pytest.approx({"a": 0.05, "v": 0.05 * 0.5, None: 0.05})  # epoch 2: 0.1·0.5, v × 0.25·2
    plain = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    set_lr(plain, 0.3)
    assert plain.param_groups[0]["lr"] == 0.3  # an untagged group: the scheduled rate


class Resampled(Concat):
    def epoch_split(self, epoch, train):
        return train.take(torch.arange(len(train)).flip(0))


def test_a_method_with_its_own_rates_or_rows_is_not_stacked(monkeypatch):
    assert can_stack(TrainConfig(method="concat"))
    for name, cls in (("rated", Rated), ("resampled", Resampled)):
        monkeypatch.setitem(methods.METHODS, name, cls)
        assert not can_stack(TrainConfig(method=name)), name


# --- H5: randomness from the run's own stream -----------------------------------------------------
class Noisy(Concat):
    """Random draws in every place a method may make them: start_epoch, epoch_split, train_step, end_epoch."""

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        with torch.no_grad():
            self.cls.bias += 0.01 * torch.randn_like(self.cls.bias)

    def epoch_split(self, epoch, train):
        return train.take(torch.randint(0, len(train), (len(train),)))

    def train_step(self, batch):
        loss = nn.functional.cross_entropy(self.logits(batch), batch.y)
        self.step(loss, before_step=lambda: self.cls.weight.grad.add_(torch.randn_like(self.cls.weight)))
        return loss.detach()

    def end_epoch(self, report):
        return {"draw": float(torch.rand(()))}


def noisy(data, seed):
    cfg = cfg_of(seed=seed)
    torch.manual_seed(seed)  # the initialisation (a model handed to the trainer is built before it seeds)
    return Trainer(data, cfg, model=Noisy(data.spec, cfg, None))


def test_one_seed_gives_one_run_alone_interleaved_or_resumed():
    data = data_of()
    alone = noisy(data, 0)
    alone.run(3)
    again = noisy(data, 0)
    again.run(3)
    a, b = noisy(data, 0), noisy(data, 1)  # a pruned grid: two runs advanced in turns
    a.run(1)
    b.run(1)
    a.run(2)
    b.run(3)
    torch.manual_seed(123)  # whatever happens outside the run's own stream
    a.run(3)
    buffer = io.BytesIO()
    first = noisy(data, 0)
    first.run(2)
    torch.save(first.checkpoint(), buffer)
    buffer.seek(0)
    resumed = noisy(data, 0)
    resumed.restore(torch.load(buffer, weights_only=False))
    resumed.run(3)
    for other in (again, a, resumed):
        assert [r["draw"] for r in other.rows] == [r["draw"] for r in alone.rows]
        assert all(torch.equal(p, q) for p, q in zip(alone.model.parameters(), other.model.parameters()))
    assert [r["draw"] for r in b.rows] != [r["draw"] for r in alone.rows]  # another seed, another stream


# --- qmf: the per-sample loss history of its official code -----------------------------------------
def test_qmf_history_is_per_sample_and_survives_across_batches_epochs_and_checkpoints():
    """With lr 0 the weights never move, so after two shuffled epochs every training sample's history
    is exactly twice its own unimodal CE: each visit was added to that sample's entry, whichever
    batch it fell in; a sample's absent modality adds nothing (30% of each modality masked). A
    checkpoint carries the history, and attaching again does not reset it."""
    data = data_of()
    trainer = Trainer(data, cfg_of(method="qmf", lr=0.1, epochs=2, missing_train=0.3))
    trainer.cfg = dataclasses.replace(trainer.cfg, lr=0.0)  # lr 0 is outside --lr's domain: set past the validator
    model = trainer.model
    assert model.history.shape == (2, 20) and not model.history.any()
    trainer.run(2)
    train = trainer.ready["train"]
    with torch.no_grad():
        logits = model.unimodal_logits(train.batch(torch.arange(20)))
    for i, m in enumerate(MODS):
        per_sample = nn.functional.cross_entropy(logits[m], train.y, reduction="none")
        assert not train.present[m].all()
        torch.testing.assert_close(model.history[i], 2 * per_sample * train.present[m])
    buffer = io.BytesIO()
    torch.save(trainer.checkpoint(), buffer)
    buffer.seek(0)
    resumed = Trainer(data, cfg_of(method="qmf", lr=0.1, epochs=2, missing_train=0.3))
    resumed.restore(torch.load(buffer, weights_only=False))
    torch.testing.assert_close(resumed.model.history, model.history)
    assert "history" not in model.state_dict()  # training state: not in model.pt


def test_qmf_refuses_a_batch_without_rows():
    model = build_model(cfg_of(method="qmf"), data_of().spec)
    batch = split_of(4, 0).batch(torch.arange(4))
    batch.index = None
    with pytest.raises(ValueError, match="Batch.index"):
        model.loss(batch)


def test_qmf_fusion_weights_pass_no_gradient():
    """``f = Σ_m s.g.(w_m) · f_m`` (the text-image and MLA code): the fused CE's gradient on each
    classifier is that of the weighted sum with the weights held constant — read from autograd on a
    hand-written copy whose weights are plain numbers."""
    data = data_of()
    model = build_model(cfg_of(method="qmf"), data.spec)
    with torch.no_grad():
        for m in MODS:
            model.cls[m].weight *= 5  # weights far from equal, so a gradient through them would show
    batch = data.train.batch(torch.arange(8))
    logits = model.unimodal_logits(batch)
    nn.functional.cross_entropy(model.fuse(logits, model.confidence(logits, batch.present)), batch.y).backward()
    got = {m: model.cls[m].weight.grad.clone() for m in MODS}
    h = {m: torch.relu(model.proj[m].linear(batch.x[m])).detach() for m in MODS}
    w_cls = {m: model.cls[m].weight.detach().clone().requires_grad_(True) for m in MODS}
    f = {m: h[m] @ w_cls[m].T + model.cls[m].bias.detach() for m in MODS}
    const = {m: 0.1 * torch.logsumexp(f[m], -1).detach() for m in MODS}  # numbers, not functions of W
    nn.functional.cross_entropy(sum(const[m][:, None] * f[m] for m in MODS), batch.y).backward()
    for m in MODS:
        torch.testing.assert_close(got[m], w_cls[m].grad)
