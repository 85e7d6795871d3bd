"""Faults and bad input in stage one and the cache: each ends in one clear line, nothing half written.

Every test drives the code path users run (the CLI, or the function it calls) on tiny generated data:
caches from the synthetic generator, checkpoints of tiny random models, dataset folders written here.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import cli
from cache import check, verify

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def one_line_error(result, *fragments: str, code: int = 2) -> str:
    """Assert the result is exit ``code`` with exactly one ``error:`` line holding every fragment."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def cache(tmp_path) -> Path:
    """A small synthetic cache in three shards, ours to damage."""
    from cache import write_arrays

    rng = np.random.default_rng(0)
    n = 60
    return write_arrays(tmp_path / "c", dataset="d", backbone="b",
                        features={"audio": rng.standard_normal((n, 8)).astype(np.float32),
                                  "visual": rng.standard_normal((n, 2, 4)).astype(np.float32)},
                        labels=np.arange(n) % 3, splits=(["train"] * 4 + ["val", "test"]) * (n // 6),
                        class_names=["a", "b", "c"], shard_size=20)


# ---------------------------------------------------------------- 1. cache verify checks the bytes


def _flip_bytes(shard: Path, dataset: str, count: int = 64) -> int:
    """XOR ``count`` raw bytes of ``dataset`` where they lie in the file; returns how many values changed."""
    with h5py.File(shard, "r") as f:
        ds = f[dataset]
        offset, before = ds.id.get_offset(), ds[:].copy()
    assert offset is not None  # contiguous storage: the bytes sit at one place in the file
    raw = bytearray(shard.read_bytes())
    for i in range(count):
        raw[offset + 3 + 2 * i] ^= 0x01  # the low bit of a float16's low byte: a tiny change, still finite
    shard.write_bytes(bytes(raw))
    with h5py.File(shard, "r") as f:
        after = f[dataset][:]
    assert np.isfinite(after).all()
    return int((before != after).sum())


def test_verify_catches_flipped_feature_bytes(cache):
    assert check(cache).problems == [] and check(cache).warnings == []
    shard = sorted(cache.glob("shard-*.h5"))[1]
    assert _flip_bytes(shard, "features/audio") == 64
    result = invoke("cache", "verify", cache)
    assert result.exit_code == 1, result.output
    assert f"problem: {shard.name}/features/audio: content checksum mismatch" in result.stderr
    assert "consistent" not in result.output


def test_verify_catches_a_label_changed_in_the_shard_or_the_manifest(cache, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(cache, other)
    # A label changed in a shard (with the checksums left as they were)...
    shard = sorted(cache.glob("shard-*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        f["labels"][3] = (f["labels"][3] + 1) % 3
    problems = verify(cache)
    assert any("labels of 1 sample(s) differ from the manifest" in p for p in problems), problems
    assert any(f"{shard.name}/labels: content checksum mismatch" in p for p in problems), problems
    # ...and one changed in the manifest only: the shards are intact, the index lies.
    manifest = pl.read_parquet(other / "manifest.parquet")
    manifest = manifest.with_columns(pl.when(pl.col("sample_id") == "0000007").then((pl.col("label") + 1) % 3)
                                     .otherwise(pl.col("label")).alias("label"))
    manifest.write_parquet(other / "manifest.parquet")
    result = invoke("cache", "verify", other)
    assert result.exit_code == 1
    assert "labels of 1 sample(s) differ from the manifest, e.g. '0000007'" in result.stderr, result.stderr
    # Splits and presence are checked the same way.
    manifest = pl.read_parquet(other / "manifest.parquet").with_columns(
        pl.lit("test").alias("split"), pl.lit(False).alias("present_visual"))
    manifest.write_parquet(other / "manifest.parquet")
    problems = verify(other)
    assert any("splits of" in p for p in problems) and any("presence of visual" in p for p in problems), problems


def test_verify_warns_on_a_cache_without_checksums(cache):
    for shard in cache.glob("shard-*.h5"):  # what a cache written before checksums looks like
        with h5py.File(shard, "r+") as f:
            for name in list(f.attrs):
                del f.attrs[name]
            f.visititems(lambda _, obj: [obj.attrs.__delitem__(k) for k in list(obj.attrs)])
    report = check(cache)
    assert report.problems == [] and report.warnings == [
        "no checksums: written by an older version; content not verified (3 of 3 shard(s))"]
    result = invoke("cache", "verify", cache)
    assert result.exit_code == 0 and "consistent" in result.output
    assert "warning: no checksums: written by an older version; content not verified" in result.stderr


# ---------------------------------------------------------------- 2. unreadable weights


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A ``folder`` dataset of six samples with an image and an audio file each, two classes."""
    from tests.test_decode import write_jpeg, write_wav

    root = tmp_path_factory.mktemp("folder")
    rows = ["sample_id,label,split,image_path,audio_path"]
    for i in range(6):
        write_jpeg(root / f"{i}.jpg", seed=i)
        write_wav(root / f"{i}.wav", 0.5, seed=i)
        rows.append(f"s{i},{'ab'[i % 2]},{('train', 'val', 'test')[i % 3]},{i}.jpg,{i}.wav")
    (root / "samples.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def good_weights(tmp_path_factory) -> dict[str, Path]:
    from tests.test_backbones import tiny_clip, tiny_resnet, tiny_whisper

    root = tmp_path_factory.mktemp("weights")
    return {"resnet18": tiny_resnet(root / "resnet18.pth"), "whisper": tiny_whisper(root / "large-v3.pt"),
            "clip": tiny_clip(root / "clip")}


def _truncated(src: Path, dst: Path) -> Path:
    """What a download cut halfway leaves: the first half of the file."""
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("backbone, family", [("resnet18", "resnet"), ("whisper", "whisper"), ("clip", "clip")])
@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_unreadable_weights_are_one_line(backbone, family, damage, good_weights, tiny_folder, tmp_path):
    import shutil

    good = good_weights[backbone]
    if backbone == "clip":  # an open_clip folder whose weights file is damaged
        bad = shutil.copytree(good, tmp_path / "clip")
        target = bad / "open_clip_pytorch_model.bin"
    else:
        bad = target = tmp_path / good.name
    if damage == "truncated":
        _truncated(good if backbone != "clip" else good / target.name, target)
    else:
        target.write_text("<html>404 Not Found: the mirror moved</html>\n" * 3)
    config = ["--config", json.dumps({"layers": [1, 1, 1, 1], "image_size": 32})] if family == "resnet" else []
    result = invoke("extract", "folder", "--backbone", backbone, "--weights", bad, "--data-root", tiny_folder,
                    "--out", tmp_path / "out", "--workers", 0, "--quiet", *config)
    line = one_line_error(result, f"cannot read weights {bad}: the file is truncated or not a {family} checkpoint (")
    assert ("incomplete zip archive" if damage == "truncated" else "neither a torch zip archive nor a pickle") in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("shard-*.h5"))


# ---------------------------------------------------------------- 3. an existing --out is refused or replaced whole


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _npz(path: Path, n: int = 30, **arrays) -> Path:
    rng = np.random.default_rng(1)
    base = {"x_audio": rng.standard_normal((n, 4)).astype(np.float32), "y": np.arange(n) % 3}
    np.savez(path, **{**base, **arrays})
    return path


@pytest.mark.parametrize("command", ["make-synthetic", "import-features"])
def test_existing_out_is_refused_then_replaced_with_overwrite(command, tmp_path):
    out = tmp_path / "out"
    first = ["make-synthetic", "--scale", "0.02"] if command == "make-synthetic" else \
        ["import-features", _npz(tmp_path / "a.npz")]
    assert invoke(*first, "--out", out).exit_code == 0
    before = _snapshot(out)
    second = ["make-synthetic", "--scale", "0.02", "--seed", "7"] if command == "make-synthetic" else \
        ["import-features", _npz(tmp_path / "b.npz", n=45)]
    one_line_error(invoke(*second, "--out", out), f"--out {out} already exists and is not empty", "--overwrite")
    assert _snapshot(out) == before  # untouched
    result = invoke(*second, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    after = _snapshot(out)
    assert after != before and verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    if command == "make-synthetic":
        assert json.loads(after["meta.json"])["synthetic"]["seed"] == 7
    else:
        assert pl.read_parquet(out / "manifest.parquet").height == 45


def test_a_failed_overwrite_leaves_the_old_cache(tmp_path):
    out = tmp_path / "out"
    assert invoke("import-features", _npz(tmp_path / "a.npz"), "--out", out).exit_code == 0
    before = _snapshot(out)
    # Passes every check of the importer, then fails inside the writer (a modality name it refuses).
    bad = _npz(tmp_path / "b.npz", x_Audio=np.zeros((30, 2), np.float32))
    one_line_error(invoke("import-features", bad, "--out", out, "--overwrite"), "invalid modality name 'Audio'")
    assert _snapshot(out) == before and not any(p.name.startswith(".") for p in tmp_path.iterdir())


# ---------------------------------------------------------------- 5. degenerate data refused before anything is written


@pytest.mark.parametrize("arrays, fragments", [
    ({"y": np.array([0.0, 1.5, 2.0] * 10)}, ["labels in 'y' must be integer class ids; 10 of 30 are not"]),
    ({"y": np.zeros(30, int)}, ["every label in f.npz is class '0'", "at least two classes"]),
    ({"y": np.zeros(0, int), "x_audio": np.zeros((0, 4), np.float32)}, ["f.npz holds no samples"]),
    ({"split": np.array(["train"] * 25 + ["test"] * 5)}, ["f.npz: no val samples", "add 'val'"]),
    ({"x_audio": np.full((30, 4), np.nan, np.float32)}, ["x_audio is NaN in all 30 rows"]),
    ({"x_audio": np.where(np.arange(120).reshape(30, 4) % 7 == 0, np.inf, 1.0).astype(np.float32)},
     ["x_audio holds 18 NaN or inf value(s)", "refused"]),
    ({"y": np.array(["cat", "dog", "eel"] * 10), "class_names": np.array(["cat", "dog"])},
     ["label(s) 'eel' of 'y' are not in class_names"]),
])
def test_import_refuses_degenerate_data(arrays, fragments, tmp_path):
    result = invoke("import-features", _npz(tmp_path / "f.npz", **arrays), "--out", tmp_path / "out")
    one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_import_accepts_integral_floats_and_string_labels(tmp_path):
    result = invoke("import-features", _npz(tmp_path / "f.npz", y=np.array([2.0, 0.0, 1.0] * 10)), "--out",
                    tmp_path / "a")
    assert result.exit_code == 0, result.output
    from cache import load_meta, load_split

    assert sorted(set(load_split(tmp_path / "a", "train").labels.tolist())) == [0, 1, 2]
    y = np.array(["dog", "cat", "eel"] * 10)
    result = invoke("import-features", _npz(tmp_path / "g.npz", y=y), "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert load_meta(tmp_path / "b")["class_names"] == ["cat", "dog", "eel"]
    manifest = pl.read_parquet(tmp_path / "b" / "manifest.parquet").sort("sample_id")
    assert manifest["label"].to_list()[:3] == [1, 0, 2]
    given = np.array(["eel", "dog", "cat"])  # the file's own order wins when it names the classes
    result = invoke("import-features", _npz(tmp_path / "h.npz", y=y, class_names=given), "--out", tmp_path / "c")
    assert result.exit_code == 0 and load_meta(tmp_path / "c")["class_names"] == ["eel", "dog", "cat"]
    assert pl.read_parquet(tmp_path / "c" / "manifest.parquet").sort("sample_id")["label"].to_list()[:3] == [1, 2, 0]


@pytest.mark.parametrize("args, fragment", [
    (["--scale", "0"], "--scale must be a positive number, got 0"),
    (["--scale", "-1"], "--scale must be a positive number, got -1"),
    (["--confusion", "visual=1.5"], "--confusion visual=1.5: a confusion is a fraction of samples, in [0, 1]"),
    (["--strength", "audio=-2"], "--strength audio=-2: a strength must be a finite number >= 0"),
])
def test_make_synthetic_refuses_bad_knobs(args, fragment, tmp_path):
    one_line_error(invoke("make-synthetic", "--out", tmp_path / "out", *args), fragment)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 4. dataset options nobody reads are refused


@pytest.mark.parametrize("option, fragment", [
    ("bogus=1", "folder: unknown option(s) bogus; known: csv, kinds"),
    ("split=actor", "unknown option(s) split; known: csv, kinds (split: the folder dataset takes its splits"),
    ("seed=abc", "unknown option(s) seed; known: csv, kinds (seed:"),
])
def test_folder_refuses_options_it_does_not_read(option, fragment, good_weights, tiny_folder, tmp_path):
    result = invoke("extract", "folder", "--backbone", "resnet18", "--weights", good_weights["resnet18"],
                    "--data-root", tiny_folder, "--out", tmp_path / "out", "--workers", 0, "--quiet",
                    "--config", json.dumps({"layers": [1, 1, 1, 1], "image_size": 32}), "-o", option)
    one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_every_adapter_refuses_an_unknown_option(tmp_path):
    from pipeline.datasets import DATASETS, DatasetError, get_dataset

    for name in DATASETS:
        with pytest.raises(DatasetError) as err:
            get_dataset(name, tmp_path, bogus="1")
        assert f"{name}: unknown option(s) bogus; known: " in str(err.value) and "\n" not in str(err.value), name
    with pytest.raises(DatasetError, match="option seed must be an integer, got 'abc'"):
        get_dataset("cremad", tmp_path, seed="abc")
    with pytest.raises(DatasetError, match="option split must be one of random, actor, got 'session'"):
        get_dataset("cremad", tmp_path, split="session")


# ---------------------------------------------------------------- 6. Git LFS pointers; failures grouped by cause


def _lfs_pointer(path: Path, seed: int) -> Path:
    """The text a Git LFS clone without `git lfs pull` holds in place of a media file."""
    import hashlib

    path.parent.mkdir(parents=True, exist_ok=True)
    oid = hashlib.sha256(str(seed).encode()).hexdigest()
    path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {200000 + seed}\n")
    return path


def _cremad(root: Path, real_actors=(), junk_actors=(), lfs_actors=()) -> Path:
    """A CREMA-D layout: per actor 2 sentences x 6 emotions; videos real, junk bytes or LFS pointers."""
    from tests.test_datasets import CREMAD_EMOTIONS, write_video, write_wav

    seed = 0
    for actors, kind in ((real_actors, "real"), (junk_actors, "junk"), (lfs_actors, "lfs")):
        for actor in actors:
            for sentence in ("DFA", "IEO"):
                for emotion in CREMAD_EMOTIONS:
                    name, seed = f"{actor}_{sentence}_{emotion}_XX", seed + 1
                    video, audio = root / "VideoFlash" / f"{name}.flv", root / "AudioWAV" / f"{name}.wav"
                    if kind == "lfs":
                        _lfs_pointer(video, seed), _lfs_pointer(audio, -seed)
                        continue
                    audio.parent.mkdir(parents=True, exist_ok=True)
                    write_wav(audio, 0.2, seed=seed)
                    video.parent.mkdir(parents=True, exist_ok=True)
                    if kind == "real":
                        write_video(video, 0.5, codec="flv", fmt="flv", seed=seed)
                    else:
                        video.write_bytes(bytes(range(256)) * 8)
    return root


def _extract_cremad(root: Path, weights: Path, out: Path):
    return invoke("extract", "cremad", "--backbone", "resnet18", "--weights", weights, "--data-root", root,
                  "--out", out, "--workers", 0, "--quiet", "--frames", 2,
                  "--config", json.dumps({"layers": [1, 1, 1, 1], "image_size": 32}))


def test_a_clone_without_lfs_pull_is_one_line_naming_the_fix(good_weights, tmp_path):
    root = _cremad(tmp_path / "CREMA-D", lfs_actors=(1001, 1002, 1003))
    result = _extract_cremad(root, good_weights["resnet18"], tmp_path / "out")
    one_line_error(result, f"36 files are Git LFS pointers, not media: run `git lfs pull` in {root}", code=1)
    assert result.output.count("Git LFS pointer") == 2  # the error line and one grouped cause, not 36 lines
    assert "   36 × Git LFS pointer, not media: <file>" in result.stdout
    failed = pl.read_parquet(tmp_path / "out" / "cremad" / "resnet18" / "failed.parquet")
    assert failed.height == 36 and failed["reason"].str.contains(r"\.flv'$").all()  # per file, with its name


def test_failures_are_grouped_by_cause_and_lfs_is_reported_once(good_weights, tmp_path):
    root = _cremad(tmp_path / "CREMA-D", real_actors=(1001, 1002), junk_actors=(1003,), lfs_actors=(1004,))
    result = _extract_cremad(root, good_weights["resnet18"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("12 files are Git LFS pointers, not media: run `git lfs pull`") == 1
    causes = [line.strip() for line in result.stdout.splitlines() if " × " in line]
    assert len(causes) == 2 and causes[0].startswith("12 × ") and causes[1].startswith("12 × ")
    assert any("undecodable video" in c and "<file>" in c for c in causes), causes
    failed = pl.read_parquet(tmp_path / "out" / "cremad" / "resnet18" / "failed.parquet")
    assert failed.height == 24 and failed["reason"].n_unique() == 24  # file names kept there


# ---------------------------------------------------------------- 7. backbones [T, D]; one workers warning; counts


def test_backbones_lists_output_shapes():
    result = invoke("backbones")
    assert result.exit_code == 0
    text = result.output
    assert "output:  image [1, 768], video [K frames, 768], text [1, 768]  (K = --frames)" in text
    assert "output:  audio [1, 1280]" in text and "output:  image [1, 2048], video [K frames, 2048]" in text
    assert "output:  image [1, 3584], video [1, 3584], audio [1, 3584], text [1, 3584]" in text  # ola: [CLASS]
    assert "image [1, D from the weights]" in text  # a family name: D depends on the weights given
    from pipeline.backbones import BACKBONES

    assert text.count("output:  ") == len(BACKBONES)


def test_workers_beyond_the_cores_warn_once(good_weights, tiny_folder, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    cores = len(os.sched_getaffinity(0))
    if cores > 8:
        pytest.skip("would start more than 9 worker processes")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "extract", "folder", "--backbone", "resnet18", "--weights",
         str(good_weights["resnet18"]), "--data-root", str(tiny_folder), "--out", str(tmp_path), "--quiet",
         "--config", json.dumps({"layers": [1, 1, 1, 1], "image_size": 32}), "--workers", str(cores + 1)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert text.count(f"--workers {cores + 1} on {cores} core(s)") == 1 and "This DataLoader will create" not in text


def test_a_rejected_duplicate_row_is_not_an_absent_modality(good_weights, tiny_folder, tmp_path):
    import shutil

    root = shutil.copytree(tiny_folder, tmp_path / "data")
    with open(root / "samples.csv", "a") as f:
        f.write("s1,b,val,1.jpg,1.wav\n")  # the same sample id twice
    result = invoke("extract", "folder", "--backbone", "resnet18", "--weights", good_weights["resnet18"],
                    "--data-root", root, "--out", tmp_path / "out", "--workers", 0, "--quiet",
                    "--config", json.dumps({"layers": [1, 1, 1, 1], "image_size": 32}))
    assert result.exit_code == 0, result.output
    assert ("failed      0 samples skipped, 0 modalities stored absent, 1 listed sample rejected by the dataset "
            "listing") in result.output
    assert "1 × line 8: duplicated sample_id" in result.output
