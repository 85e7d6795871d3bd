"""``mslr``: concat with modality-specific learning rates (Yao & Mihalcea, "Modality-specific Learning
Rates for Effective Multimodal Additive Late-fusion", Findings of ACL 2022; METHODS-MORE.md §15).

No official repository was located. The reference is the MSLR baseline of the AGM code
(lihong2303/AGM_ICCV2023 @ 5a65542, ``run/CREMAD_main.py``: ``train``'s ``cfgs.methods == "MSLR"``
branch and the ratio update in ``CREMAD_main``); the paper's own strategies (a fixed factor per
modality from unimodal tuning; its adaptive variants) could not be checked, so the options are named
after the AGM code's behaviour.

**Factors by gradient scaling**, as the reference (``params.grad = params.grad * coeff`` between
backward and step): modality m's gradients are multiplied by ``c_m = c⁰_m · r_m`` before each step —
on ``P_m`` and on m's columns ``W_m`` of the concat head (the reference's sum-fusion model has one head
per modality; here the head's bias keeps factor 1, **(choice)**). Under SGD with momentum this scales
the incoming gradient, not the step (it equals a learning-rate factor only while ``c_m`` stays put and
without weight decay); that is the reference's arithmetic, so it is the one used (the core's
learning-rate factors, ``HeadMethod.set_lr_factor``, cannot reach a column block of one weight).

**The ratio** (after each epoch e, from ``acc_m(e) = v({m})``, the modality's accuracy on validation
through the model's own subset inference, measured on the attached validation split):

    r_m = 1 while fewer than ``window`` accuracies are stored (each epoch stores one);
    then r_m = acc_m(e) / mean(acc_m(e−window) … acc_m(e−1)), and the window slides

so with ``window = 5`` the sixth epoch is the first whose ratio differs from 1, and it applies from
epoch 7 on. (A mean of 0 keeps r = 1, **(choice)**.) The reference's "validation" is its test loader;
here it is the validation split (selection stays on validation too).

``--lr-factors`` gives ``c⁰`` (default 1 for every modality; the reference's CREMA-D pair is
``audio=0.9,visual=1.1``). The reference applies the factors only inside its modulation window
(argparse: epochs 0–20); §15's tool form has no window, so they apply every epoch **(choice)**.

**M > 2**: any M, each modality's factor from its own accuracy history. Logged per epoch:
``mslr_factor_<m>`` (the factor the epoch trained with) and ``mslr_acc_<m>`` (its validation v({m}), %).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from heads.blocks.domains import POSITIVE_INT
from heads.methods.base import FIELD_PROTOCOL, Training
from heads.methods.concat import Concat

# The AGM code's optimizer is the field protocol's (tasks/CREMAD_task.py); its rate is set per dataset.
AGM_REPO = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                    FIELD_PROTOCOL.batch_size,
                    "AGM code (lihong2303/AGM_ICCV2023 tasks/CREMAD_task.py): SGD momentum 0.9, wd 1e-4, StepLR 70 × "
                    "0.1; lr 1e-3 and batch 64 of the field protocol (its lr is set per dataset on the command line; choice)")


def parse_factors(text: str, modalities: list[str]) -> dict[str, float]:
    """``"audio=0.9,visual=1.1"`` → a positive factor per modality (1 for those not named)."""
    out = dict.fromkeys(modalities, 1.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in out:
            raise ValueError(f"--lr-factors names {name!r}, not a modality of this data ({', '.join(modalities)})")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--lr-factors expects modality=number, got {item!r}") from None
        if not out[name] > 0:
            raise ValueError(f"--lr-factors must be positive, got {item!r}")
    return out


def next_ratio(memory: list[float], acc: float, window: int) -> tuple[float, list[float]]:
    """The reference's ratio update after one epoch: ``(r, memory')`` from the stored accuracies."""
    if len(memory) < window:
        return 1.0, memory + [acc]
    mean = sum(memory) / len(memory)
    return (acc / mean if mean > 0 else 1.0), memory[1:] + [acc]


class ModalityFactors(Concat):
    """Concat whose modality m's gradients (``P_m`` and the head columns ``W_m``) are multiplied by
    ``factors[m]`` before each step (host numbers, set between epochs)."""

    stackable = False  # its own train_step: gradient scaling between backward and step

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.factors = dict.fromkeys(self.modalities, 1.0)

    def scale_gradients(self) -> None:
        d = self.cfg.hidden
        for i, m in enumerate(self.modalities):
            for p in self.proj[m].parameters():
                p.grad.mul_(self.factors[m])
            self.cls.weight.grad[:, i * d:(i + 1) * d].mul_(self.factors[m])

    def train_step(self, batch):
        loss = self.loss(batch)
        self.step(loss, before_step=self.scale_gradients)
        return loss.detach()

    def unimodal_accuracy(self) -> dict[str, float]:
        """``v({m})`` (%) on the attached validation split, each modality alone through ``logits``."""
        val = self.attached("val")
        correct = torch.zeros(len(self.modalities), device=val.y.device)
        with self.evaluating():
            for batch in val.batches(self.eval_batch_size):
                for i, m in enumerate(self.modalities):
                    correct[i] += (self.logits(batch.only([m])).argmax(-1) == batch.y).sum()
        return dict(zip(self.modalities, (100 * correct / max(len(val), 1)).tolist()))


@dataclass
class MSLROptions:
    lr_factors: str = field(default="", metadata={"help": "initial factor per modality, e.g. audio=0.9,visual=1.1 (the AGM code's CREMA-D pair); unnamed: 1"})
    window: int = field(default=5, metadata={"domain": POSITIVE_INT, "help": "epochs of validation accuracy each ratio compares with (AGM code: 5)"})


class MSLR(ModalityFactors):
    Options = MSLROptions
    summary = "concat with per-modality gradient factors adapted by each modality's validation accuracy"
    modality_rule = "any M: one factor per modality, adapted from its own validation accuracy"
    training = AGM_REPO

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        if opts.window < 1:
            raise ValueError(f"--window must be at least 1, got {opts.window}")
        self.initial = parse_factors(opts.lr_factors, self.modalities)
        self.factors = dict(self.initial)
        self.memory: dict[str, list[float]] = {m: [] for m in self.modalities}

    def end_epoch(self, val_report):
        acc, used = self.unimodal_accuracy(), dict(self.factors)
        for m in self.modalities:  # the next epoch's factors (they act on gradients only: set them here)
            ratio, self.memory[m] = next_ratio(self.memory[m], acc[m], self.opts.window)
            self.factors[m] = self.initial[m] * ratio
        return {**{f"mslr_factor_{m}": used[m] for m in self.modalities},
                **{f"mslr_acc_{m}": acc[m] for m in self.modalities}}
