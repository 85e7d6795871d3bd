"""The fixed order in which a split is cut into evaluation batches, a function of its content only.

Kept apart from the splits themselves (``heads/blocks/data.py``) because three places need the same
order and nothing else of each other: a split moved to a device carries it over, the standardiser
carries it onto the standardised copy, and evaluation batches by it.
"""
from __future__ import annotations

import torch

ORDER_ROWS = 8192
EVAL_ORDER_SEED = 20_241_129  # one fixed seed: the same evaluation batches for every method, epoch and run


def evaluation_order(split) -> torch.Tensor:
    """The fixed, label-blind order in which a split is cut into evaluation batches.

    Methods that look across a batch (edm's alignment) give predictions that depend on which samples
    share a batch, so the batches must be fixed — but not by sample id or row order: real ids encode
    the class (Food-101 ``<class>_<n>``) or actor and emotion (CREMA-D ``1001_DFA_ANG_XX``), and a
    cache's rows follow its ids. The order here sorts samples by a seeded random projection of their
    own (pooled) features: a function of the content only, so renaming or reordering samples leaves
    every batch — and so every v(S) — unchanged, and no label or name can leak into it. Computed once
    per split and kept on it.
    """
    cached = split.__dict__.get("_eval_order")
    if cached is not None:
        return cached
    gen = torch.Generator().manual_seed(EVAL_ORDER_SEED)
    key = torch.zeros(len(split), dtype=torch.float64)
    if getattr(split, "streamed", False):
        return _streamed_order(split, gen, key)
    for m in sorted(split.x):
        x = split.x[m]
        direction = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
        for start in range(0, len(split), ORDER_ROWS):  # in row blocks: no float64 copy of a whole split
            rows = slice(start, start + ORDER_ROWS)
            # elementwise then a row sum: the same bits whatever the row's position (or block)
            key[rows] += (x[rows].double() * direction).sum(1)
    order = torch.argsort(key, stable=True)
    split.__dict__["_eval_order"] = order
    return order


def _streamed_order(split, gen: torch.Generator, key: torch.Tensor) -> torch.Tensor:
    """``evaluation_order`` of a split streamed from the shards (``heads/blocks/streaming.py``): one pass,
    the same blocks and per-row arithmetic on the same pooled values, so the same order bit for bit."""
    directions = {m: torch.randn(d, generator=gen, dtype=torch.float64) for m, d in sorted(split.dims.items())}
    for start, stop, feats in split.feature_blocks(ORDER_ROWS):
        for m in sorted(feats):
            t = feats[m]
            x = t[:, 0] if t.shape[1] == 1 else t.float().mean(1)
            key[start:stop] += (x.double() * directions[m]).sum(1)
    order = torch.argsort(key, stable=True)
    split.__dict__["_eval_order_host"] = order
    split.__dict__["_eval_order"] = order.to(split.device)
    return split.__dict__["_eval_order"]


def host_order(split) -> torch.Tensor:
    """``evaluation_order`` on the host too (batches read their present counts from host masks)."""
    cached = split.__dict__.get("_eval_order_host")
    if cached is None:
        cached = split.__dict__["_eval_order_host"] = evaluation_order(split).cpu()
    return cached
