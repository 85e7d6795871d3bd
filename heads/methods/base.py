"""The interface every head method implements, and the few helpers they share.

A method states only what differs from the others: which modules it has, how one batch updates
them (``train_step``), and how it predicts when only some modalities are present (``logits``).
The epoch loop, selection on validation, seeding, logging and checkpointing live once, in
``heads/train/trainer.py``; evaluation in ``heads/train/evaluation.py``; the stacked form of the loop for GPU grids in
``heads/sweeps/stacked.py`` (a method opts in with ``stackable`` or ``stack_chain``). Anything inference depends on (an order, a memory state) must be a buffer or
parameter, so that the selected checkpoint and a reloaded model carry it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from heads.blocks.data import Batch, DataSpec
from heads.blocks.modules import Projection
from heads.blocks.optim import FIELD_PROTOCOL, Training, make_optimizer  # noqa: F401  (re-exported for methods)
from heads.blocks.standardize import Standardizer


@dataclass
class NoOptions:
    """This method has no options of its own."""


class HeadMethod(nn.Module, ABC):
    """Base of all methods. Subclasses set ``Options`` (a dataclass) and build their modules in ``__init__``."""

    Options: type = NoOptions
    summary: str = ""
    # How the method trains unless told otherwise (its paper or official code; ``heads/blocks/optim.py``).
    training: Training = FIELD_PROTOCOL
    # True when configs of this method can train stacked (``heads/sweeps/stacked.py``): the batch update is
    # the inherited ``train_step`` (one ``loss``, one optimizer step) and ``loss``/``logits`` are plain
    # tensor code — no Python ``if`` on tensor values (use ``batch.has(m)``/``batch.full(m)``), no
    # ``.item()``/``float()`` of tensors, no in-place buffer updates, no random draws.
    stackable: bool = False
    # True when the method reads the per-epoch Shapley values φ / deviations δ of validation in
    # ``end_epoch`` (edm's order); others get only the full-set validation accuracy each epoch.
    reads_phi: bool = False
    # True when a sample's prediction depends on that sample alone (not on who shares its batch): the
    # core then scores every modality subset in one batched pass. edm's alignment looks across the batch.
    batch_independent: bool = True
    # How the method handles M modalities: ``max_modalities`` refuses more (a clear error at build
    # time); ``modality_rule`` is the one line ``cli.py methods`` prints (its rule for M > 2).
    max_modalities: int | None = None
    modality_rule: str = "any number of modalities"

    def __init__(self, spec: DataSpec, cfg, opts):
        super().__init__()
        if self.max_modalities is not None and len(spec.modalities) > self.max_modalities:
            raise ValueError(f"{type(self).__name__.lower()} takes at most {self.max_modalities} modalities "
                             f"({self.modality_rule}); this data has {len(spec.modalities)}: "
                             f"{', '.join(spec.modalities)} — choose some with --modalities")
        self.spec, self.cfg, self.opts = spec, cfg, opts
        # Fitted by the core on the training split; a buffer module, so checkpoints carry it.
        self.standardizer = Standardizer(spec.dims, getattr(cfg, "standardize", "feature"))
        self.modalities = list(spec.modalities)
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch = 0

    # --- what the core calls -------------------------------------------------------------------
    def configure_optimizer(self) -> torch.optim.Optimizer:
        """One optimizer over every trainable parameter (methods with stages may rebuild it)."""
        return make_optimizer([p for p in self.parameters() if p.requires_grad], self.cfg)

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (1-based)."""
        self.epoch = epoch

    def train_step(self, batch: Batch) -> torch.Tensor:
        """Update the parameters on one batch; return the (detached) loss to log."""
        loss = self.loss(batch)
        self.step(loss)
        return loss.detach()

    def end_epoch(self, val_report) -> dict:
        """Called after each epoch with the validation report; returns extra values to log."""
        return {}

    def trained_with(self) -> str:
        """What the tables' "trained with" column adds for this run ('' = nothing): a choice the
        method's options make implicitly, such as which modality conditions FiLM."""
        return ""

    @abstractmethod
    def logits(self, batch: Batch) -> torch.Tensor:
        """Class scores ``[B, C]`` using only the modalities marked present in ``batch``."""

    # --- helpers for subclasses ----------------------------------------------------------------
    def loss(self, batch: Batch) -> torch.Tensor:
        """The default objective: cross-entropy of the fused prediction."""
        return nn.functional.cross_entropy(self.logits(batch), batch.y)

    def step(self, loss: torch.Tensor, before_step=None) -> None:
        """zero_grad → backward → optional gradient surgery → optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        self.optimizer.step()


def projections(spec: DataSpec, hidden: int) -> nn.ModuleDict:
    """One ``ReLU(W_m x + b_m)`` per modality: the trainable 'encoder' of stage two."""
    return nn.ModuleDict({m: Projection(spec.dims[m], hidden) for m in spec.modalities})


def encode(proj: nn.ModuleDict, batch: Batch) -> dict[str, torch.Tensor]:
    """Project every modality and zero the absent ones (ReLU(b) of a zero input is not zero).

    A modality every sample of the batch has needs no mask (known on the host: ``batch.full``), which
    saves an elementwise pass and its backward on every complete batch.
    """
    return {m: proj[m](batch.x[m]) if batch.full(m) else proj[m](batch.x[m]) * batch.present[m].unsqueeze(1)
            for m in proj}


def mean_probability_logits(logits: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decision-level fusion: log of the mean class probability over each sample's present modalities.

    A sample with no present modality gets uniform scores (log 1/C), so argmax is class 0; the core
    never scores the empty subset through a model (v(∅) is the majority-class accuracy).
    """
    probs = torch.stack([logits[m].softmax(-1) for m in logits])  # [M, B, C]
    mask = torch.stack([present[m] for m in logits]).to(probs.dtype)  # [M, B]
    total = (probs * mask.unsqueeze(-1)).sum(0)
    count = mask.sum(0).clamp_min(1).unsqueeze(-1)
    fused = total / count
    fused = torch.where(mask.sum(0).unsqueeze(-1) > 0, fused, torch.full_like(fused, 1.0 / fused.shape[-1]))
    return fused.clamp_min(1e-12).log()
