"""``concat``: joint training of the concatenated projections with one linear classifier.

Unimodal evaluation uses the classifier's column slice for that modality plus the bias, which is
exactly what zeroing the other modalities' projections gives.
"""
from __future__ import annotations

import torch
from torch import nn

from heads.methods.base import HeadMethod, encode, projections


class Concat(HeadMethod):
    summary = "joint training, concatenated projections, one linear classifier"
    stackable = True  # the inherited train_step; loss and logits are plain tensor code

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.proj = projections(spec, cfg.hidden)
        self.cls = nn.Linear(cfg.hidden * len(self.modalities), spec.num_classes)

    def logits(self, batch):
        h = encode(self.proj, batch)
        return self.cls(torch.cat([h[m] for m in self.modalities], 1))
