"""A split streamed from the cache's HDF5 shards, for caches bigger than memory (issue 24, part 2).

``--in-memory no``, or ``auto`` when the cache's features do not fit (``heads/blocks/loading.py``),
gives the trainer ``StreamedSplit``s instead of ``SplitTensors``. Only what is small is held: ids,
labels and present masks; the features are read when a batch needs them (``cache/stream.py``).
Methods receive the same ``Batch`` objects as from a split in memory — float32, standardised,
``Batch.index`` the row in the split, present counts known on the host — so every method runs
unchanged, its attached splits included (H1): ``batches``, ``batch`` (any rows, read at once),
``len``, ``y``, ``present``, ``only``/``with_present``/``with_missing`` work as on a split in memory.
What cannot stream is refused in one line (``take``/``cat``/``subset``: an epoch split of re-sampled
copies; ``materialized``: the stacked GPU runner's whole tensors).

**Training order** (``batches`` with a generator). The split's rows, in storage order (shard, row),
are cut into chunks of ``CHUNK_ROWS`` contiguous rows; the chunks are shuffled with the run's
generator and grouped into windows of ``buffer_rows`` (the shuffle buffer); each window's rows are
permuted with the same generator and cut into batches, the rows left short of a batch carried into
the next window. So every training row comes exactly once per epoch, and a seed gives the same
batches. **(choice)** When the buffer holds the whole split there is one window and no chunk draw: the
window is the split in row order and its permutation is ``torch.randperm(N, generator)`` — exactly
the batches of a split in memory, so a streamed run then reproduces an in-memory one bit for bit.

**Evaluation order**: the batches of ``ordered_batches`` (``evaluation_order``, a function of the
content) are cut from windows of whole batches, so they are the in-memory batches, in the same order.

**Prefetch**: one thread reads the next window while the current one trains (its own shard handles;
the main thread draws every random number, so the thread cannot change the order). Memory: the
window in use, one read ahead and one being read — ``3 × buffer`` — plus a value or two per row.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from cache.stream import RowReader, SplitPlan
from heads.blocks.data import Batch, missing_present
from heads.errors import OptionError

CHUNK_ROWS = 4096  # contiguous rows read (and shuffled) together


class StreamedSplit:
    """One split of a cache, its features on disk (see the module). The interface of ``SplitTensors``
    that training, evaluation and the methods' attached reads use."""

    streamed = True
    index = None  # a split of its own: batches carry their row in it

    def __init__(self, plan: SplitPlan, buffer_rows: int, device: torch.device | str = "cpu",
                 present: dict[str, torch.Tensor] | None = None, standardizer=None, masked: bool = False):
        self.plan, self.ids = plan, plan.ids
        self.buffer_rows = max(1, int(buffer_rows))
        host = present if present is not None else {m: torch.from_numpy(p) for m, p in plan.present.items()}
        self.__dict__["_present_host"] = (host, {m: bool(p.all()) for m, p in host.items()})
        self._y_host = torch.from_numpy(plan.labels)
        self._device = torch.device(device)
        self.y = self._y_host.to(self._device)
        self.present = {m: p.to(self._device) for m, p in host.items()}
        self.standardizer, self.masked = standardizer, masked

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dims(self) -> dict[str, int]:
        return {m: d for m, (_, d) in self.plan.shapes.items()}

    @property
    def n_tokens(self) -> dict[str, int]:
        return {m: t for m, (t, _) in self.plan.shapes.items()}

    def __getstate__(self) -> dict:
        """Pickled (to worker processes) without open shards, threads or prepared copies."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_reader", "_prepared")}

    # --- derived views (the same shards) --------------------------------------------------------
    def _derived(self, device=None, present=None, standardizer=None, masked=None) -> "StreamedSplit":
        out = StreamedSplit(self.plan, self.buffer_rows, self._device if device is None else device,
                            present if present is not None else self.__dict__["_present_host"][0],
                            standardizer if standardizer is not None else self.standardizer,
                            self.masked if masked is None else masked)
        if present is None and "_eval_order" in self.__dict__:  # same content: the same order
            out.__dict__["_eval_order"] = self.__dict__["_eval_order"].to(out.device)
        return out

    def to(self, device: torch.device | str) -> "StreamedSplit":
        """This split with its batches (and labels, masks) on ``device``."""
        return self if torch.device(device) == self._device else self._derived(device=torch.device(device))

    def standardized_by(self, standardizer) -> "StreamedSplit":
        """The same rows, each batch mapped by ``standardizer`` (as ``LazyStandardized``)."""
        return self._derived(standardizer=standardizer)

    def with_present(self, present: dict[str, torch.Tensor]) -> "StreamedSplit":
        """The same rows with these present masks (they may only remove; removed features read as zeros)."""
        host = self.__dict__["_present_host"][0]
        return self._derived(present={m: present.get(m, p).cpu() & p for m, p in host.items()}, masked=True)

    def only(self, modalities) -> "StreamedSplit":
        keep = set(modalities)
        return self.with_present({m: p & (m in keep) for m, p in self.__dict__["_present_host"][0].items()})

    def with_missing(self, rate: float, seed: int) -> "StreamedSplit":
        """``SplitTensors.with_missing``: the same masks (they depend on the present masks only)."""
        if rate <= 0:
            return self
        return self._derived(present=missing_present(self.__dict__["_present_host"][0], rate, seed), masked=True)

    def source_rows(self) -> torch.Tensor:
        return torch.arange(len(self), device=self._device)

    def _refuse(self, *_args, **_kwargs):
        raise OptionError("this method builds its epoch from re-sampled copies of the training rows "
                          "(epoch_split: take/cat/subset), which a split streamed from the shards cannot hold; "
                          "use --in-memory yes")

    take = subset = _refuse
    cat = classmethod(lambda cls, parts: parts[0]._refuse())

    # --- batches --------------------------------------------------------------------------------
    def _counts(self, index, n: int) -> dict[str, int]:
        masks, complete = self.__dict__["_present_host"]
        return {m: n if complete[m] else int(masks[m][index].sum()) for m in masks}

    def _make_batch(self, feats: dict[str, np.ndarray], rows: torch.Tensor) -> Batch:
        """The batch of split rows ``rows`` from their float16 features, as ``LazyStandardized`` cuts it."""
        masks = self.__dict__["_present_host"][0]
        x, tokens = {}, {}
        for m, values in feats.items():
            t = torch.from_numpy(values)
            if self.masked:
                t = t * masks[m][rows][:, None, None].to(t.dtype)
            x[m] = t[:, 0].float() if t.shape[1] == 1 else t.float().mean(1)
            tokens[m] = x[m].unsqueeze(1) if t.shape[1] == 1 else t.float()
        on = self._device
        if on.type != "cpu":
            x, tokens = {m: v.to(on) for m, v in x.items()}, {m: v.to(on) for m, v in tokens.items()}
        batch = Batch(x, tokens, {m: p[rows.to(on)] for m, p in self.present.items()}, self.y[rows.to(on)],
                      self._counts(rows, len(rows)), rows.to(on))
        return batch if self.standardizer is None else self.standardizer(batch)

    def batch(self, index: torch.Tensor | slice, host_index: torch.Tensor | None = None) -> Batch:
        """Rows ``index`` as a batch, read from the shards now (for reads of scattered rows: pmr's prototypes)."""
        if isinstance(index, slice):
            rows = torch.arange(*index.indices(len(self)))
        else:
            rows = (index if host_index is None else host_index).cpu()
        reader = self.__dict__.get("_reader")
        if reader is None:
            reader = self.__dict__["_reader"] = RowReader(self.plan)
        unique, inverse = torch.unique(rows, return_inverse=True)  # repeats are read once
        feats = reader.read(unique.numpy())
        return self._make_batch({m: v[inverse.numpy()] for m, v in feats.items()}, rows)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Shuffled batches with a generator (training, see the module), row order otherwise."""
        if generator is None:
            rows = torch.arange(len(self))
            for _, batch in self.ordered_batches(rows, rows, batch_size):
                yield batch
            return
        yield from self._shuffled(batch_size, generator)

    def ordered_batches(self, order: torch.Tensor, host_order: torch.Tensor, size: int):
        """``(rows, batch)`` for rows ``order`` ``size`` at a time, in that order (``order`` on the split's
        device, ``host_order`` the same on the host), read a window of whole batches at a time."""
        width = max(size, self.buffer_rows // size * size)
        host = host_order.numpy()
        jobs = [host[start:start + width] for start in range(0, len(host), width)]
        at = 0
        for rows, feats in self._prefetched(jobs):
            for start in range(0, len(rows), size):
                pick = torch.from_numpy(rows[start:start + size])
                yield order[at:at + len(pick)], self._make_batch({m: v[start:start + size] for m, v in feats.items()}, pick)
                at += len(pick)

    def _shuffled(self, batch_size: int, generator: torch.Generator):
        n = len(self)
        if self.buffer_rows >= n:  # one window, the split in row order: the in-memory shuffle exactly
            jobs = [np.arange(n)]
        else:
            chunk = min(CHUNK_ROWS, self.buffer_rows)
            stored = self.plan.locations()
            chunks = [stored[start:start + chunk] for start in range(0, n, chunk)]
            per = max(1, self.buffer_rows // chunk)
            drawn = torch.randperm(len(chunks), generator=generator).tolist()
            jobs = [np.concatenate([chunks[c] for c in drawn[i:i + per]]) for i in range(0, len(drawn), per)]
        carry = None
        for k, (rows, feats) in enumerate(self._prefetched(jobs)):
            rows = torch.from_numpy(rows)
            if carry is not None:
                rows = torch.cat([carry[0], rows])
                feats = {m: np.concatenate([carry[1][m], v]) for m, v in feats.items()}
            perm = torch.argsort(rows)[torch.randperm(len(rows), generator=generator)]
            last = k == len(jobs) - 1
            full = len(rows) if last else len(rows) // batch_size * batch_size
            for start in range(0, full, batch_size):
                pick = perm[start:start + batch_size].numpy()
                yield self._make_batch({m: v[pick] for m, v in feats.items()}, rows[pick])
            rest = perm[full:].numpy()
            carry = None if last else (rows[rest], {m: v[rest] for m, v in feats.items()})

    def feature_blocks(self, rows: int, modalities=None):
        """``(start, stop, features)`` for consecutive blocks of ``rows`` split rows, in row order: float16
        ``[b, T, D]`` tensors (masked rows zero), for the passes that fit statistics or build orders."""
        n = len(self)
        jobs = [np.arange(start, min(start + rows, n)) for start in range(0, n, rows)]
        masks = self.__dict__["_present_host"][0]
        for block, feats in self._prefetched(jobs, modalities):
            start, stop = int(block[0]), int(block[-1]) + 1
            out = {m: torch.from_numpy(v) for m, v in feats.items()}
            if self.masked:
                out = {m: t * masks[m][start:stop][:, None, None].to(t.dtype) for m, t in out.items()}
            yield start, stop, out

    def _prefetched(self, jobs: list[np.ndarray], modalities=None):
        """``(rows, features)`` for each job (split rows to read), read one job ahead by a thread."""
        ready: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def put(item) -> None:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work() -> None:
            reader = RowReader(self.plan)
            try:
                for rows in jobs:
                    if stop.is_set():
                        return
                    put((rows, reader.read(rows, modalities)))
                put(None)
            except BaseException as err:  # noqa: BLE001  (re-raised in the consumer)
                put(err)
            finally:
                reader.close()

        thread = threading.Thread(target=work, name="stream-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()
