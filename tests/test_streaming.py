"""Splits streamed from the shards (issue 24, part 2): the epoch's rows, the seeded order, the same
numbers as in memory when the shuffle is the same, evaluation, refusals, and what `cache info` says."""
import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from cache import write_arrays
from cache.stream import plan_splits
from heads.blocks import loading
from heads.blocks.loading import load_head_data
from heads.blocks.order import evaluation_order
from heads.blocks.standardize import Standardizer, materialized, standardized
from heads.blocks.streaming import StreamedSplit
from heads.errors import OptionError
from heads.train.config import TrainConfig, build_model, config_from_options
from heads.train.evaluation import evaluate
from heads.train.trainer import fit

N = 90


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """90 samples over four shards, ids written out of order (the sorted split interleaves shards),
    one token modality, absent samples, splits interleaved."""
    path = tmp_path_factory.mktemp("stream") / "c"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, N)
    ids = [f"s{i:03d}" for i in rng.permutation(N)]
    feats = {"a": (rng.standard_normal((N, 6)) + labels[:, None]).astype(np.float16),
             "b": (rng.standard_normal((N, 3, 4)) - labels[:, None, None]).astype(np.float16)}
    present = {"a": np.ones(N, bool), "b": rng.random(N) < 0.8}
    feats["b"][~present["b"]] = 0
    splits = (["train"] * 6 + ["val", "test"] * 2) * 9
    write_arrays(path, dataset="d", backbone="b", features=feats, labels=labels, splits=splits,
                 class_names=["x", "y", "z"], ids=ids, present=present, shard_size=25)
    return path


def streamed(cache, rows_mb=0.0008):  # 0.0008 MB = 20 rows of 40 bytes: several windows per epoch
    return load_head_data([cache], in_memory="no", stream_buffer=rows_mb)


def test_a_streamed_epoch_visits_every_training_row_exactly_once(cache):
    data, mem = streamed(cache), load_head_data([cache], in_memory="yes")
    train = data.train
    assert 1 < train.buffer_rows < len(train)  # chunk shuffle, several windows, carried rows
    batches = list(train.batches(7, torch.Generator().manual_seed(0)))
    rows = torch.cat([b.index for b in batches])
    assert sorted(rows.tolist()) == list(range(len(train)))
    assert [len(b) for b in batches[:-1]] == [7] * (len(batches) - 1)  # full batches but the last
    for b in batches:  # each row's values are its in-memory values
        same = mem.train.batch(b.index)
        assert all(torch.equal(b.tokens[m], same.tokens[m]) and torch.equal(b.x[m], same.x[m]) for m in b.x)
        assert torch.equal(b.y, same.y) and b.counts == same.counts
        assert all(torch.equal(b.present[m], same.present[m]) for m in b.present)


def test_the_same_seed_gives_the_same_batches_and_another_seed_others(cache):
    train = streamed(cache).train
    order = lambda seed: [b.index.tolist() for b in train.batches(8, torch.Generator().manual_seed(seed))]
    assert order(3) == order(3)
    assert order(3) != order(4)
    again = pickle.loads(pickle.dumps(train))  # as a sweep's worker receives it
    assert order(3) == [b.index.tolist() for b in again.batches(8, torch.Generator().manual_seed(3))]


def test_a_buffer_holding_the_split_shuffles_exactly_as_in_memory(cache):
    train, mem = streamed(cache, 1.0).train, load_head_data([cache]).train
    assert train.buffer_rows >= len(train)
    ours = [b.index for b in train.batches(8, torch.Generator().manual_seed(5))]
    theirs = [b.index for b in mem.batches(8, torch.Generator().manual_seed(5))]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)) and len(ours) == len(theirs)


def _run(data, method="concat", epochs=3):
    return fit(data, config_from_options(method, epochs, 0, None, 16, None, 8, None, 0.0, 0.0, {}, device="cpu"),
               progress=False)


