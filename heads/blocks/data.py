"""Cached features as training tensors: splits, batches, subset views, missing-modality masks.

Heads train on whole splits held in memory, batches are index slices of those tensors, so an epoch
has no DataLoader and no per-sample Python work. The features are held in a *working dtype*
(``--feature-dtype``): ``fp16`` (default), the cache's own float16, so memory is the cache's feature
bytes and nothing is rounded; or ``fp32``, the path of earlier versions (twice the memory). Either
way a method sees float32 batches (``heads/blocks/standardize.py``: ``LazyStandardized``).
"""
from __future__ import annotations


from dataclasses import dataclass, field

import torch

from cache import FeatureSplit
from heads.blocks.order import evaluation_order


# --feature-dtype: how features are held in memory (the cache stores float16)
FEATURE_DTYPES = {"fp16": "float16", "fp32": "float32"}
POOL_ROWS = 8192  # rows pooled at a time for token features, so pooling never makes a float32 copy of all tokens


@dataclass
class Batch:
    """A batch as methods see it. ``x[m]`` is the token-mean-pooled feature ``[B, D_m]``; ``tokens[m]``
    the full ``[B, T_m, D_m]``; ``present[m]`` says which samples have modality m (absent = zeros).

    ``counts[m]`` is how many samples have m, known on the host: methods branch on ``has(m)`` and
    ``full(m)`` instead of ``bool(present[m].any())``, which on a GPU would wait for the device in the
    middle of the batch loop. Batches cut from a split carry it; a hand-built batch computes it once.

    ``index[i]`` (a device tensor ``[B]``) is the row of sample i in its split — for a row of a derived
    split (an epoch split of copies, ``SplitTensors.take``/``cat``), the row of the split it was taken
    from — so a method can keep per-sample state across batches and epochs (qmf's loss history).
    Every batch cut from a split carries it (training, evaluation, ``only``, the standardiser's map,
    stacked training); a hand-built batch has none unless given.
    """

    x: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    y: torch.Tensor
    counts: dict[str, int] | None = field(default=None, repr=False)
    index: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.y.shape[0]

    def _counts(self) -> dict[str, int]:
        if self.counts is None:  # a hand-built batch: read the masks (not cached, they may be edited)
            return {m: int(p.sum()) for m, p in self.present.items()}
        return self.counts

    def has(self, m: str) -> bool:
        """Whether any sample of the batch has modality ``m`` (no device synchronisation)."""
        return self._counts()[m] > 0

    def full(self, m: str) -> bool:
        """Whether every sample of the batch has modality ``m`` (no device synchronisation)."""
        return self._counts()[m] == len(self)

    def only(self, modalities) -> "Batch":
        """The same batch with every modality outside ``modalities`` made absent (present False, zeros).

        This is how ``v(S)`` is measured: the other modalities are treated exactly as missing.
        """
        keep = set(modalities)
        x, tokens, present = {}, {}, {}
        counts = dict(self._counts())
        for m in self.x:
            if m in keep:
                x[m], tokens[m], present[m] = self.x[m], self.tokens[m], self.present[m]
            else:
                x[m] = torch.zeros_like(self.x[m])
                tokens[m] = torch.zeros_like(self.tokens[m])
                present[m] = torch.zeros_like(self.present[m])
                counts[m] = 0
        return Batch(x, tokens, present, self.y, counts, self.index)


