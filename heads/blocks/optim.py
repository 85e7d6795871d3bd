"""How each method trains by default: its paper's (or official code's) optimizer, rate and schedule.

The field's comparisons are easy to get wrong here: OGM-GE scales gradient magnitudes, which Adam's
per-parameter normalisation largely undoes, so running every method under one optimizer silently
changes what some of them do. Each method therefore declares a ``Training`` with its source, and a
run uses it unless the user says otherwise (``--optimizer``/``--lr``/... override one setting;
``compare --same-optimizer`` runs every method under one setting for a controlled comparison).

A ``TrainConfig`` leaves these settings ``None`` until ``resolve_training`` fills them, so the
resolved values (and where they came from) are what ``config.json`` records. The epoch count is one of
them: a method declares its source's (MMPareto's code trains 50, the CCAT paper 150, CRMT's configs
140 + 45), applied when ``--epochs`` is not given; ``compare --same-optimizer`` sets one for all.

Schedules are a function of the epoch (``scheduled_lr``), applied by the core at the start of every
epoch to whatever optimizer the method holds then, so methods that rebuild their optimizer (CCAT's
stage switch) and runs resumed from a checkpoint follow the same curve. A parameter group may carry
an ``lr_factor`` (per-modality learning rates): its rate is the scheduled rate times that factor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SGD_MOMENTUM = 0.9  # every paper and official code we follow that uses SGD uses 0.9


@dataclass(frozen=True)
class Training:
    """A method's default training settings and the sentence that says where they come from."""

    optimizer: str
    lr: float
    weight_decay: float
    schedule: str  # "none", "step:<epochs>:<gamma>" or "cosine"
    batch_size: int
    source: str
    # The run's length when ``--epochs`` is not given (its source's; 100, the field's protocol, where the
    # source states none), and for a method trained in stages their lengths, which sum to ``epochs``.
    epochs: int = 100
    stages: tuple[int, ...] = ()

    def __post_init__(self):
        if self.stages and sum(self.stages) != self.epochs:
            raise ValueError(f"stage lengths {self.stages} do not sum to {self.epochs} epochs")

    def describe_epochs(self) -> str:
        """``100 epochs`` or, with stages, ``185 epochs (140 + 45)``."""
        stages = f" ({' + '.join(map(str, self.stages))})" if self.stages else ""
        return f"{self.epochs} epochs{stages}"

    def describe(self) -> str:
        return (f"{self.optimizer} lr {self.lr:g} wd {self.weight_decay:g} schedule {self.schedule} batch {self.batch_size}, "
                f"{self.describe_epochs()}")


# The protocol the CREMA-D line of work shares: OGM-GE's and MLA's official main.py both train with
# SGD (momentum 0.9, weight decay 1e-4), lr 1e-3, StepLR(70, 0.1) per epoch, batch 64, 100 epochs.
FIELD_PROTOCOL = Training("sgd", 1e-3, 1e-4, "step:70:0.1", 64,
                          "OGM-GE and MLA official code (main.py): SGD momentum 0.9, lr 1e-3, wd 1e-4, "
                          "StepLR 70 × 0.1, batch 64 — the protocol the papers' baselines share (choice for baselines)")

# ``compare --same-optimizer`` without further options: the setting this tool used for every method before.
SHARED = Training("adam", 1e-3, 1e-4, "none", 256, "one setting for every method (--same-optimizer)")

FIELDS = ("optimizer", "lr", "weight_decay", "schedule", "batch_size")


def parse_schedule(text: str) -> tuple[str, int, float]:
    """``none`` | ``cosine`` | ``step:70:0.1`` → (kind, step, gamma); raises ValueError with the valid forms."""
    if text in ("none", "cosine"):
        return text, 0, 1.0
    parts = text.split(":")
    if len(parts) == 3 and parts[0] == "step":
        try:
            step, gamma = int(parts[1]), float(parts[2])
        except ValueError:
            step, gamma = 0, 0.0
        if step >= 1 and 0 < gamma < math.inf:  # an infinite γ trains to NaN
            return "step", step, gamma
    raise ValueError(f"--schedule must be none, cosine or step:EPOCHS:GAMMA (e.g. step:70:0.1), got {text!r}")


def scheduled_lr(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of 1-based ``epoch``.

    ``step:S:γ`` is PyTorch's StepLR stepped once per epoch, as the official code does: epochs
    1…S use lr, S+1…2S use lr·γ, and so on. ``cosine`` anneals from lr to 0 over the run.
    """
    kind, step, gamma = parse_schedule(schedule)
    if kind == "step":
        return lr * gamma ** ((epoch - 1) // step)
    if kind == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))
    return lr


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The optimizer a resolved config names (SGD with momentum 0.9, as every source we follow).

    SGD is not fused: the fused kernel fails when a step leaves some parameters without a gradient
    (alternating methods update one modality at a time) while their momentum buffers exist. It is
    ``foreach`` (one multi-tensor kernel per update, not one per parameter), which skips parameters
    without a gradient as the single-tensor loop does.
    """
    params = list(params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use {', '.join(OPTIMIZERS)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The epoch's scheduled ``lr`` into every parameter group, times the group's ``lr_factor`` (1 unless
    a method tagged the group: per-modality learning rates, ``HeadMethod.set_lr_factor``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)
