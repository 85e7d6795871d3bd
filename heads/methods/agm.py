"""``agm``: Adaptive Gradient Modulation (Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model
Performance with Adaptive Gradient Modulation", ICCV 2023; METHODS-MORE.md §10).

Source: the official code, lihong2303/AGM_ICCV2023 @ 5a65542 (``model/CREMAD_net.py::GradMod``,
``run/CREMAD_main.py::train``, ``run/MOSEI_main.py``, ``utils/config.py``); BalanceMM
(``balancemm/trainer/AGM_trainer.py`` @ 4c1482f) only for what it does differently.

**Decomposition.** GradMod computes, with gradient, ``T = f({a,v})``, ``A = f({a})``, ``V = f({v})`` and
the outputs ``m_a = ½(T − V + A)``, ``m_v = ½(T − A + V)`` (``m_a + m_v = T``); backward hooks multiply
the gradient flowing into ``m_m`` by ``k_m``. For M modalities (choice): ``m_m = φ_m(f) + f(∅)/M`` with
``φ_m`` the exact Shapley value over subsets, so ``Σ_m m_m = f(all)``; M = 2 is the official form. With
the tool's absent semantics (a missing modality's projection output is zero, so for concat
``f(S) = Σ_{m∈S} W_m h_m + b`` exactly) this is the slice logit ``z_m = W_m h_m + b/M``, and the default
``--decomposition slices`` computes ``output = Σ_m GradScale(z_m, k_m)`` in one pass: P_m's and W_m's
gradients scaled by ``k_m``, the bias's by ``mean_m k_m``. ``--decomposition subsets`` forms the 2^M
subset outputs with gradient (what a non-linear head would need); for concat it gives the same numbers
(a test pins both against GradMod written out).

**Scores and coefficients** (``CREMAD_main.py``). ``s_m = mean_i −log max(softmax(m_m(i))[y_i], 1e-8)``
(detached); ``ratio_m = exp(M/(M−1) · (mean_k s_k − s_m))``, ``opt_m`` the same from the running means
``S̄`` — for M = 2 the code's ``ratio_a = exp(s_v − s_a)``, for M > 2 its MOSEI script's mean-based form
(choice); ``k_m = exp(α · min(opt_m − ratio_m, cap))`` (the CREMA-D script's cap 10; the MOSEI script has
none: ``--clip-cap inf``). A modality whose loss is now worse, relative to the others, than its history
is boosted; one doing better than its history is damped. After k is computed the running means move:
``S̄_m ← S̄_m (t−1)/t + s_m/t``, t the global step (the code's ``(epoch−1)·n_batches + step + 1``), from 0,
across epochs; they are buffers, so checkpoints carry them. A step's coefficients act in its own backward.

**Clipping.** After backward, when an entry of the classifier weight's gradient leaves ``[−c, c]``, the
global gradient norm of every parameter is clipped to c (``--grad-clip``; the code's threshold and
max_norm are both 1).

**Window (choice).** ``--modulation-start``/``--modulation-end`` (1-based, inclusive; end 0 = the run's
last epoch, the default: the whole run; the code's argparse has epochs 0–20). Outside it k = 1 while the
running scores still update and clipping still applies, as the code computes scores and clips on every
step (it leaves its hooks at the last coefficients set, which looks unintended).

**Missing data (choice).** ``s_m`` averages the samples that have m; a batch where some modality is absent
from every sample trains as concat (k = 1, clipped) and leaves the running scores alone.

**BalanceMM differs everywhere [BUG].** At HEAD: (a) its Shapley sum skips the empty set, so for M = 2
``res_a = ½(f({a,v}) − f({v}))`` (half scale, no bias, the official ``½ f({a})`` term missing); (b) the
ratio sign is flipped, ``exp(M/(M−1)(s_m − mean s))`` in both ratio and opt, so a modality whose loss rises
above its history is suppressed and one that improves is boosted — the opposite of AGM (for M = 2 it
swaps k_a and k_v); (c) only encoder gradients are scaled, not the head's slices; (e) clip threshold and
norm 5, α 0.1, cap 7. (d) In 3f27575, the commit its results table comes from, the parameter-name test never
matched under its GPU wrapper, so nothing was scaled: BalanceMM's AGM row is concat plus clipping at 5,
reproduced here by ``--alpha 0 --grad-clip 5`` (k = e⁰ = 1) with its protocol (``--optimizer adamw --lr 1e-3
--weight-decay 0.01 --schedule step:10:0.1 --batch-size 32``). HEAD's flipped sign produced no published
number and is not offered.

**Training (choice).** The official optimizer and schedule (SGD momentum 0.9, weight decay 1e-4,
StepLR(70, 0.1)) with the field protocol's lr 1e-3 and batch 64: the code's argparse (lr 1e-5, batch 16,
10 epochs) and its README (lr 1e-4, batch 64, 100 epochs) disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT
from heads.methods.base import Training, encode
from heads.methods.concat import Concat
from heads.metrics import all_subsets, shapley_values


@dataclass
class AGMOptions:
    alpha: float = field(default=1.0, metadata={"domain": NONNEGATIVE, "help": "α in k_m = exp(α·min(opt_m − ratio_m, cap)) (official 1.0; its README for AV-MNIST 2.5; BalanceMM 0.1; 0 = no modulation)"})
    clip_cap: float = field(default=10.0, metadata={"domain": POSITIVE | (math.inf,), "help": "cap on opt_m − ratio_m (official CREMA-D script 10; its MOSEI script none: inf; BalanceMM 7)"})
    grad_clip: float = field(default=1.0, metadata={"domain": NONNEGATIVE, "help": "when a classifier-weight gradient entry leaves [−c, c], clip the global gradient norm to c (official 1; BalanceMM 5; 0 = off)"})
    modulation_start: int = field(default=1, metadata={"domain": POSITIVE_INT, "help": "first epoch with modulation (1-based)"})
    modulation_end: int = field(default=0, metadata={"domain": NONNEGATIVE_INT, "help": "last epoch with modulation (0 = the run's last; the official argparse: 20)"})
    decomposition: Literal["slices", "subsets"] = field(default="slices", metadata={"help": "each modality's output m_m: the concat head's slice z_m (exact, one pass) or the Shapley form over all 2^M subsets (same numbers, 2^M passes)"})


def coefficients(score: torch.Tensor, running: torch.Tensor, alpha: float, cap: float) -> torch.Tensor:
    """``[M]`` ``k_m = exp(α·min(opt_m − ratio_m, cap))`` from this step's scores and the running means."""
    c = len(score) / (len(score) - 1)
    ratio = torch.exp(c * (score.mean() - score))
    opt = torch.exp(c * (running.mean() - running))
    return torch.exp(alpha * (opt - ratio).clamp(max=cap))


