"""The five paper datasets from small fake folders written here in their official layouts.

Each builder writes real media (JPEGs, WAVs, FLV/MP4/AVI clips of about a second, 32x32 pixels)
and label files shaped like the real releases, with a few planted faults (missing, empty or
unlisted files, labels outside the scheme, conflicting labels). The tests check counts, labels,
label rules, skip reasons, splits (stratified, disjoint, group-disjoint, deterministic,
independent of listing order, reproducible from split files) and a full `extract` of each dataset
with a tiny backbone into a cache that `cache.verify` accepts.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import av
import numpy as np
import polars as pl
import pytest
import soundfile as sf
import typer
from PIL import Image
from typer.testing import CliRunner

from cache import load_meta, verify
from pipeline.commands import register
from pipeline.datasets import DATASETS, DatasetError, get_dataset
from pipeline.datasets.files import read_id_list, read_split_file
from pipeline.datasets.policy import parse_fractions
from pipeline.datasets.splits import SPLITS, group_split, holdout_split, stratified_split
from tests.test_backbones import TINY_RESNET, tiny_clip, tiny_resnet, tiny_whisper

# ---------------------------------------------------------------- media


def write_jpeg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=85)
    return path


def write_wav(path: Path, seconds: float = 1.0, channels: int = 1, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (rng.standard_normal((int(seconds * 16000), channels)) * 0.1).astype(np.float32), 16000)
    return path


def write_video(path: Path, seconds: float = 1.0, fps: int = 8, codec: str = "mpeg4", fmt: str | None = None,
                audio: bool = False, seed: int = 0) -> Path:
    """A 32x32 clip whose frame i is a flat grey; ``audio`` adds an AAC track of noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt) as out:
        video = out.add_stream(codec, rate=fps)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        track = out.add_stream("aac", rate=16000) if audio else None
        if track is not None:
            track.layout = "mono"
        for i in range(int(seconds * fps)):
            frame = np.full((32, 32, 3), (8 * i + 37 * seed) % 256, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode())
        if track is not None:
            wav = (np.random.default_rng(seed).standard_normal((1, int(seconds * 16000))) * 0.1).astype(np.float32)
            for start in range(0, wav.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, start:start + 1024]), format="fltp",
                                                   layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                out.mux(track.encode(chunk))
            out.mux(track.encode())
    return path


# ---------------------------------------------------------------- helpers


def assignment(listing) -> dict[str, tuple[int, str]]:
    return {s.sample_id: (s.label, s.split) for s in listing.samples}


def reasons(listing) -> dict[str, str]:
    return {k.sample_id: k.reason for k in listing.skipped}


def assert_stratified(listing, fractions, tolerance: float = 2.0):
    """Ids unique, three non-empty splits, every class with >= 3 samples in every split, counts near
    n_c * f."""
    ids = [s.sample_id for s in listing.samples]
    assert len(ids) == len(set(ids))
    per_split = Counter((s.split, s.label) for s in listing.samples)
    per_class = Counter(s.label for s in listing.samples)
    assert {s.split for s in listing.samples} == set(SPLITS)
    for c, n in per_class.items():
        for split, f in zip(SPLITS, fractions):
            if n >= 3:
                assert per_split[(split, c)] >= 1, (c, split)
            assert abs(per_split[(split, c)] - n * f) < tolerance, (c, split, per_split[(split, c)], n * f)


def cli(*args):
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- split helpers


def test_stratified_split_totals_are_exact_and_every_class_is_everywhere():
    rng = random.Random(3)
    labels = {f"p{i}": rng.choice([0, 0, 1, 2]) for i in range(2592)}
    counts = Counter(stratified_split(labels, (0.6, 0.2, 0.2), seed=0).values())
    assert (counts["train"], counts["val"], counts["test"]) == (1555, 518, 519)  # MVSA rule B's published split
    counts = Counter(stratified_split({f"p{i}": i % 3 for i in range(4511)}, (0.8, 0.1, 0.1)).values())
    assert (counts["train"], counts["val"], counts["test"]) == (3608, 451, 452)
    tiny = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1, "f": 2}  # class 0 has one per split; 1 and 2 cannot
    out = stratified_split(tiny, (0.8, 0.1, 0.1))
    assert sorted(out[s] for s in "abc") == ["test", "train", "val"]


def test_splits_ignore_input_order_and_follow_the_seed():
    labels = {f"s{i:03d}": i % 4 for i in range(200)}
    shuffled = dict(sorted(labels.items(), key=lambda kv: random.Random(1).random()))
    assert stratified_split(labels, (0.8, 0.1, 0.1), 7) == stratified_split(shuffled, (0.8, 0.1, 0.1), 7)
    assert stratified_split(labels, (0.8, 0.1, 0.1), 7) != stratified_split(labels, (0.8, 0.1, 0.1), 8)
    groups = {sid: f"g{int(sid[1:]) % 10}" for sid in labels}
    first, again = group_split(labels, groups, seed=2), group_split(shuffled, groups, seed=2)
    assert first == again
    for g in set(groups.values()):
        assert len({first[s] for s in labels if groups[s] == g}) == 1  # a group never straddles splits
    assert {first[s] for s in labels} == set(SPLITS)


