"""``mbsd``: balance by self-distillation (BalanceMM's "MBSD" [Liu et al., 2023]; METHODS-MORE.md §7).

Source: no paper text or official code was located; this is BalanceMM's
``balancemm/trainer/MBSD_trainer.py`` (@ ``4c1482f``; the mechanism is the same at ``3f27575``).

**Change vs concat.** Unimodal CE on the concat head's slice logits ``z_m = W_m h_m + b/M`` (§0.1),
and, for the samples where at least one modality of a pair is right, a term weighted by the gap between
the two modalities' true-class probabilities that pulls their logits together and moves the weaker one
toward the stronger. Inference is concat's.

**Equations (one pair a, v).** ``p_m = softmax(z_m)``, ``P_{i,m} = p_m(i)[y_i]``:

    w_i  = |P_{i,a} − P_{i,v}|   if argmax z_a(i) = y_i or argmax z_v(i) = y_i, else 0   (the gap weight)
    RS_i = (1/C) Σ_c (z_{a,c}(i) − z_{v,c}(i))²
    L = CE(f(h), y) + Σ_m CE(z_m, y) + (1/B) Σ_i w_i RS_i + (1/B) Σ_i w_i KL_i

**[BUG] (BalanceMM) and the KL term, ``--kl``.** BalanceMM calls ``F.kl_div(ps, pw)`` with
``ps = max(P_a, P_v)``, ``pw = min(P_a, P_v)``: probabilities where ``kl_div`` expects a
log-probability input, so ``KL_i = pw (log pw − ps)``, a scalar non-KL term, negative for typical values.
Minimising it rewards a larger ``ps`` and pulls ``pw`` toward ``exp(ps − 1)``. ``--kl balancemm`` is
that formula (for reproducing BalanceMM's table), with nothing detached, as there (its ``w``, ``ps``,
``pw`` are built by item assignment, which autograd records). ``--kl distill`` (default, **choice**:
the likely intent) is a distribution-level distillation of the stronger modality into the weaker:
``KL_i = KL(s.g.(p_s(i)) ‖ p_w(i))`` over the C classes, s/w the sample's stronger/weaker modality by
true-class probability, with ``w_i`` detached (a weight, not something to optimise; **choice**: for
both terms).

**M > 2 (choice).** Every pair of the M(M−1)/2, each with its own ``w``, ``RS`` and ``KL``, and the
RS and KL terms each averaged over the pairs; RS on logits for every M. **(BalanceMM)** M = 3 there
averages the three pairs likewise but computes RS on *probabilities* (and ``1/C`` from the first
modality); M = 2 on logits.

**Missing data (choice).** A modality's CE counts only the samples that have it; a pair's terms only
the samples that have both (the others get ``w = 0``, still counted in ``1/B``).

**Window.** BalanceMM's ``modulation_starts 0`` / ``modulation_ends 80`` (0-based, always on in its 30
epochs) are ``--modulation-start 1`` / ``--modulation-end 81``; outside the window the loss is
``CE(f(h), y)`` alone, as there. **Training**: BalanceMM trains with AdamW lr 1e-3 (§0.3); the tool
uses its baselines' protocol (FIELD_PROTOCOL), as METHODS-MORE.md says.
At BalanceMM's HEAD its trainer calls the renamed ``Unimodality_Calculate`` and cannot run [BUG]; nothing of it
is needed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

import torch
from torch.nn import functional as F

from heads.blocks.domains import POSITIVE_INT
from heads.methods.base import FIELD_PROTOCOL, Training, encode
from heads.methods.concat import Concat


@dataclass
class MBSDOptions:
    kl: Literal["distill", "balancemm"] = field(default="distill", metadata={"help": "KL term: KL(s.g. p_strong ‖ p_weak) with the gap weight detached (distill), or BalanceMM's kl_div(ps, pw) on probabilities (balancemm)"})
    modulation_start: int = field(default=1, metadata={"domain": POSITIVE_INT, "help": "first epoch with the unimodal and distillation terms (1-based; BalanceMM's 0)"})
    modulation_end: int = field(default=81, metadata={"domain": POSITIVE_INT, "help": "last epoch with them (BalanceMM's 80, 0-based)"})


def pair_terms(z_a: torch.Tensor, z_b: torch.Tensor, y: torch.Tensor, both: torch.Tensor, kl: str):
    """``(w, RS, KL)`` per sample for one pair of slice logits ``[B, C]``; ``both`` marks the samples
    that have the two modalities (the others get ``w = 0``)."""
    log_a, log_b = z_a.log_softmax(-1), z_b.log_softmax(-1)
    p_a, p_b = log_a.gather(1, y[:, None]).squeeze(1).exp(), log_b.gather(1, y[:, None]).squeeze(1).exp()
    right = (z_a.argmax(-1) == y) | (z_b.argmax(-1) == y)
    w = (p_a - p_b).abs() * (right & both)
    rs = (z_a - z_b).pow(2).mean(-1)
    if kl == "balancemm":
        return w, rs, F.kl_div(torch.maximum(p_a, p_b), torch.minimum(p_a, p_b), reduction="none")
    a_strong = (p_a >= p_b)[:, None]
    log_strong = torch.where(a_strong, log_a, log_b).detach()
    log_weak = torch.where(a_strong, log_b, log_a)
    return w.detach(), rs, F.kl_div(log_weak, log_strong, reduction="none", log_target=True).sum(-1)


class MBSD(Concat):
    Options = MBSDOptions
    summary = "concat + unimodal CE on the slice logits + gap-weighted logit matching and distillation of the stronger modality"
    modality_rule = "any M: every modality pair gets its own gap weight, matching and KL term, averaged over the pairs (choice)"
    stackable = True  # the inherited train_step; loss and logits are plain tensor code
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "the baselines' protocol (OGM-GE/MLA official main.py: SGD momentum 0.9, lr 1e-3, wd 1e-4, "
                        "StepLR 70 × 0.1, batch 64); BalanceMM's MBSD_trainer runs AdamW lr 1e-3, batch 32")

    def slice_logits(self, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``z_m = W_m h_m + b / M``: the unimodal outputs of the concat head, summing to ``f(h)``."""
        d, share = self.cfg.hidden, self.cls.bias / len(self.modalities)
        return {m: h[m] @ self.cls.weight[:, i * d:(i + 1) * d].T + share for i, m in enumerate(self.modalities)}

    def loss(self, batch):
        z = self.slice_logits(encode(self.proj, batch))
        total = F.cross_entropy(sum(z.values()), batch.y)
        if not self.opts.modulation_start <= self.epoch <= self.opts.modulation_end:
            return total
        for m in self.modalities:
            rows = batch.present[m].to(z[m].dtype)
            total = total + (F.cross_entropy(z[m], batch.y, reduction="none") * rows).sum() / rows.sum().clamp_min(1)
        pairs = list(combinations(self.modalities, 2))
        for a, b in pairs:
            w, rs, kl = pair_terms(z[a], z[b], batch.y, batch.present[a] & batch.present[b], self.opts.kl)
            total = total + ((w * rs).sum() + (w * kl).sum()) / (len(batch) * len(pairs))
        return total
