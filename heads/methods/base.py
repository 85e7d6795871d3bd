"""The interface every head method implements, and the few helpers they share.

A method states only what differs from the others: which modules it has, how one batch updates
them (``train_step``), and how it predicts when only some modalities are present (``logits``).
The epoch loop, selection on validation, seeding, logging and checkpointing live once, in
``heads/train/trainer.py``; evaluation in ``heads/train/evaluation.py``; the stacked form of the loop for GPU grids in
``heads/sweeps/stacked.py`` (a method opts in with ``stackable`` or ``stack_chain``). Anything inference depends on (an order, a memory state) must be a buffer or
parameter, so that the selected checkpoint and a reloaded model carry it.

What the core offers a method between and inside epochs (METHODS-MORE.md §0.4), in the order of
one epoch — ``start_epoch(e)``, ``epoch_split(e, train)``, the scheduled rate set, the batch loop of
``train_step``, validation, ``end_epoch(report)``, and only then the core's copy of the state if
validation is the best so far:

- **H1, the prepared splits** (``attach``): the core hands the method its training and validation
  splits, standardised and on the device, once they are ready (and again after a checkpoint is
  restored); the test split is never attached. Read them at epoch boundaries (``start_epoch``,
  ``epoch_split``, ``end_epoch``) inside ``evaluating()``; never write to them.
- **H2, the epoch's rows** (``epoch_split``): the split the next batch loop shuffles and cuts; the
  attached training split unless the method builds another from it (``SplitTensors.take``, ``only``,
  ``with_present``, ``cat``: re-sampled copies, a held-out part left out), whose batches still carry
  each row's original training-split row as ``Batch.index``.
- **H3, phases and several steps**: decide the phase from the epoch number in ``start_epoch`` (rebuild
  ``self.optimizer`` there if the phase trains other parameters; the core sets the scheduled rate after
  it); ``train_step`` may take any number of optimizer steps (``step``) and returns one loss to log.
  ``selectable(e)`` False keeps epoch e out of the core's selection (umt's teacher phase trains no
  student, so its epochs validate an untrained model).
- **H4, rollback and per-modality rates**: ``snapshot``/``rollback`` store and restore parameters,
  buffers and optimizer state; ``modality_param_groups`` + ``set_lr_factor`` give modality m's
  parameters the scheduled rate times a factor. **Change parameters only in ``start_epoch``**: the core
  copies the state it selects right after ``end_epoch``, so a reset, rollback or phase swap made in
  ``end_epoch`` would be stored as validated when it never was. ``end_epoch`` measures and decides;
  the next ``start_epoch`` acts.
- **H5, randomness**: draw from torch's global generator (``torch.rand*``, ``randn_like``,
  ``randperm`` without a generator) anywhere in the epoch. The core gives each run its own stream
  (seeded, restored at every ``run``, saved in checkpoints), so a run interleaved with others (a pruned
  grid) or resumed reproduces itself alone. Python's ``random`` and numpy are not per-run streams:
  do not use them in a method.

One more hook serves evaluation, not training: a batch-dependent method may define
``subset_logits(batch, subsets)`` (logits ``[len(subsets), B, C]`` of one evaluation batch with only each
subset present) when it can share work between subsets; the core then calls it once per evaluation
batch instead of ``logits`` once per subset (edm: subsets with a common prefix of its chain share it).
"""
from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from heads.blocks.data import Batch, DataSpec, SplitTensors
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
    # ``.item()``/``float()`` of tensors, no random draws, no in-place buffer updates other than those of
    # ``trained_buffers``; and the inherited ``configure_optimizer`` and ``epoch_split``.
    stackable: bool = False
    # Buffers the batch loop updates in place (qmf's per-sample loss history): stacked training updates
    # each run's slice inside vmap and writes it back into the run's model after every epoch.
    trained_buffers: tuple[str, ...] = ()
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

    def attach(self, train: SplitTensors, val: SplitTensors) -> None:
        """H1: the core's prepared training and validation splits (standardised, on the device; never
        test), given once they are ready and again after a restore, so an override must keep what it
        already holds (size per-sample state only when it is missing) and draw no random numbers.
        They are not saved with the model (checkpoints and copies drop them)."""
        self.__dict__["_attached"] = {"train": train, "val": val}

    def attached(self, name: str) -> SplitTensors:
        """The attached ``train`` or ``val`` split (read-only; at epoch boundaries)."""
        splits = self.__dict__.get("_attached")
        if splits is None:
            raise RuntimeError(f"{type(self).__name__.lower()} reads the training data between epochs: "
                               "the trainer attaches it (model.attach(train=..., val=...))")
        return splits[name]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_attached", None)  # checkpoints and deep copies do not carry the data
        return state

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (1-based): phases are decided, parameters changed, here."""
        self.epoch = epoch

    def epoch_split(self, epoch: int, train: SplitTensors) -> SplitTensors:
        """H2: the rows epoch ``epoch`` trains on (called after ``start_epoch``); ``train`` is the attached
        training split. Return it, or a split derived from it (``take``/``only``/``with_present``/``cat``)."""
        return train

    def selectable(self, epoch: int) -> bool:
        """H3: whether the core may select the state of epoch ``epoch`` (best validation accuracy); a phase
        that does not train the model that predicts (umt's teachers) says False."""
        return True

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
    @property
    def eval_batch_size(self) -> int:
        """The batch size of the core's evaluation passes, for a method's own passes over a split."""
        return getattr(self.cfg, "eval_batch_size", None) or self.cfg.batch_size

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode without gradients for a pass over an attached split; the mode is restored after."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was)

    def snapshot(self) -> dict:
        """H4: a copy of everything training changes — parameters, every buffer (saved or not) and the
        optimizer's state (with its groups' rates and factors) — for ``rollback``."""
        return {"tensors": {n: t.detach().clone() for n, t in [*self.named_parameters(), *self.named_buffers()]},
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def rollback(self, snap: dict) -> None:
        """H4: back to ``snapshot()``, in place (the optimizer keeps its parameters). Call it from
        ``start_epoch``; set learning-rate factors after it (the snapshot's groups carry their own)."""
        tensors = dict([*self.named_parameters(), *self.named_buffers()])
        with torch.no_grad():
            for name, value in snap["tensors"].items():
                tensors[name].copy_(value)
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))

    def set_lr_factor(self, modality: str, factor: float) -> None:
        """H4: modality ``modality``'s groups (``modality_param_groups``) train at ``factor`` × the
        scheduled rate from the next ``set_lr`` on (the core's, at the start of each epoch)."""
        for group in self.optimizer.param_groups:
            if group.get("modality") == modality:
                group["lr_factor"] = float(factor)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The default objective: cross-entropy of the fused prediction."""
        return nn.functional.cross_entropy(self.logits(batch), batch.y)

    def step(self, loss: torch.Tensor, before_step=None, set_to_none: bool = True) -> None:
        """zero_grad → backward → optional gradient surgery → optimizer step.

        Gradients are reset to None by default: a parameter the loss does not reach then has no gradient
        and the optimizer leaves it alone (weight decay and momentum included), which alternating methods
        rely on. ``set_to_none=False`` zeroes them in place instead, for a step whose loss reaches every
        trainable parameter (the same update, without reallocating large gradient buffers each step).
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)
        loss.backward()
        if before_step is not None:
            before_step()
        self.optimizer.step()


def modality_param_groups(model: nn.Module, by_modality: dict[str, list]) -> list[dict]:
    """Parameter groups for ``make_optimizer``: one per modality (tagged ``modality``, ``lr_factor`` 1),
    and one untagged group with every other trainable parameter (factor 1 always)."""
    listed = {id(p) for ps in by_modality.values() for p in ps}
    groups = [{"params": list(ps), "modality": m, "lr_factor": 1.0} for m, ps in by_modality.items()]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in listed]
    return groups + ([{"params": rest}] if rest else [])


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
