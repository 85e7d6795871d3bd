"""``late``: independent unimodal heads, each trained on its own loss, fused by averaging probabilities.

The heads share no parameter and each loss touches only its own head, so summing the losses and
taking one optimizer step is the same as training them separately (Adam/SGD act per parameter).
A sample's absent modality contributes no loss and no vote.

This is also UME, the uni-modal ensemble of Du et al. (ICML 2023; METHODS-MORE.md §6): whether UME
averages probabilities or logits was not verified, so ``--combine`` offers both (default ``probs``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.methods.base import HeadMethod, encode, mean_probability_logits, projections


@dataclass
class LateOptions:
    combine: Literal["probs", "logits"] = field(default="probs", metadata={"help": "fuse by the mean of the present modalities' probabilities (log taken) or of their logits (UME's form unverified)"})


def mean_logits(logits: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean of each sample's present modalities' logits (zeros for a sample with none)."""
    stacked = torch.stack(list(logits.values()))  # [M, B, C]
    mask = torch.stack([present[m] for m in logits]).to(stacked.dtype).unsqueeze(-1)  # [M, B, 1]
    return (stacked * mask).sum(0) / mask.sum(0).clamp_min(1)


class Late(HeadMethod):
    Options = LateOptions
    summary = "independent unimodal heads, fused by averaging probabilities"
    stackable = True  # the inherited train_step; loss and logits are plain tensor code

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.proj = projections(spec, cfg.hidden)
        self.cls = nn.ModuleDict({m: nn.Linear(cfg.hidden, spec.num_classes) for m in self.modalities})

    def unimodal_logits(self, batch) -> dict[str, torch.Tensor]:
        h = encode(self.proj, batch)
        return {m: self.cls[m](h[m]) for m in self.modalities}

    def loss(self, batch):
        total = 0.0
        for m, logit in self.unimodal_logits(batch).items():
            per_sample = nn.functional.cross_entropy(logit, batch.y, reduction="none")
            total = total + (per_sample * batch.present[m]).sum() / batch.present[m].sum().clamp_min(1)
        return total

    def logits(self, batch):
        if self.opts.combine == "logits":
            return mean_logits(self.unimodal_logits(batch), batch.present)
        return mean_probability_logits(self.unimodal_logits(batch), batch.present)