def test_streamed_concat_gives_the_in_memory_numbers_when_the_shuffle_is_the_same(cache):
    mem = _run(load_head_data([cache]))
    same = _run(streamed(cache, 1.0))
    assert same.test.to_json() == mem.test.to_json() and same.val.to_json() == mem.val.to_json()
    assert same.epochs == mem.epochs
    # With a buffer smaller than the split, only the order of the batches differs (the rows of each
    # epoch are the same, test_a_streamed_epoch_...): the run is another, equally valid shuffle.
    other = _run(streamed(cache))
    assert other.epochs != mem.epochs


def test_streamed_statistics_order_and_evaluation_equal_in_memory(cache):
    mem, data = load_head_data([cache]), streamed(cache)
    for mode in ("feature", "modality"):
        a, b = Standardizer(mem.spec.dims, mode).fit(mem.train), Standardizer(mem.spec.dims, mode).fit(data.train)
        assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers()))
    for split in ("val", "test", "train"):
        assert torch.equal(evaluation_order(getattr(mem, split)), evaluation_order(getattr(data, split)))
    torch.manual_seed(0)
    model = build_model(TrainConfig(method="edm", hidden=8), mem.spec)  # edm looks across its batches
    model.standardizer.fit(mem.train)
    for split in ("val", "test"):
        ours = evaluate(model, standardized(getattr(data, split), model.standardizer), data.spec, 5, prepared=True)
        theirs = evaluate(model, standardized(getattr(mem, split), model.standardizer), mem.spec, 5, prepared=True)
        assert ours.to_json() == theirs.to_json() and torch.equal(ours.pred, theirs.pred)


def test_masked_streamed_splits_equal_masked_in_memory_ones(cache):
    mem, data = load_head_data([cache]), streamed(cache)
    a, b = mem.train.with_missing(0.3, 7), data.train.with_missing(0.3, 7)
    assert all(torch.equal(a.present[m], b.present[m]) for m in a.present)
    rows = torch.arange(len(a))
    x, y = a.batch(rows), b.batch(rows)
    assert all(torch.equal(x.tokens[m], y.tokens[m]) for m in x.tokens) and x.counts == y.counts


@pytest.mark.parametrize("method", ["pmr", "qmf", "mses"])
def test_methods_that_read_their_attached_splits_train_streamed(cache, method):
    result = _run(streamed(cache), method, epochs=2)
    assert result.epochs_run == 2 and 0 <= result.test.acc <= 100


def test_what_cannot_stream_is_refused_in_one_line(cache):
    data = streamed(cache)
    for call in (lambda: data.train.take(torch.arange(3)), lambda: StreamedSplit.cat([data.train]),
                 lambda: materialized(data.train)):
        with pytest.raises(OptionError, match="--in-memory yes"):
            call()
    with pytest.raises(OptionError, match="--in-memory must be one of auto, yes, no"):
        load_head_data([cache], in_memory="maybe")
    with pytest.raises(OptionError, match="--stream-buffer must be positive"):
        load_head_data([cache], in_memory="no", stream_buffer=0)


def test_auto_streams_only_when_the_features_do_not_fit(cache, monkeypatch):
    monkeypatch.setattr(loading, "available_memory", lambda: 10 ** 12)
    assert not load_head_data([cache]).meta.get("streamed")
    monkeypatch.setattr(loading, "available_memory", lambda: 10 ** 6)
    data = load_head_data([cache])
    assert data.meta["streamed"] and isinstance(data.train, StreamedSplit)
    assert load_head_data([cache], in_memory="yes").meta.get("streamed") is None


def test_plan_holds_labels_and_masks_of_the_sorted_split(cache):
    mem = load_head_data([cache])
    plan = plan_splits(cache, ("val",))["val"]
    assert plan.ids == mem.val.ids and plan.labels.tolist() == mem.val.y.tolist()
    assert all(plan.present[m].tolist() == mem.val.present[m].tolist() for m in plan.present)


