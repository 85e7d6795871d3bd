"""``reconboost``: ReconBoost (Hua, Xu, Bao, Yang, Huang, "ReconBoost: Boosting Can Achieve Modality
Reconcilement", ICML 2024, arXiv 2405.09321; METHODS-MORE.md §13). Read from the official code,
huacong/ReconBoost @ 14ab57a (``train.py``: ``main``; ``models/dynamic_net.py``: ``DynamicNet``,
``Head``; ``schedule.py``; the README's CREMA-D command), and BalanceMM's ``ReconBoost_trainer.py`` and
``BaseClassifierReconBoostModel`` @ 4c1482f for its deviations.

**Model.** Learners ``f_m = H(P_m(x_m))`` with one head H shared by all modalities (official
``common_space=True``: ``Head`` = Linear → ReLU → Linear(256, C); here d → ``--head-hidden`` 256 → C);
the prediction is the boosted ensemble ``F = β Σ_m f_m`` over the present modalities of the ensemble
(absent learners contribute nothing), β a learnable scalar (``boost_rate``, ``--boost-init`` 1.0).

**Stages.** Stage s trains modality ``m = order[s mod M]`` (the data's modality order: audio, visual
for ``av``, as the official fixed order), in two phases; with ``F_{−m} = β Σ_{k≠m} f_k`` over the other
learners of the ensemble, computed without gradient, and ``t = onehot(y)`` (eq. of ``train.py``):

    boosting_i = ( −w₁ Σ_c t_c log softmax(f_m)_c + w₂ Σ_c t_c softmax(s.g.(F_{−m}))_c log softmax(f_m)_c ) / C
               = (w₁ − w₂ · softmax(F_{−m})[y]) · (−log softmax(f_m)[y]) / C
    ga = MSE( s.g.(softmax(f_m)), s.g.(softmax(f_prev)) )    f_prev: the previous stage's learner
    L₁ = mean_i boosting_i + α · ga     (stage 0: boosting only)
    L₂ = CE(F, y)                       (global rectification)

Phase 1: ``--e1`` epochs of L₁, a new SGD over ``P_m`` and H; phase 2: ``--e2`` epochs of L₂, a new SGD
over the ensemble's projections, H and β. **[BUG] in the official code and BalanceMM:** ``ga`` is computed
from two *detached* tensors, so it contributes no gradient — the paper's memory-consolidation term is a
no-op as released. ``--ga code`` (default) reproduces the releases: ga is computed, logged
(``reconboost_ga``) and added, and the gradient of L₁ is that of the boosting term alone. ``--ga paper``
attaches it: ``MSE(softmax(f_m), s.g.(softmax(f_prev)))``, the gradient through the current learner
**(choice**: the paper's text was not available to confirm the exact form**)**.

**Tool mapping (choice).** One core epoch is one pass of one phase: after the pretraining epochs,
stage ``s = ⌊k/(E₁+E₂)⌋`` and position ``r = k mod (E₁+E₂)`` with ``k`` the epoch's 0-based index
after them; ``r < E₁`` is phase 1 of ``order[s mod M]``, else phase 2. ``start_epoch`` rebuilds the
optimizer at each phase start (as ``ccat``). The core validates every epoch (finer than the official
per-stage evaluation, which keeps the best stage from stage 3 on, on test) and selects on validation.

**Pretraining (choice; ``--pretrain``, default on, as the README's ``--use_pretrain``).** The official
code loads unimodal checkpoints trained elsewhere and puts both learners in the ensemble before
stage 0; here ``--pretrain-epochs`` 4 (choice: one phase's length) of unimodal CE per learner through
H (the losses summed, one step over every ``P_m`` and H) come first, and every learner is in the
ensemble from the start. **Without it** a learner joins the ensemble when its first phase 1 starts
(the official code adds it after that phase; joining at the start changes only what those epochs'
validation sees, **(choice)**), and while no other learner is in it ``F_{−m}`` is the official random
constant ``c0`` broadcast to ``[B, 1]``, whose softmax is 1: ``softmax(F_{−m})[y] = 1``.

**Training (official).** SGD momentum 0.9, lr 0.01 in both phases, weight decay 5e-4 (β included), batch
64, ×0.1 every 30 stages: ``step:240:0.1`` on the core's epochs (30 × (E₁ + E₂)), which also count the
pretraining epochs **(choice)**. The official run has up to 1000 stages; the default 100 epochs are the
4 pretraining epochs and 12 stages (6 per modality at M = 2).

**Missing data (choice).** ``F_{−m}`` and F sum the present learners; a sample lacking m contributes no
boosting term in m's phase (the mean runs over the samples that have m), and ga runs over the samples
that have both m and the previous learner's modality.

**(BalanceMM) deviations / bugs.** One "epoch" there is, for every modality, one phase-1 pass and one
phase-2 pass (2M passes per reported epoch); one optimizer throughout; β₀ = 0.01; a shared *Linear*
head; ``forward(padding=…)`` zeroes a local copy of the input and then calls ``modality_model(batch,
m)`` on the original batch, so its subset evaluation (unimodal accuracy, Shapley) ignores padding
**[BUG]**; its ``else`` branches reference an undefined ``loss['out']`` (never reached).

**M > 2**: any M ≥ 2 in a fixed cyclic order (official MOSEI: three); ``f_prev`` is the previous
stage's learner. Logged per epoch: ``reconboost_phase`` (0 pretraining, 1 boosting, 2 rectification),
``reconboost_learner`` (index of the boosted modality, −1 outside phase 1), ``reconboost_beta`` and,
in phase 1, ``reconboost_boosting`` and ``reconboost_ga`` (epoch means).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.domains import FINITE, NONNEGATIVE, NONNEGATIVE_INT, POSITIVE_INT, WIDTH
from heads.errors import OptionError
from heads.methods.base import HeadMethod, Training, make_optimizer, projections


@dataclass
class ReconBoostOptions:
    w1: float = field(default=5.0, metadata={"domain": NONNEGATIVE, "help": "w₁, weight of the learner's own CE in the boosting loss (CREMA-D README: 5.0)"})
    w2: float = field(default=1.0, metadata={"domain": NONNEGATIVE, "help": "w₂, weight of the ensemble-confidence term (README: 1.0)"})
    alpha: float = field(default=0.5, metadata={"domain": NONNEGATIVE, "help": "α, weight of the consolidation term ga (official 0.5)"})
    ga: Literal["code", "paper"] = field(default="code", metadata={"help": "ga detached as in the official code (code: no gradient) or through the current learner (paper)"})
    e1: int = field(default=4, metadata={"domain": POSITIVE_INT, "help": "phase-1 (boosting) epochs per stage (official epochs_per_stage 4)"})
    e2: int = field(default=4, metadata={"domain": NONNEGATIVE_INT, "help": "phase-2 (global rectification) epochs per stage (official correct_epoch 4)"})
    boost_init: float = field(default=1.0, metadata={"domain": FINITE, "help": "β₀, initial boost rate (official 1.0; BalanceMM 0.01)"})
    pretrain: bool = field(default=True, metadata={"help": "unimodal pretraining of every learner before stage 0 (README --use_pretrain)"})
    pretrain_epochs: int = field(default=4, metadata={"domain": POSITIVE_INT, "help": "pretraining epochs (choice: one phase's length)"})
    head_hidden: int = field(default=256, metadata={"domain": WIDTH, "help": "width of the shared head's hidden layer (official 256)"})


def phase_of(epoch: int, pretrain_epochs: int, e1: int, e2: int, modalities: int) -> tuple[int, int, int]:
    """``(phase, stage, learner)`` of 1-based ``epoch``: phase 0 = pretraining (stage and learner −1),
    1 = boosting learner ``stage mod M``, 2 = rectification (learner −1)."""
    if epoch <= pretrain_epochs:
        return 0, -1, -1
    stage, r = divmod(epoch - pretrain_epochs - 1, e1 + e2)
    return (1, stage, stage % modalities) if r < e1 else (2, stage, -1)


def boosting(f_m: torch.Tensor, q: torch.Tensor, y: torch.Tensor, w1: float, w2: float) -> torch.Tensor:
    """Per-sample boosting loss ``(w₁ − w₂ q_i) · CE(f_m, y)_i / C``, ``q_i = softmax(F_{−m,i})[y_i]``."""
    return (w1 - w2 * q) * nn.functional.cross_entropy(f_m, y, reduction="none") / f_m.shape[1]


def masked_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (``[B]`` or ``[B, C]``) over the rows marked in ``rows`` (0 when none is)."""
    weight = rows.to(values.dtype).reshape(-1, *[1] * (values.dim() - 1)).expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1)


