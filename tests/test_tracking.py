"""Trackers (``--log-with``): what a run logs is read back through each tracker's own reader and must
equal the run's files — TensorBoard's event files through tensorboard's ``EventAccumulator``, the
MLflow file store through ``MlflowClient``, W&B's offline run file through its protobuf records — and
a sweep logs one tracked run per config × seed, once, however often it is resumed.
"""
from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from heads.train import tracking

pytestmark = pytest.mark.trains


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The `av` preset at 5% size: 300 train, 34 validation, 37 test samples."""
    from cache.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("caches") / "av-tiny", "av", seed=0, scale=0.05)


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Nothing configured: the trackers must stay local and offline by themselves."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def epochs_csv(run: Path) -> list[dict]:
    with open(run / "epochs.csv", newline="") as f:
        return list(csv.DictReader(f))


def numeric(rows: list[dict]) -> dict[str, dict[int, float]]:
    """Each numeric column of ``epochs.csv`` as {epoch: value}, empty cells left out."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, cell in row.items():
            if key == "epoch" or cell == "":
                continue
            try:
                out.setdefault(key, {})[int(row["epoch"])] = float(cell)
            except ValueError:
                pass
    return out


def text(rows: list[dict]) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for row in rows:
        for key, cell in row.items():
            try:
                float(cell)
            except ValueError:
                out.setdefault(key, {})[int(row["epoch"])] = cell
    return out


def tensorboard_values(folder: Path) -> tuple[dict, dict]:
    """Every scalar (float64 tensors) and text summary in a TensorBoard run folder, by tag and step."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    scalars, texts = {}, {}
    for tag in acc.Tags()["tensors"]:
        for event in acc.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            if tag.endswith("/text_summary"):
                texts.setdefault(tag[:-len("/text_summary")], {})[event.step] = value.item().decode()
            else:
                assert value.dtype.name == "float64", tag  # exact, not float32
                scalars.setdefault(tag, {})[event.step] = float(value.item())
    return scalars, texts


def mlflow_client(store: Path):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.resolve().as_uri())


@pytest.fixture(scope="module")
def logged_run(tiny, tmp_path_factory):
    """One 3-epoch edm run (φ, δ, EDM and the order every epoch) logged to every tracker installed."""
    out = tmp_path_factory.mktemp("tracked")
    trackers = ["tensorboard", "mlflow"] + (["wandb"] if has("wandb") else [])
    mp = pytest.MonkeyPatch()
    for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_PROJECT"):
        mp.delenv(name, raising=False)
    result = invoke("train-head", "--method", "edm", "--cache", tiny, "--epochs", 3, "--device", "cpu", "--out", out,
                    "--name", "run", "--quiet", "--log-with", ",".join(trackers))
    mp.undo()
    assert result.exit_code == 0, result.output
    return out / "run"


def test_tensorboard_holds_every_epoch_value_and_the_result(logged_run):
    rows = epochs_csv(logged_run)
    scalars, texts = tensorboard_values(logged_run / "tensorboard")
    expected = numeric(rows)
    assert {"train_loss", "val_acc", "val_f1", "val_loss", "val_edm", "val_phi_audio", "val_delta_visual",
            "val_acc_audio"} <= set(expected)
    for key, values in expected.items():
        assert scalars[key] == values, key  # exactly the values of epochs.csv, at step = epoch
    for key, values in text(rows).items():
        assert texts[key] == values, key  # edm's order, epoch by epoch
    results = json.loads((logged_run / "results.json").read_text())
    last = results["epochs_run"]
    assert scalars["selected/epoch"] == {last: results["best_epoch"]}
    for split in ("val", "test"):
        for key in ("acc", "f1", "loss", "edm", "acc_audio", "phi_visual", "delta_audio"):
            assert scalars[f"selected/{split}_{key}"] == {last: results[split][key]}, (split, key)
    config = json.loads((logged_run / "config.json").read_text())
    assert json.loads(texts["config"][0].strip("`\n")) == config


def test_mlflow_file_store_holds_params_every_epoch_value_and_the_result(logged_run):
    client = mlflow_client(logged_run / "mlruns")
    experiment = client.get_experiment_by_name("train-head")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    config = json.loads((logged_run / "config.json").read_text())
    params = run.data.params
    assert params["train.method"] == "edm" and params["train.lr"] == str(config["train"]["lr"])
    assert params["train.options.order"] == config["train"]["options"]["order"]
    assert params["train.seed"] == "0" and params["used.device"] == "cpu"
    assert params["code_version"] == config["code_version"]
    assert json.loads(params["data.caches"]) == config["data"]["caches"]
    assert "spec.class_names" not in params
    rows = epochs_csv(logged_run)
    for key, values in numeric(rows).items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == values, key
    results = json.loads((logged_run / "results.json").read_text())
    assert run.data.metrics["selected/test_acc"] == results["test"]["acc"]
    assert run.data.metrics["selected/epoch"] == results["best_epoch"]
    best = next(r for r in rows if int(r["epoch"]) == results["best_epoch"])
    assert run.data.tags["selected/order"] == best["order"]  # MLflow metrics are numbers: the text as a tag
    marker = json.loads((logged_run / "tracked.json").read_text())
    assert {r["tracker"] for r in marker} >= {"tensorboard", "mlflow"}
    assert next(r for r in marker if r["tracker"] == "mlflow")["run_id"] == run.info.run_id


def wandb_records(path: Path):
    """The records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB
    log blocks of 32 KiB whose records (CRC, length, type) are full, or first / middle / last pieces."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            whole = data
        elif kind in (2, 3):
            pieces = (pieces if kind == 3 else b"") + data
            continue
        elif kind == 4:
            whole = pieces + data
        else:
            continue
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


