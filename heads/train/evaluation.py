"""Evaluation of a head on a split: v(S) for the modality subsets a report needs, and what follows
from them (φ, δ, EDM, macro-F1). Pure of training: the core calls ``evaluate`` after each epoch
(the full set, or every subset for methods that read φ) and once more on validation and test for the
selected model; grids, reports and robustness call it on saved models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from heads import metrics
from heads.blocks.data import Batch, SplitTensors
from heads.blocks.device import autocast
from heads.blocks.order import EVAL_ORDER_SEED, evaluation_order, host_order


# --- reports --------------------------------------------------------------------------------
@dataclass
class Report:
    """Evaluation of one model on one split: v(S) for every subset and everything derived from it.

    ``loss`` is the cross-entropy of the full-set prediction (used to break ties between configs
    with equal validation accuracy); with ``subsets=False`` the per-modality fields are NaN.
    """

    v: dict[frozenset, float]
    acc: float
    f1: float
    unimodal: dict[str, float]
    phi: dict[str, float]
    delta: dict[str, float]
    edm: float
    pred: torch.Tensor
    loss: float = float("nan")
    shapley: str = "exact"  # or "sampled (N permutations)" beyond EXACT_SHAPLEY_MAX modalities
    phi_stderr: dict[str, float] | None = None  # standard error of each sampled φ_m
    subsets: bool = True  # False: only the full set was scored (the per-epoch report of most methods)

    def row(self, prefix: str = "") -> dict:
        """The report as one flat row (``epochs.csv``); without subsets, only what was measured."""
        out = {f"{prefix}acc": self.acc, f"{prefix}f1": self.f1, f"{prefix}loss": self.loss}
        if not self.subsets:
            return out
        out[f"{prefix}edm"] = self.edm
        for m in self.unimodal:
            out[f"{prefix}acc_{m}"] = self.unimodal[m]
            out[f"{prefix}phi_{m}"] = self.phi[m]
            out[f"{prefix}delta_{m}"] = self.delta[m]
        return out

    def to_json(self) -> dict:
        out = {**self.row(), "v": {"+".join(sorted(s)) or "∅": a for s, a in self.v.items()}, "shapley": self.shapley}
        if self.phi_stderr is not None:
            out["phi_stderr"] = self.phi_stderr
        return out


def _logits(model, batch, prepared: bool) -> torch.Tensor:
    return model.logits(batch if prepared else model.standardizer(batch))


def predict(model, split: SplitTensors, modalities, batch_size: int, with_loss: bool = False, prepared: bool = False,
            probs: dict | None = None):
    """Predicted classes with only ``modalities`` present (the others exactly as missing).

    Fixed-size batches in ``evaluation_order``; each batch goes through the model's standardiser
    first, as in training (``prepared``: the split is already standardised, as the trainer keeps it).
    With ``with_loss`` also returns the mean cross-entropy of the logits. Predictions and the loss
    stay on the split's device until the end. With ``probs`` (a dict), also puts the softmax of the
    logits, ``[N, classes]`` in the split's order, at ``probs[frozenset(modalities)]`` (``predict``
    the command's per-sample probabilities). (A ``with`` block rather than a decorator, so that
    mutation testing reaches this function.)
    """
    model.eval()
    index, host = evaluation_order(split), host_order(split)
    preds = torch.empty(len(split), dtype=torch.long, device=split.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.device)
    scores = None
    with torch.inference_mode(), model_autocast(model):
        for rows, batch in split.ordered_batches(index, host, batch_size):
            batch = batch.only(modalities)
            logits = _logits(model, batch, prepared)
            preds[rows] = logits.argmax(-1)
            if probs is not None:
                scores = _scores(scores, len(split), logits)
                scores[rows] = logits.float().softmax(-1)
            if with_loss:
                loss_sum += nn.functional.cross_entropy(logits.float(), batch.y, reduction="sum").double()
    if probs is not None:
        probs[frozenset(modalities)] = scores
    if with_loss:
        return preds, float(loss_sum) / max(len(split), 1)
    return preds


def _scores(scores, rows: int, logits: torch.Tensor) -> torch.Tensor:
    """The ``[rows, classes]`` buffer for probabilities, made at the first batch (when the width is known)."""
    if scores is None:
        scores = torch.empty(rows, logits.shape[-1], dtype=torch.float32, device=logits.device)
    return scores


STACKED_EVAL_ROWS = 16_384  # rows per forward pass when subsets are scored together


def _stack_subsets(batch, subsets: list[frozenset]):
    """One batch holding ``batch`` once per subset (subset k in rows k·B … (k+1)·B − 1), the modalities
    outside each subset made absent exactly as ``Batch.only`` does."""
    k, n = len(subsets), len(batch)
    x, tokens, present, counts = {}, {}, {}, {}
    for m in batch.x:
        keep = torch.tensor([m in s for s in subsets], device=batch.y.device)
        rows = keep.repeat_interleave(n)
        x[m] = batch.x[m].repeat(k, 1) * rows[:, None].to(batch.x[m].dtype)
        tokens[m] = (x[m].unsqueeze(1) if batch.tokens[m].shape[1] == 1
                     else batch.tokens[m].repeat(k, 1, 1) * rows[:, None, None].to(batch.tokens[m].dtype))
        present[m] = batch.present[m].repeat(k) & rows
        counts[m] = batch._counts()[m] * sum(m in s for s in subsets)
    index = None if batch.index is None else batch.index.repeat(k)
    return Batch(x, tokens, present, batch.y.repeat(k), counts, index)


def predict_subsets(model, split: SplitTensors, subsets: list[frozenset], batch_size: int, prepared: bool = False,
                    full: frozenset | None = None, probs: dict | None = None) -> tuple[dict[frozenset, torch.Tensor], float]:
    """Predictions for each subset, and the mean cross-entropy of subset ``full`` (NaN if not given);
    with ``probs``, each subset's softmax probabilities too (as ``predict`` gives them).

    Methods whose prediction for a sample depends on that sample alone (``batch_independent``) score
    all subsets in one pass per chunk of rows: the chunk is repeated once per subset, masked, and sent
    through the model together — one forward instead of 2^M − 1. Methods that look across a batch
    (edm's alignment) keep the fixed evaluation batches: their own ``subset_logits`` scores every subset
    of one batch where they define it (``heads/methods/base.py``), else one pass per subset.
    """
    independent = getattr(model, "batch_independent", True)
    shared = None if independent else getattr(model, "subset_logits", None)
    if (not independent and shared is None) or len(subsets) == 1:
        preds, loss = {}, float("nan")
        for s in subsets:
            if s == full:
                preds[s], loss = predict(model, split, s, batch_size, with_loss=True, prepared=prepared, probs=probs)
            else:
                preds[s] = predict(model, split, s, batch_size, prepared=prepared, probs=probs)
        return preds, loss
    model.eval()
    index, host = evaluation_order(split), host_order(split)
    chunk = batch_size if shared is not None else max(batch_size, STACKED_EVAL_ROWS // len(subsets))
    preds = {s: torch.empty(len(split), dtype=torch.long, device=split.device) for s in subsets}
    scores = dict.fromkeys(subsets)
    at = subsets.index(full) if full in subsets else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.device)
    with torch.inference_mode(), model_autocast(model):
        for rows, batch in split.ordered_batches(index, host, chunk):
            if shared is not None:
                logits = shared(batch if prepared else model.standardizer(batch), subsets)
            else:
                logits = _logits(model, _stack_subsets(batch, subsets), prepared).view(len(subsets), len(batch), -1)
            best = logits.argmax(-1)
            for i, s in enumerate(subsets):
                preds[s][rows] = best[i]
                if probs is not None:
                    scores[s] = _scores(scores[s], len(split), logits)
                    scores[s][rows] = logits[i].float().softmax(-1)
            if at is not None:
                loss_sum += nn.functional.cross_entropy(logits[at].float(), batch.y, reduction="sum").double()
    if probs is not None:
        probs.update(scores)
    return preds, (float(loss_sum) / max(len(split), 1) if at is not None else float("nan"))


def model_autocast(model):
    """The autocast context of the model's resolved precision (set by the trainer; fp32 otherwise)."""
    device = next(iter(model.parameters())).device if any(True for _ in model.parameters()) else torch.device("cpu")
    return autocast(device, getattr(model, "precision", "fp32"))


def evaluate(model, split: SplitTensors, spec, batch_size: int, subsets: bool = True, prepared: bool = False,
             permutations: int = 128) -> Report:
    """Score the full set (and, with ``subsets``, the modality subsets) and derive φ, δ and EDM.

    v(∅) is the accuracy of always predicting the training set's majority class (no model involved).
    Up to ``EXACT_SHAPLEY_MAX`` modalities every subset is scored and φ is exact; beyond, φ is
    estimated from ``permutations`` sampled permutations (seeded, the same for every model), only
    the subsets they visit are scored, and the report carries each φ_m's standard error.
    """
    mods = list(spec.modalities)
    full = frozenset(mods)
    v: dict[frozenset, float] = {frozenset(): metrics.accuracy(torch.full_like(split.y, spec.majority_class), split.y)}
    nan = {m: float("nan") for m in mods}
    if not subsets:
        pred_full, loss = predict(model, split, mods, batch_size, with_loss=True, prepared=prepared)
        v[full] = metrics.accuracy(pred_full, split.y)
        return Report(v, v[full], metrics.macro_f1(pred_full, split.y, spec.num_classes), nan, nan, nan,
                      float("nan"), pred_full, loss, subsets=False)
    orders = None
    if len(mods) <= metrics.EXACT_SHAPLEY_MAX:
        needed = [s for s in metrics.all_subsets(mods) if s]
    else:
        orders = metrics.sample_permutations(mods, permutations, EVAL_ORDER_SEED)
        needed = sorted(set(metrics.permutation_subsets(orders)) | {frozenset([m]) for m in mods} - {frozenset()},
                        key=lambda s: (len(s), sorted(s)))
    preds, loss = predict_subsets(model, split, needed, batch_size, prepared, full)
    # One read for all subsets (a device sync each would add up); the same arithmetic as metrics.accuracy.
    correct = torch.stack([(preds[s] == split.y).double().mean() * 100 for s in needed]).tolist() if len(split) else [0.0] * len(needed)
    v.update(zip(needed, correct))
    if orders is None:
        phi, stderr, how = metrics.shapley_values(v, mods), None, "exact"
    else:
        (phi, stderr), how = metrics.shapley_from_permutations(v, orders), f"sampled ({permutations} permutations)"
    delta = metrics.deviations(phi, v[full], v[frozenset()])
    uni = {m: v[frozenset([m])] for m in mods}
    pred_full = preds[full]
    return Report(v, v[full], metrics.macro_f1(pred_full, split.y, spec.num_classes), uni, phi, delta,
                  metrics.edm(delta), pred_full, loss, how, stderr)


