"""``concat``: joint training of the concatenated projections with one linear classifier.

Unimodal evaluation uses the classifier's column slice for that modality plus the bias, which is
exactly what zeroing the other modalities' projections gives.

``slices`` are the head's per-modality outputs ``z_m = W_m h_m + b / M`` (METHODS-MORE.md §0.1, the
split OGM-GE's code uses): ``Σ_m z_m`` is the fused output, so methods that score, mask or rescale one
modality's share of the prediction (``ogm-ge``, ``opm``, ``agm``, ``amco``) read them from here.
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

    def slices(self, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``z_m = W_m h_m + b / M`` for every modality (``[B, C]`` each; they sum to the fused logits)."""
        d, bias = self.cfg.hidden, self.cls.bias / len(self.modalities)
        return {m: h[m] @ self.cls.weight[:, i * d:(i + 1) * d].T + bias for i, m in enumerate(self.modalities)}
