"""``qmf``: Quality-aware Multimodal Fusion (Zhang et al., "Provable Dynamic Fusion for Low-Quality
Multimodal Data", ICML 2023), a baseline of the MLA (Table 1), CCAT (Table 1) and EDM (Table VI) papers.

Read from the official code (QingyangZhang/QMF: ``src/models/late_fusion.py``, ``text-image-classification/
train_qmf.py`` and ``src/utils/utils.py`` ``History``; ``RGBD-scene-recognition/models/QMF.py`` and
``train_QMF_nyud2.py``) and from the MLA code that ran it as a baseline (Cecile-hi/Multimodal-Learning-
with-Alternating-Unimodal-Adaptation ``main.py --modulation QMF``, two and three modalities). The paper's
text was not available to us beyond its abstract, so equation numbers are not given; every formula
below is the code's.

- **Per-modality classifiers** (late fusion, as ``late``): ``f_m = W_m P_m(x_m) + b_m``.
- **Energy and confidence**: ``E_m = −T · logsumexp(f_m / T)`` (energy score, T = 1 in the code);
  the fusion weight is ``w_m = s · (−E_m)`` with ``s = 0.1`` (code: ``conf = logsumexp(out) / 10``).
  Weights are not normalised and not clamped (the code's; ``w_m ≤ 0`` only when ``logsumexp f_m ≤ 0``).
- **Fusion**: ``f = Σ_m w_m.detach() · f_m`` (the text-image and MLA code detach the weights in the
  fused logits; the RGB-D code does not — choice: detached).
- **Loss**: ``CE(f, y) + Σ_m CE(f_m, y) + λ Σ_m L_rank,m`` with ``λ = 0.1`` (``--rank-weight``; RGB-D
  code ``--lamb 0.1`` and MLA's audio-visual QMF run ``cml + clf + 0.1·crl``; the text-image code adds
  it with weight 1).
- **Ranking regulariser** (the code's ``rank_loss`` with ``MarginRankingLoss(margin=0)`` and target
  ``−sign``): sample i is paired with the next sample j = i + 1 of the (shuffled) batch, cyclically;
  with ``t = sign(ℓ_i − ℓ_j)`` and ``μ = |ℓ̂_i − ℓ̂_j|`` from the samples' loss histories ℓ (ℓ̂: min–max
  normalised), ``L_rank = mean_i max(0, t · (w_i − w_j) − μ)``: a harder sample (larger loss) may not be
  more confident than an easier one by more than their normalised loss gap. (The code flips CRL's
  target but keeps CRL's ``+ margin/target``, which puts μ on the loose side; we keep the code's form.)
- **The loss history**, as the code's ``History`` (text-image ``src/utils/utils.py``; MLA's QMF run the
  same): per training sample and modality, ``ℓ_{i,m}`` = the sum of its detached per-sample unimodal CE
  over every visit so far (zero before the first), kept in a ``[M, N_train]`` buffer indexed by
  ``Batch.index``; the batch's losses are added *before* ranking (the code's order), and
  ``ℓ̂ = (ℓ − min ℓ) / (max ℓ − min ℓ)`` with min and max over the **whole training set's** history
  (samples not yet visited count with their 0, as in the code's first epoch). The history lives only
  during training (not in ``model.pt``; in-progress checkpoints carry it, so a resumed run goes on).

**What changed (issue 22).** Until then batches carried no sample index, and the history was each
batch's own per-sample CE, min–max normalised over the batch. That is not the code's first epoch (an
earlier version of this docstring said so): the code normalises by the whole training set's maximum
(and its minimum, 0 while samples are unvisited), and from the second epoch on ranks by cumulative
losses. Now it is the code's history. A sample's absent modality adds nothing to its history and
pairs where either sample lacks m contribute nothing (choice); such samples keep 0 in m's history and
so hold m's minimum at 0 (the code has complete data).

**Missing modalities (choice).** A sample's absent modality gets weight 0 in the fusion (no vote, as in
``late``), no unimodal CE and no ranking term. So ``v({m}) = w_m f_m``: the modality's own classifier
(MLA evaluates QMF's unimodal accuracy with ``out_a``/``out_v`` directly), up to the positive scale w_m.

**M > 2**: any M, one weight and one ranking term per modality (MLA's three-modality QMF).

**Training.** In the MLA/CCAT/EDM tables QMF is a baseline run under the shared protocol (MLA's
``main.py --modulation QMF``: SGD momentum 0.9, lr 1e-3, wd 1e-4, StepLR(70, 0.1), batch 64) — our
default. QMF's own code trains otherwise: text-image (MVSA, Food-101) BertAdam lr 5e-5, warm-up 0.1,
batch 16 × 40 accumulation, ReduceLROnPlateau(0.5, patience 2), early stop after 5; RGB-D Adam lr 1e-4,
wd 1e-5, batch 256 × 3, ReduceLROnPlateau(0.3, patience 10), up to 500 epochs (``--optimizer adam --lr
1e-4 --weight-decay 1e-5`` is the closest this tool gets; it has no plateau schedule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heads.blocks.domains import NONNEGATIVE, POSITIVE
from heads.methods.base import FIELD_PROTOCOL, Training
from heads.methods.late import Late


@dataclass
class QMFOptions:
    temperature: float = field(default=1.0, metadata={"domain": POSITIVE, "help": "energy temperature T: E = −T·logsumexp(f/T) (code: 1)"})
    weight_scale: float = field(default=0.1, metadata={"domain": NONNEGATIVE, "help": "fusion weight w = scale·(−E) (code: 1/10)"})
    rank_weight: float = field(default=0.1, metadata={"domain": NONNEGATIVE, "help": "λ of the ranking regulariser (RGB-D code and MLA's A-V run: 0.1; text-image code: 1)"})


class QMF(Late):
    Options = QMFOptions
    summary = "late fusion weighted by energy-based confidence, with a loss-ranking regulariser"
    modality_rule = "any M: one energy weight and one ranking term per modality"
    training = Training(FIELD_PROTOCOL.optimizer, FIELD_PROTOCOL.lr, FIELD_PROTOCOL.weight_decay, FIELD_PROTOCOL.schedule,
                        FIELD_PROTOCOL.batch_size,
                        "as the MLA/CCAT/EDM baselines: MLA official main.py --modulation QMF (SGD momentum 0.9, "
                        "lr 1e-3, wd 1e-4, StepLR 70 × 0.1, batch 64); QMF's own code uses Adam (see docstring)")
    stackable = True  # the history is updated in place inside the loss, per run when stacked:
    trained_buffers = ("history",)

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        self.register_buffer("history", torch.zeros(len(self.modalities), 0), persistent=False)

    def attach(self, train, val):
        """Size the per-sample history to the training split (a restored run keeps the one it has)."""
        super().attach(train, val)
        if self.history.shape[1] != len(train):
            self.history = torch.zeros(len(self.modalities), len(train), device=train.y.device)

    def confidence(self, logits: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        """``w_m = s · T · logsumexp(f_m / T)`` (= s · (−E_m)) per sample, ``[M, B]``; 0 where m is absent."""
        T = self.opts.temperature
        energy = torch.stack([-T * torch.logsumexp(logits[m] / T, dim=-1) for m in self.modalities])
        mask = torch.stack([present[m] for m in self.modalities]).to(energy.dtype)
        return self.opts.weight_scale * -energy * mask

    def fuse(self, logits: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """``Σ_m w_m · f_m`` with the weights detached (the official text-image and MLA code)."""
        return (weights.detach().unsqueeze(-1) * torch.stack([logits[m] for m in self.modalities])).sum(0)

    def logits(self, batch):
        logits = self.unimodal_logits(batch)
        return self.fuse(logits, self.confidence(logits, batch.present))

    def rank_loss(self, conf: torch.Tensor, index: torch.Tensor, present: torch.Tensor,
                  history: torch.Tensor) -> torch.Tensor:
        """The code's ranking term for one modality, each sample paired with the next one (cyclic):
        ``history`` is the modality's ``[N_train]`` cumulative losses, ``index`` the batch's rows in it."""
        own = history[index]
        gap = own - own.roll(-1)
        target = torch.sign(gap)
        margin = gap.abs() / (history.amax() - history.amin()).clamp_min(1e-12)
        pair = torch.relu(target * (conf - conf.roll(-1)) - margin)
        valid = (present & present.roll(-1)).to(pair.dtype)
        return (pair * valid).sum() / valid.sum().clamp_min(1)

    def loss(self, batch):
        if batch.index is None:
            raise ValueError("qmf keeps a loss history per training sample: its batches must carry Batch.index "
                             "(cut them from the attached training split)")
        logits = self.unimodal_logits(batch)
        conf = self.confidence(logits, batch.present)
        total = nn.functional.cross_entropy(self.fuse(logits, conf), batch.y)
        for i, m in enumerate(self.modalities):
            if not batch.has(m):
                continue
            rows = batch.present[m]
            per_sample = nn.functional.cross_entropy(logits[m], batch.y, reduction="none")
            total = total + (per_sample * rows).sum() / rows.sum().clamp_min(1)
            history = self.history[i]
            history.index_add_(0, batch.index, (per_sample.detach() * rows).to(history.dtype))  # before ranking
            total = total + self.opts.rank_weight * self.rank_loss(conf[i], batch.index, rows, history)
        return total
