"""``ccat``: Classifier-Constrained Alternating Training (CCAT).

The run's epochs are split in two stages (``--pretrain-epochs``; default −1 = 30% of the run's epochs,
rounded, at least 1, choice; 0 skips pretraining and freezes a random classifier). ``start_epoch``
switches stage and rebuilds the optimizer over the new stage's trainable parameters.

**Stage 1, classifier pretraining** (paper §3.2, appendix A.1). Token features are projected per
token, ``z_m = P_m(x_m)`` ``[B, T_m, d]`` (T = 1 works), and fused by bidirectional cross-attention:
for each ordered pair ``a = MHA(q = z_i, k = v = z_j)``, ``h = LN(z_i + a)``, ``f = LN(h + FFN(h))``,
average-pooled over tokens, summed over the directions (all ordered pairs for M > 2, choice; ``--fusion joint``:
one block per modality attending to all the others' tokens at once, M blocks instead of M(M−1); see
``heads.blocks.modules.BiCrossAttention``; the paper gives no sizes: ``--heads`` 4, FFN d → 4d → d with GELU,
``--ffn-mult``, choice). The shared classifier ``Cls: d → C`` is trained with
``CE(Cls(f), y) + λ L_reg`` (λ = ``--lambda-reg``, default 0.001), where the per-sample contributions
``c_i = softmax_m(MI_i(z^m, f))`` use the InfoNCE estimate ``MI_i = log B + log softmax_k ⟨f̄_i, z̄^m_k⟩``
at k = i (bars: token-pooled, L2-normalised; no temperature, as in the paper; ``--temperature τ``
divides the similarities, an extension, default 1) and
``L_reg = mean_i mean_{m<n} |c_i^m − c_i^n|``. Optimised: P_m, the attention blocks, Cls.

**Stage 2, classifier-constrained alternating training** (§3.3, Algorithm 1). Cls is frozen
(``requires_grad`` off and outside the optimizer, so its weights stay bit-identical). Each modality
gets ``LoRA_m(z) = B_m A_m z`` (eq. 9; rank ``--rank`` 2, B zero-initialised: a no-op at the switch;
``--lora-scaling alpha-over-rank`` multiplies by α/r as the LoRA paper does), added to the classifier's output. Per batch, for each modality in turn
(with Cls frozen these steps touch disjoint parameters and are taken as one, the same update: ``alternating_step``):
``ŷ^m = softmax(Cls(z^m) + LoRA_m(z^m))`` with ``z^m = P_m(x̄_m)`` (pooled feature, as every other
method's unimodal path, choice), CE over the samples that have m, one optimizer step on P_m and
LoRA_m. Then the **secondary update**: with the updated model, c_i^m is computed by the same InfoNCE
softmax but on the decision-level fusion used at inference (§3.3: "the computation of c follows the
same decision-level fusion used in the inference stage"), and for each modality the samples with
``c_i^m < β`` (``--beta`` 0.15) get one more CE step on P_m, LoRA_m. ``end_epoch`` logs the fraction of
samples that got it (``ccat_secondary_<m>``).

*Which vectors enter c in stage 2* (the paper does not say; its source, SMSL (Zhou et al., ICASSP
2025), has no public code). Choice: the **pre-softmax scores, unnormalised** — each modality's
``Cls(z^m) + LoRA_m(z^m)`` against the fused prediction's log-probabilities, both centred over the
classes (adding a constant to a logit vector changes no prediction, so centring makes the inner
product depend only on the predictions) — with no L2 normalisation and no temperature, so no constant
is invented. The first implementation used L2-normalised class-probability vectors: every cosine
then lies in [0, 1] and c stayed within about ±0.01 of 1/M, so no β of the paper's grid (0.05–0.40)
selected a sample at M = 2, and at M = 6 β switched between none and all. Measured on a ccat model
trained 12 epochs (selected fraction of training samples, audio/visual[/text], at β = 0.05 · 0.15 ·
0.40): probabilities normalised 0/0 · 0/0 · 0/6% on ``av``; centred logits normalised 0/0 · 0/0 · 0/3%;
normalised with a temperature of 0.1 0/4 · 1/7 · 70/14%; **unnormalised centred logits 5/17 · 15/33 ·
34/53%** on ``av`` and 16/12/2 · 39/38/13 · 70/75/46% on ``avt`` — a fraction that rises with β over the
whole grid and is neither 0 nor 100% at the paper's β = 0.15 (``tests/test_ccat.py`` asserts it). A
confident modality that agrees with the fused prediction has a large inner product with it; one that
disagrees, or hesitates, gets a clearly smaller c. ``--temperature`` divides the scores (extension,
default 1). The InfoNCE form is that of eq. 5 (MMIM's ``CPC`` estimator has the same form).

Stage 2 continues from stage 1's projections P_m (the paper's Algorithm 1 says "initialize Enc_m";
choice: keep the pretrained ones). With missing modalities, a direction of the cross-attention counts
for a sample only when both its modalities are present; stage-1 loss terms use the samples with at
least two present modalities; contributions run over present modalities and in-batch negatives over
samples that have that modality; stage-2 steps skip samples that lack the modality.

**Inference** (both stages, so that the core's best-on-validation selection can pick any epoch): each
present modality predicts through ``Cls + LoRA_m``, fused at decision level by the mean of class
probabilities (choice). In stage 1 LoRA is still zero, so this is the pretrained classifier applied to
each modality alone; the selected epoch's stage is visible in ``epochs.csv`` (``ccat_stage``).
Unimodal accuracy v({m}) is that modality's own ``Cls + LoRA_m`` prediction.

**Cost.** Stage 1 has one block per ordered pair: at M = 6, 30 blocks of ``10 d²`` multiply-adds per
sample forward (value and output projections, the 4d FFN), 24M parameters at d = 256, about 180× the
arithmetic of a concat epoch, so pretraining dominates a run on many modalities whatever the
overheads (``benchmarks/RESULTS.md``, issue 24 part 5). Stage 2 costs two optimizer steps per batch
with Cls frozen (the alternating and the secondary steps, each fused over the modalities).

Ablations (paper's Table 2): ``--no-freeze`` (Cls trained in stage 2 too), ``--no-alternate`` (one
joint step on the sum of the M unimodal losses per batch), ``--no-secondary``, ``--no-lora``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT
from heads.blocks.modules import BiCrossAttention, LoRA
from heads.methods.base import HeadMethod, Training, make_optimizer, mean_probability_logits, projections


@dataclass
class CCATOptions:
    pretrain_epochs: int = field(default=-1, metadata={"domain": NONNEGATIVE_INT | (-1,), "help": "stage-1 (classifier pretraining) epochs; -1 = 30% of the run, 0 = none"})
    lambda_reg: float = field(default=0.001, metadata={"domain": NONNEGATIVE, "help": "λ of the contribution regulariser in stage 1"})
    rank: int = field(default=2, metadata={"domain": POSITIVE_INT, "help": "LoRA rank r"})
    lora_alpha: float = field(default=1.0, metadata={"domain": NONNEGATIVE, "help": "LoRA scale α (the paper fixes α = 1)"})
    lora_scaling: Literal["none", "alpha-over-rank"] = field(default="none", metadata={"help": "output × α (eq. 9, default) or × α/r (LoRA paper; couples rank and step size)"})
    beta: float = field(default=0.15, metadata={"domain": NONNEGATIVE, "help": "secondary-update threshold β on a sample's contribution c"})
    temperature: float = field(default=1.0, metadata={"domain": POSITIVE, "help": "InfoNCE temperature of the contributions (1 = the paper's formula, none)"})
    fusion: Literal["pairs", "joint"] = field(default="pairs", metadata={"help": "stage-1 cross-attention for M > 2: a block per ordered pair (M(M−1)) or per modality attending to all the others' tokens (M); the same at M = 2"})
    heads: int = field(default=4, metadata={"domain": POSITIVE_INT, "help": "attention heads of the cross-attention blocks"})
    ffn_mult: int = field(default=4, metadata={"domain": POSITIVE_INT, "help": "FFN width of the cross-attention blocks, × hidden"})
    freeze: bool = field(default=True, metadata={"help": "freeze the classifier in stage 2 (--no-freeze for the ablation)"})
    alternate: bool = field(default=True, metadata={"help": "one step per modality (--no-alternate: one joint step)"})
    secondary: bool = field(default=True, metadata={"help": "secondary update of samples with c < β"})
    lora: bool = field(default=True, metadata={"help": "per-modality LoRA on the classifier (--no-lora for the ablation)"})


def contributions(fused: torch.Tensor, parts: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                  temperature: float = 1.0, normalize: bool = True, has: dict[str, bool] | None = None) -> torch.Tensor:
    """Per-sample modality contributions ``c`` ``[M, B]`` (CCAT eqs. 5–6), vectorised over the batch.

    ``MI^m_i = log n_m + log softmax_k (⟨f̄_i, z̄^m_k⟩ / τ) |_{k=i}`` with bars = L2-normalised, k over
    the n_m samples that have m (n_m = B when complete); ``c_i = softmax_m MI^m_i`` over the modalities
    present for sample i (absent ones get c = 0). τ = 1 is the paper's formula; with it the cosines
    span at most [−1, 1], so for M = 2 the MI difference stays below 4 and c within about [0.02, 0.98].
    """
    unit = (lambda t: nn.functional.normalize(t, dim=-1)) if normalize else (lambda t: t)
    f = unit(fused)
    mask = torch.stack([present[m] for m in parts])  # [M, B]
    mi = []
    for m, z in parts.items():
        if not (has[m] if has is not None else bool(present[m].any())):  # ``has``: known on the host, no sync
            mi.append(torch.zeros_like(f[:, 0]))  # masked below
            continue
        sims = f @ unit(z).T / temperature  # [B, B]: row i, candidate k
        sims = sims.masked_fill(~present[m].unsqueeze(0), float("-inf"))
        n = present[m].sum().to(f.dtype)
        mi.append(torch.log(n) + sims.log_softmax(1).diagonal())
    mi = torch.stack(mi).masked_fill(~mask, float("-inf"))
    mi = torch.where(mask.any(0, keepdim=True), mi, torch.zeros_like(mi))  # no modality: no NaN
    return mi.softmax(0) * mask


def contribution_gap(c: torch.Tensor, present: dict[str, torch.Tensor]) -> torch.Tensor:
    """``L_reg`` per sample: mean over present pairs m < n of ``|c^m − c^n|`` (0 with fewer than two)."""
    mask = torch.stack(list(present.values())).to(c.dtype)  # [M, B]
    gaps, pairs = torch.zeros_like(c[0]), torch.zeros_like(c[0])
    for a in range(c.shape[0]):
        for b in range(a + 1, c.shape[0]):
            both = mask[a] * mask[b]
            gaps, pairs = gaps + (c[a] - c[b]).abs() * both, pairs + both
    return gaps / pairs.clamp_min(1)


class CCAT(HeadMethod):
    Options = CCATOptions
    summary = "pretrained cross-attention classifier, frozen; alternating unimodal steps with per-modality LoRA"
    training = Training("sgd", 1e-3, 1e-4, "step:70:0.1", 32,
                        "CCAT paper §4.1: SGD momentum 0.9, batch 32, lr 1e-3, ×0.1 every 70 epochs (150 epochs); "
                        "its printed weight decay 0.1 is read as 1e-4, the value of the code it builds on "
                        "(choice: --weight-decay 0.1 for the printed one); stages: --pretrain-epochs' 30% rule at 150",
                        epochs=150, stages=(45, 105))

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        if len(self.modalities) < 2:
            raise ValueError("ccat needs at least two modalities")
        d = cfg.hidden
        if d % opts.heads:  # multi-head attention splits d into equal heads
            raise ValueError(f"ccat: --heads {opts.heads} must divide the hidden width --hidden {d}")
        self.proj = projections(spec, d)
        self.fusion = BiCrossAttention(self.modalities, d, opts.heads, opts.ffn_mult, opts.fusion)
        self.cls = nn.Linear(d, spec.num_classes)
        self.lora = nn.ModuleDict({m: LoRA(d, spec.num_classes, opts.rank, opts.lora_alpha, opts.lora_scaling) for m in self.modalities}) if opts.lora else None
        if opts.pretrain_epochs < 0:
            self.pretrain_epochs = max(1, round(0.3 * cfg.epochs))
        else:
            self.pretrain_epochs = opts.pretrain_epochs
        self.stage = 1
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._stats = {"reg": 0.0, "batches": 0, "samples": 0, **{m: 0.0 for m in self.modalities}}

    # --- stages --------------------------------------------------------------------------------
    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        if stage == 1:
            return [*self.proj.parameters(), *self.fusion.parameters(), *self.cls.parameters()]
        params = list(self.proj.parameters())
        if self.lora is not None:
            params += list(self.lora.parameters())
        if not self.opts.freeze:
            params += list(self.cls.parameters())
        return params

    def configure_optimizer(self):
        self.stage = 1 if self.pretrain_epochs > 0 else 2
        self._set_trainable(self.stage)
        return make_optimizer(self.stage_parameters(self.stage), self.cfg)

    def _set_trainable(self, stage: int) -> None:
        keep = {id(p) for p in self.stage_parameters(stage)}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        if self.stage == 1 and epoch > self.pretrain_epochs:
            self.stage = 2
            self.optimizer.zero_grad(set_to_none=True)  # stage 1 kept its gradient buffers: free them
            self._set_trainable(2)
            self.optimizer = make_optimizer(self.stage_parameters(2), self.cfg)
        self._reset_stats()

    def end_epoch(self, val_report):
        out = {"ccat_stage": self.stage}
        batches, samples = max(self._stats["batches"], 1), max(self._stats["samples"], 1)
        if self.stage == 1:
            out["ccat_reg"] = float(self._stats["reg"]) / batches
        elif self.opts.secondary:
            out.update({f"ccat_secondary_{m}": float(self._stats[m]) / samples for m in self.modalities})
        return out

    def train_step(self, batch):
        return self.pretrain_step(batch) if self.stage == 1 else self.alternating_step(batch)

    # --- stage 1 -------------------------------------------------------------------------------
    def pretrain_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CE + λ L_reg, L_reg)`` of the cross-attention fusion on one batch."""
        z = {m: self.proj[m](batch.tokens[m]) * batch.present[m][:, None, None].to(batch.tokens[m].dtype)
             for m in self.modalities}
        fused, directions = self.fusion(z, batch.present)
        pooled = {m: t.mean(1) for m, t in z.items()}
        has = {m: batch.has(m) for m in self.modalities}
        gap = contribution_gap(contributions(fused, pooled, batch.present, self.opts.temperature, has=has), batch.present)
        if sum(batch.full(m) for m in self.modalities) >= 2:  # every sample has two: known on the host
            return nn.functional.cross_entropy(self.cls(fused), batch.y) + self.opts.lambda_reg * gap.mean(), gap.mean()
        rows = directions > 0  # samples with at least two present modalities
        ce = nn.functional.cross_entropy(self.cls(fused[rows]), batch.y[rows]) if bool(rows.any()) else fused.sum() * 0
        reg = gap[rows].mean() if bool(rows.any()) else gap.sum() * 0
        return ce + self.opts.lambda_reg * reg, reg

    def pretrain_step(self, batch):
        """One step on ``CE + λ L_reg``. Every stage-1 parameter is in the graph of every batch (absent
        directions are masked, not skipped), so the gradient buffers are kept between steps and zeroed in
        place: the same update, without reallocating the M(M−1) blocks' gradients every step (at M = 6,
        24M parameters; measured alone, a stage-1 epoch's batch loop took 12% less)."""
        loss, reg = self.pretrain_loss(batch)
        self.step(loss, set_to_none=False)
        self._stats["reg"] += reg.detach()  # stays on the device until the epoch ends
        self._stats["batches"] += 1
        return loss.detach()

    # --- stage 2 -------------------------------------------------------------------------------
    def head(self, m: str, z: torch.Tensor) -> torch.Tensor:
        """Modality m's logits through the (frozen) classifier and its LoRA: ``Cls(z) + LoRA_m(z)``."""
        out = self.cls(z)
        return out + self.lora[m](z) if self.lora is not None else out

    def unimodal_loss(self, batch, m: str, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Mean CE of modality m over ``rows`` (default: the samples that have m); None if there are none."""
        if rows is None:  # the host knows from the batch's counts: no device sync
            if not batch.has(m):
                return None
            everyone, rows = batch.full(m), batch.present[m]
        else:  # a data-dependent selection (the secondary update): its count must be read
            count = int(rows.sum())
            if count == 0:
                return None
            everyone = count == len(batch)
        x, y = (batch.x[m], batch.y) if everyone else (batch.x[m][rows], batch.y[rows])
        return nn.functional.cross_entropy(self.head(m, self.proj[m](x)), y)

    def alternating_step(self, batch):
        """The M unimodal steps, then the secondary update. With the classifier frozen (the default) step m
        reaches only P_m and LoRA_m, so the M steps touch disjoint parameters and are taken as one backward
        of their summed losses and one optimizer step: for every parameter the same gradient and the same
        update as M steps in turn, bit for bit (``tests/test_ccat.py`` pins it), at the cost of one step
        instead of M. With ``--no-freeze`` Cls is shared and each step sees the previous one's update, so
        they stay sequential; ``--no-alternate`` is the joint step in either case (so with Cls frozen it
        trains exactly as the default does: the ablation only differs with ``--no-freeze``)."""
        if self.opts.alternate and not self.opts.freeze:
            losses = []
            for m in self.modalities:
                loss = self.unimodal_loss(batch, m)
                if loss is not None:
                    self.step(loss)
                    losses.append(loss.detach())
        else:
            terms = [t for t in (self.unimodal_loss(batch, m) for m in self.modalities) if t is not None]
            self.step(sum(terms))
            losses = [t.detach() for t in terms]
        if self.opts.secondary:
            self.secondary_update(batch)
        return torch.stack(losses).mean()

    def decision_contributions(self, batch) -> torch.Tensor:
        """``c`` ``[M, B]`` from the decision-level fusion used at inference (see the module docstring).

        The vectors are logits in their centred (softmax-invariant) form: each modality's
        ``Cls(z^m) + LoRA_m(z^m)`` minus its mean over classes, against the fused prediction's
        ``log p̄`` minus its mean, where ``p̄`` is the mean of the present modalities' probabilities;
        their inner products enter the InfoNCE softmax unnormalised (no L2 norm, no temperature).
        """
        with torch.no_grad():
            logits = {m: self.head(m, self.proj[m](batch.x[m])) for m in self.modalities}
            fused = mean_probability_logits(logits, batch.present)
            centred = {m: t - t.mean(-1, keepdim=True) for m, t in logits.items()}
            return contributions(fused - fused.mean(-1, keepdim=True), centred, batch.present, self.opts.temperature,
                                 normalize=False, has={m: batch.has(m) for m in self.modalities})

    def secondary_masks(self, batch) -> dict[str, torch.Tensor]:
        """For each modality, the samples that get the secondary update: present and ``c^m < β``."""
        c = self.decision_contributions(batch)
        return {m: batch.present[m] & (c[i] < self.opts.beta) for i, m in enumerate(self.modalities)}

    def secondary_update(self, batch) -> dict[str, torch.Tensor]:
        """One more CE step for each modality on its samples with ``c^m < β`` (masks from one pass of the
        updated model). As in ``alternating_step``, with Cls frozen the modalities' steps are one step
        on the sum of their losses (disjoint parameters: the same update); with ``--no-freeze`` one each."""
        masks = self.secondary_masks(batch)
        terms = []
        for m, rows in masks.items():
            loss = self.unimodal_loss(batch, m, rows)
            if loss is not None:
                if self.opts.freeze:
                    terms.append(loss)
                else:
                    self.step(loss)
            self._stats[m] += rows.sum()
        if terms:
            self.step(sum(terms))
        self._stats["samples"] += len(batch)
        return masks

    # --- inference -----------------------------------------------------------------------------
    def unimodal_logits(self, batch) -> dict[str, torch.Tensor]:
        return {m: self.head(m, self.proj[m](batch.x[m])) for m in self.modalities}

    def logits(self, batch):
        return mean_probability_logits(self.unimodal_logits(batch), batch.present)
