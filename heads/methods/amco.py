"""``amco``: Adaptive Mask Co-optimisation (Zhou et al., "Adaptive Mask Co-Optimization for Modal
Dependence in Multimodal Learning", ICASSP 2023; METHODS-MORE.md §4).

Source: no official code and no paper text could be found; this follows BalanceMM
(``balancemm/trainer/AMCo_trainer.py``, ``balancemm/models/avclassify_model.py::BaseClassifierAMCoModel``
@ 4c1482f) and the earlier ``AMCoTrainer_2`` of 3f27575, which masked U = 512 feature units. Whether the
paper masks units or logits, and how its schedule is indexed, could not be checked.

**Model.** Concat's projections and head, slice logits ``z_m = W_m h_m + b/M``, and an extra C×C linear
layer ``L*`` (``linear_star``): the fused output is ``o = L*(Σ_m z̃_m)``, where ``z̃_m`` is masked for a
modality judged dependent and ``z_m`` otherwise. Inference: ``o`` with no mask (the flags are training
state), so ``v({m}) = L*(z_m + Σ_{k≠m} b/M)``, the others absent as for concat.

**Mask schedule.** Per epoch e (0-based, as the code: our epoch − 1) a counter ``l`` starts at 0 and grows
by ``e/10`` after each batch; ``p_t = sin(π/2 · min(ε, l)/ε)``, ``N = int(p_t · K)``, and the mask is ``K − N``
ones and N zeros at positions drawn from torch's RNG (a random permutation; the code shuffles with
numpy), one mask for the whole batch. So epoch 1 never masks; from epoch 4 on every batch after the first
masks everything (``p_t = 1``).

**What is masked (choice, flagged).** ``--mask-on features`` (default): the dependent modality's projection
output, ``h̃_m = h_m ⊙ mask`` with K = d units, and ``z̃_m = W_m h̃_m + b/M`` — the unit masking the earlier
BalanceMM code set up (U = 512, the feature width) but never wired (its U-wide mask was multiplied into
C logits). ``--mask-on logits``: ``z̃_m = z_m ⊙ mask`` with K = C, BalanceMM HEAD's form; at p_t = 1 the
dependent modality's logits are the constant 0, so it gets no gradient at all that step, and its next
dependence is judged on those zeros (each entry exp(0) = 1), so the flag tends to flip every step.

**Dependence**, decided from this step's masked slices for the next step (all False at each epoch's start):
``q = softmax([z̃_1, …, z̃_M])`` over all M·C entries, ``mass_m = (1/B) Σ_i Σ_c q_{i,(m,c)}``, dependent iff
``mass_m > σ``. Masses sum to 1, so with σ = 0.5 at most one modality is dependent (any M: BalanceMM's rule).

**Loss.** ``CE(o, y) + Σ_m CE(z̃_m, y)`` — BalanceMM's M + 1 backward calls into the same gradients, one
step. Its modulation window (epochs 0–80 of 30) covers every epoch, so here the unimodal losses always
apply (choice). Missing data (choice): ``CE(z̃_m, y)`` averages the samples that have m; the masses use
every row, a sample's absent modality entering with its ``z_m = b/M``.

**BalanceMM [BUG]s.** ``U`` unused (the mask is over C logits); in 3f27575 the model skipped the unimodal
computation whenever a modality was dependent, so the mask was never applied and the unimodal outputs
were the previous batch's; at HEAD the mask is ``expand(2, −1)``, which only broadcasts when DataParallel
scatters it over two GPUs (on one GPU ``[B, C]·[2, C]`` fails for B ≠ 2).

**Training (choice).** No official setting is known; the field protocol (SGD momentum 0.9, lr 1e-3,
weight decay 1e-4, StepLR(70, 0.1), batch 64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.domains import POSITIVE, UNIT
from heads.methods.base import FIELD_PROTOCOL, Training, encode
from heads.methods.concat import Concat


@dataclass
class AMCoOptions:
    sigma: float = field(default=0.5, metadata={"domain": UNIT, "help": "σ: a modality is dependent when its share of the softmax over all unimodal logits exceeds σ (BalanceMM 0.5)"})
    eps: float = field(default=0.3, metadata={"domain": POSITIVE, "help": "ε: the mask ratio sin(π/2 · min(ε, l)/ε) reaches 1 when the epoch's counter l reaches ε (BalanceMM 0.3)"})
    mask_on: Literal["features", "logits"] = field(default="features", metadata={"help": "mask the dependent modality's projection units (K = hidden, choice) or its slice logits (K = classes, BalanceMM HEAD)"})


def masked_count(counter: float, eps: float, k: int) -> int:
    """``N = int(p_t · K)``, ``p_t = sin(π/2 · min(ε, l)/ε)``: how many of K positions the mask zeroes."""
    return int(math.sin(math.pi / 2 * (min(eps, counter) / eps)) * k)


def dependence_mass(z: list[torch.Tensor]) -> torch.Tensor:
    """``[M]``: each modality's mean share of the softmax over the concatenated unimodal logits."""
    q = torch.cat(z, 1).softmax(1)
    return q.reshape(q.shape[0], len(z), -1).sum(2).mean(0)