def test_wandb_offline_run_holds_every_epoch_value(logged_run):
    pytest.importorskip("wandb")
    (file,) = (logged_run / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, group = {}, {}, None
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[int(items["_step"])] = items
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            group = record.run.run_group
    rows = epochs_csv(logged_run)
    for key, values in numeric(rows).items():
        assert {step: float(h[key]) for step, h in history.items() if key in h} == values, key
    for key, values in text(rows).items():
        assert {step: h[key] for step, h in history.items()} == values, key
    assert config["train"]["method"] == "edm" and group == ""
    marker = json.loads((logged_run / "tracked.json").read_text())
    assert next(r for r in marker if r["tracker"] == "wandb")["mode"] == "offline"


def test_grid_logs_one_tracked_run_per_config_and_seed_once(tiny, tmp_path):
    logs = tmp_path / "logs"
    args = ["grid", "--method", "concat", "--lr", "1e-3,3e-3", "--seeds", 2, "--cache", tiny, "--epochs", 3,
            "--device", "cpu", "--workers", 1, "--out", tmp_path, "--name", "g", "--quiet",
            "--log-with", "tensorboard,mlflow", "--log-dir", logs]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    runs = sorted(p.name for p in (tmp_path / "g").iterdir() if (p / "results.json").exists())
    assert runs == ["lr=0.001-seed0", "lr=0.001-seed1", "lr=0.003-seed0", "lr=0.003-seed1"]
    assert sorted(p.name for p in (logs / "tensorboard" / "g").iterdir()) == runs  # one sub-folder per run
    client = mlflow_client(logs / "mlruns")
    experiment = client.get_experiment_by_name("g")  # an experiment per sweep
    tracked = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(tracked) == runs and {r.data.tags["group"] for r in tracked.values()} == {"g"}
    for name in runs:
        curve = {int(r["epoch"]): float(r["val_acc"]) for r in epochs_csv(tmp_path / "g" / name)}
        assert {m.step: m.value for m in client.get_metric_history(tracked[name].info.run_id, "val_acc")} == curve
        assert tensorboard_values(logs / "tensorboard" / "g" / name)[0]["val_acc"] == curve
    assert invoke(*args).exit_code == 0  # resumed: every run reused, none logged twice
    assert len(client.search_runs([experiment.experiment_id])) == 4
    assert len(list((logs / "tensorboard" / "g" / runs[0]).glob("events.*"))) == 1


def test_a_failing_tracker_warns_once_and_the_run_folder_is_whole(tiny, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tracking._MLflow, "log", broken)
    result = invoke("train-head", "--cache", tiny, "--epochs", 2, "--device", "cpu", "--out", tmp_path,
                    "--name", "r", "--quiet", "--log-with", "mlflow,tensorboard")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "mlflow" in warnings[0] and "disk full" in warnings[0]
    run = tmp_path / "r"
    assert all((run / f).exists() for f in ("config.json", "epochs.csv", "results.json", "table.md", "model.pt"))
    assert tensorboard_values(run / "tensorboard")[0]["val_acc"] == numeric(epochs_csv(run))["val_acc"]
    assert [r["tracker"] for r in json.loads((run / "tracked.json").read_text())] == ["tensorboard"]
    (mlflow_run,) = mlflow_client(run / "mlruns").search_runs(
        [mlflow_client(run / "mlruns").get_experiment_by_name("train-head").experiment_id])
    assert mlflow_run.info.status == "FAILED"


def test_missing_library_or_unknown_tracker_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for command in (["train-head"], ["compare", "--methods", "concat"], ["grid", "--method", "concat"],
                    ["robustness"]):
        result = invoke(*command, "--cache", tmp_path / "nowhere", "--out", tmp_path, "--log-with", "tensorboard,wandb")
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, (command, result.output)
        assert lines[0] == "error: --log-with wandb needs the wandb package: pip install -e '.[tracking]'"
    result = invoke("train-head", "--cache", tmp_path / "nowhere", "--log-with", "neptune")
    assert result.exit_code == 2 and "--log-with takes tensorboard, mlflow, wandb" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_without_log_with_nothing_of_the_trackers_is_written(tiny, tmp_path):
    assert invoke("train-head", "--cache", tiny, "--epochs", 1, "--device", "cpu", "--out", tmp_path, "--name", "r",
                  "--quiet").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.json", "epochs.csv", "model.pt",
                                                                   "results.json", "table.md"]


def test_flat_params_and_values_split_numbers_from_text():
    params = tracking.flat_params({"train": {"lr": 0.1, "options": {"tau": 0.3}, "schedule": None},
                                   "data": {"caches": ["a", "b"]}, "spec": {"class_names": ["x"], "dims": {"a": 4}}})
    assert params == {"train.lr": 0.1, "train.options.tau": 0.3, "train.schedule": None, "data.caches": '["a", "b"]',
                      "spec.dims.a": 4}
    assert tracking.split_values({"a": 1, "b": 2.5, "c": "x>y", "d": "", "e": None}) == ({"a": 1.0, "b": 2.5}, {"c": "x>y"})
