"""The extraction engine end to end: a generated folder dataset of real media (with bad files among
it) through each tiny backbone into a cache; resume after kill -9 and Ctrl-C; several processes;
the CLI's messages; and a head trained on the result by `cli.py train-head`."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
import typer
from typer.testing import CliRunner

from cache import CacheError, load_meta, load_split, verify
from pipeline.commands import register
from pipeline.datasets import DATASETS, DatasetError, get_dataset
from pipeline.extract import run_extraction
from tests.conftest import ROOT
from tests.test_backbones import TINY_RESNET, tiny_clip, tiny_llava, tiny_resnet, tiny_whisper
from tests.test_decode import truncated_copy, write_bytes, write_jpeg, write_mp4, write_wav

GOOD = 12
BAD = {  # sample id -> the modality that cannot be decoded, and the reason's start
    "bad_trunc": ("image", "undecodable image"), "bad_missing": ("image", "missing file"),
    "bad_zero": ("audio", "empty file"), "bad_junk": ("audio", "undecodable audio"),
    "bad_video": ("video", "undecodable video"),
}
CLASSES = ["neg", "neu", "pos"]


def audio_seconds(i: int) -> float:
    return 0.5 + 0.25 * i


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder dataset: 12 good samples (image, audio, video, text) and 5 with one bad file each."""
    root = tmp_path_factory.mktemp("folder")
    (root / "media").mkdir()
    videos = [write_mp4(root / "media" / f"v{j}.mp4", frames=10 + 5 * j, fps=10) for j in range(3)]
    rows = ["sample_id,label,split,image_path,audio_path,video_path,text"]
    for i in range(GOOD):
        write_jpeg(root / "media" / f"{i}.jpg", seed=i, size=(40 + 4 * i, 32))
        write_wav(root / "media" / f"{i}.wav", audio_seconds(i), seed=i)
        rows.append(f"s{i:02d},{CLASSES[i % 3]},{('train', 'train', 'val', 'test')[i % 4]},media/{i}.jpg,"
                    f"media/{i}.wav,{videos[i % 3].relative_to(root)},\"a {'b ' * i}c\"")
    truncated_copy(root / "media" / "0.jpg", root / "media" / "trunc.jpg")
    write_bytes(root / "media" / "zero.wav", b"")
    write_bytes(root / "media" / "junk.wav", b"RIFF\x00\x00junk, not audio" * 10)
    write_bytes(root / "media" / "junk.mp4", bytes(range(256)) * 4)
    ok = "media/0.jpg,media/0.wav,media/v0.mp4"
    for sid, (m, _) in BAD.items():
        src = dict(zip(("image", "audio", "video"), ok.split(",")))
        src[m] = {"bad_trunc": "media/trunc.jpg", "bad_missing": "media/none.jpg", "bad_zero": "media/zero.wav",
                  "bad_junk": "media/junk.wav", "bad_video": "media/junk.mp4"}[sid]
        rows.append(f"{sid},pos,train,{src['image']},{src['audio']},{src['video']},some text")
    (root / "samples.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {"clip": tiny_clip(root / "clip"), "resnet": tiny_resnet(root / "resnet18.pth"),
            "whisper": tiny_whisper(root / "large-v3.pt")}


