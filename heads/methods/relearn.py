"""``relearn``: concat with diagnosing and re-learning (Wei et al., "Diagnosing and Re-learning for
Balanced Multimodal Learning", ECCV 2024; METHODS-MORE.md §12). Read from the official code,
GeWu-Lab/Diagnosing_Relearning_ECCV2024 @ 025085e (``code/ours.py``: ``purity_score``, ``reinit_score``,
``reinit``, ``main``; ``code/script/ours.sh``), and BalanceMM's ``ReLearning_trainer.py`` @ 4c1482f.

**Diagnosis.** For each modality m, its features ``h_m = P_m(x_m)`` (eval mode) on the training rows and
on a held-out set, each set min-max scaled to [−1, 1] per feature on itself (scikit-learn's
``MinMaxScaler``: a constant feature becomes −1), clustered by k-means with k = C, and

    purity(y, ĉ) = (1/N) Σ_clusters max_k |{i : ĉ_i = cluster, y_i = k}|
    gap_m = | purity_train,m − purity_held,m |,     α_m = tanh(λ · gap_m)

**Re-learning.** ``θ ← α_m θ_init + (1 − α_m) θ`` for every parameter θ of ``P_m`` (weight and bias),
``θ_init`` the projection as built, before any step (buffers ``initial.<i>_<name>``, dots as ``__``, saved with the
model). The head is not reset and the optimizer's state (momentum) is kept, as the official code's
``param.data = …`` keeps both.

**When.** The official code trains 0-based epoch e0, validates, and then, if ``e0 % reinit_epoch == 0``,
``e0 > 0`` and fewer than ``reinit_num`` resets have happened, diagnoses and resets: with 20/3 after
our epochs 21, 41 and 61. Here the diagnosis and the reset are made in ``start_epoch`` of the next epoch
(22, 42, 62), on the very state the official code resets — the core copies its selected state right
after ``end_epoch``, so a reset there would be stored as validated (§0.4).

**Held-out set (choice).** The official code diagnoses on a separate ``val.csv``; BalanceMM on the
**test** split **[BUG]**. The tool selects on validation, so diagnosing on it reads its labels during
training (a mild leak): the default ``--diagnose-split holdout`` carves ``--holdout`` (10%) off the
training split, class-stratified (``round(fraction · n_k)`` rows of each class), drawn from a generator
seeded with the run's seed, and those rows are never trained on (``epoch_split``; the training purity
is measured on the rows trained on). ``--diagnose-split val`` is the paper-like alternative (the whole
training split is trained on and diagnosed against validation). Only the rows that have m count in
m's diagnosis **(choice)**; a set where nobody has m gives m no reset.

**k-means (choice, recorded).** scikit-learn is not a dependency: Lloyd's algorithm in torch with
k-means++ seeding (one candidate per centre, not scikit-learn's greedy 2 + ln k trials), one
initialisation (scikit-learn ≥ 1.4's ``n_init="auto"`` for k-means++), at most 300 iterations (the
official default) until no assignment changes, drawn from a generator seeded with the run's seed (the
official ``random_state=0``: the same draw at every diagnosis). An empty cluster keeps its centre; with
fewer rows than classes k is the number of rows.

**Frozen features — degrades.** The reset acts on a one-layer projection; the premise (a deep encoder
memorising its training data) is weak here, but the mechanism is exact. **M > 2**: any M, each modality
diagnosed and reset on its own (as both codes). Not stackable: its own epoch split (the held-out rows).

**Defaults** (official ``ours.sh``/argparse): λ = 3, every 20 epochs, 3 resets; SGD lr 2e-3, momentum
0.9, wd 1e-4, no scheduler (its decay arguments are unused), batch 64, 90 epochs. **(BalanceMM)**: λ 3 /
1, every 15 / 8 epochs, 2 / 4 resets (HEAD / ``3f27575``), diagnosing on test, 30 epochs.
Logged per epoch: ``relearn_alpha_<m>`` (the α applied at this epoch's start, 0 without a reset) and, at
a diagnosis, ``relearn_purity_train_<m>``, ``relearn_purity_held_<m>``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from heads.blocks.data import SplitTensors
from heads.blocks.domains import NONNEGATIVE, NONNEGATIVE_INT, OPEN_FRACTION, POSITIVE_INT
from heads.errors import OptionError
from heads.methods.base import Training
from heads.methods.concat import Concat

KMEANS_ITERATIONS = 300  # scikit-learn's default max_iter, which the official KMeans(...) call keeps


@dataclass
class RelearnOptions:
    move_lambda: float = field(default=3.0, metadata={"domain": NONNEGATIVE, "help": "λ of α = tanh(λ · purity gap) (official: 3; BalanceMM 3, its 3f27575 1)"})
    reinit_epoch: int = field(default=20, metadata={"domain": POSITIVE_INT, "help": "diagnose and reset every this many epochs (official: 20, i.e. after epochs 21, 41, 61)"})
    reinit_num: int = field(default=3, metadata={"domain": NONNEGATIVE_INT, "help": "number of resets (official: 3)"})
    diagnose_split: Literal["holdout", "val"] = field(default="holdout", metadata={"help": "held-out set of the diagnosis: a class-stratified part of train, not trained on (default), or the validation split (paper-like)"})
    holdout: float = field(default=0.1, metadata={"domain": OPEN_FRACTION, "help": "fraction of each class of the training split held out for the diagnosis (--diagnose-split holdout)"})


def reset_due(epoch: int, every: int, count: int) -> bool:
    """Whether ``start_epoch(epoch)`` (1-based) diagnoses and resets: after the official 0-based epoch
    ``e0 = epoch − 2`` when ``e0 > 0``, ``e0 % every == 0`` and it is one of the first ``count`` such."""
    e0 = epoch - 2
    return e0 > 0 and e0 % every == 0 and e0 // every <= count


def holdout_rows(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(held, kept)`` sorted row indices: ``round(fraction · n_k)`` rows of each class k held out,
    drawn from a generator seeded with ``seed``."""
    labels = y.cpu()
    gen = torch.Generator().manual_seed(seed)
    held = []
    for k in torch.unique(labels).tolist():
        rows = (labels == k).nonzero().squeeze(1)
        held.append(rows[torch.randperm(len(rows), generator=gen)][:round(fraction * len(rows))])
    out = torch.zeros(len(labels), dtype=torch.bool)
    out[torch.cat(held)] = True
    return out.nonzero().squeeze(1), (~out).nonzero().squeeze(1)


