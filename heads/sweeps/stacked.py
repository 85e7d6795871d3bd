"""Stacked training: K runs of one method trained together as batched tensors, for GPU grids.

One head on a GPU is launch-bound: its matmuls are too small to fill the device, so a config costs
the same wall time whether the device does 1 or 30 of them at once. ``StackedTrainer`` trains K runs
that share every shape in one process: their parameters are stacked along a new leading dimension
(``torch.func.stack_module_state``), a batch of each run goes through ``vmap(grad(loss))`` of the
method's own loss, and one optimizer step updates all K runs, each with its own learning rate and
weight decay. It has the staged shape of ``heads.train.trainer.Trainer`` (``run(until)``, then ``finish``), and
it is built from K ordinary trainers, so each run is set up exactly as it would be alone: its seed's
initialisation, masks, standardisation statistics, shuffling generator and RNG stream (the method's
per-epoch hooks run with it). At the end the trained state goes back into each trainer, which
evaluates and writes its run as usual.

What may be stacked (``can_stack``, ``stack_key``): runs that differ only in seed, lr, weight decay and
the options their method lists in ``stack_options`` (read as tensors: edm's τ), of a method that is

- ``stackable``: the inherited ``train_step`` (one loss, one optimizer step per batch), optimizer and
  epoch split, and pure tensor code in ``loss``/``logits`` (concat, sum, late, film, bigated, qmf, lfm;
  qmf's per-sample history is a ``trained_buffers`` entry, updated per run inside vmap); or
- ``stack_chain`` (edm): a chain of steps per batch, each ``chain_loss`` followed by an optimizer step on
  the parameters it reaches (``step_parameters``). Runs are grouped by their epoch's modality order;
  only complete data (no ``--missing-train``), where every run has every modality in every batch.

Everything else — mla's gradient projection, ccat's stages, ogm-ge's gradient surgery — trains one
run at a time. The result is the same function of the seed as the run alone; the arithmetic differs
(batched kernels), so numbers agree within float tolerance, not bit for bit (``tests/test_stacked.py``).
The optimizers are ``torch.optim``'s update rules restated for stacked tensors (``stacked_optim.py``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from heads import metrics
from heads.blocks.data import Batch, HeadData
from heads.blocks.device import autocast
from heads.blocks.order import evaluation_order
from heads.blocks.standardize import materialized
from heads.methods import method_class
from heads.methods.base import HeadMethod
from heads.methods.edm import Started
from heads.sweeps.jobs import close_run, open_run
from heads.sweeps.stacked_optim import load_optimizer_state, stacked_rates, stacked_step
from heads.train.config import TrainConfig
from heads.train.evaluation import Report, model_autocast
from heads.train.trainer import Trainer

# Settings stacked runs may differ in; the rest (and options outside ``stack_options``) must be equal.
VARYING = ("seed", "lr", "weight_decay", "threads", "device", "training_source")
EVAL_ROWS = 8192  # validation rows per stacked forward pass (bounds the [K, rows, C] logits)


def stack_key(cfg: TrainConfig) -> str:
    """Runs with the same key can train stacked."""
    free = getattr(method_class(cfg.method), "stack_options", ())
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in VARYING}
    values["options"] = {k: v for k, v in cfg.options.items() if k not in free}
    return json.dumps(values, sort_keys=True, default=str)


def can_stack(cfg: TrainConfig) -> bool:
    """The method is stackable with the inherited one-loss-one-step update, or a chain (edm) on complete data."""
    cls = method_class(cfg.method)
    if cls.configure_optimizer is not HeadMethod.configure_optimizer or cls.epoch_split is not HeadMethod.epoch_split:
        return False  # its own parameter groups (rates) or rows per epoch
    if getattr(cls, "stack_chain", False):
        return cfg.missing_train == 0
    return bool(getattr(cls, "stackable", False)) and cls.train_step is HeadMethod.train_step


class _Call(nn.Module):
    """``forward(name, *args)`` = ``method.<name>(*args)``: ``functional_call`` runs any method function stacked."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, name: str, *args):
        return getattr(self.method, name)(*args)


