"""Reruns from a config file, sweep files, one table of every run (``runs``) and per-sample
predictions (``predict``): each checked against the numbers the runs themselves wrote.
"""
from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import cli

pytestmark = pytest.mark.trains


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The `av` preset at 5% size: 300 train, 34 validation, 37 test samples."""
    from cache.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("caches") / "av-tiny", "av", seed=0, scale=0.05)


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, message: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def without_timing(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    results.pop("seconds")
    return results


@pytest.fixture(scope="module")
def first(tiny, tmp_path_factory):
    """A run with a method option and a given setting (ogm-ge, α 0.5, lr 3e-4), 3 epochs."""
    out = tmp_path_factory.mktemp("runs")
    ok("train-head", "--method", "ogm-ge", "--alpha", "0.5", "--lr", "3e-4", "--cache", tiny, "--epochs", 3,
       "--device", "cpu", "--out", out, "--name", "first", "--quiet")
    return out / "first"


# --- reruns --------------------------------------------------------------------------------------
def test_config_json_trains_exactly_that_run_again(first):
    ok("train-head", "--config", first / "config.json", "--out", first.parent, "--name", "again", "--quiet")
    again = first.parent / "again"
    assert without_timing(again) == without_timing(first)
    assert (again / "config.json").read_text() == (first / "config.json").read_text()
    assert (again / "epochs.csv").read_text() == (first / "epochs.csv").read_text()


def test_yaml_with_the_same_keys_and_a_hand_written_one_train_the_same_run(first, tiny, tmp_path):
    config = json.loads((first / "config.json").read_text())
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(config))
    # What a person writes: only what differs from the defaults; YAML reads 3e-4 as text.
    (tmp_path / "short.yml").write_text(f"train:\n  method: ogm-ge\n  epochs: 3\n  lr: 3e-4\n  device: cpu\n"
                                        f"  options:\n    alpha: 0.5\ndata:\n  caches: [{tiny}]\n")
    for name in ("same.yaml", "short.yml"):
        ok("train-head", "--config", tmp_path / name, "--out", tmp_path / "runs", "--name", name, "--quiet")
        assert without_timing(tmp_path / "runs" / name) == without_timing(first), name
        assert json.loads((tmp_path / "runs" / name / "config.json").read_text())["train"] == config["train"], name


def test_options_typed_on_the_command_line_replace_single_keys(first, tmp_path):
    ok("train-head", "--config", first / "config.json", "--seed", 1, "--epochs", 2, "--alpha", "0.9", "--out", tmp_path,
       "--name", "changed", "--quiet")
    before = json.loads((first / "config.json").read_text())["train"]
    after = json.loads((tmp_path / "changed" / "config.json").read_text())["train"]
    assert (after["seed"], after["epochs"], after["options"]["alpha"]) == (1, 2, 0.9)
    assert {k: v for k, v in after.items() if k not in ("seed", "epochs", "options")} == \
        {k: v for k, v in before.items() if k not in ("seed", "epochs", "options")}
    assert {k: v for k, v in after["options"].items() if k != "alpha"} == \
        {k: v for k, v in before["options"].items() if k != "alpha"}


def test_bad_config_files_are_one_line(first, tmp_path):
    one_line_error(invoke("train-head", "--config", tmp_path / "none.json"), "no such file")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    one_line_error(invoke("train-head", "--config", tmp_path / "bad.yaml"), "cannot read it")
    (tmp_path / "extra.yaml").write_text("train:\n  method: edm\n  learning_rate: 0.1\n")
    one_line_error(invoke("train-head", "--config", tmp_path / "extra.yaml"), "unknown train key(s) learning_rate")
    (tmp_path / "type.yaml").write_text("train:\n  epochs: many\n")
    one_line_error(invoke("train-head", "--config", tmp_path / "type.yaml"), "train.epochs expects int, got 'many'")
    (tmp_path / "nocache.yaml").write_text("train:\n  epochs: 2\n")
    one_line_error(invoke("train-head", "--config", tmp_path / "nocache.yaml"), "names no data.caches; give --cache")
    one_line_error(invoke("compare", "--config", tmp_path / "extra.yaml"), "unknown key 'train'")


def test_a_sweep_file_equals_the_same_options(tiny, tmp_path):
    common = ["--cache", tiny, "--epochs", 2, "--device", "cpu", "--workers", 1, "--quiet"]
    ok("compare", "--methods", "concat,ogm-ge[alpha=0.5]", "--seeds", "1,", *common, "--out", tmp_path / "typed",
       "--name", "c")
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump({"methods": ["concat", "ogm-ge[alpha=0.5]"], "seeds": [1],
                                                           "caches": [str(tiny)], "epochs": 2, "device": "cpu",
                                                           "workers": 1, "quiet": True}))
    ok("compare", "--config", tmp_path / "compare.yaml", "--out", tmp_path / "file", "--name", "c")
    assert (tmp_path / "file" / "c" / "table.md").read_text() == (tmp_path / "typed" / "c" / "table.md").read_text()
    for run in ("concat-seed1", "ogm-ge_alpha=0.5_-seed1"):  # a one-seed list is that seed, not a count
        assert without_timing(tmp_path / "file" / "c" / run) == without_timing(tmp_path / "typed" / "c" / run)

    ok("grid", "--method", "concat", "--lr", "1e-3,3e-3", "--seeds", "1", *common, "--out", tmp_path / "typed",
       "--name", "g")
    (tmp_path / "grid.yaml").write_text("method: concat\nseeds: 1\naxes:\n  lr: [1e-3, 3e-3]\nepochs: 3\n")
    ok("grid", "--config", tmp_path / "grid.yaml", "--epochs", 2, *common[:2], *common[4:], "--out", tmp_path / "file",
       "--name", "g")  # --epochs typed replaces the file's 3
    typed, filed = (json.loads((tmp_path / d / "g" / "grid.json").read_text()) for d in ("typed", "file"))
    assert filed["axes"] == typed["axes"] == {"lr": [0.001, 0.003]} and filed["runs"] == typed["runs"]
    assert [c["test_acc"] for c in filed["summary"]] == [c["test_acc"] for c in typed["summary"]]


# --- one table of every run ----------------------------------------------------------------------
def md_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip()[2:-2].split(" | ")] for line in lines]  # cells hold |δ m|


@pytest.fixture(scope="module")
def sweeps(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps")
    common = ["--cache", tiny, "--epochs", 3, "--device", "cpu", "--workers", 1, "--out", out, "--quiet"]
    ok("compare", "--methods", "concat,late", "--seeds", 2, *common, "--name", "cmp")
    ok("grid", "--method", "concat", "--lr", "1e-3,3e-3", "--seeds", 2, *common, "--name", "grd")
    return out


def test_runs_over_a_compare_and_a_grid_is_one_table_whose_means_are_the_compare_tables(sweeps, tmp_path):
    (sweeps / "broken").mkdir(exist_ok=True)
    (sweeps / "broken" / "results.json").write_text("{")
    result = ok("runs", sweeps / "cmp", sweeps / "grd", sweeps / "broken", "--group-by", "sweep,label",
                "--out", tmp_path / "table.parquet")
    assert result.stderr.strip() == f"skipped {sweeps / 'broken'}: no config.json, epochs.csv"
    printed = md_rows(result.stdout)
    head, body = printed[0], printed[1:]
    assert [(r[0], r[1], r[2]) for r in body] == [("cmp", "concat", "2"), ("cmp", "late", "2"),
                                                   ("grd", "lr=0.001", "2"), ("grd", "lr=0.003", "2")]
    compare = md_rows((sweeps / "cmp" / "table.md").read_text())
    columns = {"acc multi": "test_acc", "macro-F1": "test_f1", "EDM": "test_edm", "acc audio": "test_acc_audio",
               "acc visual": "test_acc_visual"}
    for row in compare[1:]:
        label = row[0].rstrip(" ↗↘")  # the table marks a row still improving (↗) or fallen away (↘)
        ours = next(r for r in body if r[:2] == ["cmp", label])
        for theirs, mine in columns.items():
            assert ours[head.index(mine)] == row[compare[0].index(theirs)], (row[0], theirs)
    import polars as pl

    frame = pl.read_parquet(tmp_path / "table.parquet")
    with open(sweeps / "cmp" / "results.csv", newline="") as f:
        records = list(csv.DictReader(f))
    for label in ("concat", "late"):
        accs = [float(r["acc"]) for r in records if r["label"] == label]
        row = frame.filter((pl.col("sweep") == "cmp") & (pl.col("label") == label)).row(0, named=True)
        assert row["test_acc"] == pytest.approx(statistics.mean(accs), abs=1e-12)
        assert row["test_acc_std"] == pytest.approx(statistics.stdev(accs), abs=1e-12)
    grid = json.loads((sweeps / "grd" / "grid.json").read_text())
    for config in grid["summary"]:
        row = frame.filter((pl.col("sweep") == "grd") & (pl.col("label") == config["config"])).row(0, named=True)
        assert row["test_acc"] == pytest.approx(config["test_acc"], abs=1e-12)
        assert row["val_acc"] == pytest.approx(config["val_acc"], abs=1e-12)


def test_runs_lists_every_run_with_its_settings_and_filters(sweeps, tmp_path):
    result = ok("runs", sweeps, "--where", "method=late,seed=1", "--out", tmp_path / "t.csv")
    body = md_rows(result.stdout)[1:]
    assert [r[0] for r in body] == [str(sweeps / "cmp" / "late-seed1")]
    import polars as pl

    frame = pl.read_csv(tmp_path / "t.csv")
    row = frame.row(0, named=True)
    record = json.loads((sweeps / "cmp" / "late-seed1" / "results.json").read_text())
    assert (row["sweep"], row["kind"], row["dataset"], row["epochs"], row["best_epoch"]) == \
        ("cmp", "compare", "synthetic-av", 3, record["best_epoch"])
    assert row["test_acc"] == record["test"]["acc"] and row["val_acc_visual"] == record["val"]["acc_visual"]
    assert row["device"] == "cpu" and row["caches"].endswith("av-tiny")
    whole = ok("runs", sweeps, "--out", tmp_path / "all.parquet")
    assert "8 row(s)" in whole.stdout  # the grid's 4 runs and the compare's 4
    kinds = pl.read_parquet(tmp_path / "all.parquet").group_by("kind").len().sort("kind").rows()
    assert kinds == [("compare", 4), ("grid", 4)]
    one_line_error(invoke("runs", sweeps / "cmp", "--where", "colour=red"), "--where: no column 'colour'")
    one_line_error(invoke("runs", sweeps / "cmp", "--out", tmp_path / "t.xlsx"), "--out must end in .parquet, .csv or .md")


# --- predictions -----------------------------------------------------------------------------------
def test_predict_full_set_accuracy_is_the_runs_test_accuracy(first, tiny, tmp_path):
    import polars as pl

    ok("predict", "--run", first, "--cache", tiny, "--out", tmp_path / "p.parquet", "--device", "cpu")
    frame = pl.read_parquet(tmp_path / "p.parquet")
    results = json.loads((first / "results.json").read_text())
    assert frame.height == 37 and frame["id"].n_unique() == 37
    assert set(frame.columns) >= {"id", "label", "label_name", "pred", "prob", "pred_audio", "prob_audio",
                                  "pred_visual", "prob_visual", "present_audio"}
    assert (frame["pred"] == frame["label"]).sum() / frame.height * 100 == results["test"]["acc"]  # as the evaluation: mean × 100
    for m in ("audio", "visual"):
        assert (frame[f"pred_{m}"] == frame["label"]).sum() / frame.height * 100 == results["test"][f"acc_{m}"]
    assert frame["prob"].min() > 0 and frame["prob"].max() <= 1


def test_predict_with_missing_test_uses_the_masks_a_run_would_draw(first, tiny, tmp_path):
    import polars as pl
    from heads.blocks.loading import load_head_data
    from heads.sweeps.jobs import masked_test
    from heads.train.rundir import load_run

    ok("predict", "--run", first, "--cache", tiny, "--missing-test", 0.3, "--out", tmp_path / "p.parquet",
       "--device", "cpu")
    frame = pl.read_parquet(tmp_path / "p.parquet")
    model, cfg = load_run(first)
    expected = masked_test(model, load_head_data([tiny]), cfg, 0.3)
    assert (frame["pred"] == frame["label"]).sum() / frame.height * 100 == expected["acc"]
    missing = 1 - (frame["present_audio"].sum() + frame["present_visual"].sum()) / (2 * frame.height)
    assert missing == pytest.approx(expected["missing"])


def test_predict_refuses_a_cache_that_does_not_fit_the_model(first, tmp_path):
    from cache.importer import import_npz

    spec = json.loads((first / "config.json").read_text())["spec"]
    n, rng = 60, np.random.default_rng(0)
    np.savez(tmp_path / "audio.npz", x_audio=rng.normal(size=(n, spec["dims"]["audio"])).astype(np.float32),
             y=np.arange(n) % 6, class_names=np.array(spec["class_names"]))
    alone, _ = import_npz(tmp_path / "audio.npz", tmp_path / "audio", "audio")
    one_line_error(invoke("predict", "--run", first, "--cache", alone, "--out", tmp_path / "p.parquet"),
                   "lacks modality visual")
    np.savez(tmp_path / "narrow.npz", x_audio=rng.normal(size=(n, 10)).astype(np.float32),
             x_visual=rng.normal(size=(n, spec["dims"]["visual"])).astype(np.float32), y=np.arange(n) % 6,
             class_names=np.array(spec["class_names"]))
    narrow, _ = import_npz(tmp_path / "narrow.npz", tmp_path / "narrow", "narrow")
    one_line_error(invoke("predict", "--run", first, "--cache", narrow, "--out", tmp_path / "p.parquet"),
                   f"feature width of audio 10 (the model reads {spec['dims']['audio']})")
    assert not (tmp_path / "p.parquet").exists()
    assert re.search(r"\.parquet or \.csv", invoke("predict", "--run", first, "--cache", narrow, "--out",
                                                      tmp_path / "p.txt").stderr)
