"""Memory proportional to the data (issue 24, part 1): the block reader, the 16-bit working dtype, the
per-batch standardisation, the blocked statistics, make-synthetic in blocks — each the same values as
the whole-array path it replaces."""
import json

import h5py
import numpy as np
import pytest
import torch

import cache.reader as reader
import cache.synthetic as synthetic
import heads.blocks.order as order
from cache import CacheError, FeatureSplit, cache_info, load_split, load_splits, write_arrays
from heads.blocks.data import SplitTensors
from heads.blocks.loading import load_head_data
from heads.blocks.order import evaluation_order
from heads.blocks.standardize import LazyStandardized, Standardizer, _blocked_moments, materialized, standardized
from heads.train.config import config_from_options
from heads.train.trainer import fit


def _two_shard_cache(tmp_path):
    """12 samples over two shards of 5 + 7 rows, ids written out of order so the sorted split interleaves shards."""
    rng = np.random.default_rng(0)
    n = 12
    ids = [f"s{i:02d}" for i in rng.permutation(n)]
    feats = {"a": rng.standard_normal((n, 3)).astype(np.float16), "b": rng.standard_normal((n, 2, 4)).astype(np.float16)}
    present = {"a": np.ones(n, bool), "b": rng.random(n) < 0.7}
    feats["b"][~present["b"]] = 0
    labels = rng.integers(0, 3, n)
    splits = ["train", "val", "test", "train"] * 3
    write_arrays(tmp_path, dataset="d", backbone="b", features=feats, labels=labels, splits=splits,
                 class_names=["x", "y", "z"], ids=ids, present=present, shard_size=5)
    return ids, feats, present, labels, splits


def test_block_reader_puts_each_row_where_the_sorted_split_wants_it(tmp_path, monkeypatch):
    ids, feats, present, labels, splits = _two_shard_cache(tmp_path)
    monkeypatch.setattr(reader, "BLOCK_ROWS", 2)  # blocks smaller than a shard, edges inside the splits
    small = load_splits(tmp_path, ("train", "val", "test"), dtype="float16")
    monkeypatch.setattr(reader, "BLOCK_ROWS", 4096)
    for s in ("train", "val", "test"):
        rows = sorted((i for i in range(12) if splits[i] == s), key=lambda i: ids[i])  # by hand: sorted by id
        part, whole = small[s], load_split(tmp_path, s)
        assert part.ids == whole.ids == [ids[i] for i in rows]
        assert part.labels.tolist() == whole.labels.tolist() == labels[rows].tolist()
        for m in feats:
            expected = feats[m][rows].reshape(len(rows), -1, feats[m].shape[-1])
            assert part.features[m].dtype == torch.float16 and whole.features[m].dtype == torch.float32
            assert np.array_equal(part.features[m].numpy(), expected)
            assert np.array_equal(whole.features[m].numpy(), expected.astype(np.float32))  # float16 → float32 exact
            assert part.present[m].tolist() == present[m][rows].tolist()


def test_reader_refuses_an_unknown_dtype_and_a_shard_of_the_wrong_shape(tmp_path):
    _two_shard_cache(tmp_path)
    with pytest.raises(CacheError, match="float32 or float16"):
        load_splits(tmp_path, dtype="bfloat16")
    with pytest.raises(CacheError, match="--feature-dtype must be one of fp16, fp32"):
        load_head_data([tmp_path], feature_dtype="fp8")
    shard = sorted(tmp_path.glob("shard-*.h5"))[0]
    with h5py.File(shard, "a") as f:
        del f["features/a"]
        f.create_dataset("features/a", data=np.zeros((5, 1, 2), np.float16))
    with pytest.raises(CacheError, match="unreadable .*features/a has shape"):
        load_split(tmp_path, "train")


def test_make_synthetic_in_blocks_writes_the_same_values(tmp_path, monkeypatch):
    whole = synthetic.make_synthetic(tmp_path / "whole", "avt", seed=3, scale=0.03)
    monkeypatch.setattr(synthetic, "ROWS", 7)  # many blocks, the last one short
    blocks = synthetic.make_synthetic(tmp_path / "blocks", "avt", seed=3, scale=0.03)
    for s in ("train", "val", "test"):
        a, b = load_split(whole, s), load_split(blocks, s)
        assert a.ids == b.ids and a.labels.tolist() == b.labels.tolist()
        assert all(torch.equal(a.features[m], b.features[m]) for m in a.features)
    assert not list(tmp_path.glob("synthetic-*"))  # the scratch memory maps are gone


