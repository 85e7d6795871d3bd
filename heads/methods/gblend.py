"""``gblend``: Gradient-Blending (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification
Networks Hard?", CVPR 2020; METHODS-MORE.md §9). No official code was located; the reference
implementation is MultiBench @ 09a2219 (``training_structures/gradient_blend.py``: ``gb_estimate``,
``train_unimodal``, ``train_multimodal``); BalanceMM's ``GBlending_trainer.py`` @ 4c1482f only for what it
does differently.

**Model.** Concat's projections ``P_m`` and fused head ``f``, plus one linear head ``g_m`` per modality
(``--uni-heads separate``, the paper's multi-head model) or, as BalanceMM, the concat head's slices
``z_m = W_m h_m + b/M`` (``--uni-heads slice``). Inference is the fused head only (concat's ``logits``).

**Weights** (the paper). For head k ∈ {1 … M, mm}, between checkpoints N and N + n, with the training
loss ``L^T`` on T′ and the held-out loss ``L^V`` on V:

    O = L^V − L^T,   ΔO_k = O_{N+n} − O_N,   ΔG_k = L^V_N − L^V_{N+n},   OGR_k = |ΔO_k / ΔG_k|
    w_k = (1/Z) · ΔG_k / ΔO_k²,   Σ_k w_k = 1
    L_blend = Σ_m w_m CE(g_m(h_m), y) + w_mm CE(f(h), y)

Guards **(choice)**: ``ΔG_k ≤ 0`` → raw weight 0 (a head whose held-out loss rose); ``|ΔO_k| < 1e-4`` → 1e-4;
every raw weight 0 → uniform. ``--ogr-form balancemm`` is BalanceMM's ``|ΔG/ΔO²|`` (a rise counts as a
gain [BUG] (e)), measured here cleanly.

**Held-out part of train.** Once, V = ``--holdout`` of each class's training rows (``round``, drawn with a
generator seeded by the run's seed + 9 (a stream of its own, not the one the run's initialisation
started from), so a resumed run holds out the same rows) and T′ = the rest
**(choice: stratified)**. Every epoch trains on T′ only (``epoch_split``, H2), and the weights never read
validation or test: the core's validation split only selects the epoch, as for every method.

**Super-epochs.** At epochs 1, n + 1, 2n + 1, … (``--mode offline``: epoch 1 only), in ``start_epoch``:
for each head k, a copy of k's path (``P_m`` and ``g_m`` — with slices, the concat head — for modality
m; every ``P`` and ``f`` for mm) has ``L^T_N``, ``L^V_N`` measured (mean per-sample CE, eval mode; a unimodal
head over the rows that have m, choice), is trained for n epochs on T′ with ``CE_k`` alone by a fresh
optimizer of the run's type at the epoch's scheduled rate (**choice**, MultiBench: fresh optimizer,
same rate; batches from the run's torch stream, H5), and is measured again. The real model is not
touched by the estimate; the weights are a buffer (the selected checkpoint and a resume carry them).
MultiBench's 25 epochs of fused-head fine-tuning after each super-epoch are not done **(choice)**.
Logged per epoch: ``gblend_w_<k>`` (k = each modality, ``mm``), the weights the epoch trained with.

**BalanceMM [BUG]s** (none reproduced): (a) O and G are measured on the **test** split (its validation);
(b) its losses are *sums of batch means* over loaders with different batch counts, so O mostly
measures the batch counts; (c) "before" is taken after the first epoch of the estimate, from the running
training loss; (d) the measured unimodal copies are the full model with the other inputs zeroed while
training uses the slices (the measured head is not the trained head); (e) ``|G/O²|`` accepts a rise of
the held-out loss as a gain; (f) its temporary optimizer is reset to its initial state for each head.

**M > 2**: K = M + 1 heads, nothing else changes. **Training**: the field protocol (no source states one).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.data import SplitTensors
from heads.blocks.domains import POSITIVE_INT, UNIT_OPEN
from heads.blocks.optim import make_optimizer, scheduled_lr
from heads.errors import OptionError
from heads.methods.base import FIELD_PROTOCOL, Training, encode
from heads.methods.concat import Concat

MM = "mm"  # the fused head's name among the heads


@dataclass
class GBlendOptions:
    mode: Literal["online", "offline"] = field(default="online", metadata={"help": "re-estimate the weights every super-epoch (MultiBench, BalanceMM) or once at epoch 1"})
    super_epoch: int = field(default=10, metadata={"domain": POSITIVE_INT, "help": "n: epochs each estimate trains its copies, and between estimates (BalanceMM 10; MultiBench 20)"})
    holdout: float = field(default=0.08, metadata={"domain": UNIT_OPEN, "help": "fraction of each class's training rows held out to measure generalisation (MultiBench v_rate 0.08; BalanceMM: the test split)"})
    ogr_form: Literal["paper", "balancemm"] = field(default="paper", metadata={"help": "raw weight ΔG/ΔO² with ΔG ≤ 0 → 0 (paper) or BalanceMM's |ΔG/ΔO²|"})
    uni_heads: Literal["separate", "slice"] = field(default="separate", metadata={"help": "unimodal heads: one linear head per modality (paper) or the concat head's slices W_m h_m + b/M (BalanceMM)"})


def blend_weights(before: dict, after: dict, form: str = "paper") -> dict[str, float]:
    """Normalised weights from each head's ``(L^T, L^V)`` before and after its copy trained."""
    raw = {}
    for k in before:
        (t0, v0), (t1, v1) = before[k], after[k]
        gain, over = v0 - v1, max(abs((v1 - t1) - (v0 - t0)), 1e-4)
        raw[k] = abs(gain) / over ** 2 if form == "balancemm" else max(gain, 0.0) / over ** 2
    total = sum(raw.values())
    if total == 0:
        return {k: 1 / len(raw) for k in raw}
    return {k: r / total for k, r in raw.items()}


