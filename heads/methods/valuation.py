"""``valuation``: concat trained on its training split plus unimodal copies of the (sample, modality)
pairs with a low Shapley contribution (Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via
Sample-level Modality Valuation", CVPR 2024; METHODS-MORE.md §1). Source: the official code,
GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation @ 7ed12b0 (``code/sample_level.py``,
``code/modality_level.py``, ``code/datasets/dataloader.py``: ``AV_KS_Dataset_sample_level``,
``AV_KS_Dataset_modality_level``; ``code/models/models.py``: ``exec_drop``); BalanceMM's
``Sample_trainer.py``, ``evaluation/modalitys.py::Calculate_Shapley_Sample`` and
``datasets/__init__.py`` @ 4c1482f only for what they do differently.

**Values** (the official scoring). With ``ŷ_S = argmax f(S)`` the concat head with the modalities outside S
absent (``exec_drop`` zeroes the encoder *output*: exactly the tool's ``f(S)``):

    v_i(S) = |S| · 1[ŷ_S(x_i) = y_i],   v_i(∅) = 0
    φ_i^a = (v_i({a}) + v_i({a,v}) − v_i({v})) / 2,   φ_i^v = (v_i({v}) + v_i({a,v}) − v_i({a})) / 2

so φ ∈ {−0.5, 0, 0.5, 1, 1.5} and ``φ^a + φ^v = 2 · 1[fused correct]`` (fair share 1). For M > 2
**(choice)**: the same ``v(S) = |S| · 1[correct]`` and exact Shapley values over every subset (fair share
still 1, so the thresholds keep their meaning); more than eight modalities are refused (2^M passes
over train per epoch). With missing data **(choice)** ``|S|`` counts the modalities of S the sample has
(``v`` uses only present modalities) and an absent modality gets no copy.

**Sample level** (``--level sample``, the default, choice): for each sample i and modality m,
``c(φ_i^m)`` copies of i keeping only m (the others absent, features zero):

    c(φ) = 1 if 0.4 < φ < 1;   2 if −0.1 < φ < 0.4;   3 if φ < −0.1;   0 otherwise

(strict comparisons, as the code: φ = 0.4 or −0.1 exactly gives 0 copies).

**Modality level** (``--level modality``, ``func='linear'``): Z = ``int(N · part_ratio)`` rows drawn uniformly
with replacement, ``φ̄_m`` = mean of φ^m over them, ``gap_m = 1 − φ̄_m``,
``difference = |gap_a − gap_v| · (2/3) · α`` (``tanh``: ``tanh(|Δgap| · (2/3) · α)``; ``square``:
``(|Δgap| · (2/3))^1.5 · α``), ``N_r = int(difference · N)`` copies of rows drawn uniformly with
replacement from the whole split, each keeping only the modality with the larger gap. M > 2
**(choice)**: ``|Δgap|`` is the mean of ``|gap_m − gap_m'|`` over pairs and the copies keep
``argmax_m gap_m``; with missing data φ̄_m averages the drawn rows that have m and the copies are drawn
among the rows that have the chosen modality **(choice)**. ``int`` of a product that should be whole
is taken after adding 1e-9 (0.4 · 1000 is 399.99… in binary), **(choice)**.

**Per epoch.** Epochs 1 … ``warmup`` train plain concat on the training split (the official ``warmup = 5``:
its 0-based epochs 0–4). Every later epoch e trains on the original rows plus the copies valued with
the model as it left epoch e − 1 (the code values at the end of each epoch ≥ warmup − 1, 0-based,
and rebuilds the next epoch's loader): here the valuation runs in ``epoch_split`` (H2), in eval mode over
the attached training split in its row order, before any parameter of epoch e changes, which is the
same model. Copies are always made from the original rows, never from earlier copies; the run's
torch stream draws the modality-level rows (H5). ``--warmup 0`` values the initial model for epoch 1.
Logged in the epochs that train on copies: ``valuation_phi_<m>`` (mean φ^m over the rows that have m)
and ``valuation_copies_<m>``.

**BalanceMM [BUG]s** (none reproduced): (a) ``v(S) = 1[correct]`` for every subset, so φ ∈ {−1, …, 1} and a
sample right everywhere gets φ = 0.5 (one copy) instead of 1 (none); (b) its ``res_cache`` is made once
outside the batch loop, so every sample gets the φ of the sample in the same position of **batch 0**;
(c) ``model.pridiction`` raises at HEAD; (d) copies zero the *input*, not the encoder output; (e) at the
modality level each draw is appended once per modality (a full duplicate besides the unimodal copy for
M = 2) and ``difference`` is (4/3)|Δgap|, twice the official, ignoring α; (f) only the first
``N − N mod 64`` samples are valued. Its reported row is the modality level with one plain epoch.

**Training** as the official KS script: Adam lr 5e-5, weight decay 1e-4, StepLR(30, 0.1), batch 64, 60 epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from heads.blocks.data import SplitTensors
from heads.blocks.domains import NONNEGATIVE, NONNEGATIVE_INT, FRACTION
from heads.errors import OptionError
from heads.methods.base import Training
from heads.methods.concat import Concat
from heads.metrics import EXACT_SHAPLEY_MAX, all_subsets

OFFICIAL = Training("adam", 5e-5, 1e-4, "step:30:0.1", 64,
                    "Valuate-and-Enhance official code/sample_level.py + modality_level.py (KS): Adam lr 5e-5, wd 1e-4, "
                    "StepLR(30, 0.1), batch 64, 60 epochs", epochs=60)


@dataclass
class ValuationOptions:
    level: Literal["sample", "modality"] = field(default="sample", metadata={"help": "re-sample per (sample, modality) pair by its φ (sample_level.py) or a number of copies of the modality with the larger gap (modality_level.py; BalanceMM's reported row)"})
    warmup: int = field(default=5, metadata={"domain": NONNEGATIVE_INT, "help": "plain concat epochs before the first valuation (official 5; BalanceMM 1)"})
    part_ratio: float = field(default=0.2, metadata={"domain": FRACTION, "help": "modality level: fraction of the training rows drawn to average φ (official 0.2)"})
    alpha: float = field(default=1.0, metadata={"domain": NONNEGATIVE, "help": "modality level: α scaling the gap difference (official 1.0)"})
    func: Literal["linear", "tanh", "square"] = field(default="linear", metadata={"help": "modality level: difference = |Δgap|·(2/3)·α, tanh of it, or (|Δgap|·(2/3))^1.5·α"})


def sample_values(correct: dict, present: dict[str, torch.Tensor]) -> dict:
    """``v_i(S) = |S ∩ present_i| · 1[correct_i(S)]`` per sample (``[N]`` float each), ``v(∅) = 0``;
    ``correct`` maps each non-empty subset (frozenset) to a bool ``[N]``."""
    values = {}
    for s, hit in correct.items():
        size = sum(present[m].to(torch.float32) for m in s)
        values[s] = size * hit.to(torch.float32)
    values[frozenset()] = torch.zeros_like(next(iter(values.values())))
    return values


def shapley(values: dict, modalities: list[str]) -> dict[str, torch.Tensor]:
    """Exact per-sample Shapley values ``φ_i^m`` (``[N]`` each) from per-sample subset values."""
    n = len(modalities)
    phi = {}
    for m in modalities:
        total = torch.zeros_like(values[frozenset()])
        for s, value in values.items():
            if m in s:
                r = len(s) - 1
                weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
                total = total + weight * (value - values[s - {m}])
        phi[m] = total
    return phi


def copy_counts(phi: torch.Tensor) -> torch.Tensor:
    """``c(φ)``: 1 if 0.4 < φ < 1, 2 if −0.1 < φ < 0.4, 3 if φ < −0.1, else 0 (the official thresholds)."""
    counts = torch.zeros_like(phi, dtype=torch.long)
    counts = torch.where((phi > 0.4) & (phi < 1), 1, counts)
    counts = torch.where((phi > -0.1) & (phi < 0.4), 2, counts)
    return torch.where(phi < -0.1, 3, counts)


def gap_difference(mean_phi: dict[str, float], alpha: float, func: str) -> tuple[float, str]:
    """The modality level's ``difference`` and the modality the copies keep (the largest gap ``1 − φ̄``)."""
    gaps = {m: 1 - p for m, p in mean_phi.items()}
    mods = list(gaps)
    pairs = [abs(gaps[a] - gaps[b]) for i, a in enumerate(mods) for b in mods[i + 1:]]
    spread = sum(pairs) / len(pairs) * 2 / 3 if pairs else 0.0
    if func == "tanh":
        difference = math.tanh(spread * alpha)
    elif func == "square":
        difference = spread ** 1.5 * alpha
    else:
        difference = spread * alpha
    return difference, max(mods, key=lambda m: gaps[m])