def _split(dtype, n=23, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = {"a": (torch.randn(n, 1, 5, generator=gen) * 3 + 1).to(torch.float16),
              "b": (torch.randn(n, 2, 4, generator=gen) - 2).to(torch.float16)}
    present = {"a": torch.ones(n, dtype=torch.bool), "b": torch.rand(n, generator=gen) < 0.6}
    tokens["b"][~present["b"]] = 0
    feats = {m: t.to(dtype) for m, t in tokens.items()}
    return SplitTensors.from_feature_split(FeatureSplit([f"{i}" for i in range(n)], torch.arange(n) % 3, feats, present))


@pytest.mark.parametrize("per_feature", [True, False])
def test_blocked_moments_equal_the_whole_array_statistics(per_feature):
    split = _split(torch.float32)
    tokens, present = split.tokens["b"], split.present["b"]
    values = tokens[present].reshape(-1, 4).double()
    mean, std = _blocked_moments(tokens.half(), present, per_feature, rows=3)
    if per_feature:
        want_mean, want_std = values.mean(0), values.std(0, unbiased=False)  # population std, per feature
    else:
        want_mean, want_std = values.mean().expand(4), values.std(unbiased=False).expand(4)
    assert torch.allclose(mean, want_mean, rtol=0, atol=1e-12) and torch.allclose(std, want_std, rtol=0, atol=1e-12)
    assert _blocked_moments(tokens.half(), torch.zeros_like(present), per_feature) is None


@pytest.mark.parametrize("mode", ["feature", "modality", "none"])
def test_lazy_batches_are_the_standardised_float32_batches(mode):
    raw32, raw16 = _split(torch.float32), _split(torch.float16)
    dims = {m: t.shape[-1] for m, t in raw32.tokens.items()}
    std32, std16 = Standardizer(dims, mode).fit(raw32), Standardizer(dims, mode).fit(raw16)
    for a, b in zip(std32.buffers(), std16.buffers()):  # blocked statistics, rounded to float32
        assert torch.equal(a, b)
    copy, lazy = standardized(raw32, std32), standardized(raw16, std16)
    assert isinstance(lazy, LazyStandardized) and not isinstance(copy, LazyStandardized)
    assert lazy.x["b"].dtype == torch.float32 and lazy.tokens["b"].dtype == torch.float16  # pooled in float32
    assert torch.equal(lazy.x["b"], raw32.x["b"])
    assert torch.equal(evaluation_order(lazy), evaluation_order(copy))
    rows = torch.tensor([4, 0, 17, 9, 22])
    for kind in (copy.batch(rows), lazy.batch(rows), materialized(lazy).batch(rows)):
        assert all(t.dtype == torch.float32 for t in [*kind.x.values(), *kind.tokens.values()])
    want, got, full = copy.batch(rows), lazy.batch(rows), materialized(lazy).batch(rows)
    for m in dims:
        assert torch.equal(got.x[m], want.x[m]) and torch.equal(got.tokens[m], want.tokens[m])
        assert torch.equal(full.tokens[m], want.tokens[m])
        assert got.present[m].tolist() == want.present[m].tolist()
    if mode != "none":
        assert not torch.equal(got.x["a"], raw32.x["a"][rows])  # it was mapped
    assert materialized(lazy) is materialized(lazy)  # made once, shared


def test_evaluation_order_in_blocks_is_the_whole_array_order(monkeypatch):
    whole = evaluation_order(_split(torch.float32, n=50, seed=4))
    monkeypatch.setattr(order, "ORDER_ROWS", 7)
    assert torch.equal(evaluation_order(_split(torch.float32, n=50, seed=4)), whole)
    assert torch.equal(evaluation_order(_split(torch.float16, n=50, seed=4)), whole)


@pytest.mark.trains
def test_fp16_and_fp32_runs_reproduce_the_earlier_path_exactly(tmp_path):
    """The pinned numbers are those of the code before issue 24 (whole-split float32 load, a standardised
    float32 copy): ``--feature-dtype fp32`` is that path; fp16 gives the same results.json."""
    cache = synthetic.make_synthetic(tmp_path / "c", "avt-saturated", scale=0.06)  # the preset the numbers were pinned on
    results = {}
    for dtype in ("fp32", "fp16"):
        data = load_head_data([cache], feature_dtype=dtype)
        cfg = config_from_options("concat", 3, 1, None, 32, None, 16, None, 0.0, 0.0, device="cpu")
        fit(data, cfg, tmp_path / dtype, progress=False)
        results[dtype] = json.loads((tmp_path / dtype / "results.json").read_text())
        results[dtype].pop("seconds")
        assert json.loads((tmp_path / dtype / "config.json").read_text())["data"]["feature_dtype"] == dtype
    assert results["fp16"] == results["fp32"]
    assert results["fp32"]["val"]["loss"] == 0.9415679700446852
    assert results["fp32"]["test"]["loss"] == 0.9787677418101918


def test_cache_info_says_what_memory_each_feature_dtype_needs(tmp_path):
    _two_shard_cache(tmp_path)
    # 12 samples: a [1, 3] and b [2, 4] in float16 = 12·(3 + 8)·2 bytes; b's float32 token mean 12·4·4
    memory = cache_info(tmp_path)["memory"]
    assert (memory["fp16"], memory["fp32"]) == (264 + 192, 4 * 264 + 2 * 192)