def held_out_rows(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A bool ``[N]``: ``round(fraction · n_c)`` rows of each class c, drawn with a generator of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = y.cpu()
    out = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        out[members[torch.randperm(len(members), generator=g)[:round(fraction * len(members))]]] = True
    return out.to(y.device)


class GBlend(Concat):
    Options = GBlendOptions
    summary = "concat + unimodal heads, losses weighted by each head's generalisation gain per overfitting (ΔG/ΔO²) measured on a held-out part of train"
    modality_rule = "any M: M + 1 heads"
    stackable = False  # its own epoch_split and estimates in start_epoch
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "the field protocol (choice): no official G-Blend code; MultiBench's gradient_blend.py and BalanceMM's "
                        "trainer take the optimizer of their benchmark")

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        if not 0 <= opts.holdout < 1:
            raise OptionError(f"--holdout must lie in [0, 1), got {opts.holdout}")
        self.uni = nn.ModuleDict({m: nn.Linear(cfg.hidden, spec.num_classes) for m in self.modalities}) \
            if opts.uni_heads == "separate" else None
        self.heads = [*self.modalities, MM]
        self.register_buffer("weights", torch.full((len(self.heads),), 1 / len(self.heads)))

    # --- the heads ---------------------------------------------------------------------------------
    def head_logits(self, parts: nn.ModuleDict, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every head's logits from the projections ``h``, with the modules of ``parts`` (the model's or a copy's)."""
        fused = parts["cls"](torch.cat([h[m] for m in self.modalities], 1))
        if "uni" in parts:
            out = {m: parts["uni"][m](h[m]) for m in self.modalities}
        else:
            d, bias = self.cfg.hidden, parts["cls"].bias / len(self.modalities)
            out = {m: h[m] @ parts["cls"].weight[:, i * d:(i + 1) * d].T + bias for i, m in enumerate(self.modalities)}
        return {**out, MM: fused}

    def head_losses(self, parts: nn.ModuleDict, batch, heads) -> dict[str, torch.Tensor]:
        """Mean CE of each head in ``heads`` (a unimodal one over the rows that have its modality)."""
        logits = self.head_logits(parts, encode(parts["proj"], batch))
        out = {}
        for k in heads:
            per_sample = nn.functional.cross_entropy(logits[k], batch.y, reduction="none")
            rows = torch.ones_like(per_sample) if k == MM else batch.present[k].to(per_sample.dtype)
            out[k] = (per_sample * rows).sum() / rows.sum().clamp_min(1)
        return out

    def parts(self) -> nn.ModuleDict:
        modules = {"proj": self.proj, "cls": self.cls}
        return nn.ModuleDict({**modules, "uni": self.uni} if self.uni is not None else modules)

    def loss(self, batch):
        losses = self.head_losses(self.parts(), batch, self.heads)
        return sum(self.weights[i] * losses[k] for i, k in enumerate(self.heads))

    # --- the held-out part and the estimate --------------------------------------------------------
    def split_parts(self, train: SplitTensors) -> tuple[SplitTensors, SplitTensors]:
        """(T′, V) of the attached training split, drawn once per run (seeded by the run's seed + 9)."""
        cached = self.__dict__.get("_parts")
        if cached is None or cached[0] is not train:
            held = held_out_rows(train.y, self.opts.holdout, self.cfg.seed + 9)
            if not held.any() or held.all():
                raise OptionError(f"--holdout {self.opts.holdout} leaves {int(held.sum())} of {len(train)} training "
                                  "rows held out: choose one that keeps both parts non-empty")
            rows = torch.arange(len(train), device=train.device)
            cached = self.__dict__["_parts"] = (train, train.take(rows[~held]), train.take(rows[held]))
        return cached[1], cached[2]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_parts", None)  # derived from the attached split, which is not saved either
        return state

    def path(self, parts: nn.ModuleDict, head: str) -> list[nn.Parameter]:
        """The parameters head ``head``'s copy trains: every ``P`` and ``f`` for mm; ``P_m`` and ``g_m`` (with
        slices: the concat head, of which only the slice's columns and the bias get a gradient) for m."""
        if head == MM:
            return [*parts["proj"].parameters(), *parts["cls"].parameters()]
        own = parts["uni"][head] if "uni" in parts else parts["cls"]
        return [*parts["proj"][head].parameters(), *own.parameters()]

    def measure(self, parts: nn.ModuleDict, split: SplitTensors, head: str) -> float:
        """Mean per-sample CE of ``head`` over ``split`` (a unimodal head: over the rows that have m), eval mode."""
        total, count = torch.zeros(()), torch.zeros(())
        was = parts.training
        parts.eval()
        with torch.no_grad():
            for batch in split.batches(self.eval_batch_size):
                rows = float(len(batch)) if head == MM else float(batch.present[head].sum())
                total += float(self.head_losses(parts, batch, [head])[head]) * rows
                count += rows
        parts.train(was)
        return float(total / count.clamp_min(1))

    def estimate(self, epoch: int) -> dict[str, float]:
        """Train a copy of each head's path for n epochs on T′ and return the normalised weights."""
        fit, held = self.split_parts(self.attached("train"))
        lr = scheduled_lr(self.cfg.lr, self.cfg.schedule, epoch, self.cfg.epochs)
        before, after = {}, {}
        for k in self.heads:
            parts = copy.deepcopy(self.parts())
            optimizer = make_optimizer(self.path(parts, k), self.cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            before[k] = (self.measure(parts, fit, k), self.measure(parts, held, k))
            for _ in range(self.opts.super_epoch):
                order = torch.randperm(len(fit)).to(fit.device)
                for start in range(0, len(fit), self.cfg.batch_size):
                    loss = self.head_losses(parts, fit.batch(order[start:start + self.cfg.batch_size]), [k])[k]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            after[k] = (self.measure(parts, fit, k), self.measure(parts, held, k))
        return blend_weights(before, after, self.opts.ogr_form)

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        due = epoch == 1 if self.opts.mode == "offline" else (epoch - 1) % self.opts.super_epoch == 0
        if due:
            weights = self.estimate(epoch)
            with torch.no_grad():
                self.weights.copy_(torch.tensor([weights[k] for k in self.heads]))

    def epoch_split(self, epoch, train):
        return self.split_parts(train)[0]

    def end_epoch(self, val_report):
        return {f"gblend_w_{k}": w for k, w in zip(self.heads, self.weights.tolist())}
