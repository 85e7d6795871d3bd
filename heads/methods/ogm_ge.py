"""``ogm-ge``: concat with On-the-fly Gradient Modulation and Generalization Enhancement (Peng et al., CVPR 2022).

**Scores** (paper eqs. 6–8). Per batch, modality m's confidence is ``s_m = Σ_i softmax(out_m)_i[y_i]``
where ``out_m`` is the concat classifier's column slice for m plus the bias divided by M (the public
code's split: ``bias / 2`` for two modalities). Only the samples that have m count (an absent
modality's zero feature would otherwise add the bias's confidence to s_m); when the modalities have
different numbers of present samples the ratio compares means instead of sums (choice; with complete
data it is exactly the paper's ratio of sums). ``ρ_m = s_m / s̄_others`` (the other modality for
M = 2; for M > 2 ``--ratio mean``, the default, divides by the mean of the others' s, choice).

``--ratio sum`` is MLA's code (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation
``main.py`` at ab6c184, which produced MLA Table 1's OGM-GE row): ``ρ_m = s_m / Σ_{n≠m} s_n``, so at most
one modality can exceed 1 and only it is modulated; when none does, its fallback ``else`` branch
modulates audio anyway, ``k_a = 1 − tanh(α·ρ_a)`` — here the first modality of the cache (audio in
``av``/``avt``). With M = 2 both rules are the paper's (up to an exact tie, where ``sum`` modulates
the first modality).

**Coefficient** (eq. 10, as the authors' code quotes it: ``1 − tanh(α · relu(ratio))`` for the
dominant modality): ``k_m = 1 − tanh(α · ρ_m)`` when ``ρ_m > 1``, else 1 — ``--coeff-form paper``, the
default. ``--coeff-form shifted`` is ``1 − tanh(α · (ρ_m − 1))``, a variant this tool once used by
mistake, kept only under its own name (it leaves k ≈ 1 near balance, where eq. 10 already gives
``1 − tanh(α)``).

**Modulation and GE** (eqs. 9, 11). Between ``--modulation-start`` and ``--modulation-end`` (1-based,
inclusive; the code's epochs 0–50 of 100 are our 1–51) each modality's projection weight gradient
becomes ``g·k_m + N(0, σ²)``. The noise is added to every modality's weights, k = 1 included, as the
code does. σ (``--noise-std``): ``unscaled`` (default) is ``std(g)`` of the gradient before scaling —
what the authors' current code computes (``grad = grad * k + normal(0, grad.std())`` evaluates the std
before the assignment); ``scaled`` is ``std(g·k)``, the order of their earlier release
(``grad *= k; grad += normal(0, grad.std())``). ``--no-ge`` is OGM without GE.

**Training** as the official code: SGD (momentum 0.9, weight decay 1e-4), lr 1e-3, StepLR(70, 0.1);
the mechanism scales gradient magnitudes, which Adam's per-parameter normalisation largely undoes
(measured on ``av``: the strong projection moved 0.89× concat's under Adam, 0.46× under SGD).

With cached features the modulated parameters are the projections ``P_m`` (the code modulates the
encoders' convolution weights; never the fusion head).

**The T-PAMI form** (Wei, Hu, Du, Wen, T-PAMI 2024; GeWu-Lab/BML_TPAMI2024 @ 4b3aa4f, ``code/main.py
--use_modulation``, ``scripts/train_ogm.sh``; METHODS-MORE.md §2) has the same scores and eq. 10, and
differs in three ways, all reachable with options: (i) no modulation during its 6-epoch warm-up (the
code's epochs 0–5) and modulation up to its epoch 60 — ``--modulation-start 7 --modulation-end 61``;
(ii) only 4-D (convolution) weight gradients are modulated — on cached features there are none, so the
projections stay the modulated parameters; (iii) AdamW lr 5e-5, weight decay 0.01, StepLR(40, 0.1),
batch 32, α 0.8 — ``--optimizer adamw --lr 5e-5 --weight-decay 0.01 --schedule step:40:0.1
--batch-size 32``. Its code's default ``--modulation`` is ``OGM_GE``, so the T-PAMI "OGM" is ``ogm-ge``
with these settings. ``--plus 4`` is the code's ``--use_OGM_plus`` (not the paper's main method): the
dominant modality keeps k = 1 and every other scored modality's gradient is multiplied by 4 instead
(M > 2: every modality with ρ ≤ 1, choice; at an exact tie the code boosts the first modality only,
here both). GE's noise is added as without ``--plus``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE_INT
from heads.methods.base import FIELD_PROTOCOL, Training, encode
from heads.methods.concat import Concat


@dataclass
class OGMOptions:
    alpha: float = field(default=0.8, metadata={"domain": NONNEGATIVE, "help": "modulation strength α (0.8 CREMA-D, 0.1 VGGSound)"})
    coeff_form: Literal["paper", "shifted"] = field(default="paper", metadata={"help": "k = 1 − tanh(α·ρ) for ρ > 1 (paper eq. 10), or 1 − tanh(α·(ρ−1)) (shifted, not the paper's)"})
    modulation_start: int = field(default=1, metadata={"domain": POSITIVE_INT, "help": "first epoch with modulation (1-based)"})
    modulation_end: int = field(default=51, metadata={"domain": NONNEGATIVE_INT, "help": "last epoch with modulation (the code's 0–50 of 100)"})
    ge: bool = field(default=True, metadata={"help": "add Gaussian noise N(0, σ²) to the modulated gradients (GE)"})
    noise_std: Literal["unscaled", "scaled"] = field(default="unscaled", metadata={"help": "σ = std of the gradient before (code) or after scaling by k (earlier code)"})
    ratio: Literal["mean", "sum"] = field(default="mean", metadata={"help": "M > 2: ρ_m = s_m / mean of the others' s (choice), or / their sum with the first modality modulated when none exceeds 1 (MLA's code)"})
    plus: float = field(default=0.0, metadata={"domain": NONNEGATIVE, "help": "OGM+ (T-PAMI code's --use_OGM_plus): > 0 multiplies every non-dominant modality's gradient by it (code: 4) and leaves the dominant one's; 0 = off"})


def slice_confidence(z: dict[str, torch.Tensor], batch) -> torch.Tensor:
    """``[M]``: each slice's mean softmax probability of the true class over the samples that have its
    modality (eqs. 6–8 as means, see above); NaN for a modality nobody in the batch has."""
    out = []
    for m, logits in z.items():
        conf = logits.softmax(-1).gather(1, batch.y[:, None]).squeeze(1)
        rows = batch.present[m].to(conf.dtype)
        out.append((conf * rows).sum() / rows.sum())  # 0 / 0 = NaN when nobody has m
    return torch.stack(out)


def dominance(score: torch.Tensor, rule: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``ρ_m = s_m / mean of the other scored modalities' s`` (``[M]``; ``rule="sum"``: / their sum, as
    MLA's code), and where it is defined: m has a score and at least one other modality has one.
    Device code (no sync)."""
    valid = ~score.isnan()
    known = torch.where(valid, score, torch.zeros_like(score))
    others = valid.sum() - valid.to(torch.long)  # scored modalities other than m
    sum_others = known.sum() - known
    denominator = sum_others if rule == "sum" else sum_others / others.clamp_min(1)
    return known / denominator.clamp_min(1e-12), valid & (others > 0)


