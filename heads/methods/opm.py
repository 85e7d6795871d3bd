"""``opm``: On-the-fly Prediction Modulation (Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced
Multimodal Learning", T-PAMI 2024, the extension of OGM-GE; METHODS-MORE.md §2).

Source: the official code, GeWu-Lab/BML_TPAMI2024 @ 4b3aa4f (``code/models/Classifier.py``:
``Modality_drop``, ``calcu_q``, ``custom_autograd``, ``Classifier.forward``; ``code/main.py::train``;
``code/config.py``; ``code/scripts/train_opm.sh``). BalanceMM's ``OPM_trainer.py`` @ 4c1482f only for
what it does differently.

**Change vs concat.** While training, the dominant modality's projection output ``h_m`` is dropped
(zeroed) per sample with a probability that grows with its lead; the surviving features are rescaled
and samples left with no modality leave the loss. Inference is concat's (no drop).

**Scores** from the slice logits ``z_m = W_m h_m + b/M`` with the head detached, on the undropped
features (``ogm-ge``'s ``slice_confidence``): ``s_m`` = mean true-class probability over the samples that
have m (the code's sum; the ratio is the same with complete data, choice as ``ogm-ge`` for missing data).
``ρ_m = s_m / mean_{k≠m} s_k`` (M = 2: the other's score; M > 2: ``ogm-ge``'s rule, choice — BalanceMM
divides by the *sum* of the others, so with three comparable modalities it never drops [BUG]).

**Drop probabilities** (``calcu_q``): ``r_m = tanh(max(0, ρ_m − 1))``, ``q_m = clip(q_base (1 + λ r_m), 0, 1)``
if ``r_m > 0`` else 0 — the weak modality is never dropped.

**Drop** (``Modality_drop.execute_drop``), executed for the whole batch with probability ``p_exe``
(``u ~ U(0,1)``, execute iff ``u ≥ 1 − p_exe``): ``μ_{i,m} ~ Bernoulli(1 − q_m)`` per sample and modality,
``θ = Σ_m d_m q_m / Σ_m d_m`` (every ``h_m`` has the head's width, so θ = mean_m q_m),
``h̃_{i,m} = μ_{i,m} h_{i,m} / (1 − θ)`` for every modality, dropped or not, forward and backward (the code's
``custom_autograd``; θ is not a parameter, so a plain product is the same), and
``keep_i = 1[Σ_m μ_{i,m} > 0]`` (an absent modality counts as dropped). ``L = CE(f(h̃)[keep], y[keep])``,
one step for every parameter; if no row is kept the batch takes no step (the code's ``continue``).
Not executed: ``h̃ = h``. The coin and μ are drawn on every modulated batch, from torch's RNG of the
model's device (which the trainer saves and restores), whatever q is.

**One host read.** A complete batch always keeps every row (the lowest-scoring modality has ρ ≤ 1, so
q = 0 and μ = 1), so only a batch where some sample lacks a modality reads ``keep.any()`` on the host,
to skip the step as the code does.

**Warm-up.** Plain concat training for ``--warmup`` epochs (the code's ``warm_up = 1 if epoch <= 5``: its
epochs 0–5, our 1–6).

**BalanceMM.** No warm-up, ``q_base`` 0.4 (so does the official ``config.py``, overridden by its script
and argparse: 0.5); the drop also acts on the encoder outputs with the fused output recomputed, as the
official; its scores use live weights, but under a sum that is not back-propagated, so the same. Outside
its modulation window its loss is an empty dict and ``loss['output']`` raises (not reached with its
defaults) [BUG]; at HEAD it calls the renamed ``Unimodality_Calculate`` and cannot run [BUG].

**Training** as the official ``config.py`` and ``main.py``: AdamW lr 5e-5, weight decay 0.01,
StepLR(40, 0.1), batch 32 (100 epochs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, NONNEGATIVE_INT, UNIT
from heads.methods.base import Training, encode
from heads.methods.concat import Concat
from heads.methods.ogm_ge import dominance, slice_confidence


@dataclass
class OPMOptions:
    q_base: float = field(default=0.5, metadata={"domain": UNIT, "help": "base drop probability of a dominant modality (official script 0.5; its config.py and BalanceMM 0.4)"})
    lam: float = field(default=0.5, metadata={"domain": NONNEGATIVE, "help": "λ: q = q_base · (1 + λ · tanh(max(0, ρ − 1)))"})
    p_exe: float = field(default=0.7, metadata={"domain": UNIT, "help": "probability that a batch's drop is executed at all"})
    warmup: int = field(default=6, metadata={"domain": NONNEGATIVE_INT, "help": "epochs of plain concat training first (official: its epochs 0–5; BalanceMM: 0)"})


def drop_probabilities(score: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """``[M]`` ``q_m`` from the modalities' scores (``calcu_q``); 0 where ρ ≤ 1 or ρ is undefined."""
    ratio, defined = dominance(score)
    r = torch.tanh((ratio - 1).clamp_min(0))
    q = (q_base * (1 + lam * r)).clamp(0, 1)
    return torch.where(defined & (r > 0), q, torch.zeros_like(q))


class OPM(Concat):
    Options = OPMOptions
    summary = "concat; the dominant modality's projection output dropped per sample with a probability growing with its lead, survivors rescaled"
    modality_rule = "M ≥ 2: each ρ_m compares s_m with the mean score of the others, several modalities may drop (choice; the official code has 2)"
    stackable = False  # random draws inside the step, and a step that may be skipped
    training = Training("adamw", 5e-5, 0.01, "step:40:0.1", 32,
                        "OPM official BML_TPAMI2024 code/config.py + main.py (scripts/train_opm.sh): AdamW lr 5e-5, wd 0.01, "
                        "StepLR(40, 0.1), batch 32, 100 epochs")

    def __init__(self, spec, cfg, opts):
        if len(spec.modalities) < 2:
            raise ValueError(f"opm drops the modality that leads the others and needs at least two modalities; "
                             f"this data has {len(spec.modalities)}: {', '.join(spec.modalities)}")
        super().__init__(spec, cfg, opts)

    def draws(self, q: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's randomness: whether the drop executes (a 0-d bool) and ``μ ~ Bernoulli(1 − q)``, ``[n, M]``."""
        execute = torch.rand((), device=q.device) >= 1 - self.opts.p_exe
        return execute, torch.bernoulli((1 - q).expand(n, -1))

    def train_step(self, batch):
        if self.epoch <= self.opts.warmup:
            return super().train_step(batch)
        h = encode(self.proj, batch)
        with torch.no_grad():
            q = drop_probabilities(slice_confidence(self.slices(h), batch), self.opts.q_base, self.opts.lam)
            execute, mu = self.draws(q, len(batch))
            mu = torch.where(execute, mu, torch.ones_like(mu))
            scale = 1 / (1 - torch.where(execute, q.mean(), torch.zeros_like(q[0])))
            present = torch.stack([batch.present[m] for m in self.modalities], 1).to(mu.dtype)
            keep = ((mu * present).sum(1) > 0).to(mu.dtype)
        dropped = [h[m] * (mu[:, i:i + 1] * scale) for i, m in enumerate(self.modalities)]
        per_sample = nn.functional.cross_entropy(self.cls(torch.cat(dropped, 1)), batch.y, reduction="none")
        loss = (per_sample * keep).sum() / keep.sum().clamp_min(1)
        if not all(batch.full(m) for m in self.modalities) and not bool(keep.any()):
            return loss.detach()  # every row dropped: no step (the one host read, incomplete batches only)
        self.step(loss)
        return loss.detach()
