"""Issue 21's hostile-user cases, driven through the CLI as a subprocess, as a user meets them.

Every case: exit ≠ 0, exactly one ``error:`` line on stderr, no traceback, and the output folder as it
was. The cases run in parallel once per module (each is a fresh ``python cli.py …``; most fail
before any training), then each test reads its result. Beside them: two concurrent writers of one
run (one wins), a ``train-head`` killed with SIGKILL and resumed (same results.json as a run never
stopped), and writes under a file-size limit (``ulimit -f``) that leave nothing behind.
"""
from __future__ import annotations

import collections
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.trains  # subprocesses that import torch: not in the fast subset
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--epochs", "1", "--hidden", "8", "--device", "cpu"]


def cli(*args, timeout=120, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


def snapshot(folder: Path) -> dict | None:
    """Every file under ``folder`` (hidden ones too) with its size and modification time; None if absent."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {".": (folder.stat().st_size, folder.stat().st_mtime_ns)}
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def assert_one_line_error(proc, expect: str = "") -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode not in (0, None), (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert expect.lower() in errors[0].lower(), (expect, errors[0])


# --- the caches and files the cases use --------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(cache: Path, edit) -> None:
    frame = pl.read_parquet(cache / "manifest.parquet")
    edit(frame).write_parquet(cache / "manifest.parquet")


def _shard(cache: Path) -> Path:
    return next(cache.glob("shard-*.h5"))


def _edit_meta(cache: Path, edit) -> None:
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps(edit(meta)))


def build_world(root: Path) -> dict[str, Path]:
    from cache.synthetic import make_synthetic

    good = make_synthetic(root / "good", "av", seed=0, scale=0.05)
    other = make_synthetic(root / "other", "av", seed=1, scale=0.05)
    w = {"good": good, "root": root}

    w["nan"] = _copy(good, root / "nan")
    with h5py.File(_shard(w["nan"]), "r+") as f:
        x = f["features/audio"][:]
        x[0, 0, :3] = np.nan
        x[1, 0, 0] = np.inf
        f["features/audio"][...] = x

    w["foreign"] = _copy(good, root / "foreign")
    shutil.copy(other / "manifest.parquet", w["foreign"] / "manifest.parquet")

    w["dup"] = _copy(good, root / "dup")
    _edit_manifest(w["dup"], lambda m: pl.concat([m, m.head(3)]))

    w["split"] = _copy(good, root / "split")
    _edit_manifest(w["split"], lambda m: m.with_columns(
        pl.when(pl.col("row") == 0).then(pl.lit("training")).otherwise(pl.col("split")).alias("split")))

    w["row"] = _copy(good, root / "row")
    _edit_manifest(w["row"], lambda m: m.with_columns(
        pl.when(pl.col("row") == 0).then(99_999).otherwise(pl.col("row")).alias("row")))

    w["label"] = _copy(good, root / "label")  # a label beyond the class list, in shard and manifest alike
    with h5py.File(_shard(w["label"]), "r+") as f:
        y = f["labels"][:]
        y[0] = 17
        f["labels"][...] = y
    _edit_manifest(w["label"], lambda m: m.with_columns(
        pl.when(pl.col("row") == 0).then(17).otherwise(pl.col("label")).alias("label")))

    w["short"] = _copy(good, root / "short")  # the class list cut to three of six names
    _edit_meta(w["short"], lambda meta: {**meta, "class_names": meta["class_names"][:3]})

    w["list"] = _copy(good, root / "list")
    (w["list"] / "meta.json").write_text("[]")

    w["notest"] = _copy(good, root / "notest")
    _edit_manifest(w["notest"], lambda m: m.filter(pl.col("split") != "test"))

    w["one"] = _copy(good, root / "one")  # every sample of class 0 (reported 100%)
    with h5py.File(_shard(w["one"]), "r+") as f:
        f["labels"][...] = np.zeros_like(f["labels"][:])
    _edit_manifest(w["one"], lambda m: m.with_columns(pl.lit(0, dtype=pl.Int64).alias("label")))
    np.savez(root / "one.npz", x_a=np.random.default_rng(0).standard_normal((40, 4)), y=np.arange(40) % 2)
    w["one_npz"] = root / "one.npz"
    rng = np.random.default_rng(0)

    w["fifo"] = _copy(good, root / "fifo")
    shard = _shard(w["fifo"])
    shard.unlink()
    os.mkfifo(shard)

    np.savez(root / "complex.npz", x_a=rng.standard_normal((40, 4)) + 1j, y=np.arange(40) % 2)
    np.savez(root / "huge_label.npz", x_a=rng.standard_normal((40, 4)), y=np.r_[np.arange(39) % 2, 10_000_000])
    w["complex"], w["huge_label"] = root / "complex.npz", root / "huge_label.npz"

    # Joined caches that share half their training ids (refused on the ids before any feature is joined).
    keep = pl.read_parquet(good / "manifest.parquet")["sample_id"].to_list()[::2]
    w["half"] = _copy(good, root / "half")
    _edit_manifest(w["half"], lambda m: m.filter(pl.col("sample_id").is_in(keep) | (pl.col("split") != "train")))

    w["file"] = root / "a-file"
    w["file"].write_text("not a folder")
    w["runs"] = root / "runs"
    (w["runs"] / "taken").mkdir(parents=True)
    (w["runs"] / "taken" / "results.json").write_text("{}")
    (w["runs"] / "afile").write_text("a run name that is a file")
    return w


def cases(w: dict[str, Path]) -> dict[str, tuple[list, str, Path]]:
    """id → (CLI words, what the error line must say, the folder that must stay unchanged)."""
    good, runs = w["good"], w["runs"]
    t = lambda *a, cache=good: ["train-head", "--cache", cache, *SMALL, "--out", runs, *a]
    c = lambda *a: ["compare", "--cache", good, "--seeds", "1", "--workers", "1", *SMALL, "--out", runs, *a]
    return {
        # 1. filesystem errors
        "out-is-a-file": (["train-head", "--cache", good, *SMALL, "--out", w["file"], "--name", "x"], "is a file", w["file"]),
        "name-too-long": (t("--name", "n" * 300), "too long", runs),
        "name-is-a-file": (t("--name", "afile"), "exists", runs),
        "name-taken": (t("--name", "taken"), "exists", runs),
        "import-out-is-a-file": (["import-features", w["one_npz"], "--out", w["file"]], "is a file", w["file"]),
        "synthetic-out-under-a-file": (["make-synthetic", "--out", w["file"] / "sub", "--scale", "0.05"],
                                       "a-file", w["file"]),
        "import-file-is-a-folder": (["import-features", good, "--out", runs / "imp"], "not a readable", runs),
        # 2. numbers outside their domain
        "lr-inf": (t("--lr", "inf"), "--lr must lie in", runs),
        "lr-1e10": (t("--lr", "1e10"), "--lr must lie in", runs),
        "wd-nan": (t("--weight-decay", "nan"), "--weight-decay", runs),
        "wd-inf": (t("--weight-decay", "inf"), "--weight-decay", runs),
        "schedule-inf": (t("--schedule", "step:1:inf"), "--schedule", runs),
        "ccat-beta-neg": (t("--method", "ccat", "--beta", "-1"), "--beta", runs),
        "ccat-beta-nan": (t("--method", "ccat", "--beta", "nan"), "--beta", runs),
        "ogm-alpha-nan": (t("--method", "ogm-ge", "--alpha", "nan"), "--alpha", runs),
        "qmf-temperature-0": (t("--method", "qmf", "--temperature", "0"), "--temperature", runs),
        "lfm-temperature-0": (t("--method", "lfm", "--temperature", "0"), "--temperature", runs),
        "mla-alpha-neg": (t("--method", "mla", "--alpha", "-1"), "--alpha", runs),
        "mmpareto-boost-nan": (t("--method", "mmpareto", "--boost", "nan"), "--boost", runs),
        "edm-memory-dim-neg": (t("--method", "edm", "--memory-dim", "-1"), "--memory-dim", runs),
        "ccat-heads-3": (t("--method", "ccat", "--heads", "3", "--name", "h3"), "must divide", runs),
        "spec-key-twice": (c("--methods", "edm[tau=0.3;tau=0.5]"), "twice", runs),
        "seed-2-70": (t("--seed", str(2**70)), "--seed", runs),
        "seeds-empty": (c("--seeds", " , "), "--seeds", runs),
        "hidden-1e8": (t("--hidden", "100000000"), "--hidden", runs),
        "scale-1e9": (["make-synthetic", "--out", runs / "huge", "--scale", "1e9"], "--scale", runs),
        # 3. damaged caches
        "nan-features": (t(cache=w["nan"]), "nan or inf", runs),
        "foreign-manifest": (t(cache=w["foreign"]), "disagrees with the manifest", runs),
        "duplicated-rows": (t(cache=w["dup"]), "more than once", runs),
        "bogus-split": (t(cache=w["split"]), "unknown split", runs),
        "row-beyond-shard": (t(cache=w["row"]), "holds 371 rows", runs),
        "label-beyond-classes": (t(cache=w["label"]), "outside the", runs),
        "short-class-list": (t(cache=w["short"]), "outside the 3 classes", runs),
        "meta-is-a-list": (t(cache=w["list"]), "not an object", runs),
        "no-test-split": (t(cache=w["notest"]), "no test split", runs),
        "single-class": (t(cache=w["one"]), "at least two", runs),
        "import-into-a-file-path": (["import-features", w["one_npz"], "--out", w["file"] / "x"], "a-file", w["file"]),
        "join-half-the-ids": (t(cache=f"{good},{w['half']}"), "--join inner", runs),
        "fifo-shard-train": (t(cache=w["fifo"]), "not a regular file", runs),
        "fifo-shard-verify": (["cache", "verify", w["fifo"]], "problem", w["fifo"]),
        "complex-features": (["import-features", w["complex"], "--out", runs / "cx"], "complex", runs),
        "huge-label": (["import-features", w["huge_label"], "--out", runs / "hl"], "dense class ids", runs),
        # 5. promises
        "device-cuda-x": (t("--device", "cuda:x"), "device number", runs),
        "device-empty": (t("--device", ""), "empty", runs),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = build_world(tmp_path_factory.mktemp("faults"))
    table = cases(w)
    before = {k: snapshot(folder) for k, (_, _, folder) in table.items()}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {k: pool.submit(cli, *argv, timeout=120) for k, (argv, _, _) in table.items()}
        results = {k: f.result() for k, f in futures.items()}
    return w, table, before, results


CASE_IDS = list(cases(collections.defaultdict(lambda: Path("/x"))))


@pytest.mark.parametrize("case", CASE_IDS)
def test_each_fault_is_one_line_and_leaves_the_output_as_it_was(world, case):
    w, table, before, results = world
    argv, expect, folder = table[case]
    assert_one_line_error(results[case], expect)
    assert snapshot(folder) == before[case], f"{case}: {folder} changed"


def test_at_least_forty_cases():
    assert len(CASE_IDS) >= 40


# --- two writers of one run --------------------------------------------------------------------
def test_two_concurrent_runs_of_one_name_one_wins(world):
    w = world[0]
    out = w["root"] / "race"
    argv = ["train-head", "--cache", w["good"], "--epochs", "3", "--hidden", "8", "--device", "cpu", "--out", out,
            "--name", "same", "--quiet"]
    procs = [subprocess.Popen([sys.executable, "cli.py", *map(str, argv)], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, (codes, outs)
    loser = outs[[p.returncode for p in procs].index(codes[1])][1]
    errors = [line for line in loser.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("being written by process" in errors[0] or "exists" in errors[0]), loser
    assert "Traceback" not in loser
    assert sorted(p.name for p in out.iterdir()) == ["same"]  # no lock, temporary folder or checkpoint left


# --- kill -9 and resume ------------------------------------------------------------------------
def _results(run: Path) -> dict:
    record = json.loads((run / "results.json").read_text())
    return {k: v for k, v in record.items() if "second" not in k and k not in ("timing",)}


def test_train_head_killed_with_sigkill_resumes_to_the_same_results(world):
    w = world[0]
    out = w["root"] / "resume"
    base = ["train-head", "--cache", w["good"], "--epochs", "40", "--hidden", "8", "--device", "cpu",
            "--out", out, "--quiet", "--seed", "3"]
    assert cli(*base, "--name", "whole", timeout=300).returncode == 0
    proc = subprocess.Popen([sys.executable, "cli.py", *map(str, base), "--name", "cut"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    side = out / ".cut.resume" / "identity.json"
    deadline = time.monotonic() + 240
    while not side.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    stopped = json.loads(side.read_text())["epoch"]
    assert 1 <= stopped < 40 and not (out / "cut").exists()
    again = cli(*base, "--name", "cut", timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"from its checkpoint at epoch {stopped}/40" in again.stderr
    assert _results(out / "cut") == _results(out / "whole")
    assert not (out / ".cut.resume").exists()
    assert (out / "cut" / "epochs.csv").read_text().count("\n") == 41  # header + every epoch once


# --- a full disk -------------------------------------------------------------------------------
def _limit(nbytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_a_write_beyond_the_file_size_limit_is_refused_and_leaves_nothing(world):
    w = world[0]
    out = w["root"] / "full"
    out.mkdir()
    np.savez(out.parent / "big.npz", x_a=np.random.default_rng(0).standard_normal((2000, 256)).astype(np.float32),
             y=np.arange(2000) % 3)
    for argv in (["import-features", out.parent / "big.npz", "--out", out / "imp"],
                 ["make-synthetic", "--out", out / "syn"]):
        proc = subprocess.run([sys.executable, "cli.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                              env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"}, preexec_fn=_limit(256 * 1024), timeout=120)
        assert_one_line_error(proc, "ulimit -f")
        assert list(out.iterdir()) == []  # no .imp.tmp-PID/ left behind


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    from cache.replace import write_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".c.tmp-{int(dead.stdout)}"
    (stale / "half").mkdir(parents=True)
    mine = tmp_path / f".c.tmp-{os.getppid()}"  # a live process's folder stays
    mine.mkdir()
    write_folder(tmp_path / "c", False, lambda tmp: (tmp.mkdir(), (tmp / "f").write_text("x")))
    assert not stale.exists() and mine.exists() and (tmp_path / "c" / "f").exists()


# --- a sweep rerun under its name with another config ------------------------------------------
def test_a_compare_rerun_with_other_settings_is_refused_naming_them(world):
    w = world[0]
    out = w["root"] / "rerun"
    base = ["compare", "--methods", "concat", "--cache", w["good"], "--seeds", "1", "--workers", "1", "--hidden", "8",
            "--device", "cpu", "--out", out, "--name", "c", "--quiet"]
    assert cli(*base, "--epochs", "1").returncode == 0
    before = snapshot(out)
    proc = cli(*base, "--epochs", "2")
    assert_one_line_error(proc, "--epochs 1 → 2")
    assert "--overwrite" in proc.stderr and snapshot(out) == before
    assert cli(*base, "--epochs", "1").returncode == 0  # the same config resumes (nothing to train)
    assert cli(*base, "--epochs", "2", "--overwrite").returncode == 0
    assert json.loads((out / "c" / "concat-seed0" / "results.json").read_text())["epochs_run"] == 2
