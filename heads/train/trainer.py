"""The one training core: seeding, the epoch loop, selection on validation, checkpoints of a run in
progress. Methods only say how a batch updates them and how they predict (``heads/methods``);
evaluation is ``heads/train/evaluation.py`` and the run folder ``heads/train/rundir.py``.
"""
from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import numpy as np
import torch

from heads.blocks.data import HeadData
from heads.blocks.device import autocast, resolve_device, resolve_precision
from heads.blocks.optim import scheduled_lr, set_lr
from heads.blocks.standardize import standardized
from heads.blocks.progress import Progress
from heads.train.config import TrainConfig, build_model, resolve_training
from heads.train.evaluation import Report, evaluate
from heads.train.rundir import FitResult, write_run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- training ----------------------------------------------------------------------------------
def prepared(split, standardizer, device: torch.device):
    """``split`` standardised and on ``device``, made once per process for each (device, statistics):
    the runs of a sweep that read the same split with the same statistics (every seed without
    ``--missing-train``, a stack of 30 configs) share one copy instead of holding one each. Kept on
    the raw split, so it lives as long as the data does; the copies are never written to."""
    if any(b.device.type == "meta" for b in standardizer.buffers()):  # no values to tell statistics apart
        return standardized(split.to(device), standardizer)
    stats = torch.cat([b.detach().flatten().double().cpu() for b in standardizer.buffers()]) if standardizer.active \
        else torch.zeros(0, dtype=torch.float64)
    key = (str(device), standardizer.mode, stats.numpy().tobytes())
    cache = split.__dict__.setdefault("_prepared", {})
    if key not in cache:
        cache[key] = standardized(split.to(device), standardizer)
    return cache[key]


def masked_splits(data: HeadData, cfg: TrainConfig):
    """``(train, val, test)`` as a run with ``cfg`` sees them: masked with its seed at ``missing_train``
    (all three, the MLA protocol) and ``missing_test`` (test only), on the host."""
    train, val, test = data.train, data.val, data.test
    if cfg.missing_train > 0:
        train = train.with_missing(cfg.missing_train, cfg.seed + 101)
        val = val.with_missing(cfg.missing_train, cfg.seed + 202)
        test = test.with_missing(cfg.missing_train, cfg.seed + 303)
    if cfg.missing_test > 0:
        test = test.with_missing(cfg.missing_test, cfg.seed + 404)
    return train, val, test


