"""Per-feature standardisation of cached features, fitted on the training split, carried by the model.

Why it is in the data path of every method: real cached features differ in scale by orders of
magnitude between modalities (a public 6-view set spans ±0.8 to 17,600; MLLM ``[CLASS]`` vectors have
outlier dimensions in the hundreds). Unscaled, the largest-valued view dominates the first gradient
steps of a joint head, alternating methods see the others as "weak" for reasons that have nothing to
do with information, and a view that alone reaches 99.5% can sit at chance inside a method. Z-scoring
with training statistics removes that confound; it is an affine map per feature, so it changes
nothing a linear projection could not represent, only where the optimiser starts.

Modes (``--standardize``):

- ``feature`` (default): ``(x − μ_d) / σ_d`` per feature d.
- ``modality``: one μ and σ per modality over all its values — keeps the relative scale of the
  features inside a modality (for features whose per-dimension magnitudes carry meaning).
- ``none``: the cached values as they are.

Statistics use the training split only, present samples only (an absent modality is stored as zeros,
which must not pull μ toward 0), with every token of a token feature counted as one observation
(tokens pooled). A feature with σ = 0 in training is only shifted. Absent modalities stay exactly
zero after the map, as every method expects. The statistics are buffers of the model, so the selected
checkpoint, ``model.pt`` and a reloaded model apply exactly the same map to raw cached features.
"""
from __future__ import annotations

import torch
from torch import nn

from heads.blocks.data import Batch, SplitTensors
from heads.blocks.order import evaluation_order
from heads.errors import OptionError

MODES = ("feature", "modality", "none")


