"""The cache contract: round trip, resume without duplicates, refusals, verification."""
import json

import h5py
import numpy as np
import pytest

from cache import CacheError, CacheWriter, build_manifest, cache_info, load_meta, load_split, verify, write_arrays


def writer(path, **kw):
    args = dict(dataset="toy", backbone="rand", modalities={"audio": (1, 4), "visual": (3, 2)},
                class_names=["a", "b", "c"], shard_size=4)
    args.update(kw)
    return CacheWriter(path, **args)


def batch(ids, seed=0):
    rng = np.random.default_rng(seed)
    n = len(ids)
    return dict(ids=ids, labels=[i % 3 for i in range(n)], splits=(["train", "val", "test"] * n)[:n],
                features={"audio": rng.standard_normal((n, 4)).astype(np.float32),
                          "visual": rng.standard_normal((n, 3, 2)).astype(np.float32)})


def test_round_trip_float16_sorted_by_id_with_present_masks(tmp_path):
    b = batch([f"s{i}" for i in (5, 3, 1, 4, 2, 0)])
    present = {"audio": np.array([1, 1, 0, 1, 1, 1], bool), "visual": np.ones(6, bool)}
    with writer(tmp_path) as w:
        w.add(**b, present=present)
    train = load_split(tmp_path, "train")
    assert train.ids == ["s4", "s5"]  # inputs s5 and s4 got split "train"; rows come sorted by id
    order = {sid: i for i, sid in enumerate(b["ids"])}
    for k, sid in enumerate(train.ids):
        i = order[sid]
        expect = b["features"]["audio"][i] * present["audio"][i]
        np.testing.assert_allclose(train.features["audio"][k, 0].numpy(), expect.astype(np.float16), rtol=0, atol=0)
        assert bool(train.present["audio"][k]) == bool(present["audio"][i])
        assert int(train.labels[k]) == b["labels"][i]
    assert train.features["visual"].shape == (2, 3, 2) and train.features["visual"].dtype.is_floating_point


def test_resume_after_crash_holds_each_sample_exactly_once(tmp_path):
    ids = [f"id{i:02d}" for i in range(10)]
    w = writer(tmp_path)
    w.add(**batch(ids[:4]))  # reaches shard_size: written as one whole shard
    w.add(**batch(ids[4:6]))  # still buffered when the process dies
    (tmp_path / ".shard-00-00001.h5.tmp").write_bytes(b"half a shard")  # a killed flush
    del w  # the process dies: no close, no manifest
    w2 = writer(tmp_path)
    assert w2.done_ids == set(ids[:4])
    assert not list(tmp_path.glob("*.tmp"))
    added = w2.add(**batch(ids))  # the rerun offers everything again
    assert added == 6
    w2.close()
    manifest = build_manifest(tmp_path)
    assert sorted(manifest["sample_id"].to_list()) == ids
    assert verify(tmp_path) == []


def test_two_ranks_write_disjoint_shards_and_one_manifest(tmp_path):
    ids = [f"x{i}" for i in range(9)]
    for rank in (0, 1):
        w = writer(tmp_path, rank=rank)
        mine = ids[rank::2]
        w.add(**batch(mine))
        w.close(finalize=False)
    build_manifest(tmp_path)
    info = cache_info(tmp_path)
    assert sum(info["counts"].values()) == 9
    assert {p.name.split("-")[1] for p in tmp_path.glob("shard-*.h5")} == {"00", "01"}


@pytest.mark.parametrize("bad, message", [
    (dict(modalities={"Audio": (1, 4)}), "invalid modality name"),
    (dict(modalities={"audio": (0, 4)}), "must be positive"),
    (dict(class_names=[]), "class names"),
])
def test_invalid_writer_settings_refused(tmp_path, bad, message):
    with pytest.raises(CacheError, match=message):
        writer(tmp_path, **bad)


def test_bad_batches_refused(tmp_path):
    w = writer(tmp_path)
    b = batch(["a", "b"])
    b["features"]["audio"][0, 1] = np.nan
    with pytest.raises(CacheError, match="non-finite"):
        w.add(**b)
    b = batch(["a", "b"])
    b["features"]["audio"][0, 1] = 1e6
    with pytest.raises(CacheError, match="float16 range"):
        w.add(**b)
    b = batch(["a", "b"])
    b["features"]["visual"] = b["features"]["visual"][:, :, :1]
    with pytest.raises(CacheError, match="expects"):
        w.add(**b)
    b = batch(["a", "a"])
    with pytest.raises(CacheError, match="same sample id twice"):
        w.add(**b)
    b = batch(["a", "b"])
    b["labels"] = [0, 3]
    with pytest.raises(CacheError, match="labels must lie"):
        w.add(**b)
    b = batch(["a", "b"])
    b["splits"] = ["train", "dev"]
    with pytest.raises(CacheError, match="unknown split"):
        w.add(**b)


def test_reopening_with_other_dims_refused(tmp_path):
    with writer(tmp_path) as w:
        w.add(**batch(["a"]))
    with pytest.raises(CacheError, match="other modalities"):
        writer(tmp_path, modalities={"audio": (1, 5), "visual": (3, 2)})


def test_verify_finds_tampering_and_reader_refuses_corruption(tmp_path):
    with writer(tmp_path) as w:
        w.add(**batch([f"s{i}" for i in range(8)]))
    assert verify(tmp_path) == []
    shard = sorted(tmp_path.glob("shard-*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        f["features/audio"][0, 0, 0] = np.inf
        f["present/visual"][1] = False  # absent but holding non-zero features
    problems = verify(tmp_path)
    assert any("non-finite" in p for p in problems)
    assert any("absent samples with non-zero" in p for p in problems)
    shard.write_bytes(b"not hdf5 at all")
    assert any("unreadable" in p for p in verify(tmp_path))
    with pytest.raises(CacheError, match="unreadable"):
        load_split(tmp_path, "train")


def test_missing_and_foreign_caches_give_clear_errors(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        load_meta(tmp_path / "nope")
    with pytest.raises(CacheError, match="meta.json is missing"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(CacheError, match="unreadable"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(CacheError, match="schema version 99"):
        load_meta(tmp_path)


def test_write_arrays_and_meta_records_provenance(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    write_arrays(tmp_path, dataset="d", backbone="b", features={"text": x}, labels=np.array([0, 1] * 3),
                 splits=["train"] * 4 + ["val", "test"], class_names=["n", "p"], split_rule="given")
    meta = load_meta(tmp_path)
    assert meta["schema_version"] == 1 and meta["split_rule"] == "given" and meta["code_version"]
    assert meta["modalities"] == {"text": {"tokens": 1, "dim": 2}}
    assert load_split(tmp_path, "train").features["text"][:, 0].tolist() == x[:4].tolist()
