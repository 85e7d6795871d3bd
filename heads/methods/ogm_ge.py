"""``ogm-ge``: concat with On-the-fly Gradient Modulation and Generalization Enhancement (CVPR 2022).

Per batch, each modality's confidence is ``s_m = Σ_i softmax(out_m)[y_i]`` where ``out_m`` is the
concat classifier's slice for m plus half the bias (the public code's split of the bias). With
``ρ_m = s_m / mean of the other modalities' s`` (the ratio to the other one for M = 2), the
dominant modalities (ρ_m > 1) get ``k_m = 1 − tanh(α · relu(ρ_m − 1))`` (paper) or
``1 − tanh(α · relu(ρ_m))`` (``--coeff-form code``, what the public code computes); others k = 1.
Between ``--modulation-start`` and ``--modulation-end`` epochs the projection weight gradients
become ``g·k_m + N(0, std(g))`` (GE noise on every modulated weight, as the public code does).
With cached features the modulated parameters are the projections ``P_m``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.methods.base import HeadMethod, encode
from heads.methods.concat import Concat


@dataclass
class OGMOptions:
    alpha: float = field(default=0.8, metadata={"help": "modulation strength α (0.8 CREMA-D, 0.1 VGGSound)"})
    coeff_form: Literal["paper", "code"] = field(default="paper", metadata={"help": "relu(ρ−1) as in the paper, or relu(ρ) as in the public code"})
    modulation_start: int = field(default=1, metadata={"help": "first epoch with modulation"})
    modulation_end: int = field(default=50, metadata={"help": "last epoch with modulation"})
    ge: bool = field(default=True, metadata={"help": "add Gaussian noise N(0, std(g)) to modulated gradients"})


class OGMGE(Concat):
    Options = OGMOptions
    summary = "concat with on-the-fly gradient modulation + generalization enhancement"

    def coefficients(self, batch) -> dict[str, float]:
        """``k_m`` for this batch from the modalities' confidence on the true class."""
        with torch.no_grad():
            h = encode(self.proj, batch)
            d = self.cfg.hidden
            score = {}
            for i, m in enumerate(self.modalities):
                out = h[m] @ self.cls.weight[:, i * d:(i + 1) * d].T + self.cls.bias / len(self.modalities)
                score[m] = float(out.softmax(-1).gather(1, batch.y[:, None]).sum())
        coeff = {}
        for m in self.modalities:
            others = [score[o] for o in self.modalities if o != m]
            ratio = score[m] / max(sum(others) / len(others), 1e-12)
            excess = ratio - 1 if self.opts.coeff_form == "paper" else ratio
            coeff[m] = 1 - float(torch.tanh(torch.tensor(self.opts.alpha * max(excess, 0.0)))) if ratio > 1 else 1.0
        return coeff

    def train_step(self, batch):
        if not self.opts.modulation_start <= self.epoch <= self.opts.modulation_end:
            return super().train_step(batch)
        coeff = self.coefficients(batch)

        def modulate():
            for m in self.modalities:
                g = self.proj[m].linear.weight.grad
                if g is None:
                    continue
                std = g.std() + 1e-8  # of the unmodulated gradient, as in g·k + N(0, std(g))
                g.mul_(coeff[m])
                if self.opts.ge:
                    g.add_(torch.randn_like(g) * std)

        loss = nn.functional.cross_entropy(self.logits(batch), batch.y)
        self.step(loss, before_step=modulate)
        return loss.detach()
