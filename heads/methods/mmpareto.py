"""``mmpareto``: MMPareto (Wei & Hu, ICML 2024, "MMPareto: Boosting Multimodal Learning with Innocent
Unimodal Assistance").

Source: the paper's method as its official code implements it (GeWu-Lab/MMPareto_ICML2024,
``code/MMPareto.py``, ``code/min_norm_solvers.py``, ``code/models/models.py``); the equations below
follow that code line by line. The paper's text (equation numbers) could not be read here, only its
abstract: "a final gradient with direction common to all learning objectives and enhanced magnitude".

**Model** (``models.py``, ``AVClassifier``): the concat classifier of ``concat`` (the multimodal
objective) plus one linear head per modality on its own projection (the unimodal objectives).
Inference is the concat classifier alone (the code's ``out``), so v(S) is concat's: the absent
modalities' projections are zero. The unimodal heads only train.

**Losses.** ``L_mm = CE(concat(h), y)`` over the batch; ``L_m = CE(head_m(h_m), y)`` over the samples
that have m (choice for missing data; the code has complete data).

**Gradient integration, per modality m** (the code's ``train_epoch``). The shared parameters of
``L_mm`` and ``L_m`` are m's encoder; with cached features that is the projection ``P_m`` (weight and
bias, choice). With ``g_mm`` and ``g_m`` the gradients of ``L_mm`` and ``L_m`` on ``P_m``'s parameters,
flattened and concatenated:

- direction: if ``cos(g_mm, g_m) > 0`` the weights are ``(k_mm, k_m) = (½, ½)``; otherwise the
  min-norm (MGDA) point of the two, ``min_k ‖k g_mm + (1−k) g_m‖²`` over ``k ∈ [0, 1]``, whose closed form
  for two vectors is ``k_mm = clip((g_m − g_mm)·g_m / ‖g_mm − g_m‖², 0, 1)``, ``k_m = 1 − k_mm``
  (``MinNormSolver._min_norm_element_from2``; with conflicting gradients the code's 0.001/0.999 edge
  cases cannot occur, so the clip is the same);
- per parameter tensor p of ``P_m``: ``ĝ = 2 (k_mm g_mm[p] + k_m g_m[p])`` (equal weights give the plain
  sum), and magnitude: ``g[p] = γ · max(‖g_mm[p] + g_m[p]‖ / ‖ĝ‖, 1) · ĝ`` — the code rescales ĝ to the
  norm of the plain sum when that is larger (``diff = three_norm / new_norm``, applied only when > 1)
  and multiplies by ``γ = 1.5`` (hard-coded there; ``--boost``). The norms are per parameter tensor
  and the weights per modality, as in the code.

Every other parameter (the heads) gets the plain gradient of ``L_mm + Σ_m L_m``, as the code's
``loss_mm + loss_a + loss_v`` backward leaves it on its ``head*`` parameters.

**M > 2**: each projection still serves exactly two objectives (the multimodal loss and its own
unimodal loss), so the rule is unchanged.

**Training** as the official script: SGD momentum 0.9, weight decay 1e-4, lr 2e-3, batch 64, 50 epochs.
The script builds ``StepLR(30, 0.1)`` but never calls ``scheduler.step()``, so its rate stays 2e-3: the
default schedule here is ``none`` (what the code runs; ``--schedule step:30:0.1`` for the evident intent).

``end_epoch`` logs ``mmpareto_conflict_<m>``: the fraction of steps whose two gradients conflicted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heads.blocks.domains import POSITIVE
from heads.methods.base import Training, encode
from heads.methods.concat import Concat


@dataclass
class MMParetoOptions:
    boost: float = field(default=1.5, metadata={"domain": POSITIVE, "help": "γ: the integrated gradient is multiplied by it (official code: 1.5; 1 = no boost)"})
    rescale: bool = field(default=True, metadata={"help": "rescale the integrated gradient to the plain sum's norm when that is larger (--no-rescale: direction only)"})


def pareto_weights(g_mm: torch.Tensor, g_uni: torch.Tensor) -> torch.Tensor:
    """``[k_mm, k_m]`` for two flat gradients: ½, ½ when their cosine is positive, else the min-norm
    point of their convex hull. Tensor code only (no host synchronisation)."""
    diff = g_mm - g_uni
    k = ((g_uni - g_mm) @ g_uni) / (diff @ diff).clamp_min(1e-30)
    k = k.clamp(0.0, 1.0)
    cos = nn.functional.cosine_similarity(g_mm, g_uni, dim=0, eps=1e-30)
    k_mm = torch.where(cos > 0, torch.full_like(k, 0.5), k)
    return torch.stack([k_mm, 1.0 - k_mm])


class MMPareto(Concat):
    Options = MMParetoOptions
    summary = "concat + unimodal heads; per projection, Pareto (min-norm) weights when the two gradients conflict, magnitude kept and boosted"
    modality_rule = "any M: each projection integrates two gradients, the multimodal loss's and its own unimodal loss's"
    training = Training("sgd", 2e-3, 1e-4, "none", 64,
                        "MMPareto official MMPareto.py: SGD momentum 0.9, lr 2e-3, wd 1e-4, batch 64, 50 epochs; "
                        "its StepLR(30, 0.1) is never stepped, so the rate is constant", epochs=50)

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.uni = nn.ModuleDict({m: nn.Linear(cfg.hidden, spec.num_classes) for m in self.modalities})
        self._conflicts = None
        self._steps = 0

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self._conflicts, self._steps = None, 0

    def losses(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_mm`` and ``{m: L_m}`` for the modalities some sample of the batch has."""
        h = encode(self.proj, batch)
        loss_mm = nn.functional.cross_entropy(self.cls(torch.cat([h[m] for m in self.modalities], 1)), batch.y)
        uni = {}
        for m in self.modalities:
            if not batch.has(m):
                continue
            per_sample = nn.functional.cross_entropy(self.uni[m](h[m]), batch.y, reduction="none")
            rows = batch.present[m].to(per_sample.dtype)
            uni[m] = (per_sample * rows).sum() / rows.sum().clamp_min(1)
        return loss_mm, uni

    def integrate(self, g_mm: list[torch.Tensor], g_uni: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The integrated gradients of one projection's parameters, and whether the two conflicted."""
        flat_mm, flat_uni = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_uni])
        k = pareto_weights(flat_mm, flat_uni)
        out = []
        for a, b in zip(g_mm, g_uni):
            new = 2 * (k[0] * a + k[1] * b)
            scale = torch.ones((), device=new.device)
            if self.opts.rescale:
                scale = torch.maximum((a + b).norm() / new.norm().clamp_min(1e-30), scale)
            out.append(self.opts.boost * scale * new)
        conflict = nn.functional.cosine_similarity(flat_mm, flat_uni, dim=0, eps=1e-30) <= 0
        return out, conflict

    def train_step(self, batch):
        loss_mm, uni = self.losses(batch)
        shared = {m: list(self.proj[m].parameters()) for m in uni}
        params = [p for m in uni for p in shared[m]]
        grads_mm = torch.autograd.grad(loss_mm, params, retain_graph=True) if params else ()
        grads_mm = dict(zip(map(id, params), grads_mm))
        grads_uni = {m: torch.autograd.grad(uni[m], shared[m], retain_graph=True) for m in uni}
        total = loss_mm + sum(uni.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()  # the heads keep this plain sum; each projection's gradient is replaced below
        conflicts = torch.zeros(len(self.modalities), device=batch.y.device)
        with torch.no_grad():
            for i, m in enumerate(self.modalities):
                if m not in uni:
                    continue
                new, conflicts[i] = self.integrate([grads_mm[id(p)] for p in shared[m]], list(grads_uni[m]))
                for p, g in zip(shared[m], new):
                    p.grad = g
        self.optimizer.step()
        self._conflicts = conflicts if self._conflicts is None else self._conflicts + conflicts
        self._steps += 1
        return total.detach()

    def end_epoch(self, val_report):
        if self._conflicts is None:
            return {}
        share = (self._conflicts / max(self._steps, 1)).tolist()
        return {f"mmpareto_conflict_{m}": s for m, s in zip(self.modalities, share)}
