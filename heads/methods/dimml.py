"""``dimml``: detached and interactive multimodal learning (Fan et al., "Detached and Interactive
Multimodal Learning", ACM MM 2024; METHODS-MORE.md §14). Read from the official code,
fanyunfeng-bit/DI-MML @ 83b9b7a (``main_CFT.py``: ``train_epoch``, ``get_indices``, ``main``;
``loss/contrast_loss.py::SupConLoss``; ``main_CFT_stage2.py``: ``train_combine_classifier_epoch``,
``valid_combine_classifier``; ``run.sh``). Not in BalanceMM.

**Model.** Projections ``h_m = P_m(x_m)``; an own head ``g_m`` (Linear d → C) per modality; a head
``g_sh`` shared by all modalities; and, for stage 2, the concat head ``f`` over ``[h_1; …; h_M]``.

**Stage 1** (epochs 1 … E₁; no fused loss, so no competition between modalities):

    L = Σ_m CE(g_m(h_m), y) + w · Σ_m CE(g_sh(h_m), y) + L_DUC        (L_DUC from epoch E_DUC on)

**Dimension selection**, once, in ``start_epoch(E_DUC)`` (the official ``epoch == 20``, 0-based, before
that epoch trains: our 21), over the whole training split in eval mode: class centres
``μ_{m,k} = mean_{y_i=k} h_{i,m}``; per dimension j, ``hit_{i,m,j} = 1[argmin_k |h_{i,m,j} − μ_{m,k,j}| = y_i]``,
``acc_{m,j} = mean_i hit``, ``Top_m = {j : acc_{m,j} > mean_j acc_{m,j}}`` (buffer ``top``, saved). A class
without training rows has no centre and is left out of the argmin **(choice**; the official code divides
by zero**)**; only the rows that have m count for m **(choice)**.

**L_DUC** (the dimension-decoupled unidirectional contrast, ``SupConLoss``): for M = 2 with
``A = Top_a ∖ Top_v`` and ``V = Top_v ∖ Top_a``,

    L_DUC = (1/B) Σ_i [ −log softmax_j(⟨h_{i,v}[A], s.g.(h_{j,a}[A])⟩ / τ)_i − log softmax_j(⟨h_{i,a}[V], s.g.(h_{j,v}[V])⟩ / τ)_i ]

positives the same sample, labels unused, no feature normalisation, the target modality detached.
**M > 2 (choice):** the sum over ordered pairs (m ← n) of the term whose student is m, teacher n and
dimensions ``Top_n ∖ Top_m`` (for M = 2 exactly the two terms above). The dimensions enter as a 0/1 mask
(the same inner products as the code's index lists; an empty set gives the constant log B). With missing
data a pair's term runs over the samples that have both, its negatives too, and each CE over the
samples that have m **(choice)**.

**Stage 2** (epochs E₁+1 …): ``P_m``, ``g_m``, ``g_sh`` frozen (``requires_grad`` off, outside the rebuilt
optimizer); ``f`` trained with CE on the frozen ``h``. The official stage 2 is a separate run with a
fresh SGD and its own StepLR, so here stage 2 restarts the schedule: its epoch k trains at the rate of the
schedule's epoch k (a learning-rate factor on the new optimizer; ``--no-restart-schedule`` keeps the run's
schedule).

**Inference** (both stages, so that the core's selection on validation can pick any epoch):

    ω_i = softmax_k([max p(g_1(h_{i,1})), …, max p(g_M(h_{i,M})), max p(f(h_i))] / T),   output Σ_k ω_{i,k} · logits_k

over the sample's present modalities, and ``f`` only once stage 2 has begun (a buffer ``stage``, so the
selected checkpoint carries it): in stage 1 ``f`` is untrained and the official stage 1 validates only
the unimodal heads **(choice)**. v({m}) is then ``g_m`` (stage 1) or ``g_m`` and ``f(h_m, 0…)`` fused.
``g_sh`` is not used at inference (as the official stage 2).

**Defaults** (official ``run.sh``, CREMA-D): τ = 50 (AVE, UCF: 10), w = 1, T = 1 (AVE: 3), E_DUC = our 21;
SGD lr 1e-3, momentum 0.9, wd 1e-4, StepLR(70, 0.1) — the field protocol. Batch 64 (the field protocol;
the official 16, **(choice)** of §14). The official trains 150 stage-1 epochs, then 20 in its second run;
here one run of 150 epochs, ``--stage1-epochs -1`` = ⅔ of the run (100 + 50, **(choice)** of §14).
**Frozen features:** suited (everything acts on ``h_m``). **M:** any (see L_DUC); not stackable (two
phases, its own optimizer). Logged per epoch: ``dimml_stage`` and, once selected, ``dimml_top_<m>`` (|Top_m|).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, POSITIVE, POSITIVE_INT
from heads.blocks.optim import scheduled_lr
from heads.methods.base import FIELD_PROTOCOL, HeadMethod, Training, encode, make_optimizer, projections


@dataclass
class DIMMLOptions:
    tau: float = field(default=50.0, metadata={"domain": POSITIVE, "help": "temperature τ of the dimension-wise contrast L_DUC (official CREMA-D: 50; AVE, UCF: 10)"})
    weight: float = field(default=1.0, metadata={"domain": NONNEGATIVE, "help": "weight w of the shared head's CE (official: 1)"})
    duc_start: int = field(default=21, metadata={"domain": POSITIVE_INT, "help": "epoch of the dimension selection, L_DUC from it on (official 20, 0-based)"})
    temperature: float = field(default=1.0, metadata={"domain": POSITIVE, "help": "T of the certainty-weighted fusion at inference (official CREMA-D: 1; AVE: 3)"})
    stage1_epochs: int = field(default=-1, metadata={"domain": POSITIVE_INT | (-1,), "help": "epochs of stage 1 (detached unimodal training); -1 = 2/3 of the run"})
    restart_schedule: bool = field(default=True, metadata={"help": "stage 2 restarts the learning-rate schedule, as the official separate run (--no-restart-schedule: the run's)"})


def certainty_weights(confidence: torch.Tensor, present: torch.Tensor, temperature: float) -> torch.Tensor:
    """``ω`` ``[K, B]``: softmax over the K predictors of their max-probabilities / T, among the present ones."""
    scores = (confidence / temperature).masked_fill(~present, float("-inf"))
    return torch.where(present.any(0, keepdim=True), scores.softmax(0), torch.zeros_like(scores))


def discriminative_dims(h: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """``Top`` ``[d]`` (bool): the dimensions whose nearest class centre matches the label more often than
    the mean dimension does. A class without rows has no centre (left out of the argmin)."""
    counts = torch.bincount(y, minlength=classes).to(h.dtype)
    centres = torch.zeros(classes, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, y, h)
    centres = centres / counts.clamp_min(1).unsqueeze(1)
    distance = (h.unsqueeze(1) - centres.unsqueeze(0)).abs()  # [N, C, d]
    distance = distance.masked_fill((counts == 0).view(1, -1, 1), float("inf"))
    accuracy = (distance.argmin(1) == y.unsqueeze(1)).to(h.dtype).mean(0)
    return accuracy > accuracy.mean()


def duc_term(student: torch.Tensor, teacher: torch.Tensor, dims: torch.Tensor, tau: float,
             rows: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_i −log softmax_j(⟨s_i ⊙ D, s.g.(t_j) ⊙ D⟩ / τ)_i``; ``rows`` (bool ``[B]``, None = all): the
    samples that take part, as anchors and as negatives."""
    mask = dims.to(student.dtype)
    sims = (student * mask) @ (teacher.detach() * mask).T / tau  # [B, B]
    if rows is None:
        return -sims.log_softmax(1).diagonal().mean()
    sims = sims.masked_fill(~rows.unsqueeze(0), float("-inf"))
    sims = torch.where(rows.unsqueeze(1), sims, torch.zeros_like(sims))  # rows that do not take part: no NaN
    weight = rows.to(student.dtype)
    return -(sims.log_softmax(1).diagonal() * weight).sum() / weight.sum().clamp_min(1)