@dataclass
class SplitTensors:
    """One split ready for heads: pooled and token features, present masks, labels, ids.

    ``index`` is None for a split of its own (its rows are 0 … N−1). A split *derived* from another
    for one epoch (``take``, ``only``, ``cat``: re-sampled copies, a held-out part left out) keeps in
    ``index`` the row of the original split each of its rows stands for, and its batches carry those
    rows as ``Batch.index``. ``subset`` makes a split of its own (rows renumbered).
    """

    ids: list[str]
    x: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    y: torch.Tensor
    index: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.y.shape[0]

    @classmethod
    def from_feature_split(cls, split: FeatureSplit) -> "SplitTensors":
        tokens = split.features
        x = {m: t[:, 0] if t.shape[1] == 1 else _pooled(t) for m, t in tokens.items()}
        return cls(list(split.ids), x, tokens, dict(split.present), split.labels)

    def batch(self, index: torch.Tensor | slice, host_index: torch.Tensor | slice | None = None) -> Batch:
        """Rows ``index`` as a batch. ``host_index`` is the same rows on the CPU when ``index`` lives on
        an accelerator: the batch's present counts are read from a host copy of the masks, so cutting
        a batch never waits for the device."""
        take = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index))
        # Features held in 16 bits become float32 here, per batch: what a method sees is float32 always
        # (``.float()`` of a float32 tensor is the tensor itself, no copy).
        x = {m: take(t).float() for m, t in self.x.items()}
        tokens = {m: x[m].unsqueeze(1) if t.shape[1] == 1 else take(t).float() for m, t in self.tokens.items()}
        y = take(self.y)
        rows = torch.arange(*index.indices(len(self)), device=self.device) if isinstance(index, slice) else index
        return Batch(x, tokens, {m: take(p) for m, p in self.present.items()}, y,
                     self._counts(index if host_index is None else host_index, y.shape[0]),
                     rows if self.index is None else self.index.index_select(0, rows))

    def _counts(self, index: torch.Tensor | slice, n: int) -> dict[str, int]:
        """Present samples per modality among rows ``index``, from host-side masks (cached on the split)."""
        host = self.__dict__.get("_present_host")
        if host is None:
            host = {m: p.cpu() for m, p in self.present.items()}
            host = self.__dict__["_present_host"] = (host, {m: bool(p.all()) for m, p in host.items()})
        masks, complete = host
        return {m: n if complete[m] else int(masks[m][index].sum()) for m in masks}

    def __getstate__(self) -> dict:
        """Pickled (to worker processes) without the prepared copies a trainer may have cached on it."""
        return {k: v for k, v in self.__dict__.items() if k != "_prepared"}

    @property
    def device(self) -> torch.device:
        return self.y.device

    def to(self, device: torch.device | str) -> "SplitTensors":
        """This split on ``device`` (itself when it is already there), moved once for a whole run.

        What must not depend on the device is computed on the host first and carried over: the
        evaluation order (a float64 reduction whose bits would differ on a GPU) and the host copy of
        the present masks that batches read their counts from.
        """
        device = torch.device(device)
        if device == self.device:
            return self
        order = evaluation_order(self)
        self._counts(slice(0, 0), 0)  # builds the host masks
        moved = SplitTensors(self.ids, {m: t.to(device) for m, t in self.x.items()},
                             {m: t.to(device) for m, t in self.tokens.items()},
                             {m: p.to(device) for m, p in self.present.items()}, self.y.to(device),
                             None if self.index is None else self.index.to(device))
        moved.__dict__["_eval_order"] = order.to(device)
        moved.__dict__["_present_host"] = self.__dict__["_present_host"]
        return moved

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Shuffled batches when a generator is given (training), dataset order otherwise (evaluation).

        The permutation is drawn on the host from the (CPU) generator, so a seed gives the same
        batches on every device, and copied to the device once per epoch."""
        n = len(self)
        if generator is None:
            for start in range(0, n, batch_size):
                yield self.batch(slice(start, start + batch_size))
            return
        order = torch.randperm(n, generator=generator)
        on_device = order.to(self.device, non_blocking=True) if self.device.type != "cpu" else order
        for start in range(0, n, batch_size):
            yield self.batch(on_device[start:start + batch_size], order[start:start + batch_size])

    def ordered_batches(self, order: torch.Tensor, host_order: torch.Tensor, size: int):
        """``(rows, batch)`` for rows ``order`` ``size`` at a time, in that order (``host_order``: the same
        rows on the host); how evaluation walks a split (a streamed split reads them in windows)."""
        for start in range(0, len(order), size):
            yield order[start:start + size], self.batch(order[start:start + size], host_order[start:start + size])

    def subset(self, index: torch.Tensor) -> "SplitTensors":
        """Rows ``index`` of this split as a split of its own (rows renumbered; tensors are copied)."""
        idx = index.tolist()
        return SplitTensors(
            [self.ids[i] for i in idx],
            {m: t[index] for m, t in self.x.items()},
            {m: t[index] for m, t in self.tokens.items()},
            {m: p[index] for m, p in self.present.items()},
            self.y[index],
        )

    # --- derived splits: the rows of one epoch (``HeadMethod.epoch_split``) --------------------------
    def source_rows(self) -> torch.Tensor:
        """The row of the original split each row stands for (``0 … N−1`` for a split of its own)."""
        return torch.arange(len(self), device=self.device) if self.index is None else self.index

    def take(self, index: torch.Tensor) -> "SplitTensors":
        """Rows ``index`` (repeats allowed: copies), each remembering its original row (``Batch.index``).
        ``index`` may live on the split's device; reading the ids from it waits for the device once."""
        index = index.to(self.device)
        rows = index.tolist()
        return SplitTensors([self.ids[i] for i in rows], {m: t.index_select(0, index) for m, t in self.x.items()},
                            {m: t.index_select(0, index) for m, t in self.tokens.items()},
                            {m: p.index_select(0, index) for m, p in self.present.items()}, self.y.index_select(0, index),
                            self.source_rows().index_select(0, index))

    def with_present(self, present: dict[str, torch.Tensor]) -> "SplitTensors":
        """The same rows with these present masks (they may only remove): a removed modality's
        features become zeros, exactly as a missing one is stored."""
        present = {m: present.get(m, p) & p for m, p in self.present.items()}
        x = {m: t * present[m][:, None].to(t.dtype) for m, t in self.x.items()}
        tokens = {m: t * present[m][:, None, None].to(t.dtype) for m, t in self.tokens.items()}
        return SplitTensors(self.ids, x, tokens, present, self.y, self.index)

    def only(self, modalities) -> "SplitTensors":
        """The same rows with every modality outside ``modalities`` made absent (``Batch.only`` for a split)."""
        keep = set(modalities)
        return self.with_present({m: p & (m in keep) for m, p in self.present.items()})

    @classmethod
    def cat(cls, parts: list["SplitTensors"]) -> "SplitTensors":
        """The rows of ``parts`` one after the other (parts derived from one split: the original rows
        and their edited copies), each keeping its original row."""
        first = parts[0]
        return cls([i for p in parts for i in p.ids], {m: torch.cat([p.x[m] for p in parts]) for m in first.x},
                   {m: torch.cat([p.tokens[m] for p in parts]) for m in first.tokens},
                   {m: torch.cat([p.present[m] for p in parts]) for m in first.present}, torch.cat([p.y for p in parts]),
                   torch.cat([p.source_rows() for p in parts]))

    def with_missing(self, rate: float, seed: int) -> "SplitTensors":
        """Mask a fraction ``rate`` of each modality's present samples, never a sample's last modality.

        The MLA paper masks each modality of each sample with rate η; drawing that independently and
        redrawing samples left with nothing (the first implementation) realises only
        ``η(1 − η^(M−1)) / (1 − η^M)`` per modality — 37% for η = 0.6, M = 2 — so a row labelled η was
        not at η. Here each modality m loses exactly ``round(η · n_m)`` of its ``n_m`` present samples
        (the realised rate is η within one sample), chosen uniformly at random among the samples that
        still hold another modality, modalities visited in a seeded random order. When that uniform
        draw runs out of candidates, the draw is repeated preferring the samples that hold the most
        modalities; if η still cannot be met — for complete data, η > (M − 1)/M, e.g. above 50% with
        two modalities — a ``ValueError`` says so (no sample may lose every modality).
        """
        if rate <= 0:
            return self
        present = missing_present(self.present, rate, seed)
        mods = list(present)
        x = {m: self.x[m] * present[m][:, None] for m in mods}
        tokens = {m: self.tokens[m] * present[m][:, None, None] for m in mods}
        return SplitTensors(self.ids, x, tokens, present, self.y, self.index)