def cli(*args):
    """The extract/datasets/backbones commands on a typer app of their own (as cli.py registers them)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    return CliRunner().invoke(app, [str(a) for a in args])


def failed(cache: Path) -> dict[tuple[str, str], str]:
    return {(r["sample_id"], r["modality"]): r["reason"] for r in pl.read_parquet(cache / "failed.parquet").to_dicts()}


def all_ids(cache: Path) -> list[str]:
    return pl.read_parquet(cache / "manifest.parquet")["sample_id"].to_list()


def test_folder_dataset_reads_its_csv(data, tmp_path):
    ds = get_dataset("folder", data)
    assert ds.modalities == {"image": "image", "audio": "audio", "video": "video", "text": "text"}
    assert ds.class_names == CLASSES
    listing = ds.listing()
    assert len(listing.samples) == GOOD + len(BAD) and not listing.skipped
    s = listing.samples[1]
    assert (s.sample_id, s.label, s.split, s.sources["text"]) == ("s01", 1, "train", "a b c")
    assert s.sources["image"] == str(data / "media" / "1.jpg")
    # Other column names need their kind; bad rows are skipped with a reason; empty cells are absent.
    (tmp_path / "classes.txt").write_text("b\na\n")
    (tmp_path / "samples.csv").write_text("sample_id,label,split,frames_path,caption_text\n"
                                          "x,a,train,f.mp4,hi\ny,c,train,,hi\nz,b,dev,,hi\nw,b,test,,hello\n")
    with pytest.raises(DatasetError, match="kinds=frames:image|audio|video"):
        get_dataset("folder", tmp_path)
    ds = get_dataset("folder", tmp_path, kinds="frames:video")
    assert ds.modalities == {"frames": "video", "caption": "text"} and ds.class_names == ["b", "a"]
    listing = ds.listing()
    assert [(s.sample_id, s.label, sorted(s.sources)) for s in listing.samples] == [
        ("x", 1, ["caption", "frames"]), ("w", 0, ["caption"])]
    assert [(k.sample_id, "label 'c'" in k.reason or "split 'dev'" in k.reason) for k in listing.skipped] == [
        ("y", True), ("z", True)]


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'nope'; known: .*folder"):
        get_dataset("nope", tmp_path)
    assert "folder" in DATASETS


def test_resnet_end_to_end_with_bad_media_and_workers(data, weights, tmp_path):
    result = cli("extract", "folder", "--backbone", "resnet18", "--weights", weights["resnet"], "--data-root", data,
                 "--out", tmp_path, "--config", json.dumps(TINY_RESNET), "--frames", 2, "--workers", 2,
                 "--batch-size", 4, "--shard-size", 5)
    assert result.exit_code == 0, result.output
    cache = tmp_path / "folder" / "resnet18"
    assert verify(cache) == []
    meta = load_meta(cache)
    assert meta["modalities"] == {"image": {"tokens": 1, "dim": 512}, "video": {"tokens": 2, "dim": 512}}
    assert meta["extraction"]["modality_kinds"] == {"image": "image", "video": "video"}
    assert meta["backbone_config"]["layers"] == [1, 1, 1, 1]
    assert "left out modality audio" in result.output and "left out modality text" in result.output
    # Bad images and videos skipped with their reasons; bad audio does not matter (audio not extracted).
    visual_bad = {k for k, (m, _) in BAD.items() if m in ("image", "video")}
    assert sorted(all_ids(cache)) == sorted([f"s{i:02d}" for i in range(GOOD)] + ["bad_zero", "bad_junk"])
    reasons = failed(cache)
    assert set(reasons) == {(k, BAD[k][0]) for k in visual_bad}
    assert all(reasons[(k, BAD[k][0])].startswith(BAD[k][1]) for k in visual_bad)
    assert "3 samples skipped" in result.output and "missing file" in result.output
    train = load_split(cache, "train")
    assert train.features["video"].shape[1:] == (2, 512) and np.isfinite(train.features["image"].numpy()).all()
    # The first frame of a 1 s clip (t = 0.25 s) and of a 1.5 s clip (t = 0.375 s) differ in grey level.
    assert not np.allclose(train.features["video"][0, 0], train.features["video"][0, 1])


def test_whisper_stores_n_valid_for_known_clip_lengths(data, weights, tmp_path):
    result = cli("extract", "folder", "--backbone", "whisper-large-v3", "--weights", weights["whisper"],
                 "--data-root", data, "--out", tmp_path, "--workers", 0, "--batch-size", 5, "--quiet")
    assert result.exit_code == 0, result.output
    cache = tmp_path / "folder" / "whisper-large-v3"
    assert verify(cache) == [] and list(load_meta(cache)["modalities"]) == ["audio"]
    n_valid = {}
    for shard in cache.glob("shard-*.h5"):
        with h5py.File(shard) as f:
            n_valid.update(zip((s.decode() for s in f["ids"][:]), f["extra/audio_n_valid"][:].tolist()))
    # 100 mel frames per second, halved by the encoder's stride-2 convolution.
    assert [n_valid[f"s{i:02d}"] for i in range(GOOD)] == [math.ceil(audio_seconds(i) * 100 / 2) for i in range(GOOD)]
    assert set(failed(cache)) == {("bad_zero", "audio"), ("bad_junk", "audio")}


def test_clip_keep_partial_stores_the_bad_modality_as_absent(data, weights, tmp_path):
    result = cli("extract", "folder", "--backbone", "clip-vit-l14", "--weights", weights["clip"], "--data-root", data,
                 "--out", tmp_path, "--workers", 0, "--batch-size", 8, "--keep-partial", "--quiet")
    assert result.exit_code == 0, result.output
    cache = tmp_path / "folder" / "clip-vit-l14"
    assert verify(cache) == []
    manifest = pl.read_parquet(cache / "manifest.parquet")
    assert manifest.height == GOOD + len(BAD)  # nobody skipped: the bad modality is absent instead
    row = manifest.filter(pl.col("sample_id") == "bad_trunc").to_dicts()[0]
    assert (row["present_image"], row["present_text"], row["present_video"]) == (False, True, True)
    assert "3 modalities stored absent" in result.output
    split = load_split(cache, "train")
    i = split.ids.index("bad_trunc")
    assert not split.features["image"][i].any() and split.features["text"][i].norm() > 0.99


def test_llava_end_to_end_one_prompt_per_modality(data, tmp_path):
    weights = tiny_llava(tmp_path / "llava")
    (tmp_path / "prompts.json").write_text(json.dumps({"text": "{text}\nthe text in one word."}))
    result = cli("extract", "folder", "--backbone", "llava7b", "--weights", weights, "--data-root", data,
                 "--out", tmp_path, "--modalities", "image,text", "--workers", 0, "--batch-size", 6, "--quiet",
                 "--prompts", tmp_path / "prompts.json", "--prompt", "image=<image>\\nDescribe the image.")
    assert result.exit_code == 0, result.output
    cache = tmp_path / "folder" / "llava7b"
    assert verify(cache) == []
    meta = load_meta(cache)
    assert meta["modalities"] == {"image": {"tokens": 1, "dim": 16}, "text": {"tokens": 1, "dim": 16}}
    prompts = meta["backbone_config"]["prompts"]
    assert prompts["image"] == "<image>\nDescribe the image." and prompts["text"] == "{text}\nthe text in one word."
    resolved = meta["backbone_config"]["info"]["prompts_resolved"]
    assert resolved["image"] == "USER: <image>\nDescribe the image. ASSISTANT: [CLASS]"


def test_ola_without_its_package_is_one_clear_line(data, tmp_path):
    result = cli("extract", "folder", "--backbone", "ola7b", "--weights", tmp_path, "--data-root", data)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "`ola` package" in lines[0] and "pip install" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["extract", "nope", "--backbone", "resnet18", "--weights", "W"], "unknown dataset 'nope'"),
    (["extract", "folder", "--backbone", "nope", "--weights", "W"], "unknown backbone 'nope'"),
    (["extract", "folder", "--backbone", "resnet18", "--weights", "/no/such.pth"], "weights not found: /no/such.pth"),
    (["extract", "folder", "--backbone", "resnet18", "--weights", "W", "--config", "{bad"], "--config is neither"),
    (["extract", "folder", "--backbone", "resnet18", "--weights", "W", "--modalities", "smell"], "no modality smell"),
    (["extract", "folder", "--backbone", "resnet18", "--weights", "W", "--modalities", "audio"], "nothing to extract"),
])
def test_setup_errors_are_one_line(data, weights, tmp_path, args, message):
    args = [weights["resnet"] if a == "W" else a for a in args]
    result = cli(*args, "--data-root", data, "--out", tmp_path, "--config", json.dumps(TINY_RESNET)) \
        if "--config" not in args else cli(*args, "--data-root", data, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_nothing_readable_exits_nonzero(tmp_path, weights):
    (tmp_path / "samples.csv").write_text("sample_id,label,split,image_path\na,x,train,none.jpg\nb,y,test,zero.jpg\n")
    write_bytes(tmp_path / "zero.jpg", b"")
    result = cli("extract", "folder", "--backbone", "resnet18", "--weights", weights["resnet"], "--data-root",
                 tmp_path, "--out", tmp_path / "out", "--config", json.dumps(TINY_RESNET), "--workers", 0)
    assert result.exit_code == 1 and "nothing could be read" in result.stderr
    assert set(failed(tmp_path / "out" / "folder" / "resnet18").values()) == {"missing file", "empty file (0 bytes)"}


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import pipeline.backbones.resnet as resnet
from pipeline.extract import extract

encode, calls = resnet.ResNetBackbone.encode, []
def encode_then_die(self, kind, batch):
    calls.append(kind)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as if the machine died
    return encode(self, kind, batch)
resnet.ResNetBackbone.encode = encode_then_die
extract("folder", {data!r}, "resnet18", {weights!r}, out={out!r}, config={config!r}, batch_size=2, workers=0,
        shard_size=2, modalities=["image"], progress=False)
"""