class Trainer:
    """One run, trainable in stages: ``run(until)`` trains up to an epoch, ``finish`` selects and tests.

    Staged training is what lets a grid prune configs at epoch milestones (successive halving)
    without a second copy of the loop. ``fit`` is the whole run in one call.
    """

    def __init__(self, data: HeadData, cfg: TrainConfig, model=None):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cfg = resolve_training(cfg)
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.data = data
        self.train, self.val, self.test = masked_splits(data, cfg)
        self.model = model or build_model(cfg, data.spec)
        if not bool(self.model.standardizer.fitted):
            self.model.standardizer.fit(self.train)  # training statistics only, as the model will be used
        # The precision used (``cfg.precision`` keeps what was asked, e.g. auto; results.json says which).
        self.precision = resolve_precision(cfg.precision, self.device, cfg.batch_size, max(data.spec.dims.values()),
                                           cfg.hidden)
        self.cfg = cfg
        self.model.to(self.device)
        self.model.precision = self.precision
        self.model.optimizer = self.model.configure_optimizer()
        self._prepare()
        self.eval_batch_size = cfg.eval_batch_size or cfg.batch_size
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.rows: list[dict] = []
        self.epoch, self.best, self.best_epoch, self.best_state = 0, -1.0, 0, None
        self.seconds = 0.0
        # Where the epochs' time went: the batch loop, and everything else (validation, selection).
        self.phase_seconds = {"train": 0.0, "other": 0.0}
        # Each trainer owns its RNG streams so that interleaved trainers (a pruned grid) reproduce
        # exactly what they would do alone.
        self.rng_state = torch.get_rng_state()
        self.cuda_rng_state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _prepare(self) -> None:
        """The splits the loop reads: standardised once with the fitted statistics and moved to the
        device once (``train``/``val``/``test`` stay the raw host splits, for reports on masks)."""
        std = self.model.standardizer  # already on the device: the map runs there, on the moved split
        self.ready = {name: prepared(getattr(self, name), std, self.device) for name in ("train", "val", "test")}
        self.model.attach(train=self.ready["train"], val=self.ready["val"])  # H1: never test

    # A checkpoint is the trainer without its data (rebuilt from the cache), its device-side splits
    # and its generator (saved as a state): tensors are saved on the host and re-homed on load.
    _NOT_SAVED = ("data", "train", "val", "test", "ready", "shuffle", "device")

    def checkpoint(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in self._NOT_SAVED}
        state["shuffle_state"] = self.shuffle.get_state()
        return state

    def restore(self, state: dict) -> None:
        """Continue from ``checkpoint()`` (loaded with ``map_location="cpu"``) on this trainer's device."""
        state = dict(state)
        self.shuffle.set_state(state.pop("shuffle_state"))
        self.__dict__.update(state)
        self.model.to(self.device)
        optimizer = self.model.optimizer
        optimizer.load_state_dict(optimizer.state_dict())  # re-homes its state beside the parameters
        self._prepare()

    def _epoch_report(self) -> Report:
        """Validation after an epoch: the full-set accuracy and loss that selection needs, and every
        subset only when the method reads φ (edm's order) or ``epoch_subsets`` asks for it."""
        subsets = bool(getattr(self.model, "reads_phi", False)) or self.cfg.epoch_subsets
        return evaluate(self.model, self.ready["val"], self.data.spec, self.eval_batch_size, subsets, prepared=True,
                        permutations=self.cfg.shapley_permutations)

    def run(self, until: int, on_epoch=None) -> None:
        """Train epochs ``self.epoch + 1 … until`` (capped at ``cfg.epochs``)."""
        start = time.perf_counter()
        torch.set_rng_state(self.rng_state)
        if self.cuda_rng_state is not None:
            torch.cuda.set_rng_state(self.cuda_rng_state, self.device)
        model = self.model
        for epoch in range(self.epoch + 1, min(until, self.cfg.epochs) + 1):
            model.train()
            model.start_epoch(epoch)  # may rebuild the optimizer (ccat's stage switch): set the rate after it
            train = model.epoch_split(epoch, self.ready["train"])  # H2: the rows of this epoch
            set_lr(model.optimizer, scheduled_lr(self.cfg.lr, self.cfg.schedule, epoch, self.cfg.epochs))
            total = torch.zeros((), device=self.device)  # summed on the device, read once per epoch
            tick = time.perf_counter()
            with autocast(self.device, self.precision):
                for batch in train.batches(self.cfg.batch_size, self.shuffle):
                    total += model.train_step(batch) * len(batch)
            train_loss = float(total) / max(len(train), 1)  # the epoch's one wait for the device
            tock = time.perf_counter()
            report = self._epoch_report()
            extra = model.end_epoch(report)
            self.rows.append({"epoch": epoch, "train_loss": train_loss, **report.row("val_"), **extra})
            if model.selectable(epoch) and report.acc >= self.best:  # ties: the later epoch (README, "Selection and reproducibility")
                self.best, self.best_epoch = report.acc, epoch
                self.best_state = copy.deepcopy(model.state_dict())
            self.phase_seconds["train"] += tock - tick
            self.phase_seconds["other"] += time.perf_counter() - tock
            self.epoch = epoch
            if on_epoch is not None:
                on_epoch(self, report)
        self.rng_state = torch.get_rng_state()
        if self.cuda_rng_state is not None:
            self.cuda_rng_state = torch.cuda.get_rng_state(self.device)
        self.seconds += time.perf_counter() - start

    def finish(self, run_dir: str | Path | None = None) -> FitResult:
        """Restore the best-on-validation state, evaluate validation and test once, write the run."""
        start = time.perf_counter()
        self.model.load_state_dict(self.best_state)
        val_report = evaluate(self.model, self.ready["val"], self.data.spec, self.eval_batch_size, prepared=True,
                              permutations=self.cfg.shapley_permutations)
        test_report = evaluate(self.model, self.ready["test"], self.data.spec, self.eval_batch_size, prepared=True,
                               permutations=self.cfg.shapley_permutations)
        self.seconds += time.perf_counter() - start
        result = FitResult(self.model, self.cfg, self.rows, self.best_epoch, val_report, test_report, self.seconds,
                           self.epoch, str(self.device), self.precision)
        if run_dir is not None:
            write_run(Path(run_dir), result, self.data)
        return result


def fit(data: HeadData, cfg: TrainConfig, run_dir: str | Path | None = None, progress: bool = True,
        model=None, trainer: Trainer | None = None, on_epoch=None, log=None) -> FitResult:
    """Train ``cfg.method`` on ``data``, select the epoch with the best validation accuracy, test it once.

    ``trainer``: one restored from a checkpoint (``heads/train/resume.py``), continued from its epoch;
    ``on_epoch(trainer, report)`` runs after each epoch (the resume checkpoint). ``log`` (a
    ``heads.train.tracking.RunLog``) is started before the first epoch (so its set-up is not counted in
    the run's seconds), gets each epoch's row as it ends and the result once the run folder is written,
    so trackers watch the run live.
    """
    trainer = trainer or Trainer(data, cfg, model)
    cfg = trainer.cfg  # resolved: the method's epoch count when none was given
    if log is not None:
        log.start_trainer(trainer)
    what = f"{cfg.method} seed {cfg.seed}"
    with Progress(what, total=cfg.epochs, enabled=progress) as bar:
        bar.update(completed=trainer.epoch)

        def show(t: Trainer, report: Report) -> None:
            bar.update(advance=1, description=f"{what} · val {report.acc:.1f}% (best {t.best:.1f}% @ {t.best_epoch})")
            if log is not None:
                log.epoch(t.rows[-1])
            if on_epoch is not None:
                on_epoch(t, report)

        trainer.run(cfg.epochs, show)
    result = trainer.finish(run_dir)
    if log is not None:
        log.finish_fit(result, run_dir)
    return result
