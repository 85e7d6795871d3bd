"""``pmr``: concat with Prototypical Modal Rebalance (Fan et al., CVPR 2023; METHODS-MORE.md §11).
Read from the official code, fanyunfeng-bit/Modal-Imbalance-PMR @ 3615e48 (``main_Prototype_grad.py``:
``train_epoch``, ``calculate_prototype``, ``EU_dist``, ``main``; ``bash.sh``), and BalanceMM's
``PMR_trainer.py`` @ 4c1482f for its deviations.

**Prototypes** — per modality, the class means of the features ``h_m = P_m(x_m)`` over the first
``⌊n_batches · fraction⌋`` (at least one) batches of a shuffled pass over the training split, eval mode,
no gradient (the official ``all_num // 10``):

    c̃_{m,k} = mean_{i ∈ D_p, y_i = k} h_{i,m},     c_{m,k} ← (1 − μ) c̃_{m,k} + μ c_{m,k}^{old}

computed before the first epoch and after every epoch, momentum only from the third computation on
(the code's ``epoch <= 0`` check, 0-based, skips it for the first two). Here each is made in
``start_epoch`` for the epoch about to train (epoch 1: the initial one; epoch 2: after epoch 1; momentum
from epoch 3), which is where parameters and buffers change between epochs (H1; the core stores its
selected state after ``end_epoch``). The shuffled pass draws from the run's torch stream (H5).
**[BUG] in the official code and BalanceMM:** a class absent from D_p divides by zero (NaN prototypes);
here such a class keeps its previous prototype (the zero vector at the first computation), **(choice)**.
Only samples that have m count toward m's prototypes. The prototypes are buffers (checkpoints carry
them); inference does not use them.

**Per batch** (inside the modulation window; CE of the fused head alone outside it):

    S_{i,m,k} = −‖h_{i,m} − c_{m,k}‖₂,   score_m = Σ_i softmax_k(S_{i,m,·})[y_i]
    ρ_a = score_a / score_v;   β (audio), λ (visual) = (0, α) if ρ_a > 1, (α, 0) if ρ_a < 1, (0, 0) if ρ_a = 1
    L = CE(f(h), y) + β · CE(S_a, y) + λ · CE(S_v, y)

The prototypes are constants; the gradient reaches ``P_m`` through ``h`` in S. Distances have no
temperature (the code's ``--temperature`` is unused here). **M > 2 (choice):** ``ρ_m = score_m /
mean_{k≠m} score_k`` and every modality with ``ρ_m < 1`` gets ``α · CE(S_m, y)`` (for M = 2 exactly the
rule above). With missing data the scores are means over the samples that have m and each prototype
CE is averaged over them **(choice)**, as ``ogm-ge``'s scores.

The paper's abstract also describes a prototype-based entropy regulariser on the dominant modality
early in training; the released code has no such term (``bash.sh`` names a ``main_Proto_PER.py`` that is
not in the repository), so nothing of it is offered.

**(BalanceMM)** computes the prototypes at the *start* of each epoch with momentum from its second call
(the same timing shifted by one computation), defaults α = 0.6, μ = 0.5, modulation to epoch 80, and for
M = 3 drops the prototype loss for an OGM-GE-like modulation with subtracted noise — not PMR.

**Defaults.** α = 2.0 and μ = 0.0 (the CREMA-D concat scripts; argparse 1.0 and 0.2); the modulation
runs over the code's epochs 0–70 (scripts' ``--modulation_ends 70``, inclusive, 0-based), our 1–71.
Logged per epoch: ``pmr_proto_acc_<m>``, the prototype classifier's accuracy (%) on the validation
samples that have m, with the prototypes the epoch trained with.
At BalanceMM's HEAD its trainer calls the renamed ``Unimodality_Calculate`` and cannot run [BUG]; nothing of it
is needed here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from heads.blocks.domains import FRACTION, NONNEGATIVE, POSITIVE_INT, UNIT
from heads.methods.base import FIELD_PROTOCOL, Training, encode
from heads.methods.concat import Concat


@dataclass
class PMROptions:
    alpha: float = field(default=2.0, metadata={"domain": NONNEGATIVE, "help": "weight α of the prototype CE on the weaker modality (CREMA-D scripts: 2.0; argparse 1.0)"})
    momentum: float = field(default=0.0, metadata={"domain": UNIT, "help": "prototype momentum μ (CREMA-D scripts: 0.0; argparse 0.2)"})
    proto_fraction: float = field(default=0.1, metadata={"domain": FRACTION, "help": "fraction of the training batches the prototypes are computed on (code: 1/10; 1 = all)"})
    modulation_start: int = field(default=1, metadata={"domain": POSITIVE_INT, "help": "first epoch with the prototype term (1-based)"})
    modulation_end: int = field(default=71, metadata={"domain": POSITIVE_INT, "help": "last epoch with the prototype term (the scripts' 0–70 are our 1–71)"})


def updated_prototypes(old: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float | None):
    """``[M, C, d]`` prototypes from per-class feature sums and counts; ``momentum`` None = none yet.
    A class without samples keeps its old prototype."""
    mean = sums / counts.clamp_min(1).unsqueeze(-1)
    new = mean if momentum is None else (1 - momentum) * mean + momentum * old
    return torch.where(counts.unsqueeze(-1) > 0, new, old)


def distances(h: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``‖h_i − c_k‖₂`` ``[B, C]``, with a zero gradient (not NaN) where a distance is exactly 0."""
    squared = (h.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, torch.ones_like(squared)).sqrt(),
                       torch.zeros_like(squared))


def coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[M]`` weights of the prototype CE: α where ``ρ_m = s_m / mean_{k≠m} s_k < 1``, else 0; a modality
    without a score (NaN: nobody in the batch has it) or without another scored modality gets 0."""
    valid = ~scores.isnan()
    known = torch.where(valid, scores, torch.zeros_like(scores))
    others = valid.sum() - valid.to(torch.long)
    ratio = known / ((known.sum() - known) / others.clamp_min(1)).clamp_min(1e-12)
    weak = valid & (others > 0) & (ratio < 1)
    return torch.where(weak, torch.full_like(scores, alpha), torch.zeros_like(scores))


class PMR(Concat):
    Options = PMROptions
    summary = "concat + prototype cross-entropy on the modality its class prototypes rate weaker"
    modality_rule = "any M; for M > 2 each modality scoring below the mean of the others gets the prototype term (choice)"
    stackable = True  # the inherited train_step; prototypes change only in start_epoch (re-stacked after it)
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "PMR official main_Prototype_grad.py + bash.sh (CREMA-D): SGD momentum 0.9, lr 1e-3, wd 1e-4, "
                        "StepLR 70 × 0.1, batch 64")

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        if not 0 < opts.proto_fraction <= 1 or not 0 <= opts.momentum <= 1:
            raise ValueError(f"--proto-fraction must lie in (0, 1] and --momentum in [0, 1], got "
                             f"{opts.proto_fraction}, {opts.momentum}")
        self.register_buffer("prototypes", torch.zeros(len(self.modalities), spec.num_classes, cfg.hidden))

    def class_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class feature sums ``[M, C, d]`` and counts ``[M, C]`` over the first batches of a
        shuffled pass over the attached training split."""
        train = self.attached("train")
        n, size = len(train), self.cfg.batch_size
        batches = max(1, math.floor(math.ceil(n / size) * self.opts.proto_fraction + 1e-9))
        rows = torch.randperm(n)[:batches * size].to(train.device)
        sums = torch.zeros_like(self.prototypes)
        counts = torch.zeros(sums.shape[:2], device=sums.device)
        with self.evaluating():
            for start in range(0, len(rows), size):
                batch = train.batch(rows[start:start + size])
                h = encode(self.proj, batch)
                for i, m in enumerate(self.modalities):
                    keep = batch.present[m].to(h[m].dtype)
                    sums[i].index_add_(0, batch.y, h[m] * keep.unsqueeze(1))
                    counts[i].index_add_(0, batch.y, keep)
        return sums, counts

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        sums, counts = self.class_sums()
        with torch.no_grad():
            self.prototypes.copy_(updated_prototypes(self.prototypes, sums, counts,
                                                     self.opts.momentum if epoch >= 3 else None))

    def modulating(self) -> bool:
        return self.opts.modulation_start <= self.epoch <= self.opts.modulation_end

    def loss(self, batch):
        h = encode(self.proj, batch)
        loss = nn.functional.cross_entropy(self.cls(torch.cat([h[m] for m in self.modalities], 1)), batch.y)
        if not self.modulating():
            return loss
        sims = [-distances(h[m], self.prototypes[i]) for i, m in enumerate(self.modalities)]
        scores = []
        for i, m in enumerate(self.modalities):
            rows = batch.present[m].to(sims[i].dtype)
            true = sims[i].detach().softmax(-1).gather(1, batch.y[:, None]).squeeze(1)
            scores.append((true * rows).sum() / rows.sum())  # 0 / 0 = NaN when nobody has m
        weight = coefficients(torch.stack(scores), self.opts.alpha)
        for i, m in enumerate(self.modalities):
            if batch.has(m):
                rows = batch.present[m].to(sims[i].dtype)
                per_sample = nn.functional.cross_entropy(sims[i], batch.y, reduction="none")
                loss = loss + weight[i] * (per_sample * rows).sum() / rows.sum()
        return loss

    def end_epoch(self, val_report):
        val = self.attached("val")
        correct = torch.zeros(len(self.modalities), device=val.y.device)
        count = torch.zeros(len(self.modalities), device=val.y.device)
        with self.evaluating():
            for batch in val.batches(self.eval_batch_size):
                h = encode(self.proj, batch)
                for i, m in enumerate(self.modalities):
                    hit = distances(h[m], self.prototypes[i]).argmin(-1) == batch.y
                    correct[i] += (hit & batch.present[m]).sum()
                    count[i] += batch.present[m].sum()
        acc = (100 * correct / count.clamp_min(1)).tolist()
        return {f"pmr_proto_acc_{m}": a for m, a in zip(self.modalities, acc)}
