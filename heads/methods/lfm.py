"""``lfm``: Learning the modality gap dynamically (Yang, Wan, Jiang & Xu, NeurIPS 2024, "Facilitating
Multimodal Classification via Dynamically Learning Modality Gap").

Sources: the official repository njustkmg/NeurIPS24-LFM (its git history: ``Crema_ours.py`` of the first
release, f3af6ea of 2024-11-30, and ``Crema_epoch.py`` / ``Crema_epoch_learnable.py`` / ``model/AudioVideo.py``
of the current one, ad44fa0 of 2025-01-21), BalanceMM's ``balancemm/trainer/LFM_trainer.py``
(GeWu-Lab/BalanceBenchmark c1ce5a8) and the paper's abstract. The paper's body (its equation numbers) could not be read
here, so the equations are named by what they do and where the code has them.

**Model** (``AudioVideo.py``): one linear classifier per modality on its projection, ``f_m = W_m h_m + b_m``;
the multimodal prediction is the mean of the unimodal logits (the code's ``0.5·o_a + 0.5·o_v``). v(S)
averages the logits of the present modalities only (choice: the mean over S, as the code's mean over
both; a sample's absent modality does not vote).

**Objective** — the paper's "dynamic integration of unsupervised contrastive learning and supervised
multimodal learning", heuristic strategy (the first release's ``getAlpha_heritic``):

    L = α_t · L_ctr + (1 − α_t) · L_cls,      α_t = clip(exp(−a·t), 0.05, 0.95),  a = 0.3,

t the 0-based epoch (our epoch − 1): the contrastive term dominates the first epochs (α = 0.95 at
t = 0, 0.74 at t = 1) and fades to its floor 0.05 from t = 10 on.

- ``L_cls = CE(mean_m f_m, y)`` (supervised multimodal learning).
- ``L_ctr`` (``--matching code``, the default): what every release's code *executes*,
  ``½ [KL(m‖p) + KL(m‖q)]`` with ``p, q`` the two unimodal softmax predictions and ``m = (p + q)/2``
  (per sample, batch mean). The code's ``F.kl_div(p.log(), m, 'batchmean')`` is ``KL(m‖p)``: the
  target m comes first. The first release defines three module-level ``def Alignment`` (InfoNCE of the
  features, a softmax-similarity CE, then this divergence) and Python keeps the last, so its
  ``Alignment(a_f, v_f)`` ran the divergence on softmaxed *features*; the current release
  (``Crema_epoch.py``, ad44fa0) and BalanceMM apply it to the unimodal *logits* ``Alignment(o_a, o_v)``,
  which is what this default follows (the release we follow for the objective; the α schedule is the
  first release's heuristic one, below). This is not the Jensen–Shannon divergence (``js``): the
  mean sits in the first argument (``tests/test_baselines_b.py`` pins both on one example).
- ``--matching infonce`` (this tool's default before, the name the first release's first, dead
  ``Alignment`` suggests): the symmetric InfoNCE of the L2-normalised projections,
  ``S_ij = ĥ_a,i · ĥ_b,j / τ`` (τ = 0.07), ``L_ctr = ½ [CE(S, diag) + CE(Sᵀ, diag)]``: sample i's other
  modality is its positive, the batch's other samples its negatives. With cached features the
  encoders' outputs are the projections ``P_m`` (choice).
- ``--matching js``: the Jensen–Shannon divergence ``½ [KL(p‖m) + KL(q‖m)]`` of the two unimodal
  predictions — the quantity the code's variable name ``js_score`` promises, not the one it computes.

Missing data (every form): only samples that have both modalities enter a pair's term (for InfoNCE
its rows and columns), choice.

Not implemented: the paper's learning-based strategy (a bi-level update of α; the current release fits
its learned curve on CREMA-D with a degree-5 polynomial of the epoch). The heuristic strategy is the
paper's "simple yet heuristic" one.

**M > 2** (choice): ``L_ctr`` is the mean of the pairwise terms over all modality pairs, ``L_cls`` uses
the mean of the M logits.

**Training**: SGD momentum 0.9, weight decay 1e-4, lr 1e-3 (``data/crema.json`` as of the heuristic
release; the current release uses 1e-2 with its fitted weights), batch 64, ``StepLR(70, 0.1)`` stepped
*before* each epoch, so the rate drops after 69 epochs: ``step:69:0.1``. The first release fine-tuned
unimodally pretrained encoders (``getPretrain.py``) for 20 epochs, the current one trains from scratch
for 200 (``epoch_dict``); heads here train from scratch, so 200 epochs (choice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, POSITIVE
from heads.methods.base import Training, encode
from heads.methods.late import Late

_MASKED = -1e4  # a similarity no pair reaches (|S| ≤ 1/τ)


@dataclass
class LFMOptions:
    decay: float = field(default=0.3, metadata={"domain": NONNEGATIVE, "help": "a in α_t = clip(exp(−a·t), 0.05, 0.95), the contrastive weight at 0-based epoch t"})
    matching: Literal["code", "infonce", "js"] = field(default="code", metadata={"help": "alignment term: code = ½[KL(m‖p)+KL(m‖q)] of the unimodal predictions (what the official code runs), infonce = InfoNCE of the projections, js = Jensen–Shannon ½[KL(p‖m)+KL(q‖m)]"})
    temperature: float = field(default=0.07, metadata={"domain": POSITIVE, "help": "τ of the InfoNCE similarities"})


def contrastive_weight(epoch: int, decay: float) -> float:
    """``α_t = clip(exp(−a·t), 0.05, 0.95)`` with ``t = epoch − 1`` (the code counts epochs from 0)."""
    return min(max(math.exp(-decay * (epoch - 1)), 0.05), 0.95)


def info_nce(h_a: torch.Tensor, h_b: torch.Tensor, both: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE of two modalities' features over the samples ``both`` marks (rows and columns)."""
    u, v = nn.functional.normalize(h_a, dim=1), nn.functional.normalize(h_b, dim=1)
    sim = (u @ v.T) / tau
    keep = both[None, :] & both[:, None]
    sim = torch.where(keep, sim, torch.full_like(sim, _MASKED))
    target = torch.arange(len(sim), device=sim.device)
    rows = both.to(sim.dtype)
    per_row = nn.functional.cross_entropy(sim, target, reduction="none") + nn.functional.cross_entropy(sim.T, target, reduction="none")
    return 0.5 * (per_row * rows).sum() / rows.sum().clamp_min(1)


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, both: torch.Tensor,
                  mean_first: bool = False) -> torch.Tensor:
    """``½ [KL(p‖m) + KL(q‖m)]``, m = (p + q)/2, per sample, averaged over the samples ``both`` marks;
    ``mean_first``: ``½ [KL(m‖p) + KL(m‖q)]``, what the official ``Alignment`` computes."""
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    if mean_first:
        kl = lambda lp: (logm.exp() * (logm - lp)).sum(-1)  # noqa: E731
    else:
        kl = lambda lp: (lp.exp() * (lp - logm)).sum(-1)  # noqa: E731
    rows = both.to(logp.dtype)
    return (0.5 * (kl(logp) + kl(logq)) * rows).sum() / rows.sum().clamp_min(1)


