"""``edm``: EDM-ordered alternating training with a cross-modal memory (METHODS.md, "edm").

Per batch the modalities form a chain in the epoch's order (weakest first by default). At step k:
``h_k = P_k(x_k)``; alignment brings the previous chain state to this modality's samples
(``a_k = S' H_{k−1}``, threshold τ or learnable gate; ``a_1 = 0``); the memory cell gives
``(H_k, C_k)``; the loss ``CE(cls(H_k), y)`` takes one optimizer step before the next modality
("first update with m_i, then use the past state to guide m_j"). ``H_{k−1}``, ``C_{k−1}`` and
``h_{k−1}`` enter step k detached (choice).

After each epoch the core measures Shapley values on validation; ``end_epoch`` sorts the modalities
by deviation ``δ_m`` for the next epoch (weak-to-strong; or strong-to-weak, random, fixed for the
paper's order analysis). The first chain state ``(H_0, C_0)`` is inherited: an exponential moving
average of the batch mean of the last step's state across batches and epochs (choice), saved with
the model and used at inference. The memory state is 64 wide by default (``--memory-dim``; choice,
the paper gives no width). The cell's gate products grow with the square of the width, so a run
costs about 1.75× a concat run at 64, 2.2× at 128 and 4.4× at d = 256. On both built-in presets 64
did as well as 128 within the seed spread, with a lower EDM (benchmarks/RESULTS.md). The classifier
reads H, so with many classes (Food-101) a wider memory may pay off. Inference chains through each
sample's present modalities in the order of the last trained epoch, the order the selected
checkpoint's validation score was measured with; a sample's absent modality is skipped (its state
passes through unchanged). Alignment looks across the batch, so predictions depend on which samples
share an evaluation batch: the core fixes the batches by a seeded, label- and name-blind order of the
samples' own features (``heads.blocks.order.evaluation_order``; never sorted ids, which encode the class).

Training defaults (``training``): the paper's AdamW at lr 1e-4; weight decay, schedule and batch size
are not stated (choices: torch's AdamW default 0.01, no schedule, the baselines' batch 64).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.domains import UNIT_OPEN, WIDTH
from heads.blocks.modules import Alignment, MemoryCell
from heads.methods.base import HeadMethod, Training, projections
from heads.metrics import weak_to_strong


@dataclass(frozen=True)
class Started:
    """Which samples have had a chain step: the device mask, and whether the host knows that some or
    every sample has (from the batch's present counts), so the chain branches without a device sync."""

    mask: torch.Tensor
    some: bool
    every: bool

    def add(self, present: torch.Tensor, has: bool, full: bool) -> "Started":
        return Started(self.mask | present, self.some or has, self.every or full)


@dataclass
class EDMOptions:
    tau: float = field(default=0.5, metadata={"domain": UNIT_OPEN, "help": "alignment threshold τ in [0, 1): keep similarities > τ"})
    gate: Literal["threshold", "learnable"] = field(default="threshold", metadata={"help": "hard threshold τ or the learnable gate σ(g(S))"})
    order: Literal["weak-to-strong", "strong-to-weak", "random", "fixed"] = field(default="weak-to-strong", metadata={"help": "how the chain order is chosen each epoch"})
    initial_order: str = field(default="", metadata={"help": "order of epoch 1, e.g. visual,audio (default: the cache's order)"})
    align: bool = field(default=True, metadata={"help": "cross-modal alignment (off: a_k = 0)"})
    memory: bool = field(default=True, metadata={"help": "LSTM-style memory cell (off: H_k = h_k + a_k)"})
    inherit: bool = field(default=True, metadata={"help": "inherit (H_0, C_0) across batches and epochs (off: zeros)"})
    inherit_momentum: float = field(default=0.9, metadata={"domain": UNIT_OPEN, "help": "EMA momentum of the inherited state"})
    memory_dim: int = field(default=64, metadata={"domain": WIDTH | (0,), "help": "width of the memory state H, C (0 = the hidden width d)"})


class EDM(HeadMethod):
    Options = EDMOptions
    summary = "EDM-ordered weak-to-strong alternating chain with alignment and memory"
    # Stacked training (heads/sweeps/stacked.py) runs the chain itself: one vmapped ``chain_loss`` and one
    # optimizer step per modality, runs grouped by their epoch's order; τ may differ inside a stack.
    stack_chain = True
    stack_options = ("tau", "inherit_momentum")
    training = Training("adamw", 1e-4, 0.01, "none", 64,
                        "EDM paper §IV-A: AdamW, lr 1e-4 (\"All models are trained using the AdamW optimizer with a "
                        "learning rate of 1e-4\"); weight decay, schedule and batch size unstated: torch's AdamW "
                        "default 0.01, none, and the baselines' batch 64 (choices)")

    def __init__(self, spec, cfg, opts: EDMOptions):
        super().__init__(spec, cfg, opts)
        if not 0 <= opts.tau < 1:
            raise ValueError(f"--tau must lie in [0, 1), got {opts.tau}")
        if not 0 <= opts.inherit_momentum < 1:
            raise ValueError(f"--inherit-momentum must lie in [0, 1), got {opts.inherit_momentum}")
        d = cfg.hidden
        # Without the cell, H_k = h_k + a_k lives in the projection space, so its width is d.
        width = (opts.memory_dim or d) if opts.memory else d
        self.proj = projections(spec, d)
        self.align = Alignment(opts.tau, opts.gate)
        self.cell = MemoryCell(d, width) if opts.memory else None
        self.cls = nn.Linear(width, spec.num_classes)
        initial = [m.strip() for m in opts.initial_order.split(",") if m.strip()] or self.modalities
        if sorted(initial) != sorted(self.modalities):
            raise ValueError(f"--initial-order must name each of {', '.join(self.modalities)} once, got {opts.initial_order!r}")
        index = torch.tensor([self.modalities.index(m) for m in initial])
        # Buffers, so the selected checkpoint and a reloaded model carry them.
        self.register_buffer("order_index", index.clone())  # the order trained with (and inferred with)
        self.register_buffer("next_order_index", index.clone())  # set by the schedule for the next epoch
        self.register_buffer("memory_h", torch.zeros(width))
        self.register_buffer("memory_c", torch.zeros(width))

    @property
    def order(self) -> list[str]:
        """The chain order (the ``order_index`` buffer), known on the host: read from the buffer once
        after each change (``start_epoch``, a loaded state), never once per batch."""
        cached = self.__dict__.get("_order_host")
        if cached is None:
            cached = self.__dict__["_order_host"] = [self.modalities[i] for i in self.order_index.tolist()]
        return cached

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_order_host", None)  # the loaded order_index decides again
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def reads_phi(self) -> bool:
        """The per-epoch order reads validation δ (so the core scores every subset each epoch)."""
        return self.opts.order in ("weak-to-strong", "strong-to-weak")

    @property
    def batch_independent(self) -> bool:
        """Alignment mixes the states of the samples that share a batch."""
        return not self.opts.align

    def initial_state(self, batch):
        """``(h_prev, started, H_0, C_0)`` before the first step; ``H_0, C_0`` are the inherited memory,
        one row ``[1, width]`` that broadcasts over the batch (the cell multiplies it once). ``started``
        is a per-sample mask plus what the host knows of it (``Started``), so no step waits for the device."""
        n = len(batch)
        h_prev = torch.zeros(n, self.cfg.hidden, device=batch.y.device)
        started = Started(torch.zeros(n, dtype=torch.bool, device=batch.y.device), False, False)
        return h_prev, started, self.memory_h.unsqueeze(0), self.memory_c.unsqueeze(0)

    def chain_step(self, m, batch, h_prev, started: "Started", state_h, state_c):
        """One modality's step for every sample that has it; the others pass their state through.

        ``h_prev`` is each sample's projection at its last step and ``started`` says which samples
        have had one; a sample's first present modality gets ``a = 0``. Samples that have not started
        have zero ``h_prev``, whose similarity 0 never passes the gate, so nobody aligns to them.
        """
        present = batch.present[m]
        everyone = batch.full(m)  # the usual case: masking would change nothing, so skip it
        h = self.proj[m](batch.x[m])
        if not everyone:
            h = h * present.unsqueeze(1)
        a = None  # a = 0: the cell skips its block
        if self.opts.align and started.some:
            a = self.align(h, h_prev, state_h)
            if not started.every:
                a = a * started.mask.unsqueeze(1)
        if self.cell is not None:
            new_h, new_c = self.cell(h, a, state_h, state_c)
        else:
            new_h, new_c = h if a is None else h + a, state_c
        if not everyone:
            keep = present.unsqueeze(1)
            new_h, new_c = torch.where(keep, new_h, state_h), torch.where(keep, new_c, state_c)
            h = torch.where(keep, h, h_prev)
        return h, started.add(present, batch.has(m), everyone), new_h, new_c

    def chain_loss(self, m, batch, h_prev, started: "Started", state_h, state_c):
        """Step k of the chain and its loss, the mean CE of ``cls(H_k)`` over the samples that have m:
        ``(loss, h_seen, started, H_k, C_k)`` (what ``train_step`` and the stacked runner share)."""
        h_seen, started, new_h, new_c = self.chain_step(m, batch, h_prev, started, state_h, state_c)
        present = batch.present[m]
        per_sample = nn.functional.cross_entropy(self.cls(new_h), batch.y, reduction="none")
        return (per_sample * present).sum() / present.sum(), h_seen, started, new_h, new_c

    def step_parameters(self, m: str, aligned: bool) -> tuple[str, ...]:
        """Names (prefixes) of the parameters step m's loss reaches — those its optimizer step moves;
        the others have no gradient and are left alone, as ``torch.optim`` leaves them."""
        names = [f"proj.{m}.", "cls."]
        if self.cell is not None:
            names.append("cell.")
        if aligned and self.align.gate is not None:
            names.append("align.")
        return tuple(names)

    def train_step(self, batch):
        h_prev, started, state_h, state_c = self.initial_state(batch)
        total = torch.zeros((), device=batch.y.device)
        for m in self.order:
            if not batch.has(m):
                continue
            loss, h_seen, started, new_h, new_c = self.chain_loss(m, batch, h_prev, started, state_h, state_c)
            self.step(loss)
            total = total + loss.detach()
            h_prev, state_h, state_c = h_seen.detach(), new_h.detach(), new_c.detach()
        if self.opts.inherit:
            beta = self.opts.inherit_momentum
            # The means first: a state no step replaced is still a view of the buffers updated here.
            mean_h, mean_c = state_h.mean(0), state_c.mean(0)
            self.memory_h.mul_(beta).add_(mean_h, alpha=1 - beta)
            self.memory_c.mul_(beta).add_(mean_c, alpha=1 - beta)
        return total / len(self.modalities)

    def logits(self, batch):
        h_prev, started, state_h, state_c = self.initial_state(batch)
        for m in self.order:
            if batch.has(m):
                h_prev, started, state_h, state_c = self.chain_step(m, batch, h_prev, started, state_h, state_c)
        return self.cls(state_h.expand(len(batch), -1))  # one row if no modality was present

    def subset_logits(self, batch, subsets: list[frozenset]) -> torch.Tensor:
        """``logits(batch.only(S))`` for every S in ``subsets``, ``[len(subsets), B, C]``, sharing prefixes.

        With only S present the chain steps through S's modalities in the epoch's order and passes the
        others by, so after the first j modalities of the order its state depends only on which of them
        are in S. The states are therefore grown as a tree of those prefixes, one chain step per node:
        2^M − 1 steps for all 2^M − 1 subsets instead of M·2^(M−1) (a third at M = 6), each the same
        computation on the same inputs as in ``logits``, so the logits are the same bit for bit
        (``tests/test_edm.py``). The per-epoch φ on validation that the order reads is what this serves.
        """
        wanted = [frozenset(s) for s in subsets]
        nodes = {frozenset(): self.initial_state(batch)}
        seen: set[str] = set()
        for m in self.order:
            seen.add(m)
            needed = {s & seen for s in wanted}  # the prefixes some wanted subset passes through
            grown, stepped = {}, {}  # stepped: one step per distinct state (prefixes that passed a modality by share one)
            for prefix, state in nodes.items():
                if prefix in needed:
                    grown[prefix] = state
                if prefix | {m} in needed:
                    if batch.has(m):
                        if id(state) not in stepped:
                            stepped[id(state)] = self.chain_step(m, batch, *state)
                        grown[prefix | {m}] = stepped[id(state)]
                    else:  # nobody has m: the chain passes it by, as ``logits`` does
                        grown[prefix | {m}] = state
            nodes = grown
        return torch.stack([self.cls(nodes[s][2].expand(len(batch), -1)) for s in wanted])

    # --- the schedule ------------------------------------------------------------------------------
    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self.order_index.copy_(self.next_order_index)
        self.__dict__.pop("_order_host", None)
        self.order  # re-read once, here, not in the batch loop

    def end_epoch(self, val_report) -> dict:
        if self.opts.order == "weak-to-strong":
            nxt = weak_to_strong(val_report.delta)
        elif self.opts.order == "strong-to-weak":
            nxt = weak_to_strong(val_report.delta)[::-1]
        elif self.opts.order == "random":
            nxt = [self.modalities[i] for i in torch.randperm(len(self.modalities)).tolist()]
        else:
            nxt = self.order
        self.next_order_index.copy_(torch.tensor([self.modalities.index(m) for m in nxt]))
        return {"order": ">".join(self.order), "next_order": ">".join(nxt)}
