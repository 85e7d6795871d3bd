"""``crmt``: Certifiable Robust Multi-modal Training, CRMT-JT (Yang, Wei, Liang & Hu, ICLR 2024,
"Quantifying and Enhancing Multi-modal Robustness with Modality Preference").

Source: the official repository GeWu-Lab/Certifiable-Robust-Multi-modal-Training (``train.py``:
``train_CRMT_JT``, ``get_lip``, ``the_second_step``; ``models/fusion_model.py``: ``OrthFusion``,
``orthogonal_linear``, ``OWNNorm``; ``cfgs/``) and its README, which states the two steps' objectives.
(The code is under GeWu-Lab; no njustkmg/ICLR24-CRMT repository could be found.) The paper's body could
not be read here; the ablation literature cites its step-1 objective as eq. 12 and the certified bound
as eq. 10, the numbers used below.

**Model** (orthogonal-based framework, ``OrthFusion``): concat's classifier ``W = [W_1 … W_M]``, ``b``,
with each modality's block row-normalised — ``W̃_m[k] = c_k / ‖c_k‖`` with ``c_k = W_m[k] − mean(W_m[k])``
(what ``OWNNorm(norm_groups = C)`` computes: one row per group, centred and whitened, i.e. scaled to
unit norm; the rows are not made orthogonal to each other) — and a learnable integration weight per
modality and class, ``a_m ∈ R^C`` (initialised 0.1). Unimodal scores ``s_m = W̃_m h_m`` (no bias),
logits ``z = Σ_m a_m ⊙ s_m + b``. An absent modality's ``h_m`` is zero, so v(S) sums the present ones.

**Step 1** (joint training, eq. 12, README): ``L_1 = CE(z, y) + ρ · mean_i log(Σ_m Σ_{k≠y} exp(s_m,k − s_m,y) + ε)``,
ρ = 2.0 (``cfgs/methods/CRMT_JT.yaml`` since the authors' "Update the configs." commit 9f42759, unchanged at
their HEAD 5c17d92; the initial commit's ρ = 1 is ``--rho 1``), all parameters (a included) trained. ε = 1e-5 is the code's
(``log(Σ_m (Σ_k e^{s_k} e^{−s_y} − 1) + 1e-5)``), kept because it floors the term at log ε ≈ −11.5: the
push on the margins stops there instead of growing the features forever. Computed as
``logaddexp(logsumexp(gaps), log ε)`` (stable, same value). Missing data: a sample's term sums its
present modalities (choice).

**Lipschitz constants** (``get_lip``): after step 1, ``τ_m,k = max_i ‖∂ s_m,k(x_i) / ∂ x_m‖`` over the
training set, w.r.t. the cached (standardised) feature that enters ``P_m``. Choices: the gradient is of
the unimodal score ``s_m,k`` (the quantity the bound multiplies by ``a_m,k``; the code differentiates the
fused logit, which already contains ``a``, and does not reset the visual input's gradient between
classes). The sweep is the first epoch of step 2: it computes τ from every training batch and changes
no parameter (the core's loop hands a method batches, not the data set).

**Step 2** (eq. 10, ``the_second_step``): ``W̃``, ``P_m``, ``b`` fixed; only ``a`` moves, minimising
``L_2 = −mean_i r(x_i)`` with the certified lower bound

    r(x) = (Σ_m [a_m,y s_m,y − a_m,j s_m,j] + b_y − b_j) / sqrt(Σ_m (a_m,y τ_m,y + a_m,j τ_m,j)²),

``j`` the highest-scoring wrong class of ``z``, the scores ``s`` and the bias detached. Optimizer as the
code: SGD on ``a`` with lr 0.03 × the run's base lr, momentum 0.9, weight decay 1e-2, rebuilt every epoch.
Missing data: the sums run over the sample's present modalities (choice).

**Epochs**: the code runs step 1 for ``n_epochs`` and then ``range(1, n_epochs // 3)``, i.e.
``n_epochs // 3 − 1`` epochs of step 2; since 9f42759 ``n_epochs`` is 140 (``cfgs/train.yaml``), so
140 + 45 — the default run here (185 epochs, the Lipschitz sweep counted as step 2's first epoch,
choice: the core's loop hands a method batches, so the sweep takes an epoch). ``--second-step-epochs``
(−1 = the same share of any other ``--epochs``, 45/185 rounded: ``--epochs 100`` is 76 + 1 + 23; the
initial commit's 100 + 32 is ``--epochs 132 --second-step-epochs 32``, and this tool's earlier
quarter rule ``--second-step-epochs 25`` at 100) ends the run. The core selects the best epoch on
validation over both steps.

**M > 2**: the paper's sums over m run over all M modalities (choice: the paper and code have two).

**Training** (step 1) as ``cfgs/`` at 9f42759: SGD momentum 0.9, lr 1e-3, weight decay 1e-4,
``StepLR(60, 0.1)`` stepped after each epoch (the initial commit's 40 is ``--schedule step:40:0.1``),
batch 64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE
from heads.methods.base import Training, encode
from heads.methods.concat import Concat

_LOG_EPS = math.log(1e-5)  # the code's ε inside the margin term's log


@dataclass
class CRMTOptions:
    rho: float = field(default=2.0, metadata={"domain": NONNEGATIVE, "help": "ρ: weight of the unimodal margin regulariser in step 1 (eq. 12; configs since 9f42759: 2.0, initial commit 1.0)"})
    second_step_epochs: int = field(default=-1, metadata={"domain": NONNEGATIVE_INT | (-1,), "help": "epochs of step 2 at the end of the run, the Lipschitz sweep included; -1 = 45/185 of the run (45 of the default 185), 0 = step 1 only"})
    a_lr_factor: float = field(default=0.03, metadata={"domain": POSITIVE, "help": "step 2's learning rate for the integration weights a, as a multiple of the base lr (code: 0.03)"})
    a_weight_decay: float = field(default=1e-2, metadata={"domain": NONNEGATIVE, "help": "step 2's weight decay on a (code: 1e-2)"})


def orthonormal_rows(w: torch.Tensor) -> torch.Tensor:
    """Each row centred over its entries and scaled to unit norm (``OWNNorm`` with one row per group)."""
    c = w - w.mean(dim=1, keepdim=True)
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)


class CRMT(Concat):
    Options = CRMTOptions
    summary = "orthogonal-framework concat; step 1 CE + unimodal margin regulariser, step 2 integration weights a raise the certified bound"
    modality_rule = "any M: margins and the certified bound sum over all modalities (choice; the paper has two)"
    training = Training("sgd", 1e-3, 1e-4, "step:60:0.1", 64,
                        "CRMT official cfgs at 9f42759 \"Update the configs.\" (train.yaml, optimizer/SGD.yaml, "
                        "scheduler/step_decay.yaml): SGD momentum 0.9, lr 1e-3, wd 1e-4, StepLR(60, 0.1), batch 64, "
                        "140 epochs of step 1 then 140 // 3 − 1 = 45 of step 2",
                        epochs=185, stages=(140, 45))

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.a = nn.ParameterDict({m: nn.Parameter(torch.full((spec.num_classes,), 0.1)) for m in self.modalities})
        self.register_buffer("lipschitz", torch.zeros(len(self.modalities), spec.num_classes))
        k = opts.second_step_epochs
        joint, second = type(self).training.stages  # (self.training is nn.Module's train/eval flag)
        self.second_step_epochs = round(cfg.epochs * second / (joint + second)) if k < 0 else k
        if self.second_step_epochs >= cfg.epochs:
            raise ValueError(f"crmt: --second-step-epochs {k} leaves no joint training in a run of {cfg.epochs} epochs; "
                             f"give fewer than --epochs")
        self.first_step_epochs = cfg.epochs - self.second_step_epochs
        self.phase = "joint"
        self.a_optimizer: torch.optim.Optimizer | None = None

    # --- the model -----------------------------------------------------------------------------
    def unimodal_scores(self, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``s_m = W̃_m h_m`` for every modality (zero rows where m is absent)."""
        d = self.cfg.hidden
        return {m: h[m] @ orthonormal_rows(self.cls.weight[:, i * d:(i + 1) * d]).T for i, m in enumerate(self.modalities)}

    def combine(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.a[m] * scores[m] for m in self.modalities) + self.cls.bias

    def logits(self, batch):
        return self.combine(self.unimodal_scores(encode(self.proj, batch)))

    # --- step 1 --------------------------------------------------------------------------------
    def margin_term(self, batch, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """``mean_i log(Σ_m Σ_{k≠y} exp(s_m,k − s_m,y) + ε)`` over the sample's present modalities (eq. 12)."""
        rows = torch.arange(len(batch.y), device=batch.y.device)
        parts = []
        for m in self.modalities:
            s = scores[m]
            gap = s - s[rows, batch.y][:, None]
            gap = gap.masked_fill(nn.functional.one_hot(batch.y, s.shape[1]).bool(), float("-inf"))
            gap = gap.masked_fill(~batch.present[m][:, None], float("-inf"))
            parts.append(gap)
        every = torch.cat(parts, 1)  # [B, M·C]
        has_any = torch.isfinite(every).any(1)
        every = torch.where(has_any[:, None], every, torch.zeros_like(every))  # no modality: no term, no NaN
        per_sample = torch.logaddexp(torch.logsumexp(every, 1), torch.full_like(every[:, 0], _LOG_EPS))
        return (per_sample * has_any).sum() / has_any.sum().clamp_min(1)

    def loss(self, batch):
        scores = self.unimodal_scores(encode(self.proj, batch))
        return nn.functional.cross_entropy(self.combine(scores), batch.y) + self.opts.rho * self.margin_term(batch, scores)

    # --- the steps -----------------------------------------------------------------------------
    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        if epoch <= self.first_step_epochs:
            self.phase = "joint"
        elif epoch == self.first_step_epochs + 1:
            self.phase = "sweep"
            self.lipschitz.zero_()
        else:
            self.phase = "bound"
            params = list(self.a.values())
            self.a_optimizer = torch.optim.SGD(params, lr=self.cfg.lr * self.opts.a_lr_factor, momentum=0.9,
                                               weight_decay=self.opts.a_weight_decay)

    def train_step(self, batch):
        if self.phase == "joint":
            return super().train_step(batch)
        if self.phase == "sweep":
            self.sweep_lipschitz(batch)
            with torch.no_grad():
                return nn.functional.cross_entropy(self.logits(batch), batch.y)
        loss = self.bound_loss(batch)
        self.a_optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.a.values()))
        self.a_optimizer.step()
        return loss.detach()

    def sweep_lipschitz(self, batch) -> None:
        """``τ_m,k ← max(τ_m,k, max_i ‖∂ s_m,k(x_i) / ∂ x_i,m‖)`` over this batch's samples that have m."""
        d = self.cfg.hidden
        for i, m in enumerate(self.modalities):
            if not batch.has(m):
                continue
            x = batch.x[m].detach().requires_grad_(True)
            w = orthonormal_rows(self.cls.weight[:, i * d:(i + 1) * d]).detach()
            s = self.proj[m](x) @ w.T  # [B, C]
            for k in range(s.shape[1]):
                (g,) = torch.autograd.grad(s[:, k].sum(), x, retain_graph=k + 1 < s.shape[1])
                norms = g.norm(dim=1) * batch.present[m]  # rows are independent: row i is sample i's gradient
                self.lipschitz[i, k] = torch.maximum(self.lipschitz[i, k], norms.max())

    def certified_bound(self, batch) -> torch.Tensor:
        """``r(x)`` per sample (eq. 10), differentiable in ``a`` only."""
        with torch.no_grad():
            scores = self.unimodal_scores(encode(self.proj, batch))
            z = self.combine(scores)
            wrong = z.masked_fill(nn.functional.one_hot(batch.y, z.shape[1]).bool(), float("-inf"))
            j = wrong.argmax(1)
        bias = self.cls.bias.detach()
        rows = torch.arange(len(batch.y), device=batch.y.device)
        y = batch.y
        numer, denom = bias[y] - bias[j], 0.0
        for i, m in enumerate(self.modalities):
            a, s, tau = self.a[m], scores[m], self.lipschitz[i]
            present = batch.present[m].to(s.dtype)
            numer = numer + (a[y] * s[rows, y] - a[j] * s[rows, j]) * present
            denom = denom + ((a[y] * tau[y] + a[j] * tau[j]) * present) ** 2
        return numer / denom.clamp_min(1e-30).sqrt()

    def bound_loss(self, batch) -> torch.Tensor:
        return -self.certified_bound(batch).mean()

    def end_epoch(self, val_report):
        return {"crmt_step": {"joint": 1, "sweep": 2, "bound": 2}[self.phase]}
