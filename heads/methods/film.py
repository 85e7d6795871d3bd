"""``film``: FiLM as a fusion baseline (Perez et al., "FiLM: Visual Reasoning with a General Conditioning
Layer", AAAI 2018), as the MLA (CVPR 2024, Table 1 and §A.2) and CCAT (Table 1) papers use it.

**Equations.** FiLM's layer (paper eqs. 1–2: ``γ = f(x)``, ``β = h(x)``; ``FiLM(F | γ, β) = γ ⊙ F + β``):
a conditioning input produces ``(γ, β) = split(W_f h_c + b_f)`` (one linear "condition encoder" whose output is twice the
feature width, split into halves, γ first), and the conditioned feature becomes ``γ ⊙ h_m + β``.
The fusion baseline feeds that into one linear classifier: ``logits = W_o (γ(h_c) ⊙ h_m + β(h_c)) + b_o``.
Checked against the public module the papers' baselines use (GeWu-Lab/OGM-GE_CVPR2022
``models/fusion_modules.py`` class ``FiLM``, also copied into Cecile-hi/Multimodal-Learning-with-
Alternating-Unimodal-Adaptation ``models/fusion_modules.py``): ``fc = Linear(d, 2d)``,
``gamma, beta = split(fc(film), d)``, ``fc_out(gamma * to_be_film + beta)``; no activation between.

**Where it applies (choice).** The original FiLM conditions CNN feature maps; the baseline code applies
it to the encoders' pooled output vectors, and here the trainable encoders are the projections, so
``h_m = P_m(x_m) = ReLU(W_m x_m + b_m)`` (the projected features) play that role.

**Which modality conditions (``--condition``).** The official ``AVClassifier`` builds ``FiLM(x_film=True)``
and calls it as ``fusion(a, v)``: audio (x) produces γ, β, visual is modulated. Here the default is the
first modality of the cache (audio in ``av`` and ``avt``); ``--condition NAME`` picks another (MLA
§A.2: "either audio or text serves as the condition encoder's input").

**M > 2 (choice).** The conditioning modality modulates each other modality with its own generator
``(γ_m, β_m) = split(W_{f,m} h_c + b_{f,m})``; the modulated features are concatenated into the one
classifier (MLA §A.2: the condition "conditionally encode[s] the remaining modalities"; their code has
no three-modality FiLM). With M = 2 this is exactly the official module.

**Missing modalities (choice, defined).** An absent modality's projection is zero (as for every
method here; MLA/CCAT "disable the complementary modality within the fusion network"), and the
network computes on: with the conditioning modality absent, ``γ = b_γ`` and ``β = b_β`` (the generator's
biases: a learned, input-independent modulation), so ``v({m}) = W_o (b_γ ⊙ h_m + b_β) + b_o``; with a
modulated modality m absent its slot is ``β(h_c)`` alone (γ multiplies zero), so the conditioning
modality alone predicts through β.

**Training.** As the papers' baselines: the shared protocol of the OGM-GE and MLA official main.py
(``--fusion_method film``): SGD momentum 0.9, lr 1e-3, wd 1e-4, StepLR(70, 0.1), batch 64.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heads.methods.base import FIELD_PROTOCOL, HeadMethod, Training, encode, projections

BASELINE_PROTOCOL = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay,
                             FIELD_PROTOCOL.schedule, FIELD_PROTOCOL.batch_size,
                             "as the MLA/CCAT baselines: OGM-GE and MLA official main.py (--fusion_method film|gated): "
                             "SGD momentum 0.9, lr 1e-3, wd 1e-4, StepLR 70 × 0.1, batch 64")


def choose_modality(name: str, modalities: list[str], flag: str) -> str:
    """The modality ``name`` (``""`` = the first); a clear error when the data has no such modality."""
    if len(modalities) < 2:
        raise ValueError(f"{flag.split()[0]} fuses two or more modalities; this data has {len(modalities)}: "
                         f"{', '.join(modalities)}")
    if not name:
        return modalities[0]
    if name not in modalities:
        raise ValueError(f"{flag} {name!r}: this data has no such modality; choose one of {', '.join(modalities)}")
    return name


@dataclass
class FiLMOptions:
    condition: str = field(default="", metadata={"help": "modality whose projection produces γ, β ('' = the first, as the official x_film=True: audio)"})


class FiLM(HeadMethod):
    Options = FiLMOptions
    summary = "FiLM fusion: γ(h_c) ⊙ h_m + β(h_c), one linear classifier"
    modality_rule = ("any M ≥ 2: the conditioning modality modulates each other one with its own (γ, β); "
                     "modulated features concatenated (choice; M = 2 is the official module)")
    training = BASELINE_PROTOCOL
    stackable = True

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.condition = choose_modality(opts.condition, self.modalities, "film --condition")
        self.modulated = [m for m in self.modalities if m != self.condition]
        self.proj = projections(spec, cfg.hidden)
        self.film = nn.ModuleDict({m: nn.Linear(cfg.hidden, 2 * cfg.hidden) for m in self.modulated})
        self.cls = nn.Linear(cfg.hidden * len(self.modulated), spec.num_classes)

    def trained_with(self) -> str:
        return f"condition {self.condition}"

    def gamma_beta(self, h_condition: torch.Tensor, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(γ, β)`` for modality m from the conditioning feature (γ the first half, as the code's split)."""
        gamma, beta = self.film[m](h_condition).chunk(2, dim=1)
        return gamma, beta

    def logits(self, batch):
        h = encode(self.proj, batch)
        modulated = []
        for m in self.modulated:
            gamma, beta = self.gamma_beta(h[self.condition], m)
            modulated.append(gamma * h[m] + beta)
        return self.cls(torch.cat(modulated, 1))