class AMCo(Concat):
    Options = AMCoOptions
    summary = "concat + C×C output layer and unimodal losses; the modality judged dependent is masked (units or logits) with a ratio ramping up in each epoch"
    modality_rule = "M ≥ 2: dependence is each modality's share of the softmax over all M·C unimodal logits (BalanceMM's rule)"
    stackable = False  # random mask positions inside the step, and dependence flags carried from step to step
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "AMCo: no official code or setting located (BalanceMM trains every method with its shared AdamW "
                        "protocol); the field protocol: SGD momentum 0.9, lr 1e-3, wd 1e-4, StepLR 70 × 0.1, batch 64 (choice)")

    def __init__(self, spec, cfg, opts):
        if len(spec.modalities) < 2:
            raise ValueError(f"amco masks the modality the others depend on and needs at least two modalities; "
                             f"this data has {len(spec.modalities)}: {', '.join(spec.modalities)}")
        super().__init__(spec, cfg, opts)
        self.star = nn.Linear(spec.num_classes, spec.num_classes)  # L*
        # Training state, moved with the model but not saved: the flags of the previous step, and how
        # often each modality was dependent this epoch (logged).
        self.register_buffer("dependent", torch.zeros(len(self.modalities), dtype=torch.bool), persistent=False)
        self.register_buffer("dependent_steps", torch.zeros(len(self.modalities)), persistent=False)
        self.counter, self.steps = 0.0, 0

    def logits(self, batch):
        return self.star(super().logits(batch))

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self.dependent.zero_()
        self.dependent_steps.zero_()
        self.counter, self.steps = 0.0, 0

    def draw_mask(self, k: int) -> torch.Tensor:
        """``[K]``: N = ``masked_count`` zeros at random positions (torch's RNG), ones elsewhere."""
        n = masked_count(self.counter, self.opts.eps, k)
        return (torch.randperm(k, device=self.cls.weight.device) >= n).to(self.cls.weight.dtype)

    def masked_slices(self, batch) -> list[torch.Tensor]:
        """``z̃_m`` for every modality, the previous step's dependent ones masked."""
        features = self.opts.mask_on == "features"
        mask = self.draw_mask(self.cfg.hidden if features else self.spec.num_classes)
        gate = torch.where(self.dependent[:, None], mask[None, :], torch.ones_like(mask)[None, :])  # [M, K]
        h = encode(self.proj, batch)
        if features:
            h = {m: h[m] * gate[i] for i, m in enumerate(self.modalities)}
        z = list(self.slices(h).values())
        return z if features else [z[i] * gate[i] for i in range(len(z))]

    def train_step(self, batch):
        z = self.masked_slices(batch)
        loss = nn.functional.cross_entropy(self.star(sum(z)), batch.y)
        for m, zm in zip(self.modalities, z):
            if batch.has(m):
                per_sample = nn.functional.cross_entropy(zm, batch.y, reduction="none")
                rows = batch.present[m].to(per_sample.dtype)
                loss = loss + (per_sample * rows).sum() / rows.sum()
        self.step(loss)
        with torch.no_grad():
            self.dependent.copy_(dependence_mass([t.detach() for t in z]) > self.opts.sigma)
        self.dependent_steps += self.dependent
        self.steps += 1
        self.counter += (self.epoch - 1) / 10
        return loss.detach()

    def end_epoch(self, val_report):
        """``amco_dependent_<m>``: the share of this epoch's steps after which m was judged dependent."""
        share = (self.dependent_steps / max(self.steps, 1)).tolist()
        return {f"amco_dependent_{m}": s for m, s in zip(self.modalities, share)}