class ReconBoost(HeadMethod):
    Options = ReconBoostOptions
    summary = "boosted ensemble of unimodal learners on a shared head: alternating boosting + global rectification"
    modality_rule = "any M ≥ 2, boosted in the data's modality order, one per stage"
    training = Training("sgd", 0.01, 5e-4, "step:240:0.1", 64,
                        "ReconBoost official train.py + README (CREMA-D): SGD momentum 0.9, lr 0.01 in both phases, "
                        "wd 5e-4, a new optimizer per phase, ×0.1 every 30 stages (240 epochs of E1 + E2 = 8), batch 64; "
                        "100 epochs = 4 pretraining (choice) + 12 stages (official: up to 1000)",
                        epochs=100, stages=(4, 96))

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        if len(self.modalities) < 2:
            raise OptionError(f"reconboost boosts one modality against the others and needs at least two; "
                              f"this data has {len(self.modalities)}")
        self.proj = projections(spec, cfg.hidden)
        self.head = nn.Sequential(nn.Linear(cfg.hidden, opts.head_hidden), nn.ReLU(),
                                  nn.Linear(opts.head_hidden, spec.num_classes))
        self.beta = nn.Parameter(torch.tensor(float(opts.boost_init)))
        # Which learners are in the ensemble (inference reads it: a buffer). Pretrained: all from the start.
        self.register_buffer("members", torch.full((len(self.modalities),), bool(opts.pretrain)))
        self.pretrain_epochs = opts.pretrain_epochs if opts.pretrain else 0
        self.current = phase_of(1, self.pretrain_epochs, opts.e1, opts.e2, len(self.modalities))
        self.joined = [bool(opts.pretrain)] * len(self.modalities)  # the members on the host, for train_step
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._stats = {"boosting": 0.0, "ga": 0.0, "batches": 0}

    # --- phases --------------------------------------------------------------------------------
    def phase_parameters(self, phase: tuple[int, int, int]) -> list[nn.Parameter]:
        """Phase 0: every projection and H; 1: the boosted learner's projection and H; 2: the ensemble's
        projections, H and β."""
        kind, _, learner = phase
        if kind == 0:
            return [*self.proj.parameters(), *self.head.parameters()]
        if kind == 1:
            return [*self.proj[self.modalities[learner]].parameters(), *self.head.parameters()]
        joined = [p for m, j in zip(self.modalities, self.joined) if j for p in self.proj[m].parameters()]
        return [*joined, *self.head.parameters(), self.beta]

    def _enter(self, phase: tuple[int, int, int]) -> None:
        self.current = phase
        if phase[0] == 1:
            self.joined[phase[2]] = True
            self.members[phase[2]] = True
        self.optimizer = make_optimizer(self.phase_parameters(phase), self.cfg)

    def configure_optimizer(self):
        self._enter(self.current)
        return self.optimizer

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        phase = phase_of(epoch, self.pretrain_epochs, self.opts.e1, self.opts.e2, len(self.modalities))
        if phase != self.current:  # a new phase: a new optimizer over its parameters (official)
            self._enter(phase)
        self._reset_stats()

    # --- the learners --------------------------------------------------------------------------
    def learner(self, m: str, batch) -> torch.Tensor:
        """``f_m = H(P_m(x_m))`` ``[B, C]`` (not masked)."""
        return self.head(self.proj[m](batch.x[m]))

    def ensemble(self, batch, leave_out: str | None = None) -> torch.Tensor:
        """``β Σ f_k`` over the present learners of the ensemble, without ``leave_out``."""
        total = 0.0
        for i, m in enumerate(self.modalities):
            if m != leave_out:
                keep = (self.members[i] & batch.present[m]).to(self.beta.dtype).unsqueeze(1)
                total = total + self.learner(m, batch) * keep
        return self.beta * total

    def logits(self, batch):
        return self.ensemble(batch)

    def pretrain_loss(self, batch) -> torch.Tensor:
        total = 0.0
        for m in self.modalities:
            ce = nn.functional.cross_entropy(self.learner(m, batch), batch.y, reduction="none")
            total = total + masked_mean(ce, batch.present[m])
        return total

    def boosting_loss(self, batch) -> torch.Tensor:
        """Phase 1's L₁ for the boosted learner (its stats accumulated on the device)."""
        _, stage, index = self.current
        m = self.modalities[index]
        f_m = self.learner(m, batch)
        with torch.no_grad():
            if any(j for i, j in enumerate(self.joined) if i != index):
                q = self.ensemble(batch, leave_out=m).softmax(-1).gather(1, batch.y[:, None]).squeeze(1)
            else:  # no other learner yet: the official constant c0, broadcast to [B, 1], has softmax 1
                q = torch.ones_like(batch.y, dtype=f_m.dtype)
        loss = masked_mean(boosting(f_m, q, batch.y, self.opts.w1, self.opts.w2), batch.present[m])
        self._stats["boosting"] = self._stats["boosting"] + loss.detach()
        self._stats["batches"] += 1
        if stage == 0:
            return loss
        prev = self.modalities[(stage - 1) % len(self.modalities)]
        with torch.no_grad():
            target = self.learner(prev, batch).softmax(-1)
        p = f_m.softmax(-1) if self.opts.ga == "paper" else f_m.detach().softmax(-1)
        ga = masked_mean((p - target).pow(2), batch.present[m] & batch.present[prev])
        self._stats["ga"] = self._stats["ga"] + ga.detach()
        return loss + self.opts.alpha * ga

    def loss(self, batch):
        kind = self.current[0]
        if kind == 0:
            return self.pretrain_loss(batch)
        if kind == 1:
            return self.boosting_loss(batch)
        return nn.functional.cross_entropy(self.ensemble(batch), batch.y)

    def end_epoch(self, val_report):
        kind, _, learner = self.current
        out = {"reconboost_phase": kind, "reconboost_learner": learner, "reconboost_beta": float(self.beta.detach())}
        if kind == 1:
            batches = max(1, self._stats["batches"])
            out["reconboost_boosting"] = float(self._stats["boosting"]) / batches
            out["reconboost_ga"] = float(self._stats["ga"]) / batches
        return out
