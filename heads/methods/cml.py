"""``cml``: Calibrating Multimodal Learning (Ma et al., ICML 2023; METHODS-MORE.md §8).

Sources: the official QingyangZhang/CML (``cpm/CPM_Nets.py::rank_loss``; its experiments are CPM-Nets
and MIWAE on multi-view data, no audio-visual trainer) and BalanceMM's ``CML_trainer.py``
(``conf_loss``, ``training_step``), which carries the method to audio-visual concat.

**Change vs concat.** Besides the full-input CE, the model is trained on inputs with modalities
removed, and penalised whenever removing a modality *increases* its confidence. With
``conf(S) = max_c softmax(f(S))_c`` and ``ŷ(S) = argmax f(S)``, for nested subsets ``S ⊃ S'``:

    official:  R(S, S') = Σ_i ReLU( (conf_i(S') − conf_i(S)) · sign_i − ε ),
               sign_i = 1 − 1[ŷ_i(S') = y_i ∧ ŷ_i(S) ≠ y_i]       (the code's "trick 1")
    balancemm: R(S, S') = max(0, Σ_i (conf_i(S') − conf_i(S)))     (the hinge of the batch sum)

Both sum over the batch, as both sources do. ``--form official`` (default, **choice**) is the paper's
per-sample, sign-masked rank loss; ``--form balancemm`` the hinge of the batch sum, for reproducing
BalanceMM's table (**[BUG] (BalanceMM)**: its ``conf_loss`` computes a sign but never uses it — and
with the condition reversed, zero where the *larger* input is right and the smaller wrong).

**The chain.** A shuffled list of the modalities; removals pop from its end: ``S_0`` = all,
``S_k = S_{k−1} ∖ {r_k}`` for k = 1 … M − 1, and

    L = (1/M) Σ_{k=0}^{M−1} CE(f(S_k), y) + λ Σ_{k=1}^{M−1} R(S_{k−1}, S_k)

(BalanceMM's M = 2 and M = 3; the rule is general). For concat ``f(S ∖ {r}) = f(S) − W_r h_r`` (the
bias kept), exactly the tool's ``f`` with r absent, and it costs nothing extra; confidences are not
detached. **Order** (``--order``): ``per-epoch`` shuffles once per epoch, as BalanceMM (with M = 2 one
modality is removed for the whole epoch); ``per-batch`` draws a new order every batch (the official
code's random removal). The draws come from the torch RNG the core saves, once per epoch
(``start_epoch``): per-batch orders from a Python generator seeded there, so a step reads nothing
from the device.

**Missing data (choice).** A sample lacking ``r`` has ``f(S) = f(S ∖ {r})``: its CE counts as is and its
rank term is zero (equal confidences).

**Training**: the baselines' protocol (FIELD_PROTOCOL), as METHODS-MORE.md says; BalanceMM runs AdamW
lr 1e-3, batch 32. λ = 0.1 is BalanceMM's (the official MIWAE code uses β/100 with β ∈ {0, 10}).
At BalanceMM's HEAD its trainer calls the renamed ``Unimodality_Calculate`` and cannot run [BUG]; nothing of it
is needed here.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.nn import functional as F

from heads.blocks.domains import NONNEGATIVE
from heads.methods.base import FIELD_PROTOCOL, Training, encode
from heads.methods.concat import Concat


@dataclass
class CMLOptions:
    lam: float = field(default=0.1, metadata={"domain": NONNEGATIVE, "help": "λ of the confidence rank penalty (BalanceMM 0.1)"})
    form: Literal["official", "balancemm"] = field(default="official", metadata={"help": "penalty: per-sample, sign-masked (official rank_loss) or the hinge of the batch sum (BalanceMM conf_loss)"})
    epsilon: float = field(default=0.0, metadata={"domain": NONNEGATIVE, "help": "ε of the official per-sample hinge"})
    order: Literal["per-epoch", "per-batch"] = field(default="per-epoch", metadata={"help": "removal order shuffled once per epoch (BalanceMM) or every batch"})


def rank_penalty(logits: torch.Tensor, fewer: torch.Tensor, y: torch.Tensor, form: str, epsilon: float) -> torch.Tensor:
    """``R(S, S')`` from the logits of the larger input ``S`` and of ``S'`` (one modality fewer)."""
    conf, pred = logits.softmax(-1).max(-1)
    conf_fewer, pred_fewer = fewer.softmax(-1).max(-1)
    if form == "balancemm":
        return torch.relu((conf_fewer - conf).sum())
    sign = ~((pred_fewer == y) & (pred != y))
    return torch.relu((conf_fewer - conf) * sign - epsilon).sum()


class CML(Concat):
    Options = CMLOptions
    summary = "concat + CE on nested modality-removed inputs + a penalty when removing a modality raises confidence"
    modality_rule = "any M: a chain of M − 1 removals, CE averaged over its M inputs, the penalty summed over its links"
    stackable = False  # the removal order is drawn at random (METHODS-MORE.md H5)
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "the baselines' protocol (OGM-GE/MLA official main.py: SGD momentum 0.9, lr 1e-3, wd 1e-4, "
                        "StepLR 70 × 0.1, batch 64); BalanceMM's CML_trainer runs AdamW lr 1e-3, batch 32")

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.order = list(self.modalities)  # removals pop from the end
        self.draws = random.Random(0)

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self.order = [self.modalities[i] for i in torch.randperm(len(self.modalities)).tolist()]
        self.draws = random.Random(int(torch.randint(2 ** 62, ())))

    def loss(self, batch):
        h = encode(self.proj, batch)
        d = self.cfg.hidden
        order = self.order if self.opts.order == "per-epoch" else self.draws.sample(self.modalities, len(self.modalities))
        out = self.cls(torch.cat([h[m] for m in self.modalities], 1))
        ce, penalty = F.cross_entropy(out, batch.y), 0.0
        for r in order[:0:-1]:  # the last M − 1 of the list, last first
            i = self.modalities.index(r)
            fewer = out - h[r] @ self.cls.weight[:, i * d:(i + 1) * d].T
            ce = ce + F.cross_entropy(fewer, batch.y)
            penalty = penalty + rank_penalty(out, fewer, batch.y, self.opts.form, self.opts.epsilon)
            out = fewer
        return ce / len(self.modalities) + self.opts.lam * penalty