def coefficient(ratio: float, alpha: float, form: str = "paper") -> float:
    """``k`` of one modality from its confidence ratio ρ (eq. 10; 1 when the modality is not dominant)."""
    if ratio <= 1:
        return 1.0
    return 1.0 - math.tanh(alpha * (ratio if form == "paper" else ratio - 1.0))


class OGMGE(Concat):
    Options = OGMOptions
    summary = "concat with on-the-fly gradient modulation + generalization enhancement"
    modality_rule = "any M; for M > 2 each ρ_m compares s_m with the mean score of the others (choice; --ratio sum: MLA's code)"
    stackable = False  # its own train_step (gradient surgery between backward and step)
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "OGM-GE official main.py: SGD momentum 0.9, lr 1e-3, wd 1e-4, StepLR 70 × 0.1, batch 64, 100 epochs")

    def score_tensor(self, batch) -> torch.Tensor:
        """``[M]`` mean true-class confidence of each modality's slice over the samples that have it
        (eqs. 6–8); NaN for a modality nobody in the batch has. Stays on the device (no sync)."""
        with torch.no_grad():
            return slice_confidence(self.slices(encode(self.proj, batch)), batch)

    def coefficient_tensor(self, batch) -> torch.Tensor:
        """``[M]`` coefficients ``k_m`` (eq. 10), computed on the device: 1 for a modality without a
        score or without another scored modality, or that is not dominant (ρ ≤ 1). With ``--plus``:
        1 for the dominant modality, ``plus`` for every other scored one."""
        ratio, defined = dominance(self.score_tensor(batch), self.opts.ratio)
        dominant = defined & (ratio > 1)
        if self.opts.ratio == "sum":  # MLA's fallback: nobody dominates, so the first modality is modulated
            first = torch.arange(len(ratio), device=ratio.device) == 0
            dominant = dominant | (first & defined & ~dominant.any())
        one = torch.ones_like(ratio)
        if self.opts.plus > 0:
            return torch.where(defined & ~dominant, one * self.opts.plus, one)
        shifted = ratio if self.opts.coeff_form == "paper" else ratio - 1.0
        return torch.where(dominant, 1.0 - torch.tanh(self.opts.alpha * shifted), one)

    def scores(self, batch) -> dict[str, float]:
        """The scores as host numbers (analysis and tests; training reads the tensor)."""
        return dict(zip(self.modalities, self.score_tensor(batch).tolist()))

    def coefficients(self, batch) -> dict[str, float]:
        """``k_m`` for this batch as host numbers (1 for a modality absent from the whole batch)."""
        return dict(zip(self.modalities, self.coefficient_tensor(batch).tolist()))

    def modulating(self) -> bool:
        return self.opts.modulation_start <= self.epoch <= self.opts.modulation_end

    def train_step(self, batch):
        if not self.modulating():
            return super().train_step(batch)
        coeff = self.coefficient_tensor(batch)

        def modulate():
            for i, m in enumerate(self.modalities):
                g = self.proj[m].linear.weight.grad
                if g is None:
                    continue
                unscaled_std = g.std()
                g.mul_(coeff[i])
                if self.opts.ge:
                    std = unscaled_std if self.opts.noise_std == "unscaled" else g.std()
                    g.add_(torch.randn_like(g) * (std + 1e-8))

        loss = nn.functional.cross_entropy(self.logits(batch), batch.y)
        self.step(loss, before_step=modulate)
        return loss.detach()
