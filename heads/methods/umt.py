"""``umt``: Uni-Modal Teacher (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning", ICML 2023; METHODS-MORE.md §6). No official code was located (the ReconBoost repository ships
only UMT/UME *features*); the equations are BalanceMM's ``UMT_trainer.py`` @ 4c1482f, whose teachers
come from ``unimodal_trainer.py`` runs.

Two phases in one run (H3), decided from the epoch in ``start_epoch``:

**Phase A, the teachers** (epochs 1…E_A, ``--teacher-epochs``; −1 = ⌊epochs/3⌋, at least 1,
**(choice)**: linear-projection teachers converge fast, and the joint phase gets the rest). One unimodal
model per modality — its own projection ``P^T_m`` and linear head — trained on its CE over the samples
that have m, as ``late`` trains them (the losses summed, one step: the teachers share no parameter).
After each of these epochs every teacher's accuracy on the validation samples that have m is measured
(``umt_teacher_acc_<m>``) and the state of its best epoch kept, per teacher (ties: the later epoch, as
the core) — **(choice)**: BalanceMM reloads the teacher run's best *test* epoch (§0.3 item 2). The
stage is inside the method **(choice: default)**; accepting a saved ``late`` run as the teachers
(``--teachers RUN_DIR``) is not offered: a method does not read run folders.

**Phase B, the student** (epochs E_A+1…). At the switch the kept teacher states are loaded and frozen:
no gradient (``requires_grad`` off, outside the optimizer, forward without autograd) and **eval mode**
for the rest of the run — **[BUG]** BalanceMM leaves its teachers in train mode, so their BatchNorm
statistics move on every student batch. A concat student (initialised as ``concat`` would be, not from
the teachers, as BalanceMM) trains with a new optimizer on

    L = CE(f(h), y) + λ Σ_m MSE( h_m, s.g.(h^T_m) ),    h^T_m = P^T_m(x_m)

with MSE the mean over the feature elements of the batch's samples that have m (**(choice)** for
missing data: the term of m uses only those samples). λ = ``--lam`` 10 (BalanceMM ``scaling: 10``; its
``alpha: 1`` is unused; the paper's value was not verified). At λ = 0 the student is ``concat``.

**Selection** is restricted to phase-B epochs (``selectable``): phase A trains no student, so its
epochs validate an untrained model. Inference is always the student (concat); the teachers are
submodules (saved with the model) that inference never reads. BalanceMM's hard-coded
``MultiModalParallel(device_ids=[0, 1])`` is ignored (it does not change the method).

**UME** (same paper: the unimodal models trained independently, their predictions ensembled) is
``late``; whether UME averages probabilities or logits was not verified, so ``late`` offers
``--combine probs|logits``. The paper picks UMT or UME by whether cross-modal interaction matters: an
experiment, not an option.

**Frozen features — degrades.** Teacher and student are the same function class on the same frozen
input (``ReLU(W x + b)``), so the distillation pulls ``P_m`` toward the unimodally trained ``P^T_m``: a
regulariser toward the ``late`` solution, not a transfer of representation power.

**M > 2**: one teacher per modality; the sum runs over all. Training: ``FIELD_PROTOCOL`` (§6's table;
BalanceMM's AdamW protocol is §0.3 item 1); its StepLR counts the teacher epochs too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, POSITIVE_INT
from heads.errors import OptionError
from heads.methods.base import FIELD_PROTOCOL, Training, encode, make_optimizer, projections
from heads.methods.concat import Concat


@dataclass
class UMTOptions:
    lam: float = field(default=10.0, metadata={"domain": NONNEGATIVE, "help": "λ of the feature distillation toward the frozen teachers (BalanceMM scaling: 10)"})
    teacher_epochs: int = field(default=-1, metadata={"domain": POSITIVE_INT | (-1,), "help": "phase-A epochs training the unimodal teachers; -1 = ⌊epochs/3⌋ (at least 1)"})


def teacher_epochs(epochs: int, asked: int) -> int:
    """E_A: ``asked``, or ⌊epochs/3⌋ (at least 1) for −1; the student must keep at least one epoch."""
    n = max(1, epochs // 3) if asked == -1 else asked
    if not 1 <= n < epochs:
        raise OptionError(f"umt trains its teachers, then the student: --teacher-epochs must lie in "
                          f"[1, {epochs - 1}] for --epochs {epochs}, got {n}")
    return n


def distillation(h: torch.Tensor, teacher: torch.Tensor, present: torch.Tensor, full: bool) -> torch.Tensor:
    """``MSE(h_m, h^T_m)``: the mean of ``(h − h^T)²`` over the d features of the samples that have m
    (0 when none has); ``full``: every sample has m (known on the host, no mask)."""
    if full:
        return nn.functional.mse_loss(h, teacher)
    rows = present.to(h.dtype)
    return ((h - teacher).pow(2).sum(1) * rows).sum() / (rows.sum().clamp_min(1) * h.shape[1])


def masked_ce(logits: torch.Tensor, y: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the samples that have the modality (0 when none has)."""
    per_sample = nn.functional.cross_entropy(logits, y, reduction="none")
    return (per_sample * present).sum() / present.sum().clamp_min(1)