def test_holdout_keeps_test_groups_apart_and_carves_val_from_the_rest():
    labels = {f"s{i:02d}": i % 2 for i in range(40)}
    groups = {sid: f"g{int(sid[1:]) % 4}" for sid in labels}
    out = holdout_split(labels, groups, ["g3"], val_fraction=0.25, seed=0)
    assert {s for s, v in out.items() if v == "test"} == {s for s in labels if groups[s] == "g3"}
    assert {groups[s] for s, v in out.items() if v == "val"} <= {"g0", "g1", "g2"}
    assert Counter(out.values()) == {"train": 22, "val": 8, "test": 10}  # floor(0.75 * 30) train
    out = holdout_split(labels, groups, ["g3"], val_groups=["g2"])
    assert {groups[s] for s, v in out.items() if v == "val"} == {"g2"}


def test_split_and_list_files(tmp_path):
    (tmp_path / "a.csv").write_text("sample_id,split\nx,train\ny,valid\nz,test\n# note\n\nx,train\n")
    assert read_split_file(tmp_path / "a.csv") == {"x": "train", "y": "val", "z": "test"}
    (tmp_path / "b.tsv").write_text("x\ttraining\ny\tdev\n")
    assert read_split_file(tmp_path / "b.tsv") == {"x": "train", "y": "val"}
    (tmp_path / "c.csv").write_text("x,train\ny,holdout\n")
    with pytest.raises(DatasetError, match="line 2: expected sample_id,split"):
        read_split_file(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("x,train\nx,test\n")
    with pytest.raises(DatasetError, match="x is given two splits"):
        read_split_file(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("1001_DFA_ANG_XX,ANG\n1002_IEO_HAP_LO,HAP\n")
    assert read_id_list(tmp_path / "e.csv") == ["1001_DFA_ANG_XX", "1002_IEO_HAP_LO"]
    (tmp_path / "f.csv").write_text("name,label\nq,ANG\n")
    assert read_id_list(tmp_path / "f.csv") == ["q"]


@pytest.mark.parametrize("text, expected", [("0.8,0.1,0.1", (0.8, 0.1, 0.1)), ("60/20/20", (0.6, 0.2, 0.2))])
def test_fractions_parse(text, expected):
    assert parse_fractions(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["0.8,0.2", "0.9,0.1,0", "0.5,0.3,0.3", "a,b,c"])
def test_bad_fractions_are_one_line(text):
    with pytest.raises(DatasetError, match="fractions must be three positive numbers"):
        parse_fractions(text)


# ---------------------------------------------------------------- MVSA-Single

MVSA_CRAFTED = [  # (id, text label, image label); rule A / rule B outcome in the comments
    ("1", "positive", "positive"),  # A positive, B positive
    ("2", "neutral", "neutral"),  # A neutral, B neutral
    ("3", "negative", "negative"),  # A negative, B negative
    ("4", "positive", "neutral"),  # A positive, B dropped
    ("5", "neutral", "negative"),  # A negative, B dropped
    ("6", "positive", "negative"),  # dropped by both (conflict)
    ("7", "negative", "positive"),  # dropped by both (conflict)
    ("8", "neutral", "positive"),  # A positive, B dropped
    ("9", "xxx", "positive"),  # outside the scheme
    ("11", "positive", "positive"), ("11", "negative", "negative"),  # same id, different labels: dropped
    ("12", "neutral", "neutral"), ("12", "neutral", "neutral"),  # exact repeat: kept once
    ("13", "positive", "positive"),  # image missing
    ("14", "negative", "negative"),  # text empty
    ("15", "neutral", "neutral"),  # image of 0 bytes
    ("16", "positive", "positive"),  # text file missing
]
MVSA_BULK_AGREE = [(str(100 + i), ("negative", "neutral", "positive")[i % 3]) for i in range(60)]
MVSA_BULK_NEUTRAL_SIDE = [(str(200 + i), ("positive", "negative")[i % 2], i % 3 == 0) for i in range(30)]


def make_mvsa(root: Path, shuffle: int | None = None) -> Path:
    lines = [(sid, t, i) for sid, t, i in MVSA_CRAFTED]
    lines += [(sid, label, label) for sid, label in MVSA_BULK_AGREE]
    lines += [(sid, "neutral", label) if text_neutral else (sid, label, "neutral")
              for sid, label, text_neutral in MVSA_BULK_NEUTRAL_SIDE]
    body = [f"{sid}\t{t},{i}" for sid, t, i in lines] + ["10\tpositive"]  # 10: malformed line
    if shuffle is not None:
        random.Random(shuffle).shuffle(body)
    (root / "data").mkdir(parents=True)
    (root / "labelResultAll.txt").write_text("ID\ttext,image\n" + "\n".join(body) + "\n")
    ids = sorted({sid for sid, _, _ in lines}, key=lambda s: random.Random(shuffle).random() if shuffle else int(s))
    for sid in ids:
        if sid != "13":
            write_jpeg(root / "data" / f"{sid}.jpg", seed=int(sid))
        if sid != "16":
            text = b"" if sid == "14" else f"tweet {sid} caf\xe9 ".encode("latin-1")  # Latin-1, as some tweets are
            (root / "data" / f"{sid}.txt").write_bytes(text)
    (root / "data" / "15.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def mvsa_root(tmp_path_factory) -> Path:
    return make_mvsa(tmp_path_factory.mktemp("MVSA_Single"))


def test_mvsa_rules_a_and_b_on_a_crafted_label_file(mvsa_root):
    classes = ["negative", "neutral", "positive"]
    bulk = {sid: classes.index(label) for sid, label in MVSA_BULK_AGREE}
    side = {sid: classes.index(label) for sid, label, _ in MVSA_BULK_NEUTRAL_SIDE}
    a = get_dataset("mvsa", mvsa_root).listing()
    expected_a = {"1": 2, "2": 1, "3": 0, "4": 2, "5": 0, "8": 2, "12": 1, **bulk, **side}
    assert {sid: label for sid, (label, _) in assignment(a).items()} == expected_a
    b = get_dataset("mvsa", mvsa_root, rule="B").listing()
    assert {sid: label for sid, (label, _) in assignment(b).items()} == {"1": 2, "2": 1, "3": 0, "12": 1, **bulk}
    why_a, why_b = reasons(a), reasons(b)
    assert set(why_a) == {"6", "7", "9", "10", "11", "13", "14", "15", "16"}
    assert all("conflicting labels" in why_a[s] for s in ("6", "7"))
    assert "outside the scheme" in why_a["9"] and "not ID<TAB>text,image" in why_a["10"]
    assert "different labels" in why_a["11"]
    assert why_a["13"] == "image data/13.jpg is missing" and why_a["15"] == "image data/15.jpg is empty (0 bytes)"
    assert why_a["14"] == "text data/14.txt is empty" and "unreadable" in why_a["16"]
    assert set(why_b) == set(why_a) | {"4", "5", "8"} | set(side)
    assert "rule B keeps equal labels only" in why_b["4"] and "differs" in why_b["6"]
    sample = next(s for s in a.samples if s.sample_id == "1")
    assert sample.sources == {"image": str(mvsa_root / "data" / "1.jpg"), "text": "tweet 1 café"}
    assert a.split_rule.startswith("rule A; random stratified 80/10/10 by label, seed 0")
    assert b.split_rule.startswith("rule B; random stratified 60/20/20")
    assert_stratified(a, (0.8, 0.1, 0.1))
    assert_stratified(b, (0.6, 0.2, 0.2))


def test_mvsa_splits_are_deterministic_and_independent_of_file_order(mvsa_root, tmp_path):
    first = get_dataset("mvsa", mvsa_root, rule="b", seed="3").listing()
    assert assignment(first) == assignment(get_dataset("mvsa", mvsa_root, rule="b", seed=3).listing())
    reordered = make_mvsa(tmp_path / "reordered", shuffle=5)
    assert assignment(get_dataset("mvsa", reordered, rule="b", seed=3).listing()) == assignment(first)
    other = get_dataset("mvsa", mvsa_root, rule="b", seed=4).listing()
    assert assignment(other) != assignment(first)
    assert first.split_rule == get_dataset("mvsa", mvsa_root, rule="b", seed=3).listing().split_rule


def test_mvsa_split_file_reproduces_a_given_split_and_reports_unknown_ids(mvsa_root, tmp_path):
    rows = ["sample_id,split", "1,train", "2,val", "3,test", "12,train", "999,test", "13,train"]
    rows += [f"{sid},{('train', 'val', 'test')[i % 3]}" for i, (sid, _) in enumerate(MVSA_BULK_AGREE)]
    (tmp_path / "paper.csv").write_text("\n".join(rows) + "\n")
    listing = get_dataset("mvsa", mvsa_root, rule="B", split_file=str(tmp_path / "paper.csv")).listing()
    got = {sid: split for sid, (_, split) in assignment(listing).items()}
    assert got["1"] == "train" and got["2"] == "val" and got["3"] == "test"
    assert got == {r.split(",")[0]: r.split(",")[1] for r in rows[1:] if r.split(",")[0] not in ("999", "13")}
    why = reasons(listing)
    assert why["999"] == "listed in the split file paper.csv but not in the dataset"
    assert "missing" in why["13"]  # skipped by the dataset itself, so not reported as unknown
    assert "2 of its ids not used (1 not in the dataset, 1 skipped by the listing)" in listing.split_rule
    # Relative to the data root, tab-separated, without val: val is carved from train, seeded.
    (mvsa_root / "tt.tsv").write_text("".join(f"{sid}\t{'test' if int(sid) % 4 == 0 else 'train'}\n"
                                             for sid, _ in MVSA_BULK_AGREE))
    listing = get_dataset("mvsa", mvsa_root, split_file="tt.tsv", val_fraction="0.2").listing()
    assert {s.split for s in listing.samples} == set(SPLITS)
    assert all(s.split == "test" for s in listing.samples if int(s.sample_id) % 4 == 0)
    assert "val = stratified 0.2 of its train ids, seed 0" in listing.split_rule
    assert reasons(listing)["1"] == "not in the split file tt.tsv"


# ---------------------------------------------------------------- CREMA-D

CREMAD_EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
CREMAD_GOOD = [f"{actor}_{sentence}_{emotion}_{'XX' if sentence == 'DFA' else 'HI'}"
               for actor in range(1001, 1007) for sentence in ("DFA", "IEO") for emotion in CREMAD_EMOTIONS]


@pytest.fixture(scope="module")
def cremad_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("CREMA-D")
    for i, name in enumerate(CREMAD_GOOD + ["1001_DFA_XYZ_XX", "1002_TIE_HAP_XX", "1003_TIE_SAD_XX"]):
        write_wav(root / "AudioWAV" / f"{name}.wav", 0.5, seed=i)
        if name != "1002_TIE_HAP_XX":  # its video is missing
            write_video(root / "VideoFlash" / f"{name}.flv", 0.5, codec="flv", fmt="flv", seed=i)
    (root / "VideoFlash" / "1003_TIE_SAD_XX.flv").write_bytes(b"")
    write_wav(root / "AudioWAV" / "notes.wav", 0.1)
    return root


def test_cremad_lists_labels_and_skips_with_reasons(cremad_root):
    ds = get_dataset("cremad", cremad_root)
    assert ds.class_names == CREMAD_EMOTIONS
    listing = ds.listing()
    assert sorted(assignment(listing)) == sorted(CREMAD_GOOD)
    assert all(s.label == CREMAD_EMOTIONS.index(s.sample_id.split("_")[2]) for s in listing.samples)
    s = listing.samples[0]
    assert s.sources == {"audio": str(cremad_root / "AudioWAV" / f"{s.sample_id}.wav"),
                         "visual": str(cremad_root / "VideoFlash" / f"{s.sample_id}.flv")}
    why = reasons(listing)
    assert why == {"1001_DFA_XYZ_XX": "emotion XYZ is outside the scheme NEU HAP SAD FEA DIS ANG",
                   "1002_TIE_HAP_XX": "VideoFlash/1002_TIE_HAP_XX.flv is missing",
                   "1003_TIE_SAD_XX": "VideoFlash/1003_TIE_SAD_XX.flv is empty (0 bytes)",
                   "notes": "file name is not ACTOR_SENTENCE_EMOTION_LEVEL"}
    assert_stratified(listing, (0.8, 0.1, 0.1))


def test_cremad_actor_split_keeps_each_actor_in_one_split(cremad_root):
    listing = get_dataset("cremad", cremad_root, split="actor", seed=1).listing()
    actors: dict[str, set] = {}
    for s in listing.samples:
        actors.setdefault(s.sample_id[:4], set()).add(s.split)
    assert all(len(v) == 1 for v in actors.values()) and len(actors) == 6
    assert Counter(next(iter(v)) for v in actors.values()) == {"train": 4, "val": 1, "test": 1}
    assert listing.split_rule.startswith("actor-disjoint stratified 80/10/10 over 6 actors")
    assert listing.split_rule == get_dataset("cremad", cremad_root, split="actor", seed=1).listing().split_rule
    random_split = get_dataset("cremad", cremad_root).listing()
    shared = {s.sample_id[:4] for s in random_split.samples if s.split == "test"} & \
             {s.sample_id[:4] for s in random_split.samples if s.split == "train"}
    assert shared  # the papers' random split shares actors; the actor split above does not


def test_cremad_ogm_ge_train_and_test_csvs(cremad_root, tmp_path):
    train = [n for n in CREMAD_GOOD if not n.startswith("1006")] + ["1002_TIE_HAP_XX"]
    test = [n for n in CREMAD_GOOD if n.startswith("1006") and "DFA" in n] + ["1099_DFA_ANG_XX"]
    (tmp_path / "train.csv").write_text("".join(f"{n},{n.split('_')[2]}\n" for n in train))
    (tmp_path / "test.csv").write_text("".join(f"{n},{n.split('_')[2]}\n" for n in test))
    listing = get_dataset("cremad", cremad_root, train_file=tmp_path / "train.csv",
                          test_file=tmp_path / "test.csv", seed=2).listing()
    got = assignment(listing)
    assert {sid for sid, (_, s) in got.items() if s == "test"} == set(test) - {"1099_DFA_ANG_XX"}
    assert {sid for sid, (_, s) in got.items() if s != "test"} == set(train) - {"1002_TIE_HAP_XX"}
    assert Counter(s for _, s in got.values())["val"] == 6  # 10% of 60, one per class
    why = reasons(listing)
    assert why["1099_DFA_ANG_XX"] == "listed in the train file train.csv + test file test.csv but not in the dataset"
    assert why["1002_TIE_HAP_XX"].endswith("is missing")
    assert all(why[n] == "not in the train file train.csv + test file test.csv" for n in CREMAD_GOOD
               if n.startswith("1006") and "IEO" in n)


# ---------------------------------------------------------------- Kinetics-Sounds and Kinetics-400

KS_CLASSES = ["playing drums", "tap dancing", "typing"]


def ytid(tag: str) -> str:
    """An 11-character YouTube id with '_' and '-' inside, as real ones have."""
    return (tag + "_x-" * 4)[:11]


def make_ks(root: Path, shuffle: int | None = None, integer_labels: bool = False, write_videos: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "test": []}
    for c, label in enumerate(KS_CLASSES):
        for i in range(6):
            split = "train" if i < 4 else "test"
            vid, start = ytid(f"k{c}n{i}"), 3 * i
            clip = f"{vid}_{start}" if i % 2 else f"{vid}_{start}_{start + 10}"
            lines[split].append(f"{clip},10,{c if integer_labels else label}")
            if write_videos:
                folder = root / "videos" / split / label.replace(" ", "_")
                write_video(folder / f"{vid}_{start:06d}_{start + 10:06d}.mp4", 1.0, audio=True, seed=c * 10 + i)
    lines["train"] += [f"{ytid('gone')}_5,10,{0 if integer_labels else 'typing'}",  # no video file
                       f"{ytid('k0n0')}_0_10,10,{1 if integer_labels else 'tap dancing'}",  # conflicting label
                       "just-an-id"]  # malformed
    for split, body in lines.items():
        if shuffle is not None:
            random.Random(shuffle).shuffle(body)
        (root / f"my_{split}.txt").write_text("\n".join(body) + "\n")
    return root


@pytest.fixture(scope="module")
def ks_root(tmp_path_factory) -> Path:
    return make_ks(tmp_path_factory.mktemp("KS"))


def test_ks_reads_the_lists_and_finds_clips_by_id_and_start(ks_root, tmp_path):
    ds = get_dataset("ks", ks_root)
    assert ds.class_names == KS_CLASSES
    listing = ds.listing()
    got = assignment(listing)
    assert len(got) == 17 and Counter(s for _, s in got.values())["test"] == 6
    assert all(ytid("k0n0") not in sid for sid in got)  # its two lines disagree on the label
    s = next(s for s in listing.samples if s.sample_id == f"{ytid('k1n1')}_3")
    assert s.label == 1 and s.sources["audio"] == s.sources["visual"]
    assert s.sources["visual"].endswith(f"tap_dancing/{ytid('k1n1')}_000003_000013.mp4")
    why = reasons(listing)
    assert why[f"{ytid('gone')}_5"].startswith("no video file for this clip")
    assert "different labels" in why[f"{ytid('k0n0')}_0_10"]
    assert "is not <clip id>,<seconds>,<label>" in why["my_train.txt-line-15"]
    assert listing.split_rule.startswith("official lists: train my_train.txt, test my_test.txt; val = stratified 0.1")
    # Shuffled lists give the same splits; integer labels name classes from classes.txt.
    shuffled = make_ks(tmp_path / "shuffled", shuffle=1, write_videos=False)
    assert assignment(get_dataset("ks", shuffled, videos=ks_root / "videos").listing()) == got
    numbered = make_ks(tmp_path / "numbered", integer_labels=True, write_videos=False)
    (numbered / "classes.txt").write_text("\n".join(KS_CLASSES) + "\n")
    renamed = get_dataset("ks", numbered, videos=str(ks_root / "videos"))
    assert renamed.class_names == KS_CLASSES and assignment(renamed.listing()) == got
    (numbered / "classes.txt").unlink()
    assert get_dataset("ks", numbered, videos=ks_root / "videos").class_names == ["0", "1", "2"]


K400_CLASSES = ["abseiling", "air drumming", "passing American football (in game)"]


def make_k400(root: Path, with_test: bool = True) -> Path:
    rows = {"train": [], "val": [], "test": []}
    for c, label in enumerate(K400_CLASSES):
        for i in range(8):
            split = "train" if i < 4 else "val" if i < 6 else "test"
            vid, start = ytid(f"a{c}n{i}"), 10 * i
            rows[split].append((label, vid, start, start + 10, split))
            folder = "replacement/replacement_for_corrupted_k400" if (c, i) == (0, 1) else split
            write_video(root / folder / f"{vid}_{start:06d}_{start + 10:06d}.mp4", 1.0, seed=c * 10 + i)
    rows["train"].append(("abseiling", ytid("lost"), 0, 10, "train"))  # clip never downloaded
    rows["test"].append(("", ytid("nolabel"), 0, 10, "test"))
    (root / "annotations").mkdir()
    for split, body in rows.items():
        if split == "test" and not with_test:
            continue
        text = "label,youtube_id,time_start,time_end,split\n"
        text += "".join(f'"{label}",{vid},{s},{e},{sp}\n' if "(" in label else f"{label},{vid},{s},{e},{sp}\n"
                        for label, vid, s, e, sp in body)
        (root / "annotations" / f"{split}.csv").write_text(text)
    return root


@pytest.fixture(scope="module")
def k400_root(tmp_path_factory) -> Path:
    return make_k400(tmp_path_factory.mktemp("k400"))


def test_k400_official_splits_and_val_as_test(k400_root, tmp_path):
    ds = get_dataset("k400", k400_root)
    assert ds.class_names == K400_CLASSES
    listing = ds.listing()
    got = assignment(listing)
    assert Counter(s for _, s in got.values()) == {"train": 12, "val": 6, "test": 6}
    assert f"{ytid('a0n1')}_000010_000020" in got  # found in replacement/
    why = reasons(listing)
    assert why[f"{ytid('lost')}_000000_000010"] == f"video train/{ytid('lost')}_000000_000010.mp4 is missing"
    assert why[f"{ytid('nolabel')}_000000_000010"] == "no label in annotations/test.csv"
    assert listing.split_rule.startswith("official train / val / test annotations")
    as_val = get_dataset("k400", k400_root, test_from="val", seed=1).listing()
    got = assignment(as_val)
    assert {sid for sid, (_, s) in got.items() if s == "test"} == {f"{ytid(f'a{c}n{i}')}_{10 * i:06d}_{10 * i + 10:06d}"
                                                                   for c in range(3) for i in (4, 5)}
    assert Counter(s for _, s in got.values()) == {"train": 9, "val": 3, "test": 6}
    assert as_val.split_rule.startswith("official train; official val used as test (test.csv not used); val = ")
    no_test = make_k400(tmp_path / "k400-no-test", with_test=False)
    assert assignment(get_dataset("k400", no_test, seed=1).listing()) == got
    with pytest.raises(DatasetError, match="test_from=test needs annotations/test.csv"):
        get_dataset("k400", no_test, test_from="test")


# ---------------------------------------------------------------- IEMOCAP

IEMOCAP_LABELS = ["neu", "hap", "exc", "ang", "sad", "fru", "xxx", "neu", "ang", "sad", "hap", "exc"]


def iemocap_utterance(session: int, i: int) -> str:
    return f"Ses0{session}F_impro01_{'F' if i % 2 else 'M'}{i:03d}"


@pytest.fixture(scope="module")
def iemocap_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("IEMOCAP_full_release")
    for session in range(1, 6):
        dialog = f"Ses0{session}F_impro01"
        base = root / f"Session{session}" / "dialog"
        for sub in ("EmoEvaluation", "transcriptions"):
            (base / sub).mkdir(parents=True)
        evaluation = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        transcript = []
        for i, label in enumerate(IEMOCAP_LABELS):
            utt, start = iemocap_utterance(session, i), round(0.3 * i, 4)
            evaluation += [f"[{start:.4f} - {start + 0.25:.4f}]\t{utt}\t{label}\t[2.5000, 2.5000, 2.5000]",
                           f"C-E1:\t{label};\t()", ""]
            if (session, i) != (2, 3):  # no transcript line for this one
                text = "" if (session, i) == (3, 8) else f"words of {utt}"
                transcript.append(f"{utt} [{start:08.4f}-{start + 0.25:08.4f}]: {text}")
        (base / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(evaluation) + "\n")
        (base / "EmoEvaluation" / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07 resource fork")
        (base / "transcriptions" / f"{dialog}.txt").write_text("\n".join(transcript) + "\n")
        write_wav(base / "wav" / f"{dialog}.wav", 4.0, channels=2, seed=session)
        write_video(base / "avi" / "DivX" / f"{dialog}.avi", 4.0, fps=10, seed=session)
    return root


def test_iemocap_four_and_six_classes_with_windows_and_transcripts(iemocap_root):
    four = get_dataset("iemocap", iemocap_root).listing()
    labels = {sid: label for sid, (label, _) in assignment(four).items()}
    expected = {iemocap_utterance(s, i): ["hap", "sad", "neu", "ang"].index("hap" if lab == "exc" else lab)
                for s in range(1, 6) for i, lab in enumerate(IEMOCAP_LABELS) if lab not in ("fru", "xxx")}
    del expected[iemocap_utterance(2, 3)], expected[iemocap_utterance(3, 8)]
    assert labels == expected and len(labels) == 48
    six = get_dataset("iemocap", iemocap_root, classes=6)
    assert six.class_names == ["hap", "sad", "neu", "ang", "exc", "fru"]
    assert len(six.listing().samples) == 53
    s = next(s for s in four.samples if s.sample_id == iemocap_utterance(1, 4))
    assert s.window == pytest.approx((1.2, 1.45)) and s.sources["text"] == f"words of {s.sample_id}"
    assert s.sources["visual"].endswith("Session1/dialog/avi/DivX/Ses01F_impro01.avi")
    assert s.sources["audio"].endswith("Session1/dialog/wav/Ses01F_impro01.wav")
    why = reasons(four)
    assert why[iemocap_utterance(1, 5)] == ("label 'fru' is outside the 4-class scheme hap, sad, neu, ang "
                                            "(exc merged into hap)")
    assert "outside the 4-class" in why[iemocap_utterance(1, 6)]
    assert why[iemocap_utterance(2, 3)] == "no line in transcriptions/Ses02F_impro01.txt"
    assert why[iemocap_utterance(3, 8)] == "empty transcript"
    assert four.split_rule.startswith("random stratified 60/20/20 by label, seed 0")
    assert_stratified(four, (0.6, 0.2, 0.2))


def test_iemocap_session_disjoint_and_leave_one_session_out(iemocap_root):
    session_of = {iemocap_utterance(s, i): s for s in range(1, 6) for i in range(12)}
    listing = get_dataset("iemocap", iemocap_root, split="session", seed=4).listing()
    where = {}
    for s in listing.samples:
        where.setdefault(session_of[s.sample_id], set()).add(s.split)
    assert all(len(v) == 1 for v in where.values()) and {next(iter(v)) for v in where.values()} == set(SPLITS)
    assert listing.split_rule.startswith("session-disjoint stratified 60/20/20 over 5 sessions")
    loso = get_dataset("iemocap", iemocap_root, split="loso", test_session="5", val_session="Session4").listing()
    for s in loso.samples:
        assert s.split == {5: "test", 4: "val"}.get(session_of[s.sample_id], "train")
    carved = get_dataset("iemocap", iemocap_root, split="loso", test_session=5, val_fraction=0.25).listing()
    assert {session_of[s.sample_id] for s in carved.samples if s.split == "test"} == {5}
    assert {session_of[s.sample_id] for s in carved.samples if s.split == "val"} <= {1, 2, 3, 4}
    assert "leave-one-session-out: test session Session5" in carved.split_rule
    with pytest.raises(DatasetError, match="Session9 not in the data"):
        get_dataset("iemocap", iemocap_root, split="loso", test_session=9).listing()
    with pytest.raises(DatasetError, match="split=loso needs test_session"):
        get_dataset("iemocap", iemocap_root, split="loso")


# ---------------------------------------------------------------- UPMC Food-101

FOOD_CLASSES = ["apple_pie", "baklava", "ramen"]


@pytest.fixture(scope="module")
def food_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("UPMC_Food101")
    (root / "texts").mkdir()
    for split, n in (("train", 6), ("test", 2)):
        rows = [] if split == "train" else ["image_name,text,label"]
        for c, label in enumerate(FOOD_CLASSES):
            for i in range(n):
                write_jpeg(root / "images" / split / label / f"{label}_{i}.jpg", seed=c * 10 + i)
                rows.append(f'{label}_{i}.jpg,"{label} recipe {i}, easy",{label}')
        if split == "train":
            rows += ["baklava_1.jpg,another page,baklava",  # same image, different text
                     "pizza_0.jpg,pizza,pizza",  # class without a folder
                     "ramen_50.jpg,lost ramen,ramen"]  # image missing
            write_jpeg(root / "images" / "train" / "apple_pie" / "apple_pie_99.jpg")  # no text row
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(rows) + "\n")
    return root


def test_food101_official_splits_texts_and_skips(food_root):
    ds = get_dataset("food101", food_root)
    assert ds.class_names == FOOD_CLASSES
    listing = ds.listing()
    got = assignment(listing)
    assert len(got) == 17 + 6 and "train/apple_pie_0" in got and "test/apple_pie_0" in got
    assert Counter(s for _, s in got.values()) == {"train": 14, "val": 3, "test": 6}  # val: 10% of 17 -> 1/class
    sample = next(s for s in listing.samples if s.sample_id == "test/ramen_1")
    assert sample.label == 2 and sample.sources["text"] == "ramen recipe 1, easy"
    assert sample.sources["image"] == str(food_root / "images" / "test" / "ramen" / "ramen_1.jpg")
    why = reasons(listing)
    assert why == {"train/baklava_1": "train_titles.csv lists baklava_1.jpg twice with different texts or classes",
                   "train/pizza_0": "class 'pizza' has no folder under images/ (outside the scheme)",
                   "train/ramen_50": "image train/ramen/ramen_50.jpg is missing",
                   "train/apple_pie_99": "no row for apple_pie_99.jpg in texts/train_titles.csv"}
    assert listing.split_rule.startswith("official train / test; val = stratified 1 samples of train, seed 0")
    assert assignment(get_dataset("food101", food_root, seed=5).listing()) != got
    assert assignment(get_dataset("food101", food_root).listing()) == got


# ---------------------------------------------------------------- options, CLI listing


@pytest.mark.parametrize("name, options, message", [
    ("mvsa", {"rule": "C"}, "option rule must be one of a, b"),
    ("mvsa", {"colour": "red"}, "mvsa: unknown option(s) colour; known: seed"),
    ("mvsa", {"split": "actor"}, "option split must be one of random"),
    ("cremad", {"seed": "x"}, "option seed must be an integer"),
    ("cremad", {"train_file": "a.csv"}, "train_file and test_file go together"),
    ("cremad", {"split": "actor", "split_file": "s.csv"}, "a split file replaces the split option"),
    ("cremad", {"split_file": "nope.csv"}, "split file nope.csv not found"),
    ("iemocap", {"classes": "5"}, "option classes must be one of 4, 6"),
    ("iemocap", {"test_session": "5"}, "apply to split=loso only"),
    ("k400", {"test_from": "train"}, "option test_from must be one of auto, test, val"),
    ("k400", {"fractions": "0.8,0.1,0.1"}, "fractions apply to split=random only"),
    ("ks", {"val_fraction": "1.5"}, "option val_fraction must be a number in (0, 1)"),
    ("food101", {"val_size": "0"}, "option val_size must be positive"),
])
def test_bad_options_are_one_clear_line(name, options, message, request):
    root = request.getfixturevalue({"mvsa": "mvsa_root", "cremad": "cremad_root", "iemocap": "iemocap_root",
                                    "k400": "k400_root", "ks": "ks_root", "food101": "food_root"}[name])
    with pytest.raises(DatasetError) as err:
        get_dataset(name, root, **options).listing()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["mvsa", "cremad", "ks", "k400", "iemocap", "food101"])
def test_wrong_root_is_one_clear_line(name, tmp_path):
    with pytest.raises(DatasetError) as err:
        get_dataset(name, tmp_path)
    assert "not found" in str(err.value) or "no Session" in str(err.value)


def test_datasets_command_lists_every_adapter():
    result = cli("datasets")
    assert result.exit_code == 0, result.output
    for name in ("mvsa", "cremad", "ks", "k400", "iemocap", "food101"):
        assert f"\n{name}: " in f"\n{result.output}" and DATASETS[name].layout in result.output
    assert "classes     6: NEU, HAP, SAD, FEA, DIS, ANG" in result.output
    assert "modalities  audio (audio), text (text), visual (video)" in result.output


# ---------------------------------------------------------------- extraction end to end


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {"clip-vit-l14": tiny_clip(root / "clip"), "resnet18": tiny_resnet(root / "resnet18.pth"),
            "whisper-large-v3": tiny_whisper(root / "large-v3.pt")}


@pytest.mark.parametrize("name, root, backbone, options, modalities", [
    ("mvsa", "mvsa_root", "clip-vit-l14", ["rule=B"], {"image", "text"}),
    ("cremad", "cremad_root", "resnet18", ["split=actor"], {"visual"}),
    ("ks", "ks_root", "whisper-large-v3", [], {"audio"}),
    ("k400", "k400_root", "resnet18", ["test_from=val"], {"visual"}),
    ("iemocap", "iemocap_root", "clip-vit-l14", ["classes=6", "split=session"], {"text", "visual"}),
    ("iemocap", "iemocap_root", "whisper-large-v3", [], {"audio"}),
    ("food101", "food_root", "clip-vit-l14", [], {"image", "text"}),
])
def test_extract_end_to_end_into_a_valid_cache(name, root, backbone, options, modalities, weights, tmp_path, request):
    data = request.getfixturevalue(root)
    config = ["--config", json.dumps(TINY_RESNET)] if backbone == "resnet18" else []
    opts = [a for o in options for a in ("-o", o)]
    result = cli("extract", name, "--backbone", backbone, "--weights", weights[backbone], "--data-root", data,
                 "--out", tmp_path, "--workers", 0, "--batch-size", 16, "--frames", 2, "--quiet", *config, *opts)
    assert result.exit_code == 0, result.output
    cache = tmp_path / name / backbone
    assert verify(cache) == []
    meta = load_meta(cache)
    ds = get_dataset(name, data, **dict(o.split("=", 1) for o in options))
    listing = ds.listing()
    assert set(meta["modalities"]) == modalities and meta["class_names"] == ds.class_names
    assert meta["split_rule"] == listing.split_rule
    manifest = pl.read_parquet(cache / "manifest.parquet")
    assert dict(zip(manifest["sample_id"], manifest["split"])) == {s.sample_id: s.split for s in listing.samples}
    assert dict(zip(manifest["sample_id"], manifest["label"])) == {s.sample_id: s.label for s in listing.samples}
    failed = pl.read_parquet(cache / "failed.parquet")
    assert set(failed["sample_id"]) == {k.sample_id for k in listing.skipped}