def test_cache_info_prints_the_memory_of_each_mode(cache):
    out = CliRunner().invoke(cli.app, ["cache", "info", str(cache)])
    assert out.exit_code == 0, out.output
    assert "in memory (--in-memory yes)" in out.output and "with --feature-dtype fp16" in out.output
    assert "streamed (--in-memory no)" in out.output and "shuffle buffer" in out.output


def test_train_head_streams_on_in_memory_no(cache, tmp_path):
    out = CliRunner().invoke(cli.app, ["train-head", "--cache", str(cache), "--epochs", "1", "--in-memory", "no",
                                       "--stream-buffer", "0.001", "--out", str(tmp_path), "--name", "r", "--quiet",
                                       "--device", "cpu", "--hidden", "8"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "r" / "results.json").exists()


def test_the_finite_test_reads_the_exponent_bits_of_float16():
    """``all_finite`` is numpy's isfinite for float16: the largest finite value and subnormals pass,
    inf, −inf and NaN fail, wherever they sit (also past the first block of rows)."""
    from cache.stream import FINITE_ROWS, all_finite

    values = np.zeros((FINITE_ROWS + 3, 2), np.float16)
    values[0] = [65504, -65504]
    values[1] = [np.float16(6e-8), -np.float16(6e-8)]
    assert all_finite(values)
    for bad in (np.inf, -np.inf, np.nan):
        broken = values.copy()
        broken[FINITE_ROWS + 1, 1] = bad
        assert not all_finite(broken) and not np.isfinite(broken).all()
    assert all_finite(np.zeros((0, 4), np.float16))


@pytest.mark.parametrize("shape", [(40, 1, 3), (40, 2, 3)])
def test_every_read_path_puts_each_row_in_its_place(tmp_path, shape):
    """``_read_sorted``'s three paths — consecutive rows straight into ``out``, a dense span through the
    reused block (consecutive places: ``np.take``; scattered places: fancy), a sparse point read — all
    give ``out[at[i]] = ds[rows[i]]``, with the same scratch buffer across calls."""
    import h5py

    from cache.stream import _read_sorted

    data = np.arange(np.prod(shape), dtype=np.float16).reshape(shape)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["x"] = data
    cases = {"consecutive": (np.arange(5, 25), np.arange(3, 23)),
             "dense, consecutive places": (np.arange(0, 40, 2), np.arange(20)),
             "dense, scattered places": (np.arange(0, 40, 2), np.arange(20)[::-1].copy()),
             "sparse": (np.array([1, 39]), np.array([0, 1]))}
    scratch = {}
    with h5py.File(tmp_path / "f.h5", "r") as f:
        for name, (rows, at) in cases.items():
            out = np.full((25, *shape[1:]), -1, np.float16)
            _read_sorted(f["x"], rows, out, at, scratch)
            expected = np.full_like(out, -1)
            expected[at] = data[rows]
            assert np.array_equal(out, expected), name
    assert len(scratch) == 1


def test_a_streamed_split_refuses_nan_features_in_one_line_or_zeroes_them(tmp_path):
    from cache import CacheError
    from cache.stream import RowReader

    path = tmp_path / "bad"
    write_arrays(path, dataset="d", backbone="b", features={"a": np.ones((12, 4), np.float32)}, labels=np.arange(12) % 2,
                 splits=["train"] * 12, class_names=["x", "y"], ids=[f"s{i:02d}" for i in range(12)])
    plan = plan_splits(path, ("train",))["train"]
    import h5py

    with h5py.File(path / plan.shards[0], "r+") as f:  # the writer refuses inf: damage the shard after it
        f["features/a"][int(plan.row[7]), 0, 2] = np.inf
    with pytest.raises(CacheError, match="NaN or inf value"):
        RowReader(plan).read(np.arange(12))
    plan.allow_nonfinite = True
    out = RowReader(plan).read(np.arange(12))["a"]
    assert out[7, 0, 2] == 0 and np.isfinite(out).all() and out.sum() == 12 * 4 - 1