def min_max_scaled(x: torch.Tensor) -> torch.Tensor:
    """Each column mapped to [−1, 1] by its own min and max (a constant column becomes −1)."""
    low, high = x.min(0).values, x.max(0).values
    span = high - low
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (x - low) / span * 2 - 1


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Cluster labels ``[N]`` of Lloyd's algorithm from k-means++ seeds (``generator``: a CPU generator)."""
    n = x.shape[0]
    k = min(k, n)
    pick = int(torch.randint(n, (1,), generator=generator))
    centres = [x[pick]]
    nearest = (x - x[pick]).pow(2).sum(1)
    for _ in range(1, k):
        cumulative = nearest.cumsum(0)
        draw = float(torch.rand((), generator=generator)) * float(cumulative[-1])
        pick = min(int(torch.searchsorted(cumulative, torch.tensor([draw], device=x.device), right=True)), n - 1)
        centres.append(x[pick])
        nearest = torch.minimum(nearest, (x - x[pick]).pow(2).sum(1))
    centres = torch.stack(centres)
    labels = None
    for _ in range(iterations):
        assigned = torch.cdist(x, centres).argmin(1)
        if labels is not None and torch.equal(assigned, labels):
            break
        labels = assigned
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return labels


def purity(y: torch.Tensor, clusters: torch.Tensor) -> float:
    """``(1/N) Σ_clusters max_k |{i : ĉ_i = cluster, y_i = k}|``."""
    classes = int(y.max()) + 1
    counts = torch.bincount(clusters * classes + y, minlength=(int(clusters.max()) + 1) * classes)
    return float(counts.view(-1, classes).max(1).values.sum()) / len(y)