def grad_scaled(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``t`` itself; its incoming gradient is multiplied by ``k`` (GradMod's backward hooks)."""
    t.register_hook(lambda g: g * k)
    return t


class AGM(Concat):
    Options = AGMOptions
    summary = "concat; each modality's Shapley share of the output gets a gradient scale from its loss against its running history"
    modality_rule = "M ≥ 2: Shapley shares over all subsets, losses compared with the mean of all (choice; the official code has 2)"
    stackable = False  # its own train_step: running-score buffers updated in place, gradient hooks, clipping
    training = Training("sgd", 1e-3, 1e-4, "step:70:0.1", 64,
                        "AGM official run/CREMAD_main.py + utils/config.py: SGD momentum 0.9, wd 1e-4, StepLR(70, 0.1); "
                        "lr 1e-3 and batch 64 of the field protocol (choice: its argparse says lr 1e-5, batch 16, its README lr 1e-4, batch 64)")

    def __init__(self, spec, cfg, opts):
        if len(spec.modalities) < 2:
            raise ValueError(f"agm compares each modality's loss with the others' and needs at least two modalities; "
                             f"this data has {len(spec.modalities)}: {', '.join(spec.modalities)}")
        super().__init__(spec, cfg, opts)
        self.register_buffer("running", torch.zeros(len(self.modalities)))  # S̄_m
        self.register_buffer("steps", torch.zeros(()))  # t
        self._k_sum, self._k_steps = None, 0

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self._k_sum, self._k_steps = None, 0

    def parts(self, batch) -> list[torch.Tensor]:
        """``m_m`` for every modality, with gradient (``Σ_m m_m`` = the fused logits)."""
        if self.opts.decomposition == "slices":
            return list(self.slices(encode(self.proj, batch)).values())
        f = {s: self.logits(batch.only(s)) for s in all_subsets(self.modalities)}
        phi = shapley_values(f, self.modalities)  # plain arithmetic, so it runs on tensors as well
        return [phi[m] + f[frozenset()] / len(self.modalities) for m in self.modalities]

    def scores(self, parts: list[torch.Tensor], batch) -> torch.Tensor:
        """``[M]`` ``s_m``: mean floored negative log-likelihood of ``m_m`` over the samples that have m."""
        out = []
        for m, z in zip(self.modalities, parts):
            nll = -z.detach().softmax(-1).gather(1, batch.y[:, None]).squeeze(1).clamp_min(1e-8).log()
            rows = batch.present[m].to(nll.dtype)
            out.append((nll * rows).sum() / rows.sum())
        return torch.stack(out)

    def modulating(self) -> bool:
        return self.opts.modulation_start <= self.epoch <= (self.opts.modulation_end or self.cfg.epochs)

    def coefficient_tensor(self, score: torch.Tensor) -> torch.Tensor:
        if not self.modulating():
            return torch.ones_like(score)
        return coefficients(score, self.running, self.opts.alpha, self.opts.clip_cap)

    def clip_gradients(self) -> None:
        """The code's clip: the global norm to c, only when a classifier-weight gradient entry exceeds c."""
        c = self.opts.grad_clip
        if c <= 0:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # clip_grad_norm_'s factor; below 1 whenever it applies (an entry above c puts the norm above c)
        factor = torch.where(self.cls.weight.grad.abs().amax() > c, c / (norm + 1e-6), torch.ones_like(norm))
        for g in grads:
            g.mul_(factor)

    def train_step(self, batch):
        if not all(batch.has(m) for m in self.modalities):
            loss = self.loss(batch)
            self.step(loss, before_step=self.clip_gradients)
            return loss.detach()
        parts = self.parts(batch)
        score = self.scores(parts, batch)
        k = self.coefficient_tensor(score)
        self.steps += 1
        self.running.mul_((self.steps - 1) / self.steps).add_(score / self.steps)
        loss = nn.functional.cross_entropy(sum(grad_scaled(z, k[i]) for i, z in enumerate(parts)), batch.y)
        self.step(loss, before_step=self.clip_gradients)
        self._k_sum = k if self._k_sum is None else self._k_sum + k
        self._k_steps += 1
        return loss.detach()

    def end_epoch(self, val_report):
        """``agm_k_<m>``: the epoch's mean coefficient of each modality (read once per epoch)."""
        if self._k_sum is None:
            return {}
        return {f"agm_k_{m}": k for m, k in zip(self.modalities, (self._k_sum / self._k_steps).tolist())}