def test_resume_after_kill_9_ends_with_every_sample_once(data, weights, tmp_path):
    script = KILL_SCRIPT.format(root=str(ROOT), data=str(data), weights=str(weights["resnet"]), out=str(tmp_path),
                                config=TINY_RESNET)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -9, proc.stderr
    cache = tmp_path / "folder" / "resnet18"
    assert len(list(cache.glob("shard-*.h5"))) == 3 and not (cache / "manifest.parquet").exists()
    args = ["extract", "folder", "--backbone", "resnet18", "--weights", weights["resnet"], "--data-root", data,
            "--out", tmp_path, "--config", json.dumps(TINY_RESNET), "--batch-size", 2, "--workers", 0,
            "--shard-size", 2, "--modalities", "image"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "resuming: 6 of 17 samples already" in result.output
    ids = all_ids(cache)
    assert sorted(ids) == sorted([f"s{i:02d}" for i in range(GOOD)] + ["bad_zero", "bad_junk", "bad_video"])
    assert verify(cache) == []
    again = cli(*args)  # a third run has nothing left to do and changes nothing
    assert again.exit_code == 0 and "0 new, 15 already there" in again.output and all_ids(cache) == ids


def test_ctrl_c_keeps_whole_shards_and_the_rerun_finishes(data, weights, tmp_path):
    from pipeline.backbones import build_backbone

    backbone = build_backbone("resnet18", weights["resnet"], TINY_RESNET)
    encode, calls = backbone.encode, []

    def interrupted(kind, batch):
        calls.append(kind)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(kind, batch)

    backbone.encode = interrupted
    ds = get_dataset("folder", data)
    cache = tmp_path / "c"
    opts = dict(batch_size=3, workers=0, shard_size=100, modalities=["image"], progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(ds, backbone, "resnet18", cache, **opts)
    shards = list(cache.glob("shard-*.h5"))
    assert len(shards) == 1  # the two finished batches were flushed on the way out
    with h5py.File(shards[0]) as f:
        assert f["ids"].shape == (6,)
    backbone.encode = encode
    summary = run_extraction(ds, backbone, "resnet18", cache, **opts)
    assert (summary.already_done, summary.written, summary.in_cache) == (6, 9, 15) and verify(cache) == []


def test_non_finite_features_are_refused(data, weights, tmp_path):
    from pipeline.backbones import build_backbone

    backbone = build_backbone("resnet18", weights["resnet"], TINY_RESNET)
    encode = backbone.encode

    def poisoned(kind, batch):
        x, extras = encode(kind, batch)
        x[0] = float("nan")  # the first sample of every batch
        return x, extras

    backbone.encode = poisoned
    summary = run_extraction(get_dataset("folder", data), backbone, "resnet18", tmp_path / "c", batch_size=5,
                             workers=0, modalities=["image"], progress=False)
    reasons = failed(tmp_path / "c")
    refused = [k for k, r in reasons.items() if r.startswith("non-finite")]
    # Batches of 5 over 17 samples, 2 of which fail to decode: 4 batches, one poisoned sample each.
    assert len(refused) == 4 and summary.in_cache == 15 - 4 and verify(tmp_path / "c") == []
    assert not set(k[0] for k in refused) & set(all_ids(tmp_path / "c"))


def test_resume_refuses_other_settings(data, weights, tmp_path):
    base = ["extract", "folder", "--backbone", "resnet18", "--weights", weights["resnet"], "--data-root", data,
            "--out", tmp_path, "--config", json.dumps(TINY_RESNET), "--workers", 0, "--limit", 2, "--quiet"]
    assert cli(*base, "--frames", 2).exit_code == 0
    result = cli(*base, "--frames", 3)
    assert result.exit_code == 2 and "other settings" in result.stderr


def test_two_processes_write_disjoint_shards_and_one_manifest(data, weights, tmp_path):
    from pipeline.backbones import build_backbone

    backbone = build_backbone("resnet18", weights["resnet"], TINY_RESNET)
    ds = get_dataset("folder", data)
    barrier = threading.Barrier(2)
    summaries, errors = {}, []

    def rank(r):
        try:
            summaries[r] = run_extraction(ds, backbone, "resnet18", tmp_path / "c", rank=r, world=2,
                                          barrier=barrier.wait, batch_size=2, workers=0, shard_size=3,
                                          modalities=["image"], progress=False)
        except BaseException as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    cache = tmp_path / "c"
    ranks = {p.name.split("-")[1] for p in cache.glob("shard-*.h5")}
    assert ranks == {"00", "01"} and verify(cache) == []
    assert summaries[0].in_cache == 15 and summaries[0].failed_samples == 2
    assert set(failed(cache)) == {("bad_trunc", "image"), ("bad_missing", "image")}
    assert not list(cache.glob(".failed-*"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.trains
def test_two_launches_as_two_machines_share_one_cache(data, weights, tmp_path):
    """Two separate launcher commands on this machine, each a "machine" of one process
    (``torchrun --nnodes 2 --node_rank r``, what ``accelerate launch --num_machines 2 --machine_rank r``
    runs on GPU machines), write one cache: each global rank its own shards, one manifest, every
    sample once (docs/extraction.md, "Several machines")."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "cli.py"), "extract", "folder",
         "--backbone", "resnet18", "--weights", str(weights["resnet"]), "--data-root", str(data), "--out", str(tmp_path),
         "--config", json.dumps(TINY_RESNET), "--workers", "0", "--batch-size", "2", "--shard-size", "2",
         "--modalities", "image"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outputs
    cache = tmp_path / "folder" / "resnet18"
    assert {p.name.split("-")[1] for p in cache.glob("shard-*.h5")} == {"00", "01"} and verify(cache) == []
    ids = all_ids(cache)
    assert sorted(ids) == sorted([f"s{i:02d}" for i in range(GOOD)] + ["bad_zero", "bad_junk", "bad_video"])
    assert set(failed(cache)) == {("bad_trunc", "image"), ("bad_missing", "image")}
    # The rank split: global rank r took listing positions r, r + 2, … (each shard holds its rank's ids only).
    listing = [s.sample_id for s in get_dataset("folder", data).listing().samples]
    for shard in cache.glob("shard-*.h5"):
        rank = int(shard.name.split("-")[1])
        with h5py.File(shard) as f:
            held = [x.decode() if isinstance(x, bytes) else x for x in f["ids"][:]]
        assert all(listing.index(sid) % 2 == rank for sid in held), (shard.name, held)


def test_failed_list_is_merged_across_resumes(data, weights, tmp_path):
    base = ["extract", "folder", "--backbone", "resnet18", "--weights", weights["resnet"], "--data-root", data,
            "--out", tmp_path, "--config", json.dumps(TINY_RESNET), "--workers", 0, "--quiet", "--modalities", "image"]
    assert cli(*base, "--limit", 13).exit_code == 0  # 13 rows: bad_trunc fails, bad_missing not reached
    cache = tmp_path / "folder" / "resnet18"
    assert set(failed(cache)) == {("bad_trunc", "image")}
    assert cli(*base).exit_code == 0  # retries bad_trunc, reaches bad_missing
    assert set(failed(cache)) == {("bad_trunc", "image"), ("bad_missing", "image")}
    (data / "media" / "none.jpg").write_bytes((data / "media" / "1.jpg").read_bytes())  # the user fixes a file
    try:
        assert cli(*base).exit_code == 0
    finally:
        (data / "media" / "none.jpg").unlink()
    assert set(failed(cache)) == {("bad_trunc", "image")} and "bad_missing" in all_ids(cache)


def test_datasets_and_backbones_commands(tmp_path):
    result = cli("datasets")
    assert result.exit_code == 0 and "folder:" in result.output and "samples.csv" in result.output
    result = cli("backbones")
    assert result.exit_code == 0 and all(n in result.output for n in ("ola7b", "llava7b", "whisper-large-v3"))


def test_train_head_on_an_extracted_cache(data, weights, tmp_path):
    result = cli("extract", "folder", "--backbone", "clip-vit-l14", "--weights", weights["clip"], "--data-root", data,
                 "--out", tmp_path, "--modalities", "image,text", "--workers", 0, "--quiet")
    assert result.exit_code == 0, result.output
    cache = tmp_path / "folder" / "clip-vit-l14"
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train-head", "--cache", str(cache), "--method",
                           "concat", "--epochs", "2", "--out", str(tmp_path / "runs"), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "runs").glob("*/results.json"))


def test_cache_error_on_a_foreign_cache(data, weights, tmp_path):
    from pipeline.backbones import build_backbone

    backbone = build_backbone("resnet18", weights["resnet"], TINY_RESNET)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "meta.json").write_text("{not json")
    with pytest.raises(CacheError, match="meta.json is unreadable"):
        run_extraction(get_dataset("folder", data), backbone, "resnet18", tmp_path / "c", workers=0, progress=False)

