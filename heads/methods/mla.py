"""``mla``: Multimodal Learning with Alternating Unimodal Adaptation (Zhang et al., CVPR 2024).

Training (eqs. 1–5). Each modality has its own predictor ``f_m = g ∘ P_m`` with one linear head
``g`` shared by all. Every batch makes M optimizer steps, one per modality in the spec's order
(iteration t uses modality ``m_t = t mod M``); step t's loss is the cross-entropy of ``f_{m_t}`` on
the samples that have that modality (a sample's absent modality is skipped in that modality's
iteration, which is how MLA trains with missing modalities). Only ``P_{m_t}`` and ``g`` receive
gradients. The head's *weight* gradient (C × d, not its bias) is right-multiplied by the
recursive-least-squares matrix ``P`` (d × d, initialised to I, one P shared by all modalities and
kept across batches and epochs, stored as a float64 buffer):

    q = P h̄ / (α + h̄ᵀ P h̄),   P ← P − q h̄ᵀ P,     h̄ = batch mean of P_{m_t}(x) (detached)

so each row of the head's update lies in ``range(P)``, which after an update with h̄ holds
``P h̄ = P_old h̄ · α / (α + h̄ᵀ P_old h̄)``: the update is orthogonal to the previous iterations'
mean features up to that factor (exactly so as α → 0). The guarantee is about the *gradient*: with
plain SGD (no momentum, no weight decay) the weight update inherits it exactly; Adam's per-coordinate
scaling, momentum and weight decay act after the modification and break exact orthogonality.
The very first step is unmodified (eq. 3, t = 0).

Paper vs public code (defaults follow METHODS.md's reading of the paper; each difference is an option):

- ``--p-update after`` (default): P is updated with iteration t's h̄ after its step and applied from
  iteration t + 1 on, so step t + 1 is orthogonal to the previous modality's features.
  ``before``: the public code's order (P updated with the current batch, then applied to the
  current gradient; the paper's Algorithm 1 also lists "compute P_t" before "update φ").
- ``--alpha-schedule constant`` (default): α fixed (``--alpha``, default 0.1; the paper gives no value,
  0.1 is the public code's starting value). ``code``: ``α · 0.1^(b / n_b)`` with b the batch index
  within the epoch and n_b the number of batches per epoch, i.e. 0.1 → 0.01 within each epoch as in
  the public code. The method cannot see the data size, so n_b is counted in the first epoch; during
  epoch 1 α stays at its base value (choice).
- ``--frobenius`` (off by default): divide P by its Frobenius norm after each update, as the public
  code does. P ≈ I − (low rank) has ‖P‖_F ≈ √d, so this shrinks the modified gradient by about 1/√d
  (1/16 at d = 256) while hardly changing its direction; with Adam (scale-invariant) that is close to
  a no-op, with SGD it is a 16× smaller head learning rate. ``end_epoch`` logs the measured
  ``mla_grad_ratio`` (‖G'‖/‖G‖) and ``mla_grad_cos`` (cosine of G' and G), averaged over the epoch.
- ``--gradient replace`` (default; paper and official code): ``G ← G P``.
  ``add``: ``G ← G + G P`` (the BalanceMM toolkit).
  (P stays symmetric, so ``G P`` and the code's ``G Pᵀ`` agree.)
- Ablations of the paper's Table 3: ``--no-modify-head`` (no head gradient modification, HGM),
  ``--no-dynamic-fusion`` (equal-weight mean of the present modalities' logits instead of DF).

Inference (eqs. 6–8): per sample, ``e_m = −Σ_c p_mc log p_mc`` from ``log_softmax`` (stable; never
per batch), ``λ_m = softmax_m(max_v e_v − e_m)`` over the sample's present modalities only, and the
prediction is ``Σ_m λ_m f_m(x_m)`` (logits). With one present modality that is its own ``f_m``,
which is MLA's unimodal accuracy v({m}); several present modalities give the fused v(S).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.domains import POSITIVE
from heads.methods.base import HeadMethod, Training, projections


@dataclass
class MLAOptions:
    alpha: float = field(default=0.1, metadata={"domain": POSITIVE, "help": "RLS regulariser α of eq. 5 (base value of the code schedule)"})
    alpha_schedule: Literal["constant", "code"] = field(default="constant", metadata={"help": "constant α (paper) or α·0.1^(batch/n_batches) within each epoch (public code)"})
    frobenius: bool = field(default=False, metadata={"help": "divide P by its Frobenius norm after each update (public code; ~1/√d smaller gradient)"})
    gradient: Literal["replace", "add"] = field(default="replace", metadata={"help": "G ← G·P (paper, official code) or G ← G + G·P (BalanceMM)"})
    p_update: Literal["after", "before"] = field(default="after", metadata={"help": "update P after the step and apply it from the next iteration (paper), or before applying it (public code)"})
    modify_head: bool = field(default=True, metadata={"help": "head gradient modification (HGM); --no-modify-head for the ablation"})
    dynamic_fusion: bool = field(default=True, metadata={"help": "entropy-weighted test-time fusion (DF); --no-dynamic-fusion averages logits"})


def entropy_weights(logits: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
    """MLA's fusion weights λ ``[M, B]`` (eqs. 7–8), per sample, over each sample's present modalities.

    ``e_m = −Σ p log p`` with ``log p = log_softmax`` (finite for any logits); ``λ_m = softmax_m(max_v e_v − e_m)``
    where the max and the softmax run over the present modalities only; absent ones get weight 0.
    A sample with no present modality gets all-zero weights.
    """
    mods = list(logits)
    logp = torch.stack([logits[m].log_softmax(-1) for m in mods])  # [M, B, C]
    entropy = -(logp.exp() * logp).sum(-1)  # [M, B]
    mask = torch.stack([present[m] for m in mods])  # [M, B]
    top = entropy.masked_fill(~mask, float("-inf")).amax(0, keepdim=True)
    score = (top - entropy).masked_fill(~mask, float("-inf"))
    score = torch.where(mask.any(0, keepdim=True), score, torch.zeros_like(score))  # no modality: no NaN
    return score.softmax(0) * mask


class MLA(HeadMethod):
    Options = MLAOptions
    summary = "alternating unimodal steps, shared head with RLS gradient projection, entropy-weighted fusion"
    training = Training("sgd", 1e-3, 1e-4, "step:70:0.1", 64,
                        "MLA paper §A (SGD momentum 0.9, lr 1e-3, decay 0.1, batch 64) and official main.py "
                        "(weight decay 1e-4, StepLR 70 × 0.1 per epoch, 100 epochs)")

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.proj = projections(spec, cfg.hidden)
        self.head = nn.Linear(cfg.hidden, spec.num_classes)
        self.register_buffer("P", torch.eye(cfg.hidden, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimizer steps so far (t)
        self.batches_per_epoch = 0  # counted during the first epoch (for the code α schedule)
        self._batch_index = 0
        self._stats = {"ratio": 0.0, "cos": 0.0, "n": 0}

    # --- training ------------------------------------------------------------------------------
    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self._steps_host = int(self.steps)  # a host copy of t, read once per epoch (no sync per batch)
        self._batch_index = 0
        self._stats = {"ratio": 0.0, "cos": 0.0, "n": 0}

    def _host_steps(self) -> int:
        """``t`` known on the host (the buffer is read only when no epoch has set the copy)."""
        if getattr(self, "_steps_host", None) is None:
            self._steps_host = int(self.steps)
        return self._steps_host

    def current_alpha(self) -> float:
        if self.opts.alpha_schedule == "constant" or not self.batches_per_epoch:
            return self.opts.alpha
        return self.opts.alpha * 0.1 ** (self._batch_index / self.batches_per_epoch)

    def update_P(self, h_mean: torch.Tensor) -> None:
        """One RLS step of eq. 5 with the batch-mean feature ``h_mean`` ``[d]``.

        (``with torch.no_grad()`` inside rather than as a decorator: mutation testing skips decorated
        functions, and these two are the method's mechanism.)
        """
        with torch.no_grad():
            h = h_mean.to(self.P.dtype)
            Ph = self.P @ h
            q = Ph / (self.current_alpha() + h @ Ph)
            self.P -= torch.outer(q, h @ self.P)
            if self.opts.frobenius:
                self.P /= self.P.norm()

    def modify_head_gradient(self) -> None:
        """``∇W ← ∇W·P`` (or ``∇W + ∇W·P``) on the head's weight only; skipped at the first step."""
        grad = self.head.weight.grad
        if not self.opts.modify_head or grad is None or self._host_steps() == 0:
            return
        with torch.no_grad():
            new = grad @ self.P.to(grad.dtype)
            if self.opts.gradient == "add":
                new = grad + new
            self._stats["ratio"] += (new.norm() / grad.norm().clamp_min(1e-30)).detach()  # summed on the device
            self._stats["cos"] += nn.functional.cosine_similarity(new.flatten(), grad.flatten(), dim=0).detach()
            self._stats["n"] += 1
            grad.copy_(new)

    def train_step(self, batch):
        total, count = torch.zeros((), device=batch.y.device), 0
        for m in self.modalities:
            rows = batch.present[m]
            if not batch.has(m):
                continue  # nobody in this batch has modality m: no iteration for it
            x, y = (batch.x[m], batch.y) if batch.full(m) else (batch.x[m][rows], batch.y[rows])
            h = self.proj[m](x)
            loss = nn.functional.cross_entropy(self.head(h), y)
            h_mean = h.detach().mean(0)
            if self.opts.p_update == "before":
                self.update_P(h_mean)
            self.step(loss, before_step=self.modify_head_gradient)
            if self.opts.p_update == "after":
                self.update_P(h_mean)
            self.steps += 1
            self._steps_host = self._host_steps() + 1
            total, count = total + loss.detach(), count + 1
        self._batch_index += 1
        return total / max(count, 1)

    def end_epoch(self, val_report):
        if self.epoch == 1:
            self.batches_per_epoch = self._batch_index
        n = max(self._stats["n"], 1)
        return {"mla_grad_ratio": float(self._stats["ratio"]) / n, "mla_grad_cos": float(self._stats["cos"]) / n}

    # --- inference -----------------------------------------------------------------------------
    def unimodal_logits(self, batch) -> dict[str, torch.Tensor]:
        """``f_m(x_m) = g(P_m(x_m))`` for every modality (rows where m is absent are ignored by fusion)."""
        return {m: self.head(self.proj[m](batch.x[m])) for m in self.modalities}

    def fusion_weights(self, batch, logits=None) -> torch.Tensor:
        logits = logits if logits is not None else self.unimodal_logits(batch)
        if self.opts.dynamic_fusion:
            return entropy_weights(logits, batch.present)
        mask = torch.stack([batch.present[m] for m in logits]).to(next(iter(logits.values())).dtype)
        return mask / mask.sum(0, keepdim=True).clamp_min(1)

    def logits(self, batch):
        logits = self.unimodal_logits(batch)
        weights = self.fusion_weights(batch, logits)  # [M, B]
        return (weights.unsqueeze(-1) * torch.stack([logits[m] for m in self.modalities])).sum(0)
