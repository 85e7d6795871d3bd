"""Stacked training: K runs of one method trained together as batched tensors, for GPU grids.

One head on a GPU is launch-bound: its matmuls are too small to fill the device, so a config costs
the same wall time whether the device does 1 or 30 of them at once. ``StackedTrainer`` trains K runs
that share every shape (seeds, learning rates, weight decays of one method and config) in one
process: their parameters are stacked along a new leading dimension
(``torch.func.stack_module_state``), one batch of each run goes through ``vmap(grad(loss))`` of the
method's own ``loss``, and one optimizer step updates all K runs with their own learning rate and
weight decay. It has the staged shape of ``heads.core.Trainer`` (``run(until)``, then ``finish``),
and it is built from K ordinary trainers, so each run is set up exactly as it would be alone: its
seed's initialisation, masks, standardisation statistics and shuffling generator. At the end the
trained state goes back into each trainer, which evaluates and writes its run as usual.

What may be stacked: methods that declare ``stackable`` (the inherited ``train_step``: one loss, one
optimizer step; pure tensor code in ``loss``/``logits``), and runs that differ only in ``seed``,
``lr`` and ``weight_decay`` (``stack_key``). Everything else — other option values, methods with
their own update (edm's chain of steps, mla's gradient projection, ccat's stages) — trains one run at
a time on the device. The result is the same function of the seed as the run alone; the arithmetic
differs (batched kernels), so numbers agree within float tolerance, not bit for bit
(``tests/test_stacked.py``).

The optimizers are re-stated here for stacked tensors, with torch's update rules (Adam/AdamW as
``torch.optim`` computes them, SGD with momentum 0.9, dampening 0): per-parameter rules act
elementwise, so a stacked step is K independent steps, each with its own rate.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time

import torch
from torch import nn

from heads import metrics
from heads.core import Trainer, TrainConfig
from heads.evaluation import Report, model_autocast
from heads.data import Batch, HeadData
from heads.training import SGD_MOMENTUM, scheduled_lr

# What stacked runs may differ in: everything else must be equal (same shapes, same update rule).
VARYING = ("seed", "lr", "weight_decay", "threads", "device", "training_source")
EVAL_ROWS = 8192  # validation rows per stacked forward pass (bounds the [K, rows, C] logits)


def stack_key(cfg: TrainConfig) -> str:
    """Runs with the same key can train stacked."""
    return json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in VARYING}, sort_keys=True, default=str)


def can_stack(cfg: TrainConfig) -> bool:
    """The method declares itself stackable and keeps the inherited one-loss-one-step update."""
    from heads.core import method_class
    from heads.methods.base import HeadMethod

    cls = method_class(cfg.method)
    return bool(getattr(cls, "stackable", False)) and cls.train_step is HeadMethod.train_step


class _Loss(nn.Module):
    """``forward(batch) = method.loss(batch)``, so ``functional_call`` can run a method's loss."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.method.loss(batch)


class _Logits(_Loss):
    def forward(self, batch: Batch) -> torch.Tensor:
        return self.method.logits(batch)


