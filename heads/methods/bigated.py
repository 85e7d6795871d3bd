"""``bigated``: the gated fusion baseline "BiGated" of the MLA (CVPR 2024, Table 1, §A.2) and CCAT
(Table 1) papers — Kiela et al., "Efficient Large-Scale Multi-Modal Classification", AAAI 2018.

**Equations** (the public module the papers' baselines use: GeWu-Lab/OGM-GE_CVPR2022
``models/fusion_modules.py`` class ``GatedFusion``, the same file in Cecile-hi/Multimodal-Learning-with-
Alternating-Unimodal-Adaptation): each modality gets a linear layer ``u_m = W_m h_m + b_m`` (width d, no
activation); the gating modality g gives ``σ(u_g)``, and

    logits = W_o (σ(u_g) ⊙ u_m) + b_o.

"Bi" is *bilinear* (MLA §A.2 calls it "BiLinear Gated Fusion"): the gate multiplies the two modalities'
linear maps. The official module gates in **one** direction (``x_gate=True``: the gate comes from x,
audio, and multiplies y, visual); MLA §A.2 says the same ("one modality's hidden state undergoes an
activation function (sigmoid in our experiments) to derive a gated weight … used to modulate the other
hidden states"). That is the default here. ``--bidirectional`` (not in the official code; choice, off by
default) also gates the other way and concatenates: ``W_o [σ(u_g) ⊙ u_m ; σ(u_m) ⊙ u_g] + b_o``.

**Where it applies (choice).** As in the code, on the encoders' pooled output vectors; here those are the
projected features ``h_m = P_m(x_m)`` (Kiela et al. gate text and image feature vectors, not feature maps).

**Which modality gates (``--gate``).** Default the first modality of the cache (audio in ``av``/``avt``),
as the official ``x_gate=True`` with ``fusion(a, v)``.

**M > 2 (choice).** The gating modality's ``σ(u_g)`` gates each other modality's ``u_m``; the gated
vectors are concatenated into the one classifier (MLA: "modulate the other hidden states before they
are appended to the fully connected layer"). With ``--bidirectional`` every ordered pair (a gates b,
a ≠ b) contributes one gated vector: M(M − 1) of them. With M = 2 both are the official/stated forms.

**Missing modalities (choice, defined).** An absent modality's projection is zero and the network
computes on (MLA/CCAT: "disable the complementary modality within the fusion network"): with the
gating modality absent its gate is the constant ``σ(b_g)``, so ``v({m}) = W_o (σ(b_g) ⊙ u_m) + b_o``;
with a gated modality m absent its slot is ``σ(u_g) ⊙ b_m``, so the gating modality alone predicts
through its gate times a learned constant vector.

**Training.** As the papers' baselines: OGM-GE / MLA official main.py (``--fusion_method gated``):
SGD momentum 0.9, lr 1e-3, wd 1e-4, StepLR(70, 0.1), batch 64.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heads.methods.base import HeadMethod, encode, projections
from heads.methods.film import BASELINE_PROTOCOL, choose_modality


@dataclass
class BiGatedOptions:
    gate: str = field(default="", metadata={"help": "modality whose σ(W h + b) gates the others ('' = the first, as the official x_gate=True: audio)"})
    bidirectional: bool = field(default=False, metadata={"help": "also gate the other way (every ordered pair); not in the official code"})


class BiGated(HeadMethod):
    Options = BiGatedOptions
    summary = "bilinear gated fusion: σ(W_g h_g) ⊙ W_m h_m, one linear classifier"
    modality_rule = ("any M ≥ 2: the gating modality gates each other one, gated vectors concatenated (choice); "
                     "--bidirectional: every ordered pair")
    training = BASELINE_PROTOCOL
    stackable = True

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        gate = self.gate = choose_modality(opts.gate, self.modalities, "bigated --gate")
        if opts.bidirectional:
            self.pairs = [(a, b) for a in self.modalities for b in self.modalities if a != b]
        else:
            self.pairs = [(gate, m) for m in self.modalities if m != gate]
        self.proj = projections(spec, cfg.hidden)
        self.fc = nn.ModuleDict({m: nn.Linear(cfg.hidden, cfg.hidden) for m in self.modalities})
        self.cls = nn.Linear(cfg.hidden * len(self.pairs), spec.num_classes)

    def trained_with(self) -> str:
        return "gate every pair" if self.opts.bidirectional else f"gate {self.gate}"

    def logits(self, batch):
        h = encode(self.proj, batch)
        u = {m: self.fc[m](h[m]) for m in self.modalities}
        return self.cls(torch.cat([torch.sigmoid(u[a]) * u[b] for a, b in self.pairs], 1))