class Standardizer(nn.Module):
    """``x ↦ (x − shift_m) · inv_scale_m`` per modality, applied to every batch before a method sees it."""

    def __init__(self, dims: dict[str, int], mode: str = "feature"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"--standardize must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.modalities = list(dims)
        for m, d in dims.items():
            self.register_buffer(f"shift_{m}", torch.zeros(d))
            self.register_buffer(f"inv_scale_{m}", torch.ones(d))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def active(self) -> bool:
        """Fitted and not ``none``; the flag is read from the buffer once and then known on the host
        (a read per batch would wait for the device)."""
        if self.mode == "none":
            return False
        if "_fitted_host" not in self.__dict__:
            self._fitted_host = bool(self.fitted)
        return self._fitted_host

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_fitted_host", None)  # the loaded buffer decides again
        super()._load_from_state_dict(*args, **kwargs)

    def shift(self, m: str) -> torch.Tensor:
        return getattr(self, f"shift_{m}")

    def inv_scale(self, m: str) -> torch.Tensor:
        return getattr(self, f"inv_scale_{m}")

    @torch.no_grad()
    def fit(self, split) -> "Standardizer":
        """Statistics from ``split`` (the training split): present samples, tokens pooled, float64."""
        if self.mode == "none":
            return self
        streamed = getattr(split, "streamed", False)
        for m in self.modalities:
            if not streamed and split.tokens[m].dtype == torch.float32:  # the float32 path of earlier versions
                tokens = split.tokens[m][split.present[m]]  # [n_present, T, D]
                values = tokens.reshape(-1, tokens.shape[-1]).double()
                if values.shape[0] == 0:
                    continue  # no training sample has m: leave it as it is
                if self.mode == "feature":
                    mean, std = values.mean(0), values.std(0, unbiased=False)
                else:
                    mean = values.mean().expand(values.shape[1])
                    std = values.std(unbiased=False).expand(values.shape[1])
            else:
                moments = _moments(_blocks(split, m), split.present[m].cpu(), self.mode == "feature")
                if moments is None:
                    continue
                mean, std = moments
            inv = torch.where(std > 1e-12, 1.0 / std.clamp_min(1e-12), torch.ones_like(std))
            self.shift(m).copy_(mean.to(self.shift(m).dtype))
            self.inv_scale(m).copy_(inv.to(self.inv_scale(m).dtype))
        self.fitted.fill_(True)
        self._fitted_host = True
        return self

    @torch.no_grad()
    def apply_split(self, split, chunk: int = 4096):
        """The whole split standardised once (a new ``SplitTensors``), so a training loop over it
        needs no per-batch map; the same arithmetic as ``forward``, chunked to bound memory."""
        if not self.active:
            return split
        evaluation_order(split)  # of the raw features, as ``predict`` on raw splits uses
        split._counts(slice(0, 0), 0)

        x, tokens = {}, {}
        for m in split.x:
            parts_x, parts_t = [], []
            for start in range(0, len(split), chunk):
                rows = slice(start, start + chunk)
                batch = self.forward(_View(split, rows, m))
                parts_x.append(batch.x[m])
                parts_t.append(batch.tokens[m])
            x[m] = torch.cat(parts_x) if parts_x else split.x[m]
            tokens[m] = torch.cat(parts_t) if parts_t else split.tokens[m]
        out = SplitTensors(split.ids, x, tokens, split.present, split.y, split.index)
        for key in ("_eval_order", "_present_host"):  # content-derived: identical for the mapped split
            if key in split.__dict__:
                out.__dict__[key] = split.__dict__[key]
        return out

    def forward(self, batch):
        """The standardised batch (a new ``Batch``; absent rows stay zero)."""
        if not self.active:
            return batch
        x, tokens = {}, {}
        for m in batch.x:
            keep = batch.present[m].to(batch.x[m].dtype)
            x[m] = (batch.x[m] - self.shift(m)) * self.inv_scale(m) * keep[:, None]
            if batch.tokens[m].shape[1] == 1:
                tokens[m] = x[m].unsqueeze(1)
            else:
                tokens[m] = (batch.tokens[m] - self.shift(m)) * self.inv_scale(m) * keep[:, None, None]
        return Batch(x, tokens, batch.present, batch.y, batch.counts, batch.index)


class LazyStandardized(SplitTensors):
    """A split held in its 16-bit working dtype whose batches come out standardised, in float32.

    Why not ``apply_split``: a standardised copy is a second copy of the features. Here the raw
    (cache) values are the only copy, and each batch is gathered, made float32 and mapped by the same
    ``Standardizer.forward`` arithmetic ``apply_split`` uses — so a method sees exactly the values
    the float32 path gives it (float16 → float32 is exact), at the cost of the map once per batch.
    Only ``batch`` differs from a plain split; ``materialized`` is the standardised float32 copy for
    the code that reads whole tensors (the stacked GPU runner).
    """

    @classmethod
    def wrap(cls, split: SplitTensors, standardizer: Standardizer) -> "LazyStandardized":
        evaluation_order(split)  # of the raw features, as ``apply_split`` carries it
        split._counts(slice(0, 0), 0)
        out = cls(split.ids, split.x, split.tokens, split.present, split.y)
        for key in ("_eval_order", "_present_host"):
            out.__dict__[key] = split.__dict__[key]
        out.__dict__["_standardizer"] = standardizer
        out.__dict__["_raw"] = split
        return out

    def batch(self, index, host_index=None) -> Batch:
        return self.__dict__["_standardizer"](super().batch(index, host_index))

    def materialized(self) -> SplitTensors:
        """The standardised float32 copy, made once (the runs that share this view share it too)."""
        if "_full" not in self.__dict__:
            self.__dict__["_full"] = self.__dict__["_standardizer"].apply_split(self.__dict__["_raw"])
        return self.__dict__["_full"]


def standardized(split: SplitTensors, standardizer: Standardizer) -> SplitTensors:
    """``split`` as the training loop reads it: a standardised float32 copy when the split is held in
    float32 (the earlier path, unchanged), a ``LazyStandardized`` view when it is held in 16 bits, a
    streamed split whose batches are standardised when it is read from the shards."""
    if getattr(split, "streamed", False):
        return split.standardized_by(standardizer)
    if all(t.dtype == torch.float32 for t in split.tokens.values()):
        return standardizer.apply_split(split)
    return LazyStandardized.wrap(split, standardizer)


def materialized(split: SplitTensors) -> SplitTensors:
    """A split whose tensors are what methods see (for code that indexes them directly)."""
    if getattr(split, "streamed", False):
        raise OptionError("stacked training reads whole splits as tensors, which a split streamed from the shards "
                          "does not hold; use --stack off or --in-memory yes")
    return split.materialized() if isinstance(split, LazyStandardized) else split


MOMENT_ROWS = 8192


def _blocks(split, m: str):
    """A function giving ``(tokens, present)`` of modality ``m`` in blocks of ``MOMENT_ROWS`` rows, in row
    order: slices of a split in memory, or reads of a streamed one (the same blocks, so the same sums)."""
    if getattr(split, "streamed", False):
        present = split.present[m].cpu()
        return lambda: ((f[m], present[a:b]) for a, b, f in split.feature_blocks(MOMENT_ROWS, [m]))
    tokens, present = split.tokens[m], split.present[m]
    return lambda: ((tokens[a:a + MOMENT_ROWS], present[a:a + MOMENT_ROWS]) for a in range(0, len(present), MOMENT_ROWS))


def _blocked_moments(tokens: torch.Tensor, present: torch.Tensor, per_feature: bool, rows: int = MOMENT_ROWS):
    """``_moments`` of a split's tokens in memory, in blocks of ``rows`` rows."""
    return _moments(lambda: ((tokens[a:a + rows], present[a:a + rows]) for a in range(0, len(present), rows)),
                    present, per_feature)


def _moments(blocks, present: torch.Tensor, per_feature: bool):
    """Mean and population std of the present rows' values (tokens pooled), in float64, a block of rows
    at a time: no float64 copy of the split (which at Kinetics scale would be 4× its float16 bytes).
    Two passes (the mean, then the squared deviations from it), the textbook stable form; per feature
    or, with ``per_feature`` False, over all values. None when no row is present. The sums run in
    blocks, so the last bits of the float64 statistics can differ from one whole-array reduction."""
    if not bool(present.any()):
        return None
    total, count, dim = None, 0, 0

    def values():
        for tokens, keep in blocks():
            block = tokens[keep]
            yield block.reshape(-1, block.shape[-1]).double()
    for block in values():
        count, dim = count + block.shape[0], block.shape[1]
        if total is None:
            total = torch.zeros(dim, dtype=torch.float64)
        total += block.sum(0)
    mean = total / count if per_feature else (total.sum() / (count * dim)).expand(dim)
    squares = torch.zeros(dim, dtype=torch.float64)
    for block in values():
        squares += (block - mean).pow(2).sum(0)
    var = squares / count if per_feature else (squares.sum() / (count * dim)).expand(dim)
    return mean, var.sqrt()


class _View:
    """One modality of a slice of a split, shaped like a batch for ``Standardizer.forward``."""

    def __init__(self, split, rows: slice, m: str):
        self.x = {m: split.x[m][rows]}
        self.tokens = {m: split.tokens[m][rows]}
        self.present = {m: split.present[m][rows]}
        self.y = split.y[rows]
        self.counts = None
        self.index = None
