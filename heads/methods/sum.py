"""``sum``: joint training of the summed projections with one shared linear head.

Unimodal evaluation feeds the single present feature to the shared head (absent ones add zero).
"""
from __future__ import annotations

from torch import nn

from heads.methods.base import HeadMethod, encode, projections


class Sum(HeadMethod):
    summary = "joint training, summed projections, one shared linear head"
    stackable = True  # the inherited train_step; loss and logits are plain tensor code

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.proj = projections(spec, cfg.hidden)
        self.cls = nn.Linear(cfg.hidden, spec.num_classes)

    def logits(self, batch):
        return self.cls(sum(encode(self.proj, batch).values()))