class Valuation(Concat):
    Options = ValuationOptions
    summary = "concat trained on its rows plus unimodal copies of the (sample, modality) pairs whose Shapley contribution |S|·1[correct] is low"
    modality_rule = "2 ≤ M ≤ 8: exact per-sample Shapley values of v(S) = |S|·1[correct] (choice beyond the official 2)"
    max_modalities = EXACT_SHAPLEY_MAX
    stackable = False  # its own epoch_split
    training = OFFICIAL

    def __init__(self, spec, cfg, opts):
        if len(spec.modalities) < 2:
            raise OptionError(f"valuation re-samples a modality against the others and needs at least two; this data "
                              f"has {len(spec.modalities)}: {', '.join(spec.modalities)}")
        super().__init__(spec, cfg, opts)
        self.logged: dict = {}

    def values(self, train: SplitTensors) -> dict[str, torch.Tensor]:
        """φ^m of every training row (``[N]`` each, 0 where the row lacks m) from the current model."""
        subsets = [s for s in all_subsets(self.modalities) if s]
        correct = {s: [] for s in subsets}
        with self.evaluating():
            for batch in train.batches(self.eval_batch_size):
                for s in subsets:
                    correct[s].append(self.logits(batch.only(s)).argmax(-1) == batch.y)
        correct = {s: torch.cat(c) for s, c in correct.items()}
        return shapley(sample_values(correct, train.present), self.modalities)

    def copies(self, train: SplitTensors, phi: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows to copy for each modality (repeats allowed), each copy keeping only that modality."""
        if self.opts.level == "sample":
            rows = torch.arange(len(train), device=train.device)
            return {m: rows.repeat_interleave(torch.where(train.present[m], copy_counts(phi[m]), 0))
                    for m in self.modalities}
        n = len(train)
        drawn = torch.randint(0, n, (int(n * self.opts.part_ratio + 1e-9),), device=train.device)
        mean = {}
        for m in self.modalities:
            has = train.present[m][drawn].to(phi[m].dtype)
            mean[m] = float((phi[m][drawn] * has).sum() / has.sum()) if bool(has.any()) else 1.0
        difference, keep = gap_difference(mean, self.opts.alpha, self.opts.func)
        candidates = train.present[keep].nonzero().squeeze(1)
        count = int(difference * n + 1e-9) if len(candidates) else 0
        picked = candidates[torch.randint(0, max(len(candidates), 1), (count,), device=train.device)]
        empty = torch.zeros(0, dtype=torch.long, device=train.device)
        return {m: picked if m == keep else empty for m in self.modalities}

    def epoch_split(self, epoch, train):
        self.logged = {}
        if epoch <= self.opts.warmup:
            return train
        phi = self.values(train)
        rows = self.copies(train, phi)
        for m in self.modalities:
            has = train.present[m].to(phi[m].dtype)
            self.logged[f"valuation_phi_{m}"] = float((phi[m] * has).sum() / has.sum().clamp_min(1))
            self.logged[f"valuation_copies_{m}"] = len(rows[m])
        parts = [train] + [train.take(rows[m]).only([m]) for m in self.modalities if len(rows[m])]
        return SplitTensors.cat(parts) if len(parts) > 1 else train

    def end_epoch(self, val_report):
        return dict(self.logged)