class Relearn(Concat):
    Options = RelearnOptions
    summary = "concat; every few epochs each projection is partly reset toward its initial weights by its train/held-out k-means purity gap"
    modality_rule = "any M: each modality is diagnosed and reset on its own"
    stackable = False  # its own epoch split (the held-out rows are not trained on)
    training = Training("sgd", 2e-3, 1e-4, "none", 64,
                        "Relearning official code/ours.py + script/ours.sh: SGD momentum 0.9, lr 2e-3, wd 1e-4, "
                        "no scheduler (its decay arguments are unused), batch 64, 90 epochs", epochs=90)

    def __init__(self, spec, cfg, opts):
        super().__init__(spec, cfg, opts)
        if not 0 < opts.holdout < 1:
            raise OptionError(f"--holdout must lie in (0, 1), got {opts.holdout}")
        self.initial = nn.Module()  # θ_init: the projections as built, before any step (saved)
        for i, m in enumerate(self.modalities):
            for name, p in self.proj[m].named_parameters():
                self.initial.register_buffer(f"{i}_{name.replace('.', '__')}", p.detach().clone())
        self.last: dict[str, float] = {}

    def parts(self) -> dict[str, SplitTensors]:
        """The attached training split cut into the rows trained on (``fit``) and the held-out rows
        (``held``), made once per attach (after a restore again: the same rows, from the run's seed)."""
        train = self.attached("train")
        splits = self.__dict__["_attached"]
        if "held" not in splits:
            held, kept = holdout_rows(train.y, self.opts.holdout, self.cfg.seed)
            if len(held) == 0:
                raise OptionError(f"--holdout {self.opts.holdout} holds out no row of a training split of {len(train)}: "
                                  "give a larger --holdout or --diagnose-split val")
            splits.update(fit=train.take(kept), held=train.take(held))
        return splits

    def diagnosis_splits(self) -> tuple[SplitTensors, SplitTensors]:
        """``(trained-on rows, held-out rows)`` of the diagnosis."""
        if self.opts.diagnose_split == "holdout":
            return self.parts()["fit"], self.parts()["held"]
        return self.attached("train"), self.attached("val")

    def epoch_split(self, epoch, train):
        return self.parts()["fit"] if self.opts.diagnose_split == "holdout" else train

    def features(self, split: SplitTensors, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_m, y)`` of the rows of ``split`` that have m (eval mode, no gradient)."""
        parts, labels = [], []
        with self.evaluating():
            for batch in split.batches(self.eval_batch_size):
                keep = batch.present[m]
                parts.append(self.proj[m](batch.x[m])[keep])
                labels.append(batch.y[keep])
        return torch.cat(parts), torch.cat(labels)

    def split_purity(self, split: SplitTensors, m: str) -> float | None:
        h, y = self.features(split, m)
        if len(y) == 0:
            return None
        generator = torch.Generator().manual_seed(self.cfg.seed)
        return purity(y, kmeans(min_max_scaled(h), self.spec.num_classes, generator))

    def diagnose(self) -> dict[str, float]:
        """``α_m`` per modality, and the purities behind them in ``self.last``."""
        fit, held = self.diagnosis_splits()
        alphas = {}
        for m in self.modalities:
            train_p, held_p = self.split_purity(fit, m), self.split_purity(held, m)
            if train_p is None or held_p is None:
                alphas[m] = 0.0
                continue
            alphas[m] = math.tanh(self.opts.move_lambda * abs(train_p - held_p))
            self.last.update({f"relearn_purity_train_{m}": train_p, f"relearn_purity_held_{m}": held_p})
        return alphas

    def reset(self, alphas: dict[str, float]) -> None:
        """``θ ← α_m θ_init + (1 − α_m) θ`` in place for ``P_m``'s parameters (the optimizer keeps its state)."""
        initial = dict(self.initial.named_buffers())
        with torch.no_grad():
            for i, m in enumerate(self.modalities):
                for name, p in self.proj[m].named_parameters():
                    p.copy_(alphas[m] * initial[f"{i}_{name.replace('.', '__')}"] + (1 - alphas[m]) * p)

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self.last = {}
        alphas = dict.fromkeys(self.modalities, 0.0)
        if reset_due(epoch, self.opts.reinit_epoch, self.opts.reinit_num):
            alphas = self.diagnose()
            self.reset(alphas)
        self.last.update({f"relearn_alpha_{m}": alphas[m] for m in self.modalities})

    def end_epoch(self, val_report):
        return dict(self.last)