class UMT(Concat):
    Options = UMTOptions
    summary = "concat student distilled toward unimodal teachers' features, the teachers trained alone first"
    modality_rule = "any M: one teacher per modality, the distillation summed over all"
    stackable = False  # two phases, an optimizer rebuilt at the switch (concat's stacking does not apply)
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "no official UMT code; METHODS-MORE.md §6: the field's protocol (OGM-GE/MLA main.py: SGD "
                        "momentum 0.9, lr 1e-3, wd 1e-4, StepLR 70 × 0.1, batch 64); phases: ⌊100/3⌋ teacher epochs "
                        "(choice), the rest joint",
                        epochs=100, stages=(33, 67))

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)  # the student first: it starts as concat's would, seed for seed
        self.teacher_epochs = teacher_epochs(cfg.epochs, opts.teacher_epochs)
        self.teachers = nn.ModuleDict({
            "proj": projections(spec, cfg.hidden),
            "cls": nn.ModuleDict({m: nn.Linear(cfg.hidden, spec.num_classes) for m in self.modalities})})
        self.phase = 1
        self.best_teachers: dict[str, tuple[float, dict]] = {}  # m → (validation accuracy, state) of phase A
        self._distill, self._batches = {m: 0.0 for m in self.modalities}, 0

    # --- phases --------------------------------------------------------------------------------
    def configure_optimizer(self):
        return make_optimizer(self.teachers.parameters(), self.cfg)

    def selectable(self, epoch):
        return epoch > self.teacher_epochs

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        if self.phase == 1 and epoch > self.teacher_epochs:
            self.phase = 2
            with torch.no_grad():
                for m, (_, state) in self.best_teachers.items():
                    self.teacher_module(m).load_state_dict(state)
            self.teachers.requires_grad_(False)
            self.teachers.eval()
            self.optimizer = make_optimizer([*self.proj.parameters(), *self.cls.parameters()], self.cfg)
        self._distill, self._batches = {m: 0.0 for m in self.modalities}, 0

    def train(self, mode: bool = True):
        """The core sets train mode every epoch; frozen teachers stay in eval mode."""
        super().train(mode)
        if getattr(self, "phase", 1) == 2:
            self.teachers.eval()
        return self

    def teacher_module(self, m: str) -> nn.Module:
        """Teacher m's projection and head, as one module (for its kept state)."""
        return nn.ModuleDict({"proj": self.teachers["proj"][m], "cls": self.teachers["cls"][m]})

    # --- losses --------------------------------------------------------------------------------
    def teacher_loss(self, batch) -> torch.Tensor:
        """Phase A: the sum over modalities of each teacher's CE on the samples that have m."""
        total = 0.0
        for m in self.modalities:
            logits = self.teachers["cls"][m](self.teachers["proj"][m](batch.x[m]))
            total = total + masked_ce(logits, batch.y, batch.present[m])
        return total

    def loss(self, batch):
        if self.phase == 1:
            return self.teacher_loss(batch)
        h = encode(self.proj, batch)
        loss = nn.functional.cross_entropy(self.cls(torch.cat([h[m] for m in self.modalities], 1)), batch.y)
        self._batches += 1
        for m in self.modalities:
            if not batch.has(m):
                continue
            with torch.no_grad():
                target = self.teachers["proj"][m](batch.x[m])
            term = distillation(h[m], target, batch.present[m], batch.full(m))
            self._distill[m] = self._distill[m] + term.detach()
            loss = loss + self.opts.lam * term
        return loss

    # --- between epochs ------------------------------------------------------------------------
    def teacher_accuracy(self) -> dict[str, float]:
        """Each teacher's accuracy (%) on the validation samples that have its modality."""
        val = self.attached("val")
        correct = torch.zeros(len(self.modalities), device=val.y.device)
        count = torch.zeros(len(self.modalities), device=val.y.device)
        with self.evaluating():
            for batch in val.batches(self.eval_batch_size):
                for i, m in enumerate(self.modalities):
                    pred = self.teachers["cls"][m](self.teachers["proj"][m](batch.x[m])).argmax(-1)
                    correct[i] += ((pred == batch.y) & batch.present[m]).sum()
                    count[i] += batch.present[m].sum()
        return dict(zip(self.modalities, (100 * correct / count.clamp_min(1)).tolist()))

    def end_epoch(self, val_report):
        if self.phase == 2:
            batches = max(1, self._batches)
            return {"umt_phase": 2, **{f"umt_distill_{m}": float(v) / batches for m, v in self._distill.items()}}
        acc = self.teacher_accuracy()
        for m, a in acc.items():
            if m not in self.best_teachers or a >= self.best_teachers[m][0]:  # kept; loaded in start_epoch
                state = {k: v.detach().clone() for k, v in self.teacher_module(m).state_dict().items()}
                self.best_teachers[m] = (a, state)
        return {"umt_phase": 1, **{f"umt_teacher_acc_{m}": a for m, a in acc.items()}}
