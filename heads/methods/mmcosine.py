"""``mmcosine``: Multi-Modal Cosine loss (Xu, Feng, Zhang & Hu, "MMCosine: Multi-Modal Cosine Loss
Towards Balanced Audio-Visual Fine-Grained Learning", ICASSP 2023; METHODS-MORE.md §5).

Source: the official code GeWu-Lab/MMCosine_ICASSP23 (``main_CD.py``: ``train_epoch``, ``valid``);
BalanceMM's ``MMCosine_trainer.py`` has the same equations.

**Change vs concat.** Each modality's logits become scaled cosine similarities between its
L2-normalised projection and the L2-normalised rows of its slice ``W_m`` of the concat classifier;
the fused logit is their sum, with no bias. Every modality's logits then live on the same scale
``[−s, s]``, which is how the method balances them:

    ẑ_{m,c} = s · ⟨ h_m/‖h_m‖, w_{c,m}/‖w_{c,m}‖ ⟩,     o = Σ_m ẑ_m,     L = CE(o, y)

(``F.normalize`` with its ε = 1e-12, on the features per sample and on the class rows of each slice —
the code's ``normalize(Wᵀ_slice, dim=0)``.) The classifier's bias exists, as in the code, but is never
used: it gets no gradient and never moves. An absent modality has ``h_m = 0`` and ``normalize(0) = 0``,
so it adds nothing: v(S) is exact, with no special case.

**Inference (choice).** ``logits`` is ``o``, the trained objective, for every subset. The official
``valid`` scores the unimodal accuracies with ``ẑ_m`` but the multimodal accuracy with the plain
``W [h_a; h_v] + b`` of the concat module (its ``out``), a classifier the loss never trained (the bias
is at its initial value); we do not reproduce that.

**Not implemented:** the supplementary material's supervised cross-modal NCE term (official
``--lam``, default 0). **(BalanceMM)** ``--scaling`` 15 there; the official argparse and README use
10, the default here. **[BUG] (BalanceMM)** ``MMCosineTrainer.val_loop`` compares a float with the
``best_acc`` dict (TypeError at both commits read); its logged validation loss sums batch means and
divides by the sample count.

**M > 2**: the sum runs over all modalities (BalanceMM writes out M = 3; the rule is general).

**Training** as the official ``main_CD.py``: SGD momentum 0.9, lr 1e-3, weight decay 1e-4,
``StepLR(100, 0.1)``, batch 32 (it trains 200 epochs; the tool's ``--epochs`` decides here).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from heads.blocks.domains import POSITIVE
from heads.methods.base import Training, encode
from heads.methods.concat import Concat


@dataclass
class MMCosineOptions:
    scaling: float = field(default=10.0, metadata={"domain": POSITIVE, "help": "s: each modality's cosine logits are scaled by it (official 10; BalanceMM 15)"})


class MMCosine(Concat):
    Options = MMCosineOptions
    summary = "concat's weights as scaled cosine logits per modality (unit features, unit class rows), summed, no bias"
    modality_rule = "any M: the cosine logits of all present modalities are summed"
    stackable = True  # the inherited train_step; loss and logits are plain tensor code
    training = Training("sgd", 1e-3, 1e-4, "step:100:0.1", 32,
                        "MMCosine official main_CD.py: SGD momentum 0.9, lr 1e-3, wd 1e-4, StepLR 100 × 0.1, "
                        "batch 32, 200 epochs (epochs: the tool's)")

    def cosine_logits(self, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``ẑ_m = s · normalize(h_m) · normalize(W_m)ᵀ`` per modality, ``[B, C]`` each."""
        d = self.cfg.hidden
        out = {}
        for i, m in enumerate(self.modalities):
            rows = F.normalize(self.cls.weight[:, i * d:(i + 1) * d], dim=1)
            out[m] = self.opts.scaling * F.normalize(h[m], dim=1) @ rows.T
        return out

    def logits(self, batch):
        return sum(self.cosine_logits(encode(self.proj, batch)).values())