class StackedTrainer:
    """K trainers of one method, trained together; ``run(until)`` and ``finish()`` as ``Trainer``."""

    def __init__(self, trainers: list[Trainer]):
        if not trainers:
            raise ValueError("nothing to stack")
        if len({stack_key(t.cfg) for t in trainers}) != 1 or len({t.epoch for t in trainers}) != 1:
            raise ValueError("stacked runs must share every setting but seed, lr and weight decay, and their epoch")
        if not all(can_stack(t.cfg) for t in trainers):
            raise ValueError(f"method {trainers[0].cfg.method!r} cannot be stacked (see heads/sweeps/stacked.py)")
        self.trainers, self.k = trainers, len(trainers)
        first = trainers[0]
        self.cfg, self.device, self.spec = first.cfg, first.device, first.data.spec
        self.chain = bool(getattr(first.model, "stack_chain", False))
        self.template = copy.deepcopy(first.model).to("meta")  # shapes only: the functions run on the stack
        self.call = _Call(self.template)
        params, buffers = stack_module_state([t.model for t in trainers])
        self.params = {f"method.{n}": p.detach().clone() for n, p in params.items()}
        self.buffers = {f"method.{n}": b.clone() for n, b in buffers.items()}
        self.state: dict[str, dict] = {n: {"step": 0} for n in self.params}  # optimizer state per parameter
        # Buffers the stacked training changes (a chain's inherited memory, a method's ``trained_buffers``);
        # the models own the rest, and their epoch hooks may change them (re-stacked after ``start_epoch``).
        self.trained_buffers = [n for n in ("method.memory_h", "method.memory_c") if self.chain and n in self.buffers]
        self.trained_buffers += [f"method.{n}" for n in getattr(first.model, "trained_buffers", ())]
        load_optimizer_state(self.trainers, self.state, self.device)  # a resumed run's moments go on
        # One data copy when every run reads the same (standardised) splits, else one per run.
        self.shared = len({id(t.train) for t in trainers}) == 1 and len({id(t.val) for t in trainers}) == 1
        self.train = [materialized(t.ready["train"]) for t in trainers]  # gathered as whole tensors
        self.val = [materialized(t.ready["val"]) for t in trainers]
        for t in trainers:
            t.stacked_with = self.k

    # --- batches of every run ----------------------------------------------------------------------
    def _gather(self, splits, index: torch.Tensor, runs: list[int]) -> dict:
        """``[G, B, …]`` inputs: run k's rows ``index[i]`` of its split, for the runs ``runs``."""
        out = {}
        for kind in ("x", "tokens", "present"):
            out[kind] = {}
            for m in getattr(splits[0], kind):
                if self.shared:
                    out[kind][m] = getattr(splits[0], kind)[m][index]
                else:
                    out[kind][m] = torch.stack([getattr(splits[k], kind)[m][index[i]] for i, k in enumerate(runs)])
        out["y"] = splits[0].y[index] if self.shared else torch.stack([splits[k].y[index[i]] for i, k in enumerate(runs)])
        # Batch.index: each run's rows of its split (the splits trained stacked are splits of their own).
        out["index"] = index if all(splits[k].index is None for k in runs) else \
            torch.stack([splits[k].source_rows()[index[i]] for i, k in enumerate(runs)])
        return out

    @staticmethod
    def _counts(per_run: list[dict[str, int]], n: int) -> dict[str, int]:
        """One count per modality true of every run's batch for ``has``/``full``: n (all full), 0
        (nobody anywhere), else 1 (some: the methods' general, masked path)."""
        out = {}
        for m in per_run[0]:
            values = [c[m] for c in per_run]
            out[m] = n if all(v == n for v in values) else 0 if all(v == 0 for v in values) else 1
        return out

    def _restack_buffers(self) -> None:
        """The models' buffers into the stack after ``start_epoch``, which may change them (pmr's prototypes)."""
        own = [dict(t.model.named_buffers()) for t in self.trainers]
        self.buffers = {n: torch.stack([b[n.removeprefix("method.")] for b in own]) for n in self.buffers}

    def _hook(self, k: int, name: str, *args):
        """A method's per-epoch hook on run k's own model, with run k's own RNG stream (edm's random order)."""
        t = self.trainers[k]
        torch.set_rng_state(t.rng_state)
        out = getattr(t.model, name)(*args)
        t.rng_state = torch.get_rng_state()
        return out

    def _groups(self) -> list[list[int]]:
        """Runs that train together this epoch: all of them, or (a chain) those sharing the chain order."""
        if not self.chain:
            return [list(range(self.k))]
        groups: dict[tuple, list[int]] = {}
        for k, t in enumerate(self.trainers):
            groups.setdefault(tuple(t.model.order), []).append(k)
        return list(groups.values())

    # --- training ------------------------------------------------------------------------------------
    def run(self, until: int, on_epoch=None) -> None:
        start = time.perf_counter()
        first = self.trainers[0]
        n = len(self.train[0])
        for epoch in range(first.epoch + 1, min(until, self.cfg.epochs) + 1):
            for k in range(self.k):
                self._hook(k, "start_epoch", epoch)
            self._restack_buffers()
            self.template.epoch = epoch  # what a loss reads of the epoch (lfm's α_t); the hooks ran on the models
            lr, wd = stacked_rates(self.trainers, epoch, self.device)
            host = torch.stack([torch.randperm(n, generator=t.shuffle) for t in self.trainers])  # each run's shuffle
            index = host.to(self.device, non_blocking=True)
            total = torch.zeros(self.k, device=self.device)
            steps = {n: slot["step"] for n, slot in self.state.items()}  # every group starts from these counts
            for runs in self._groups():
                if self.chain:
                    self._chain_epoch(runs, index, host, lr, wd, total, steps)
                else:
                    self._plain_epoch(index, host, lr, wd, total)
            reports = self._validate()
            losses = (total / n).tolist()
            self._write_back()
            for k, (t, report) in enumerate(zip(self.trainers, reports)):
                extra = self._hook(k, "end_epoch", report)
                t.rows.append({"epoch": epoch, "train_loss": losses[k], **report.row("val_"), **extra})
                if t.model.selectable(epoch) and report.acc >= t.best:  # ties: the later epoch, as in Trainer.run
                    t.best, t.best_epoch = report.acc, epoch
                    t.best_state = copy.deepcopy(t.model.state_dict())
                t.epoch = epoch
                if on_epoch is not None:
                    on_epoch(t, report)
        share = (time.perf_counter() - start) / self.k
        for t in self.trainers:
            t.seconds += share

    def _batches(self, index, host, runs):
        """``(inputs, counts, rows)`` of each training batch of the runs ``runs``."""
        n, b = index.shape[1], self.cfg.batch_size
        for s in range(0, n, b):
            rows, rows_host = index[runs, s:s + b], host[runs, s:s + b]
            counts = self._counts([self.train[k]._counts(rows_host[i], rows_host.shape[1]) for i, k in enumerate(runs)],
                                  rows_host.shape[1])
            yield self._gather(self.train, rows, runs), counts, rows.shape[1]

    def _plain_epoch(self, index, host, lr, wd, total) -> None:
        def loss_of(params, buffers, x, tokens, present, y, rows, counts):
            return functional_call(self.call, (params, buffers), ("loss", Batch(x, tokens, present, y, counts, rows)))

        step = vmap(grad_and_value(loss_of), in_dims=(0, 0, 0, 0, 0, 0, 0, None))
        runs = list(range(self.k))
        for inputs, counts, size in self._batches(index, host, runs):
            with autocast(self.device, self.trainers[0].precision):
                grads, loss = step(self.params, self.buffers, inputs["x"], inputs["tokens"], inputs["present"],
                                   inputs["y"], inputs["index"], counts)
            with torch.no_grad():
                stacked_step(self.cfg.optimizer, self.params, self.state, grads, lr, wd)
            total += loss.detach() * size

    def _chain_epoch(self, runs: list[int], index, host, lr, wd, total, steps: dict[str, int]) -> None:
        """One epoch of a chain method (edm) for the runs ``runs``, which share this epoch's order."""
        every = len(runs) == self.k
        pick = torch.tensor(runs, device=self.device)
        params = self.params if every else {n: p[pick] for n, p in self.params.items()}
        buffers = self.buffers if every else {n: b[pick] for n, b in self.buffers.items()}
        state = self.state if every else {n: {k: (v[pick] if torch.is_tensor(v) else v) for k, v in s.items()}
                                          for n, s in self.state.items()}
        if not every:
            for n, slot in state.items():
                slot["step"] = steps[n]  # complete data: every group steps each parameter equally often
        order = self.trainers[runs[0]].model.order
        self.template.__dict__["_order_host"] = list(order)
        opts = self.template.opts
        beta = torch.tensor([self.trainers[k].model.opts.inherit_momentum for k in runs], device=self.device)[:, None]
        sub_lr, sub_wd = lr[pick], wd[pick]
        for inputs, counts, size in self._batches(index, host, runs):
            batch_args = (inputs["x"], inputs["tokens"], inputs["present"], inputs["y"], inputs["index"])
            g = len(runs)
            h_prev = torch.zeros(g, size, self.cfg.hidden, device=self.device)
            mask = torch.zeros(g, size, dtype=torch.bool, device=self.device)
            state_h, state_c = buffers["method.memory_h"][:, None], buffers["method.memory_c"][:, None]
            some = full = False
            loss_sum = torch.zeros(g, device=self.device)
            for m in order:
                if counts[m] == 0:
                    continue

                def chain_of(params, buffers, x, tokens, present, y, rows, h_prev, mask, state_h, state_c, m=m,
                             some=some, full=full):
                    batch = Batch(x, tokens, present, y, counts, rows)
                    loss, seen, started, new_h, new_c = functional_call(
                        self.call, (params, buffers), ("chain_loss", m, batch, h_prev, Started(mask, some, full),
                                                       state_h, state_c))
                    return loss, (seen, started.mask, new_h, new_c)

                step = vmap(grad_and_value(chain_of, has_aux=True))
                with autocast(self.device, self.trainers[0].precision):
                    grads, (loss, (seen, mask, new_h, new_c)) = step(params, buffers, *batch_args, h_prev, mask,
                                                                     state_h, state_c)
                with torch.no_grad():
                    stacked_step(self.cfg.optimizer, params, state, grads, sub_lr, sub_wd,
                                 self.template.step_parameters(m, opts.align and some))
                loss_sum += loss.detach()
                h_prev, state_h, state_c = seen.detach(), new_h.detach(), new_c.detach()
                some, full = some or counts[m] > 0, full or counts[m] == size
            if opts.inherit:  # the memory every run starts its next batch from (edm's inherited state)
                for name, value in (("method.memory_h", state_h), ("method.memory_c", state_c)):
                    buffers[name].mul_(beta).add_((1 - beta) * value.mean(1))
            total[pick] += loss_sum / len(self.spec.modalities) * size
        if not every:  # the group's slice back into the stack
            for n, p in params.items():
                self.params[n][pick] = p
            for n, b in buffers.items():
                self.buffers[n][pick] = b
            for n, s in state.items():
                for key, value in s.items():
                    if torch.is_tensor(value):
                        if key not in self.state[n]:
                            self.state[n][key] = torch.zeros((self.k, *value.shape[1:]), dtype=value.dtype,
                                                             device=value.device)
                        self.state[n][key][pick] = value
                    else:
                        self.state[n][key] = value

    # --- validation ----------------------------------------------------------------------------------
    def _validate(self) -> list[Report]:
        """Each run's validation report, from vmapped passes over the stacked parameters: the full set
        only, or every subset when the method reads φ (edm's order) or ``epoch_subsets`` asks."""
        subsets = bool(getattr(self.template, "reads_phi", False)) or self.cfg.epoch_subsets
        mods = list(self.spec.modalities)
        full = frozenset(mods)
        wanted = [s for s in metrics.all_subsets(mods) if s] if subsets else [full]
        if subsets and len(mods) > metrics.EXACT_SHAPLEY_MAX:  # sampled φ: the trainers evaluate themselves
            self._write_back()
            return [t._epoch_report() for t in self.trainers]

        # A batch-dependent method's own scoring of every subset of a batch (edm's prefix tree), vmapped.
        tree = not getattr(self.template, "batch_independent", True) and hasattr(self.template, "subset_logits")

        def logits_of(params, buffers, x, tokens, present, y, rows, counts):
            batch = Batch(x, tokens, present, y, counts, rows)
            return functional_call(self.call, (params, buffers), ("subset_logits", batch, wanted) if tree else ("logits", batch))

        def fields(b: Batch) -> tuple:
            return b.x, b.tokens, b.present, b.y, b.index, b.counts

        n = len(self.val[0])
        size = self.trainers[0].eval_batch_size if not getattr(self.template, "batch_independent", True) \
            else max(1, EVAL_ROWS // self.k)
        order = torch.stack([evaluation_order(v) for v in self.val])
        host = torch.stack([evaluation_order(v).cpu() for v in self.val]) if self.device.type != "cpu" else order
        preds = {s: torch.empty(self.k, n, dtype=torch.long, device=self.device) for s in wanted}
        loss = torch.zeros(self.k, dtype=torch.float64, device=self.device)
        with torch.no_grad(), model_autocast(self.trainers[0].model):
            for runs in self._groups():
                pick = torch.tensor(runs, device=self.device)
                params = {k: p[pick] for k, p in self.params.items()} if len(runs) < self.k else self.params
                buffers = {k: b[pick] for k, b in self.buffers.items()} if len(runs) < self.k else self.buffers
                if self.chain:
                    self.template.__dict__["_order_host"] = list(self.trainers[runs[0]].model.order)
                for s in range(0, n, size):
                    rows, rows_host = order[runs, s:s + size], host[runs, s:s + size]
                    inputs = self._gather(self.val, rows, runs)
                    counts = self._counts([self.val[k]._counts(rows_host[i], rows_host.shape[1])
                                           for i, k in enumerate(runs)], rows_host.shape[1])
                    whole = Batch(inputs["x"], inputs["tokens"], inputs["present"], inputs["y"], counts, inputs["index"])
                    batched = vmap(logits_of, in_dims=(0, 0, 0, 0, 0, 0, 0, None))
                    every = batched(params, buffers, *fields(whole)) if tree else None  # [runs, subsets, rows, C]
                    for i, subset in enumerate(wanted):
                        logits = every[:, i] if tree else batched(params, buffers, *fields(whole.only(subset)))
                        preds[subset][pick[:, None], rows] = logits.argmax(-1)
                        if subset == full:
                            loss[pick] += nn.functional.cross_entropy(
                                logits.float().flatten(0, 1), whole.y.flatten(), reduction="none"
                            ).view(len(runs), -1).sum(1).double()
        return self._reports(preds, (loss / max(n, 1)).tolist(), subsets)

    def _reports(self, preds: dict, losses: list[float], subsets: bool) -> list[Report]:
        mods = list(self.spec.modalities)
        full = frozenset(mods)
        nan = {m: float("nan") for m in mods}
        reports = []
        for k, val in enumerate(self.val):
            majority = metrics.accuracy(torch.full_like(val.y, self.spec.majority_class), val.y)
            v = {frozenset(): majority, **{s: metrics.accuracy(p[k], val.y) for s, p in preds.items()}}
            f1 = metrics.macro_f1(preds[full][k], val.y, self.spec.num_classes)
            if not subsets:
                reports.append(Report(v, v[full], f1, nan, nan, nan, float("nan"), preds[full][k], losses[k],
                                      subsets=False))
                continue
            phi = metrics.shapley_values(v, mods)
            delta = metrics.deviations(phi, v[full], v[frozenset()])
            reports.append(Report(v, v[full], f1, {m: v[frozenset([m])] for m in mods}, phi, delta,
                                  metrics.edm(delta), preds[full][k], losses[k]))
        return reports

    def _write_back(self) -> None:
        """Each run's slice of the stack into its own model (and its optimizer's state)."""
        with torch.no_grad():
            for k, t in enumerate(self.trainers):
                named = dict(t.model.named_parameters())
                for name, p in self.params.items():
                    named[name.removeprefix("method.")].copy_(p[k])
                own_buffers = dict(t.model.named_buffers())
                for name in self.trained_buffers:  # the others (edm's order) belong to the models' hooks
                    own_buffers[name.removeprefix("method.")].copy_(self.buffers[name][k])
                opt = t.model.optimizer
                fused = bool(getattr(opt, "defaults", {}).get("fused"))
                for name, slot in self.state.items():
                    param = named[name.removeprefix("method.")]
                    if not slot["step"]:
                        continue
                    own = opt.state.setdefault(param, {})
                    for key, value in slot.items():
                        if torch.is_tensor(value):
                            own[key] = value[k].clone()
                    if t.cfg.optimizer != "sgd":
                        own["step"] = torch.tensor(float(slot["step"]), device=param.device if fused else "cpu")

    def finish(self, run_dirs=None) -> list:
        """Each trainer's ``finish``: its best state evaluated on validation and test, its run written."""
        self._write_back()
        dirs = run_dirs or [None] * self.k
        return [t.finish(d) for t, d in zip(self.trainers, dirs)]


def advance_stacked(data: HeadData, jobs: list) -> list[dict]:
    """The sweep's ``advance`` for a group of stackable jobs with the same span: open each run, train
    them stacked to ``until``, then checkpoint or finish each exactly as alone."""
    trainers = [open_run(data, job) for job in jobs]
    StackedTrainer(trainers).run(jobs[0].until)
    return [close_run(data, job, t) for job, t in zip(jobs, trainers)]
