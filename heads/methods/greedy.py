"""``greedy``, **degraded frozen-feature form**: balanced multi-modal learning against greediness (Wu,
Jastrzębski, Cho, Geras, "Characterizing and overcoming the greedy nature of learning in multi-modal deep
neural networks", ICML 2022; METHODS-MORE.md §3), with **one MMTM gate after the projections** instead of
MMTM blocks inside deep encoders. Source: the official code, nyukat/greedy_multimodal_learning @ a190e03
(``src/callbacks.py::Bias_Mitigation_Strong``, ``src/balanced_mmtm.py::MMTM_mitigate``, ``train.py::blend_loss``,
``configs/training_guided.gin``); BalanceMM's ``Greedy_trainer.py`` and ``MMTM`` @ 4c1482f only for its
deviations. The paper's mechanism needs cross-modal flow inside the encoders; here each modality has one
trainable layer, so what the conditional learning speed reads is much weaker than the paper's.

**Model.** ``h_m = P_m(x_m)`` (zero where absent), one MMTM block (squeeze width ``2 · M · d / ratio``):

    z = G [h_1; …; h_M] + g,   e_m = σ(E_m ReLU(z) + c_m),   h̃_m = h_m ⊙ e_m

per-modality linear heads ``g_m(h̃_m)``; loss ``Σ_m CE(g_m(h̃_m), y)`` over the samples that have m (the
official ``blend_loss``); prediction the mean logit over the sample's present modalities (official
``(x_0 + x_1)/2``). In training forwards the running mean ``ē_m ← (mean_batch(e_m) + ē_m · t)/(t + 1)``
(detached, t the forward count) is updated first; the batch mean is over the samples that have m
**(choice)**, and evaluation passes neither update it nor curate **(choice**: the core evaluates every
epoch). **[BUG] in the official code:** the second modality's average is computed from the first's
excitation (``vis_out``); here each modality's own. In curation with caring modality c, ``e_c`` is replaced
by ``ē_c`` for every sample (branch c gets no sample-specific information from the others).

**Conditional learning speed** (``compute_BDR``), after backward and before the step, with ``main_m`` =
``{P_m, g_m}`` and ``bypass_m`` = ``{E_m, c_m}`` plus the shared ``{G, g}``:

    μ_main,m += Σ_{θ∈main_m} ‖∇θ‖² / Σ_{θ∈main_m} ‖θ‖²,   μ_bypass,m += (the same over bypass_m)
    BDR_m = log10(μ_bypass,m / μ_main,m),   d = BDR_0 − BDR_1

**Per step** (``Bias_Mitigation_Strong.on_backward_end``): before ``--starting-epoch`` μ accumulates and d is
computed, never curating; from it on, when not curating, μ accumulates and ``|d| > ε`` starts curation of
``caring = 0 if d > 0 else 1`` with a step count 0; when curating, the count rises and curation ends when it
reaches ``--window``, μ not accumulated. The mode set at step t acts in the forward of step t + 1, so exactly
``window`` forwards are curated. M > 2 **(choice)**: BDR_m for every m; ``max BDR − min BDR > ε`` cares for
``argmax BDR`` (for M = 2 exactly the rule above). The whole state is tensors (buffers, carried by
checkpoints), updated without a host read.

**BalanceMM** uses a concat head with CE on the fused output, MMTMs after layers 1–4, no warm-up and
``alpha`` (ε) 0.001; its ``MMTM.forward`` resets ``running_avg_weight = {}`` at every call and then reads
it (KeyError at HEAD) [BUG]; ``B = 64`` is hard-coded in its visual reshape (the default batch is 32) [BUG];
it calls the renamed ``Unimodality_Calculate`` [BUG]. None of that is reproduced.

**Training (choice):** the field protocol; the official setting (SGD lr 0.1, momentum 0, wd 0, batch 8,
ReduceLROnPlateau, early stopping, ≤ 300 epochs) is for ModelNet40 two views. Logged per epoch:
``greedy_bdr_<m>`` (at the epoch's last step) and ``greedy_curated_<m>`` (forwards curated for m).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, POSITIVE, POSITIVE_INT
from heads.methods.base import FIELD_PROTOCOL, HeadMethod, Training, encode, projections


@dataclass
class GreedyOptions:
    epsilon: float = field(default=0.01, metadata={"domain": NONNEGATIVE, "help": "ε: curation starts when |BDR_0 − BDR_1| > ε (official 0.01; BalanceMM 0.001)"})
    window: int = field(default=5, metadata={"domain": POSITIVE_INT, "help": "forward passes each curation lasts (official 5)"})
    starting_epoch: int = field(default=3, metadata={"domain": POSITIVE_INT, "help": "first epoch that may curate (official 2, 0-based; BalanceMM from step 1)"})
    ratio: float = field(default=4.0, metadata={"domain": POSITIVE, "help": "MMTM squeeze: width 2·M·d / ratio (official 4)"})


def advance(state: dict, add_bypass: torch.Tensor, add_main: torch.Tensor, unlocked: bool, eps: float, window: int) -> None:
    """One step of the curation state machine, in place on tensors (``state``: ``mu_bypass``, ``mu_main``
    ``[M]``; ``curating`` bool, ``count`` and ``caring`` long, 0-d): μ accumulates unless curating; a curation
    ends after ``window`` counted steps; otherwise, once unlocked, a BDR spread above ε starts one."""
    curating = state["curating"]
    keep = (~curating).to(add_main.dtype)
    state["mu_bypass"] += add_bypass * keep
    state["mu_main"] += add_main * keep
    bdr = torch.log10(state["mu_bypass"] / state["mu_main"])
    count = torch.where(curating, state["count"] + 1, torch.zeros_like(state["count"]))
    start = ~curating & (bdr.max() - bdr.min() > eps) & unlocked
    state["count"].copy_(count)
    state["caring"].copy_(torch.where(start, bdr.argmax(), state["caring"]))
    state["curating"].copy_((curating & (count < window)) | start)
    state["bdr"].copy_(bdr)


class Greedy(HeadMethod):
    Options = GreedyOptions
    summary = ("DEGRADED frozen-feature form — greedy (one gate after the projections): an MMTM gate over the projections, "
               "per-modality heads; the cross-modal gate of the modality whose bypass learns faster is frozen to its mean for a window")
    modality_rule = "any M: BDR_m for every m; when max − min > ε the argmax is cared for (choice; official: 2)"
    stackable = False  # its own train_step with a state machine in buffers
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "the field protocol (choice): greedy_multimodal_learning's official setting (SGD lr 0.1, no momentum, "
                        "batch 8, ReduceLROnPlateau, ≤ 300 epochs) is for ModelNet40 two views")

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        k, d = len(self.modalities), cfg.hidden
        self.proj = projections(spec, d)
        self.squeeze = nn.Linear(k * d, max(1, int(2 * k * d / opts.ratio)))
        self.excite = nn.ModuleDict({m: nn.Linear(self.squeeze.out_features, d) for m in self.modalities})
        self.cls = nn.ModuleDict({m: nn.Linear(d, spec.num_classes) for m in self.modalities})
        self.register_buffer("running", torch.zeros(k, d))  # ē_m
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))  # t
        self.register_buffer("mu_bypass", torch.zeros(k))
        self.register_buffer("mu_main", torch.zeros(k))
        self.register_buffer("bdr", torch.zeros(k))
        self.register_buffer("curating", torch.zeros((), dtype=torch.bool))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("caring", torch.zeros((), dtype=torch.long))
        self.register_buffer("curated", torch.zeros(k, dtype=torch.long))  # forwards curated this epoch

    def gated(self, batch) -> dict[str, torch.Tensor]:
        """``h̃_m``: the projections times their excitations (in training, ē updated and curation applied)."""
        h = encode(self.proj, batch)
        z = torch.relu(self.squeeze(torch.cat([h[m] for m in self.modalities], 1)))
        out = {}
        for i, m in enumerate(self.modalities):
            e = torch.sigmoid(self.excite[m](z))
            if self.training:
                with torch.no_grad():
                    rows = batch.present[m].to(e.dtype)
                    mean = (e * rows[:, None]).sum(0) / rows.sum().clamp_min(1)
                    t = self.forwards.to(e.dtype)
                    self.running[i].copy_(torch.where(rows.sum() > 0, (mean + self.running[i] * t) / (t + 1), self.running[i]))
                curate = self.curating & (self.caring == i)
                self.curated[i] += curate.to(self.curated.dtype)
                e = torch.where(curate, self.running[i].expand_as(e), e)
            out[m] = h[m] * e
        if self.training:
            self.forwards += 1
        return out

    def unimodal_logits(self, batch) -> dict[str, torch.Tensor]:
        h = self.gated(batch)
        return {m: self.cls[m](h[m]) for m in self.modalities}

    def logits(self, batch):
        logits = self.unimodal_logits(batch)
        mask = torch.stack([batch.present[m] for m in self.modalities]).to(logits[self.modalities[0]].dtype)
        total = (torch.stack([logits[m] for m in self.modalities]) * mask[:, :, None]).sum(0)
        return total / mask.sum(0).clamp_min(1)[:, None]

    def loss(self, batch):
        total = 0.0
        for m, logit in self.unimodal_logits(batch).items():
            per_sample = nn.functional.cross_entropy(logit, batch.y, reduction="none")
            rows = batch.present[m].to(per_sample.dtype)
            total = total + (per_sample * rows).sum() / rows.sum().clamp_min(1)
        return total

    def groups(self) -> tuple[list[list[nn.Parameter]], list[list[nn.Parameter]]]:
        """Per modality, the main parameters ``{P_m, g_m}`` and the bypass ``{E_m, c_m, G, g}``."""
        main = [[*self.proj[m].parameters(), *self.cls[m].parameters()] for m in self.modalities]
        bypass = [[*self.excite[m].parameters(), *self.squeeze.parameters()] for m in self.modalities]
        return main, bypass

    def speeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's ``Σ‖∇θ‖² / Σ‖θ‖²`` per modality over its bypass and its main parameters (``[M]`` each)."""
        def ratio(params):
            grads = sum((p.grad.pow(2).sum() for p in params if p.grad is not None), torch.zeros((), device=params[0].device))
            return grads / sum(p.detach().pow(2).sum() for p in params)

        main, bypass = self.groups()
        return torch.stack([ratio(ps) for ps in bypass]), torch.stack([ratio(ps) for ps in main])

    def train_step(self, batch):
        loss = self.loss(batch)
        unlocked = self.epoch >= self.opts.starting_epoch

        def measure():
            add_bypass, add_main = self.speeds()
            state = {"mu_bypass": self.mu_bypass, "mu_main": self.mu_main, "curating": self.curating,
                     "count": self.count, "caring": self.caring, "bdr": self.bdr}
            advance(state, add_bypass, add_main, unlocked, self.opts.epsilon, self.opts.window)

        self.step(loss, measure)
        return loss.detach()

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self.curated.zero_()

    def end_epoch(self, val_report):
        bdr, curated = self.bdr.tolist(), self.curated.tolist()
        return {**{f"greedy_bdr_{m}": b for m, b in zip(self.modalities, bdr)},
                **{f"greedy_curated_{m}": c for m, c in zip(self.modalities, curated)}}