class LFM(Late):
    Options = LFMOptions
    summary = "unimodal heads, mean-logit fusion; CE and a cross-modal alignment term (the code's KL to the mean prediction), its weight decaying per epoch"
    modality_rule = "any M: the contrastive term averages all modality pairs, the prediction averages the M logits (choice)"
    stackable = True
    training = Training("sgd", 1e-3, 1e-4, "step:69:0.1", 64,
                        "LFM official code (data/crema.json, Crema_ours.py): SGD momentum 0.9, lr 1e-3, wd 1e-4, batch 64, "
                        "StepLR(70, 0.1) stepped before each epoch (drop after 69); 200 epochs from scratch "
                        "(the current release's epoch_dict)", epochs=200)

    def alpha(self) -> float:
        return contrastive_weight(self.epoch or 1, self.opts.decay)

    def fuse(self, batch, h: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean of the present modalities' logits, per sample."""
        logits = torch.stack([self.cls[m](h[m]) for m in self.modalities])  # [M, B, C]
        mask = torch.stack([batch.present[m] for m in self.modalities]).to(logits.dtype)  # [M, B]
        return (logits * mask[..., None]).sum(0) / mask.sum(0).clamp_min(1)[:, None]

    def logits(self, batch):
        return self.fuse(batch, encode(self.proj, batch))

    def matching_loss(self, batch, h: dict[str, torch.Tensor]) -> torch.Tensor:
        """``L_ctr``: the mean over modality pairs that some sample of the batch has both of."""
        terms = []
        for i, m in enumerate(self.modalities):
            for n in self.modalities[i + 1:]:
                if not (batch.has(m) and batch.has(n)):
                    continue
                both = batch.present[m] & batch.present[n]
                if self.opts.matching == "infonce":
                    terms.append(info_nce(h[m], h[n], both, self.opts.temperature))
                else:
                    terms.append(js_divergence(self.cls[m](h[m]), self.cls[n](h[n]), both,
                                               mean_first=self.opts.matching == "code"))
        return torch.stack(terms).mean() if terms else torch.zeros((), device=batch.y.device)

    def loss(self, batch):
        h = encode(self.proj, batch)
        alpha = self.alpha()
        return alpha * self.matching_loss(batch, h) + (1 - alpha) * nn.functional.cross_entropy(self.fuse(batch, h), batch.y)
