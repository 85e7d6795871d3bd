"""``mses``: concat with modality-specific early stopping (METHODS-MORE.md §16), the companion strategy
to MSLR (Yao & Mihalcea, Findings of ACL 2022). Reference: the MSES baseline of the AGM code
(lihong2303/AGM_ICCV2023 @ 5a65542, ``run/CREMAD_main.py``).

Each modality stops learning — its gradients (``P_m`` and the head columns ``W_m``; the head's bias
keeps learning, **(choice)** as ``mslr``) are multiplied by ``c_m = 0`` instead of 1 — once its smoothed
validation loss has not improved for more than ``patience`` epochs, and the model is rolled back to
that modality's best epoch. After each epoch e, with ``ℓ_m(e)`` the cross-entropy of the modality's
slice of the concat head on validation, ``z_m = W_m h_m + b/M`` (OGM-GE's decomposition), averaged
over the validation samples that have m:

    e = 1:  L̃_m = ℓ_m(1), best_m = ℓ_m(1), e*_m = 1
    e > 1:  L̃_m = 0.6 · ℓ_m(e−1) + 0.4 · ℓ_m(e)     (the previous *raw* loss, as the reference)
    if L̃_m < best_m (strict): best_m = L̃_m, e*_m = e, and the full state is stored
    if e − e*_m > patience and c_m ≠ 0: c_m = 0, and the model goes back to the state of e*_m

**[BUG] in the reference:** its strict comparison never stores the epoch-1 state, so a rollback to
epoch 1 finds no checkpoint; here epoch 1's state is stored explicitly.

**Rollback (H4).** The stored state is the whole model and optimizer (``snapshot``) taken in
``end_epoch`` — after the epoch was validated, so it is a validated state. The stop is decided there
and the rollback applied in the next ``start_epoch`` (the core copies its selected state right after
``end_epoch``; a rollback there would be stored as validated). It replaces *all* parameters, as the
reference does (the other modalities lose their progress since e*_m too); when several modalities
stop in one epoch they are restored in modality order, so the last one's state stands, as in the
reference. The core's own selection (best validation accuracy) stays independent of these rollbacks
**(choice)**. The reference exits when every modality has stopped; the core runs its epochs, so from
then on a step makes no update **(choice)**: the remaining epochs validate the rolled-back state.

``--patience 80`` is the reference's; with fewer than ``patience + 2`` epochs no modality can stop and
the run is ``concat`` exactly (a factor of 1). Choose a smaller patience for short runs (e.g. 10).

**M > 2**: any M, each modality stops on its own loss. Logged per epoch: ``mses_loss_<m>`` (ℓ_m),
``mses_smoothed_<m>`` (L̃_m) and ``mses_factor_<m>`` (the factor the epoch trained with).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE_INT, UNIT
from heads.methods.base import encode
from heads.methods.mslr import AGM_REPO, ModalityFactors


@dataclass
class MSESOptions:
    patience: int = field(default=80, metadata={"domain": NONNEGATIVE_INT, "help": "epochs without a better smoothed validation loss before a modality stops (AGM code: 80)"})
    smoothing: float = field(default=0.6, metadata={"domain": UNIT, "help": "weight of the previous epoch's raw loss in the smoothed loss (AGM code: 0.6)"})


def track(state: dict, loss: float, epoch: int, patience: int, weight: float) -> tuple[bool, bool]:
    """One modality's bookkeeping after epoch ``epoch`` (``state`` updated in place): whether the
    smoothed loss improved (store the state) and whether the modality stops now."""
    smoothed = loss if state["previous"] is None else weight * state["previous"] + (1 - weight) * loss
    state["previous"], state["smoothed"] = loss, smoothed
    improved = state["best"] is None or smoothed < state["best"]  # epoch 1 is stored: the reference's [BUG] fixed
    if improved:
        state["best"], state["best_epoch"] = smoothed, epoch
    stop = epoch - state["best_epoch"] > patience and not state["stopped"]
    state["stopped"] = state["stopped"] or stop
    return improved, stop


class MSES(ModalityFactors):
    Options = MSESOptions
    summary = "concat with per-modality early stopping on smoothed validation loss, rolling back to the best state"
    modality_rule = "any M: each modality stops on its own smoothed validation loss"
    training = AGM_REPO

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        if opts.patience < 0 or not 0 <= opts.smoothing <= 1:
            raise ValueError(f"--patience must be 0 or more and --smoothing in [0, 1], got {opts.patience}, "
                             f"{opts.smoothing}")
        self.tracks = {m: {"previous": None, "smoothed": None, "best": None, "best_epoch": 0, "stopped": False}
                       for m in self.modalities}
        self.stored: dict[int, dict] = {}  # epoch → snapshot, for the epochs some modality may return to
        self.pending: list[int] = []  # epochs to roll back to at the next start_epoch, in modality order

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        for back in self.pending:
            self.rollback(self.stored[back])
        self.pending = []

    def train_step(self, batch):
        if not any(self.factors.values()):  # every modality has stopped: no more updates
            with torch.no_grad():
                return self.loss(batch)
        return super().train_step(batch)

    def slice_losses(self) -> dict[str, float]:
        """``ℓ_m``: mean CE of ``z_m = W_m h_m + b/M`` over the validation samples that have m."""
        val, d, k = self.attached("val"), self.cfg.hidden, len(self.modalities)
        total = torch.zeros(k, device=val.y.device)
        count = torch.zeros(k, device=val.y.device)
        with self.evaluating():
            for batch in val.batches(self.eval_batch_size):
                h = encode(self.proj, batch)
                for i, m in enumerate(self.modalities):
                    z = h[m] @ self.cls.weight[:, i * d:(i + 1) * d].T + self.cls.bias / k
                    rows = batch.present[m].to(z.dtype)
                    total[i] += (nn.functional.cross_entropy(z, batch.y, reduction="none") * rows).sum()
                    count[i] += rows.sum()
        return dict(zip(self.modalities, (total / count.clamp_min(1)).tolist()))

    def end_epoch(self, val_report):
        losses, used = self.slice_losses(), dict(self.factors)
        store = False
        for m in self.modalities:
            improved, stop = track(self.tracks[m], losses[m], self.epoch, self.opts.patience, self.opts.smoothing)
            store = store or improved
            if stop:
                self.factors[m] = 0.0
                self.pending.append(self.tracks[m]["best_epoch"])
        if store:
            self.stored[self.epoch] = self.snapshot()
        keep = {t["best_epoch"] for t in self.tracks.values() if not t["stopped"]} | set(self.pending)
        self.stored = {e: s for e, s in self.stored.items() if e in keep}
        return {**{f"mses_loss_{m}": losses[m] for m in self.modalities},
                **{f"mses_smoothed_{m}": self.tracks[m]["smoothed"] for m in self.modalities},
                **{f"mses_factor_{m}": used[m] for m in self.modalities}}
