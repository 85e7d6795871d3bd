"""The command line as a user meets it: real subprocesses for errors, in-process runs for results."""
import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cache import load_split, verify
from tests.conftest import ROOT

import cli


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["train-head", "--method", "nope"], "unknown method 'nope'"),
    (["train-head", "--cache", "/no/such/cache"], "no cache at /no/such/cache"),
    (["train-head", "--method", "ogm-ge", "--alpha", "x"], "--alpha expects float"),
    (["train-head", "--method", "concat", "--tau", "0.3"], "has no option --tau"),
    (["cache", "verify", "/no/such/cache"], "no cache at"),
])
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path):
    proc = run_cli(*args, "--out", str(tmp_path)) if args[0] == "train-head" else run_cli(*args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_corrupt_cache_is_reported_not_crashed(small_av, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_av, bad)
    (bad / "manifest.parquet").write_bytes(b"garbage")
    proc = run_cli("train-head", "--cache", str(bad), "--epochs", "1", "--out", str(tmp_path))
    assert proc.returncode == 2 and "manifest.parquet is unreadable" in proc.stderr and "Traceback" not in proc.stderr


def test_train_head_writes_a_complete_run_folder(small_av, tmp_path):
    result = CliRunner().invoke(cli.app, ["train-head", "--cache", str(small_av), "--epochs", "2", "--quiet",
                                          "--method", "ogm-ge", "--alpha", "0.5", "--no-ge", "--name", "r",
                                          "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "r"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["options"] == {"alpha": 0.5, "coeff_form": "paper", "modulation_start": 1,
                                          "modulation_end": 51, "ge": False, "noise_std": "unscaled",
                                          "ratio": "mean", "plus": 0.0}
    # OGM-GE trains with its official code's SGD by default, and the config says where that came from.
    assert (config["train"]["optimizer"], config["train"]["schedule"]) == ("sgd", "step:70:0.1")
    assert "OGM-GE official main.py" in config["train"]["training_source"] and config["train"]["standardize"] == "feature"
    assert config["train"]["epochs"] == 2 and config["data"]["caches"] == [str(small_av)]
    assert (run / "epochs.csv").read_text().splitlines()[0].startswith("epoch,train_loss,val_acc")
    results = json.loads((run / "results.json").read_text())
    assert set(results["test"]["v"]) == {"∅", "audio", "visual", "audio+visual"}
    assert "| ogm-ge ↗ | 1 |" in result.output  # two epochs: still improving, and the table says so


def test_compare_prints_mean_and_std_over_seeds(small_av, tmp_path):
    result = CliRunner().invoke(cli.app, ["compare", "--cache", str(small_av), "--methods", "concat,late",
                                          "--seeds", "2", "--epochs", "2", "--quiet", "--out", str(tmp_path),
                                          "--name", "c"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| concat") or line.startswith("| late")]
    assert len(rows) == 2 and all("±" in r and "| 2 |" in r for r in rows)
    csv_lines = (tmp_path / "c" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4
    assert "convergence: ↗ concat, late" in result.output  # two epochs: compare names the rows still improving
    assert "conv_flag" in csv_lines[0]


@pytest.mark.parametrize("args, says", [
    (["--paper", "mla", "--tune", "lr"], "drop --tune"),
    (["--prune"], "--prune applies to --tune"),
    (["--tune", "tau=0.1"], "not a training setting"),
    (["--tune", "lr", "--lr", "0.01", "--methods", "concat"], "--lr and --tune lr both set it"),
])
def test_compare_tune_refuses_bad_requests_in_one_line(args, says, tmp_path):
    result = CliRunner().invoke(cli.app, ["compare", "--cache", "/no/such/cache", "--out", str(tmp_path), *args])
    assert result.exit_code != 0 and says in result.output and "Traceback" not in result.output


def test_import_features_with_and_without_split(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x_img = rng.standard_normal((60, 8)).astype(np.float32)
    x_txt = rng.standard_normal((60, 2, 4)).astype(np.float32)
    x_txt[5] = np.nan  # a wholly-NaN row = text missing for sample 5
    np.savez(tmp_path / "f.npz", x_image=x_img, x_text=x_txt, y=y, class_names=np.array(["a", "b", "c"]))
    result = CliRunner().invoke(cli.app, ["import-features", str(tmp_path / "f.npz"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "train 48, val 6, test 6" in result.output  # stratified 80/10/10: 16/2/2 per class
    assert verify(tmp_path / "c") == []
    splits = [load_split(tmp_path / "c", s) for s in ("train", "val", "test")]
    for s in splits:
        assert sorted(np.bincount(s.labels.numpy()).tolist()) == [len(s) // 3] * 3
    missing = {i for s in splits for i, p in zip(s.ids, s.present["text"].tolist()) if not p}
    assert missing == {"0000005"}
    given = np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    np.savez(tmp_path / "g.npz", x_image=x_img, y=y, split=given)
    result = CliRunner().invoke(cli.app, ["import-features", str(tmp_path / "g.npz"), "--out", str(tmp_path / "d")])
    assert "train 40, val 10, test 10" in result.output
    np.savez(tmp_path / "bad.npz", x_image=np.full((3, 2), np.inf), y=np.zeros(3))
    proc = run_cli("import-features", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "e"))
    assert proc.returncode == 2 and "refused" in proc.stderr


def test_cache_info_and_verify_commands(small_av):
    runner = CliRunner()
    info = runner.invoke(cli.app, ["cache", "info", str(small_av)])
    assert info.exit_code == 0 and "audio" in info.output and "[T=1, D=1280]" in info.output
    ok = runner.invoke(cli.app, ["cache", "verify", str(small_av)])
    assert ok.exit_code == 0 and "consistent" in ok.output