class DIMML(HeadMethod):
    Options = DIMMLOptions
    summary = "detached unimodal heads + a shared head + dimension-wise contrast, then a fused head; certainty-weighted fusion"
    modality_rule = "any M: L_DUC over ordered pairs m ← n on Top_n ∖ Top_m, fusion weights over the M heads and f (choice)"
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "DI-MML official main_CFT.py, main_CFT_stage2.py + run.sh (CREMA-D): SGD momentum 0.9, lr 1e-3, "
                        "wd 1e-4, StepLR 70 × 0.1 (restarted for stage 2); batch 64 (field protocol; official 16, choice); "
                        "official 150 stage-1 epochs then 20 in a second run, here 150 with 2/3 in stage 1 (choice)",
                        epochs=150, stages=(100, 50))

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        d, c = cfg.hidden, spec.num_classes
        self.proj = projections(spec, d)
        self.own = nn.ModuleDict({m: nn.Linear(d, c) for m in self.modalities})
        self.shared = nn.Linear(d, c)
        self.cls = nn.Linear(d * len(self.modalities), c)
        first, second = type(self).training.stages  # (self.training is nn.Module's train/eval flag)
        self.stage1_epochs = max(1, round(cfg.epochs * first / (first + second))) if opts.stage1_epochs < 0 \
            else opts.stage1_epochs
        self.register_buffer("top", torch.zeros(len(self.modalities), d, dtype=torch.bool))
        self.register_buffer("selected", torch.zeros((), dtype=torch.bool))
        self.register_buffer("stage", torch.ones((), dtype=torch.long))
        self.duc = False

    # --- stages --------------------------------------------------------------------------------
    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        if stage == 1:
            return [*self.proj.parameters(), *self.own.parameters(), *self.shared.parameters()]
        return list(self.cls.parameters())

    def configure_optimizer(self):
        stage = int(self.stage)
        keep = {id(p) for p in self.stage_parameters(stage)}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return make_optimizer(self.stage_parameters(stage), self.cfg)

    def select_dims(self) -> None:
        """``Top_m`` for every modality, over the attached training split (eval mode)."""
        train = self.attached("train")
        with self.evaluating():
            for i, m in enumerate(self.modalities):
                parts, labels = [], []
                for batch in train.batches(self.eval_batch_size):
                    keep = batch.present[m]
                    parts.append(self.proj[m](batch.x[m])[keep])
                    labels.append(batch.y[keep])
                self.top[i] = discriminative_dims(torch.cat(parts), torch.cat(labels), self.spec.num_classes)
            self.selected.fill_(True)

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        stage1 = epoch <= self.stage1_epochs
        if stage1 and epoch >= self.opts.duc_start and not bool(self.selected):
            self.select_dims()
        self.duc = stage1 and epoch >= self.opts.duc_start
        if not stage1 and int(self.stage) == 1:
            self.stage.fill_(2)
            self.optimizer = self.configure_optimizer()
        if not stage1 and self.opts.restart_schedule:
            cfg, k = self.cfg, epoch - self.stage1_epochs
            factor = (scheduled_lr(1.0, cfg.schedule, k, cfg.epochs - self.stage1_epochs)
                      / scheduled_lr(1.0, cfg.schedule, epoch, cfg.epochs))
            for group in self.optimizer.param_groups:
                group["lr_factor"] = factor

    def end_epoch(self, val_report):
        out = {"dimml_stage": int(self.stage)}
        if bool(self.selected):
            out.update({f"dimml_top_{m}": int(self.top[i].sum()) for i, m in enumerate(self.modalities)})
        return out

    # --- the model -----------------------------------------------------------------------------
    def logits(self, batch):
        h = encode(self.proj, batch)
        outs = [self.own[m](h[m]) for m in self.modalities] + [self.cls(torch.cat([h[m] for m in self.modalities], 1))]
        confidence = torch.stack([o.softmax(-1).max(-1).values for o in outs])  # [M + 1, B]
        present = torch.stack([batch.present[m] for m in self.modalities] + [(self.stage == 2).expand(len(batch))])
        weights = certainty_weights(confidence, present, self.opts.temperature)
        return sum(w.unsqueeze(1) * o for w, o in zip(weights, outs))

    def masked_ce(self, logits: torch.Tensor, batch, m: str) -> torch.Tensor:
        """CE over the samples of the batch that have m."""
        if batch.full(m):
            return nn.functional.cross_entropy(logits, batch.y)
        rows = batch.present[m].to(logits.dtype)
        return (nn.functional.cross_entropy(logits, batch.y, reduction="none") * rows).sum() / rows.sum().clamp_min(1)

    def loss(self, batch):
        return self.stage2_loss(batch) if self.epoch > self.stage1_epochs else self.stage1_loss(batch)

    def stage1_loss(self, batch) -> torch.Tensor:
        h = encode(self.proj, batch)
        loss = torch.zeros((), device=batch.y.device)
        for m in self.modalities:
            if batch.has(m):
                loss = loss + self.masked_ce(self.own[m](h[m]), batch, m) + self.opts.weight * self.masked_ce(
                    self.shared(h[m]), batch, m)
        if self.duc:
            for i, m in enumerate(self.modalities):
                for j, n in enumerate(self.modalities):
                    if i == j or not (batch.has(m) and batch.has(n)):
                        continue
                    dims = self.top[j] & ~self.top[i]
                    rows = None if batch.full(m) and batch.full(n) else batch.present[m] & batch.present[n]
                    loss = loss + duc_term(h[m], h[n], dims, self.opts.tau, rows)
        return loss

    def stage2_loss(self, batch) -> torch.Tensor:
        with torch.no_grad():
            h = encode(self.proj, batch)
        return nn.functional.cross_entropy(self.cls(torch.cat([h[m] for m in self.modalities], 1)), batch.y)