class StackedTrainer:
    """K trainers of one stackable method, trained together; ``run(until)`` and ``finish()`` as ``Trainer``."""

    def __init__(self, trainers: list[Trainer]):
        from torch.func import stack_module_state

        if not trainers:
            raise ValueError("nothing to stack")
        keys = {stack_key(t.cfg) for t in trainers}
        if len(keys) != 1 or len({t.epoch for t in trainers}) != 1:
            raise ValueError("stacked runs must share every setting but seed, lr and weight decay, and their epoch")
        if not all(can_stack(t.cfg) for t in trainers):
            raise ValueError(f"method {trainers[0].cfg.method!r} does not declare itself stackable")
        self.trainers, self.k = trainers, len(trainers)
        first = trainers[0]
        self.cfg, self.device, self.spec = first.cfg, first.device, first.data.spec
        self.template = copy.deepcopy(first.model).to("meta")  # shapes only: the functions run on the stack
        self.loss_module, self.logits_module = _Loss(self.template), _Logits(self.template)
        params, buffers = stack_module_state([t.model for t in trainers])
        self.params = {f"method.{n}": p.detach().clone() for n, p in params.items()}
        self.buffers = {f"method.{n}": b.clone() for n, b in buffers.items()}
        self.state = {n: {} for n in self.params}  # optimizer state per stacked parameter
        self.steps = 0
        self._load_optimizer_state()
        # One data copy when every run reads the same (standardised) splits, else one per run.
        self.shared = len({id(t.train) for t in trainers}) == 1 and len({id(t.val) for t in trainers}) == 1
        self.train = [t.ready["train"] for t in trainers]
        self.val = [t.ready["val"] for t in trainers]
        for t in trainers:
            t.stacked_with = self.k

    # --- the optimizer ---------------------------------------------------------------------------
    def _rates(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr = [scheduled_lr(t.cfg.lr, t.cfg.schedule, epoch, t.cfg.epochs) for t in self.trainers]
        wd = [t.cfg.weight_decay for t in self.trainers]
        return torch.tensor(lr, device=self.device), torch.tensor(wd, device=self.device)

    def _load_optimizer_state(self) -> None:
        """Continue the trainers' own optimizers (a run resumed from a checkpoint has moments)."""
        opts = [t.model.optimizer for t in self.trainers]
        names = [n for n, _ in self.trainers[0].model.named_parameters()]
        slots = [[o.state.get(p, {}) for p in t.model.parameters()] for o, t in zip(opts, self.trainers)]
        for i, name in enumerate(names):
            per_run = [s[i] for s in slots]
            if all(per_run):
                for key in per_run[0]:
                    if key != "step":
                        self.state[f"method.{name}"][key] = torch.stack([r[key].to(self.device) for r in per_run])
                self.steps = int(per_run[0]["step"]) if "step" in per_run[0] else self.steps

    def _step(self, grads: dict[str, torch.Tensor], lr: torch.Tensor, wd: torch.Tensor) -> None:
        kind = self.cfg.optimizer
        self.steps += 1
        t = self.steps
        for name, p in self.params.items():
            g = grads[name]
            shape = (self.k,) + (1,) * (p.dim() - 1)
            rate, decay = lr.view(shape), wd.view(shape)
            slot = self.state[name]
            if kind == "sgd":
                d = g + decay * p
                buf = slot.get("momentum_buffer")
                slot["momentum_buffer"] = d.clone() if buf is None else buf.mul_(SGD_MOMENTUM).add_(d)
                p.sub_(rate * slot["momentum_buffer"])
                continue
            if kind == "adamw":
                p.mul_(1 - rate * decay)
                d = g
            else:  # adam: L2 added to the gradient
                d = g + decay * p
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            m = slot.setdefault("exp_avg", torch.zeros_like(p))
            v = slot.setdefault("exp_avg_sq", torch.zeros_like(p))
            m.lerp_(d, 1 - beta1)
            v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
            step_size = rate / (1 - beta1 ** t)
            denom = v.sqrt() / (1 - beta2 ** t) ** 0.5 + eps
            p.sub_(step_size * m / denom)

    # --- batches of every run ----------------------------------------------------------------------
    def _gather(self, splits, index: torch.Tensor) -> dict:
        """``[K, B, …]`` inputs: run k's rows ``index[k]`` of its split."""
        out = {}
        for field in ("x", "tokens", "present"):
            out[field] = {}
            for m in getattr(splits[0], field):
                if self.shared:
                    source = getattr(splits[0], field)[m]
                    out[field][m] = source[index]
                else:
                    out[field][m] = torch.stack([getattr(s, field)[m][index[k]] for k, s in enumerate(splits)])
        out["y"] = splits[0].y[index] if self.shared else torch.stack([s.y[index[k]] for k, s in enumerate(splits)])
        return out

    @staticmethod
    def _counts(per_run: list[dict[str, int]], n: int) -> dict[str, int]:
        """One count per modality that is true of every run's batch for ``has``/``full``: n (all full),
        0 (nobody anywhere), else 1 (some: the methods' general, masked path)."""
        out = {}
        for m in per_run[0]:
            values = [c[m] for c in per_run]
            out[m] = n if all(v == n for v in values) else 0 if all(v == 0 for v in values) else 1
        return out

    # --- training ------------------------------------------------------------------------------------
    def run(self, until: int, on_epoch=None) -> None:
        from torch.func import functional_call, grad_and_value, vmap

        from heads.device import autocast

        start = time.perf_counter()
        first = self.trainers[0]
        n, b = len(self.train[0]), self.cfg.batch_size

        def loss_of(params, buffers, x, tokens, present, y, counts):
            batch = Batch(x, tokens, present, y, counts)
            return functional_call(self.loss_module, (params, buffers), (batch,))

        for epoch in range(first.epoch + 1, min(until, self.cfg.epochs) + 1):
            for t in self.trainers:
                t.model.start_epoch(epoch)
            self.template.start_epoch(epoch)  # what a loss reads of the epoch (lfm's α_t) lives on the module
            lr, wd = self._rates(epoch)
            orders = [torch.randperm(n, generator=t.shuffle) for t in self.trainers]  # each run's own shuffle
            host = torch.stack(orders)
            index = host.to(self.device, non_blocking=True)
            total = torch.zeros(self.k, device=self.device)
            for s in range(0, n, b):
                rows, rows_host = index[:, s:s + b], host[:, s:s + b]
                counts = self._counts([tr._counts(rows_host[k], rows_host.shape[1]) for k, tr in enumerate(self.train)],
                                      rows_host.shape[1])
                inputs = self._gather(self.train, rows)
                step = vmap(grad_and_value(loss_of), in_dims=(0, 0, 0, 0, 0, 0, None))
                with autocast(self.device, first.precision):
                    grads, loss = step(self.params, self.buffers, inputs["x"], inputs["tokens"], inputs["present"],
                                       inputs["y"], counts)
                with torch.no_grad():
                    self._step(grads, lr, wd)
                total += loss.detach() * rows.shape[1]
            reports = self._validate()
            losses = (total / n).tolist()
            self._write_back()
            for k, (t, report) in enumerate(zip(self.trainers, reports)):
                extra = t.model.end_epoch(report)
                t.rows.append({"epoch": epoch, "train_loss": losses[k], **report.row("val_"), **extra})
                if report.acc >= t.best:  # ties: the later epoch, as in Trainer.run
                    t.best, t.best_epoch = report.acc, epoch
                    t.best_state = copy.deepcopy(t.model.state_dict())
                t.epoch = epoch
                if on_epoch is not None:
                    on_epoch(t, report)
        share = (time.perf_counter() - start) / self.k
        for t in self.trainers:
            t.seconds += share

    def _validate(self) -> list[Report]:
        """Full-set validation accuracy, loss and macro-F1 of every run, from one vmapped pass per chunk
        of rows (in the evaluation order; order does not matter for a stackable method). With
        ``epoch_subsets`` the trainers score every subset themselves."""
        if self.cfg.epoch_subsets:
            self._write_back()
            return [t._epoch_report() for t in self.trainers]
        from torch.func import functional_call, vmap

        def logits_of(params, buffers, x, tokens, present, y, counts):
            return functional_call(self.logits_module, (params, buffers), (Batch(x, tokens, present, y, counts),))

        val, n = self.val, len(self.val[0])
        preds = torch.empty(self.k, n, dtype=torch.long, device=self.device)
        loss = torch.zeros(self.k, dtype=torch.float64, device=self.device)
        chunk = max(1, EVAL_ROWS // self.k)
        base, base_host = torch.arange(n, device=self.device), torch.arange(n)
        with torch.no_grad(), model_autocast(self.trainers[0].model):
            for s in range(0, n, chunk):
                rows = base[s:s + chunk]
                index = rows.expand(self.k, -1)
                inputs = self._gather(val, index)
                counts = self._counts([v._counts(base_host[s:s + chunk], len(rows)) for v in val], len(rows))
                logits = vmap(logits_of, in_dims=(0, 0, 0, 0, 0, 0, None))(
                    self.params, self.buffers, inputs["x"], inputs["tokens"], inputs["present"], inputs["y"], counts)
                preds[:, s:s + chunk] = logits.argmax(-1)
                loss += nn.functional.cross_entropy(logits.float().flatten(0, 1), inputs["y"].flatten(),
                                                    reduction="none").view(self.k, -1).sum(1).double()
        reports = []
        mean_loss = (loss / max(n, 1)).tolist()
        for k, v in enumerate(val):
            acc = metrics.accuracy(preds[k], v.y)
            nan = {m: float("nan") for m in self.spec.modalities}
            full = frozenset(self.spec.modalities)
            reports.append(Report({full: acc}, acc, metrics.macro_f1(preds[k], v.y, self.spec.num_classes), nan, nan,
                                  nan, float("nan"), preds[k], mean_loss[k], subsets=False))
        return reports

    def _write_back(self) -> None:
        """Each run's slice of the stack into its own model (and its optimizer's moments)."""
        with torch.no_grad():
            for k, t in enumerate(self.trainers):
                named = dict(t.model.named_parameters())
                for name, p in self.params.items():
                    named[name.removeprefix("method.")].copy_(p[k])
                opt = t.model.optimizer
                for name, slot in self.state.items():
                    param = named[name.removeprefix("method.")]
                    own = opt.state.setdefault(param, {})
                    for key, value in slot.items():
                        own[key] = value[k].clone()
                    if slot and t.cfg.optimizer != "sgd":
                        own["step"] = torch.tensor(float(self.steps), device=param.device if
                                                   getattr(opt, "defaults", {}).get("fused") else "cpu")

    def finish(self, run_dirs=None) -> list:
        """Each trainer's ``finish``: its best state evaluated on validation and test, its run written."""
        self._write_back()
        dirs = run_dirs or [None] * self.k
        return [t.finish(d) for t, d in zip(self.trainers, dirs)]


def advance_stacked(data: HeadData, jobs: list) -> list[dict]:
    """The sweep's ``advance`` for a group of stackable jobs with the same span: open each run, train
    them stacked to ``until``, then checkpoint or finish each exactly as alone."""
    from heads.sweep import close_run, open_run

    trainers = [open_run(data, job) for job in jobs]
    StackedTrainer(trainers).run(jobs[0].until)
    return [close_run(data, job, t) for job, t in zip(jobs, trainers)]
