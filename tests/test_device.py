"""Stage two's device-agnostic path, run here with ``--device cpu``: device and precision resolution,
no host reads inside the batch loop, evaluation that scores only what it must, batched subsets, and
sampled Shapley values beyond eight modalities."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heads import metrics
from heads.train.config import build_model, TrainConfig
from heads.train.trainer import Trainer
from heads.train.evaluation import evaluate, predict, predict_subsets
from heads.blocks.data import Batch, DataSpec, HeadData, SplitTensors
from heads.blocks.device import DeviceError, resolve_device, resolve_precision

ROOT = Path(__file__).resolve().parent.parent


def random_data(modalities: int = 3, n: int = 48, dim: int = 5, classes: int = 3, seed: int = 0) -> HeadData:
    g = torch.Generator().manual_seed(seed)
    mods = [f"m{i}" for i in range(modalities)]

    def split(count: int) -> SplitTensors:
        x = {m: torch.randn(count, dim, generator=g) for m in mods}
        return SplitTensors([f"s{i}" for i in range(count)], x, {m: t[:, None] for m, t in x.items()},
                            {m: torch.ones(count, dtype=torch.bool) for m in mods},
                            torch.randint(0, classes, (count,), generator=g))

    spec = DataSpec(mods, dict.fromkeys(mods, dim), dict.fromkeys(mods, 1), classes, [str(c) for c in range(classes)], 0)
    return HeadData(spec, split(n), split(n // 2), split(n // 2), {"caches": ["random"], "dataset": "random"})


# --- resolution ----------------------------------------------------------------------------------
def test_device_names_resolve_or_fail_with_what_exists():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_precision_is_fp32_unless_asked_and_auto_needs_native_bf16(monkeypatch):
    from heads.blocks import device

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu, 64, 32, 16) == "fp32"
    assert resolve_precision("bf16", cpu, 64, 32, 16) == "bf16"
    monkeypatch.setattr(device, "cpu_native_bf16", lambda: False)
    monkeypatch.setattr(device, "bf16_wins", lambda *a: True)
    assert resolve_precision("auto", cpu, 64, 32, 16) == "fp32"  # emulated bf16 is never chosen
    monkeypatch.setattr(device, "cpu_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu, 64, 32, 16) == "bf16"
    monkeypatch.setattr(device, "bf16_wins", lambda *a: False)
    assert resolve_precision("auto", cpu, 64, 32, 16) == "fp32"  # native but slower: fp32
    with pytest.raises(DeviceError):
        resolve_precision("fp16", cpu, 64, 32, 16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="under mutmut a cli.py run outside mutants/ cannot load its trampolines")
def test_cli_refuses_a_missing_gpu_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train-head", "--device", "cuda", "--epochs", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --device cuda: torch sees no CUDA device")
    assert not any(tmp_path.iterdir())


def test_a_run_records_the_device_and_precision_it_used(tmp_path):
    data = random_data()
    trainer = Trainer(data, TrainConfig(method="concat", epochs=1, hidden=8, device="cpu"))
    trainer.run(1)
    result = trainer.finish(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (saved["device"], saved["precision"]) == ("cpu", "fp32") == (result.device, result.precision)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["device"] == "cpu"


# --- no host reads in the batch loop -------------------------------------------------------------
HOST_READS = ("__bool__", "__float__", "__int__", "item", "tolist")


@pytest.mark.parametrize("method", sorted(__import__("heads.methods").methods.METHODS))
def test_a_training_step_never_reads_a_tensor_on_the_host(method, monkeypatch):
    """On a GPU a host read waits for the device; the batch loop must not make one. Every way a tensor
    reaches Python is made to fail during ``train_step`` (ccat: its stage-1 step; its stage-2 secondary
    update must read how many samples fall below β, and is the stated exception)."""
    data = random_data(modalities=2)
    cfg = TrainConfig(method=method, epochs=4, hidden=8, device="cpu")
    trainer = Trainer(data, cfg)
    model = trainer.model
    model.train()
    model.start_epoch(1)
    batch = next(trainer.ready["train"].batches(16, torch.Generator().manual_seed(0)))

    def refuse(*_args, **_kw):
        raise AssertionError("a tensor was read on the host inside train_step")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    model.train_step(batch)
    model.train_step(batch)  # the second step too (mla modifies the head gradient from step 2 on)


def test_the_guard_catches_a_host_read(monkeypatch):
    """The test above would catch the pattern it forbids (guards against a patch that does nothing)."""
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda *_: (_ for _ in ()).throw(AssertionError("read")))
    with pytest.raises(AssertionError, match="read"):
        bool(torch.ones(2).any())


# --- evaluation that costs what it must ----------------------------------------------------------
def test_epoch_reports_score_subsets_only_for_methods_that_read_phi_or_when_asked():
    data = random_data()
    rows = {}
    for method, extra in (("concat", {}), ("edm", {}), ("concat", {"epoch_subsets": True})):
        trainer = Trainer(data, TrainConfig(method=method, epochs=1, hidden=8, device="cpu", **extra))
        trainer.run(1)
        rows[(method, bool(extra))] = trainer.rows[0]
    assert "val_phi_m0" not in rows[("concat", False)] and "val_edm" not in rows[("concat", False)]
    assert "val_phi_m0" in rows[("edm", False)] and "val_phi_m0" in rows[("concat", True)]
    assert {"val_acc", "val_loss", "val_f1"} <= set(rows[("concat", False)])


def test_batched_subsets_give_the_predictions_of_one_pass_per_subset():
    data = random_data(modalities=3)
    model = build_model(TrainConfig(method="concat", hidden=8, device="cpu"), data.spec)
    model.standardizer.fit(data.train)
    subsets = [s for s in metrics.all_subsets(data.spec.modalities) if s]
    batched, loss = predict_subsets(model, data.val, subsets, batch_size=5, full=frozenset(data.spec.modalities))
    for s in subsets:
        assert torch.equal(batched[s], predict(model, data.val, s, batch_size=5)), s
    assert loss == pytest.approx(predict(model, data.val, data.spec.modalities, 5, with_loss=True)[1], rel=1e-5)


@pytest.mark.parametrize("method", ["concat", "edm"])  # scored together / one pass per subset (edm aligns across a batch)
def test_subset_probabilities_are_the_softmax_of_each_subsets_logits(method):
    data = random_data(modalities=3)
    model = build_model(TrainConfig(method=method, hidden=8, device="cpu"), data.spec)
    model.standardizer.fit(data.train)
    subsets = [s for s in metrics.all_subsets(data.spec.modalities) if s]
    probs: dict = {}
    preds, _ = predict_subsets(model, data.val, subsets, batch_size=7, full=frozenset(data.spec.modalities), probs=probs)
    assert set(probs) == set(subsets)
    order = data.val.__dict__["_eval_order"]
    for s in subsets:
        assert probs[s].shape == (len(data.val), data.spec.num_classes) and probs[s].dtype == torch.float32
        assert torch.equal(probs[s].argmax(-1), preds[s]), s
        for start in range(0, len(data.val), 7):  # the evaluation's own batches, row by row
            rows = order[start:start + 7]
            batch = model.standardizer(data.val.batch(rows).only(s))
            with torch.inference_mode():
                expected = model.logits(batch).float().softmax(-1)
            torch.testing.assert_close(probs[s][rows], expected, rtol=1e-5, atol=1e-6)
    alone: dict = {}
    predict(model, data.val, ["m0"], 7, probs=alone)
    torch.testing.assert_close(alone[frozenset(["m0"])], probs[frozenset(["m0"])], rtol=1e-5, atol=1e-6)
    without = predict_subsets(model, data.val, subsets, batch_size=7, full=frozenset(data.spec.modalities))
    assert all(torch.equal(without[0][s], preds[s]) for s in subsets)


def test_stacked_subset_batch_makes_the_outside_modalities_absent():
    from heads.train.evaluation import _stack_subsets

    x = {"a": torch.ones(2, 3), "b": 2 * torch.ones(2, 3)}
    batch = Batch(x, {m: t[:, None] for m, t in x.items()}, {m: torch.ones(2, dtype=torch.bool) for m in x},
                  torch.tensor([0, 1]))
    stacked = _stack_subsets(batch, [frozenset("a"), frozenset("b"), frozenset("ab")])
    assert stacked.present["a"].tolist() == [True, True, False, False, True, True]
    assert stacked.x["b"][:2].abs().sum() == 0 and torch.equal(stacked.x["b"][2:4], x["b"])
    assert stacked.counts == {"a": 4, "b": 4} and stacked.y.tolist() == [0, 1] * 3


def test_edm_with_alignment_keeps_its_evaluation_batches(monkeypatch):
    """Alignment mixes a batch's samples, so stacking subsets into one batch would change v(S): edm's
    subsets are scored by its own ``subset_logits``, one call per fixed evaluation batch, never stacked."""
    from heads.train import evaluation

    data = random_data(modalities=2)
    model = build_model(TrainConfig(method="edm", hidden=8, device="cpu"), data.spec)
    assert not model.batch_independent
    calls, real = [], model.subset_logits
    model.subset_logits = lambda batch, subsets: calls.append((len(batch), len(subsets))) or real(batch, subsets)
    monkeypatch.setattr(evaluation, "_stack_subsets", lambda *a: pytest.fail("edm's subsets were stacked"))
    evaluate(model, data.val, data.spec, 8)
    sizes = [min(8, len(data.val) - start) for start in range(0, len(data.val), 8)]
    assert calls == [(n, 3) for n in sizes]  # {m0}, {m1}, {m0, m1} of each batch of 8


def test_beyond_eight_modalities_phi_is_sampled_with_its_standard_error():
    data = random_data(modalities=9, n=20, dim=3)
    model = build_model(TrainConfig(method="concat", hidden=4, device="cpu"), data.spec)
    model.standardizer.fit(data.train)
    report = evaluate(model, data.val, data.spec, 10, permutations=12)
    assert report.shapley == "sampled (12 permutations)" and set(report.phi_stderr) == set(data.spec.modalities)
    orders = metrics.sample_permutations(data.spec.modalities, 12, seed=__import__("heads.blocks.order").blocks.order.EVAL_ORDER_SEED)
    assert len(report.v) == len(set(metrics.permutation_subsets(orders)) | {frozenset([m]) for m in data.spec.modalities})
    phi, stderr = metrics.shapley_from_permutations(report.v, orders)
    assert phi == report.phi and stderr == report.phi_stderr
    assert report.to_json()["shapley"] == "sampled (12 permutations)"


def test_up_to_eight_modalities_phi_is_exact():
    data = random_data(modalities=3)
    model = build_model(TrainConfig(method="concat", hidden=4, device="cpu"), data.spec)
    report = evaluate(model, data.val, data.spec, 10)
    assert report.shapley == "exact" and report.phi_stderr is None and len(report.v) == 8


# --- moving a split --------------------------------------------------------------------------------
def test_a_moved_split_carries_its_host_order_and_masks():
    """The evaluation order is a float64 reduction: computed on the host before the move, so its bits
    (and so every v(S) of a batch-dependent method) do not depend on the device."""
    from heads.blocks.order import evaluation_order

    split = random_data().val
    assert split.to("cpu") is split
    moved = split.to("meta")  # a device with no arithmetic: anything computed after the move would fail
    assert moved.x["m0"].device.type == "meta" and moved.__dict__["_eval_order"].device.type == "meta"
    assert torch.equal(split.__dict__["_eval_order"], evaluation_order(random_data().val))  # made on the host
    assert moved.__dict__["_present_host"] is split.__dict__["_present_host"]
    assert moved._counts(torch.tensor([0, 1, 2]), 3) == {m: 3 for m in split.x}  # counts never touch the device


def test_the_trainer_prepares_its_splits_on_its_device():
    """Splits are moved first and standardised where the model is (no host/device mix): checked on
    the ``meta`` device, which has shapes but no data, so any tensor left on the host would fail."""
    trainer = Trainer(random_data(), TrainConfig(method="concat", epochs=1, hidden=8, device="cpu"))
    trainer.device = torch.device("meta")
    trainer.model.to("meta")
    trainer._prepare()
    for split in trainer.ready.values():
        assert {t.device.type for t in (*split.x.values(), *split.present.values(), split.y)} == {"meta"}
    batch = next(trainer.ready["train"].batches(8, torch.Generator().manual_seed(0)))
    assert trainer.model.logits(batch).device.type == "meta"


@pytest.mark.parametrize("method", sorted(__import__("heads.methods").methods.METHODS))
def test_every_method_trains_and_predicts_where_its_tensors_are(method):
    """A tensor a method makes on the host (``torch.zeros(n)`` without ``device=``) breaks it on a GPU.
    Here the model and the batch live on ``meta`` (shapes, no data): any host tensor meeting them fails.
    (The per-epoch hooks run before the move: they may read the device once per epoch.)"""
    trainer = Trainer(random_data(modalities=2), TrainConfig(method=method, epochs=4, hidden=8, device="cpu"))
    model = trainer.model
    model.train()
    model.start_epoch(1)
    trainer.device = torch.device("meta")
    model.to("meta")
    trainer._prepare()
    model.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    batch = next(trainer.ready["train"].batches(8, torch.Generator().manual_seed(0)))
    model.train_step(batch)
    model.train_step(batch)
    assert model.logits(batch).device.type == "meta"


def test_runs_reading_the_same_split_share_one_prepared_copy():
    """Seeds without masking read the same split with the same statistics: one standardised copy for
    all (a stack of 30 configs on a GPU holds the data once); other statistics get their own."""
    data = random_data()
    a = Trainer(data, TrainConfig(method="concat", epochs=1, hidden=8, device="cpu", seed=0))
    b = Trainer(data, TrainConfig(method="late", epochs=1, hidden=8, device="cpu", seed=1))
    assert all(a.ready[s] is b.ready[s] for s in ("train", "val", "test"))
    c = Trainer(data, TrainConfig(method="concat", epochs=1, hidden=8, device="cpu", standardize="modality"))
    assert c.ready["train"] is not a.ready["train"]
    masked = Trainer(data, TrainConfig(method="concat", epochs=1, hidden=8, device="cpu", missing_train=0.2))
    assert masked.ready["train"] is not a.ready["train"]
    import pickle

    assert "_prepared" not in pickle.loads(pickle.dumps(data.train)).__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_trained_on_the_cpu_reloads_on_the_gpu_with_the_same_predictions(tmp_path):
    from heads.train.rundir import load_run

    data = random_data()
    trainer = Trainer(data, TrainConfig(method="edm", epochs=2, hidden=8, device="cpu"))
    trainer.run(2)
    trainer.finish(tmp_path / "run")
    on_cpu, _ = load_run(tmp_path / "run", "cpu")
    on_gpu, _ = load_run(tmp_path / "run", "cuda")
    assert torch.equal(predict(on_cpu, data.val, data.spec.modalities, 8),
                       predict(on_gpu, data.val.to("cuda"), data.spec.modalities, 8).cpu())