def _pooled(tokens: torch.Tensor) -> torch.Tensor:
    """The token mean ``[N, D]`` in float32 whatever the working dtype, a block of rows at a time (a
    row's mean does not depend on the block it is in: the same bits as one call on float32 tokens)."""
    out = torch.empty(tokens.shape[0], tokens.shape[2], dtype=torch.float32)
    for start in range(0, tokens.shape[0], POOL_ROWS):
        out[start:start + POOL_ROWS] = tokens[start:start + POOL_ROWS].float().mean(1)
    return out


def missing_present(present: dict[str, torch.Tensor], rate: float, seed: int) -> dict[str, torch.Tensor]:
    """The present masks of ``SplitTensors.with_missing`` (a function of the masks, the rate and the seed)."""
    if not 0 <= rate < 1:
        raise ValueError(f"missing rate must lie in [0, 1), got {rate}")
    mods = list(present)
    orig = torch.stack([present[m] for m in mods], 1)  # [N, M]
    keep = _exact_masks(orig, rate, seed, balance=False)
    if keep is None:
        keep = _exact_masks(orig, rate, seed, balance=True)
    if keep is None:
        most = 100 * (len(mods) - 1) / len(mods)
        raise ValueError(f"a missing rate of {rate:g} cannot be met with {len(mods)} modalities without removing "
                         f"some sample's every modality (with complete data at most {most:.0f}% can go)")
    return {m: keep[:, i] for i, m in enumerate(mods)}


def _exact_masks(orig: torch.Tensor, rate: float, seed: int, balance: bool) -> torch.Tensor | None:
    """``keep`` [N, M] with exactly ``round(rate · n_m)`` removals per modality, or None if stuck.

    ``balance``: among the candidates, remove from the samples with the most modalities left first
    (random among equals), the choice that keeps every later modality feasible.
    """
    gen = torch.Generator().manual_seed(seed)
    keep = orig.clone()
    for j in torch.randperm(orig.shape[1], generator=gen).tolist():
        target = round(rate * int(orig[:, j].sum()))
        candidates = (keep[:, j] & (keep.sum(1) >= 2)).nonzero().squeeze(1)
        if len(candidates) < target:
            return None
        shuffled = candidates[torch.randperm(len(candidates), generator=gen)]
        if balance:
            left = keep[shuffled].sum(1)
            shuffled = shuffled[torch.argsort(-left, stable=True)]
        keep[shuffled[:target], j] = False
    return keep


def realised_missing(original: "SplitTensors", masked: "SplitTensors") -> dict[str, float]:
    """Per modality, the fraction of its present samples that masking removed."""
    return {m: 1 - float(masked.present[m].sum()) / max(float(original.present[m].sum()), 1.0) for m in original.present}


@dataclass
class DataSpec:
    """What a method needs to know to build itself: modalities, their dims and tokens, classes."""

    modalities: list[str]
    dims: dict[str, int]
    tokens: dict[str, int]
    num_classes: int
    class_names: list[str]
    majority_class: int


@dataclass
class HeadData:
    """Train, validation and test splits of one or more joined caches."""

    spec: DataSpec
    train: SplitTensors
    val: SplitTensors
    test: SplitTensors
    meta: dict
