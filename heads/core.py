"""The one training core: seeding, the epoch loop, evaluation of every modality subset, selection on
validation, per-epoch logging, checkpoints and run folders. Methods only say how a batch updates
them and how they predict (``heads/methods``).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import random
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from heads import metrics
from heads.data import HeadData, SplitTensors
from heads.methods import METHODS
from heads.training import scheduled_lr, set_lr


@dataclass
class TrainConfig:
    """Everything a run depends on; written to ``config.json`` of every run, resolved."""

    method: str = "concat"
    epochs: int = 100
    # None = the method's paper setting (``heads.training``; ``resolve_training`` fills them in).
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None
    schedule: str | None = None
    hidden: int = 256
    seed: int = 0
    eval_batch_size: int = 0  # 0 = same as batch_size (methods that look across a batch need a fixed rule)
    missing_train: float = 0.0  # per-modality masking rate for train and val (MLA protocol)
    missing_test: float = 0.0  # per-modality masking rate for test only (EDM paper's Table VI)
    standardize: str = "feature"  # per-feature z-scoring with training statistics (heads/standardize.py)
    threads: int = 0  # 0 = torch's default
    options: dict = field(default_factory=dict)  # the method's own options, resolved
    training_source: str = ""  # where the resolved optimizer settings came from (filled by resolve_training)


class OptionError(ValueError):
    """A method option that does not exist or does not parse; the message lists what is valid."""


def method_class(name: str):
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def option_fields(method: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(method_class(method).Options))


def _field_type(method: str, name: str):
    """The declared type of an option (annotations may be strings under ``from __future__``)."""
    return typing.get_type_hints(method_class(method).Options)[name]


def _convert(f: dataclasses.Field, raw, method: str):
    """Parse one option value by the field's declared type (bool, int, float, str or a Literal)."""
    kind = _field_type(method, f.name)
    flag = f"--{f.name.replace('_', '-')}"
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        if raw not in choices:
            raise OptionError(f"{flag} must be one of {', '.join(map(str, choices))}, got {raw!r}")
        return raw
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).lower()
        if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise OptionError(f"{flag} expects true or false, got {raw!r}")
        return word in ("1", "true", "yes", "on")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise OptionError(f"{flag} expects {kind.__name__}, got {raw!r}") from None


def resolve_options(method: str, given: dict) -> dict:
    """Defaults of the method's Options, overridden by ``given`` (names with '_' or '-')."""
    fields = {f.name: f for f in option_fields(method)}
    out = {name: f.default for name, f in fields.items()}
    for key, raw in given.items():
        name = key.replace("-", "_")
        if name not in fields:
            valid = ", ".join("--" + n.replace("_", "-") for n in fields) or "none"
            raise OptionError(f"method {method!r} has no option --{key.replace('_', '-')}; its options: {valid}")
        out[name] = _convert(fields[name], raw, method)
    return out


def parse_option_args(method: str, args: list[str]) -> dict:
    """Turn ``--tau 0.3 --no-align --order=fixed`` (extra CLI words) into a method options dict."""
    names = {f.name for f in option_fields(method)}

    def is_flag(name: str) -> bool:
        return name in names and _field_type(method, name) is bool

    given, i = {}, 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--"):
            raise OptionError(f"unexpected argument {word!r}")
        name = word[2:]
        key = name.replace("-", "_")
        if "=" in name:
            name, value = name.split("=", 1)
            given[name] = value
        elif key.startswith("no_") and is_flag(key[3:]):
            given[key[3:]] = False
        elif is_flag(key):
            given[key] = True
        else:
            if i + 1 >= len(args):
                raise OptionError(f"option {word} needs a value")
            given[name] = args[i + 1]
            i += 1
        i += 1
    return resolve_options(method, given)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_training(cfg: TrainConfig) -> TrainConfig:
    """Fill the settings left ``None`` from the method's declared paper setting; record the source.

    Idempotent. A setting the user gave is kept; ``training_source`` then says which were given.
    """
    from heads.training import FIELDS, parse_schedule

    defaults = method_class(cfg.method).training
    given = [name for name in FIELDS if getattr(cfg, name) is not None]
    if not cfg.training_source:
        source = f"{cfg.method}: {defaults.source}"
        if given:
            source += "; given: " + ", ".join(f"{n.replace('_', '-')} {getattr(cfg, n)}" for n in given)
        cfg = dataclasses.replace(cfg, training_source=source)
    cfg = dataclasses.replace(cfg, **{n: getattr(defaults, n) for n in FIELDS if getattr(cfg, n) is None})
    parse_schedule(cfg.schedule)
    return cfg


def build_model(cfg: TrainConfig, spec):
    cfg = resolve_training(cfg)
    cls = method_class(cfg.method)
    opts = cls.Options(**resolve_options(cfg.method, cfg.options))
    return cls(spec, cfg, opts)


# --- evaluation --------------------------------------------------------------------------------
@dataclass
class Report:
    """Evaluation of one model on one split: v(S) for every subset and everything derived from it.

    ``loss`` is the cross-entropy of the full-set prediction (used to break ties between configs
    with equal validation accuracy); with ``subsets=False`` the per-modality fields are NaN.
    """

    v: dict[frozenset, float]
    acc: float
    f1: float
    unimodal: dict[str, float]
    phi: dict[str, float]
    delta: dict[str, float]
    edm: float
    pred: torch.Tensor
    loss: float = float("nan")

    def row(self, prefix: str = "") -> dict:
        out = {f"{prefix}acc": self.acc, f"{prefix}f1": self.f1, f"{prefix}loss": self.loss, f"{prefix}edm": self.edm}
        for m in self.unimodal:
            out[f"{prefix}acc_{m}"] = self.unimodal[m]
            out[f"{prefix}phi_{m}"] = self.phi[m]
            out[f"{prefix}delta_{m}"] = self.delta[m]
        return out

    def to_json(self) -> dict:
        return {**self.row(), "v": {"+".join(sorted(s)) or "∅": a for s, a in self.v.items()}}


EVAL_ORDER_SEED = 20_241_129  # one fixed seed: the same evaluation batches for every method, epoch and run


def evaluation_order(split: SplitTensors) -> torch.Tensor:
    """The fixed, label-blind order in which a split is cut into evaluation batches.

    Methods that look across a batch (edm's alignment) give predictions that depend on which samples
    share a batch, so the batches must be fixed — but not by sample id or row order: real ids encode
    the class (Food-101 ``<class>_<n>``) or actor and emotion (CREMA-D ``1001_DFA_ANG_XX``), and a
    cache's rows follow its ids. The order here sorts samples by a seeded random projection of their
    own (pooled) features: a function of the content only, so renaming or reordering samples leaves
    every batch — and so every v(S) — unchanged, and no label or name can leak into it. Computed once
    per split and kept on it.
    """
    cached = split.__dict__.get("_eval_order")
    if cached is not None:
        return cached
    gen = torch.Generator().manual_seed(EVAL_ORDER_SEED)
    key = torch.zeros(len(split), dtype=torch.float64)
    for m in sorted(split.x):
        x = split.x[m].double()
        direction = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
        key += (x * direction).sum(1)  # elementwise then a row sum: the same bits whatever the row's position
    order = torch.argsort(key, stable=True)
    split.__dict__["_eval_order"] = order
    return order


def predict(model, split: SplitTensors, modalities, batch_size: int, with_loss: bool = False):
    """Predicted classes with only ``modalities`` present (the others exactly as missing).

    Fixed-size batches in ``evaluation_order``; each batch goes through the model's standardiser
    first, as in training. With ``with_loss`` also returns the mean cross-entropy of the logits.
    (A ``with`` block rather than a decorator, so that mutation testing reaches this function.)
    """
    model.eval()
    index = evaluation_order(split)
    preds = torch.empty(len(split), dtype=torch.long)
    loss_sum = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            rows = index[start:start + batch_size]
            batch = split.batch(rows).only(modalities)
            logits = model.logits(model.standardizer(batch))
            preds[rows] = logits.argmax(-1)
            if with_loss:
                loss_sum += nn.functional.cross_entropy(logits.float(), batch.y, reduction="sum").double()
    if with_loss:
        return preds, float(loss_sum) / max(len(split), 1)
    return preds


def evaluate(model, split: SplitTensors, spec, batch_size: int, subsets: bool = True) -> Report:
    """Score every modality subset (or only the full set) and derive φ, δ and EDM from them.

    v(∅) is the accuracy of always predicting the training set's majority class (no model involved).
    """
    mods = spec.modalities
    full = frozenset(mods)
    v: dict[frozenset, float] = {frozenset(): metrics.accuracy(torch.full_like(split.y, spec.majority_class), split.y)}
    pred_full, loss = predict(model, split, mods, batch_size, with_loss=True)
    v[full] = metrics.accuracy(pred_full, split.y)
    if subsets:
        for s in metrics.all_subsets(mods):
            if s and s != full:
                v[s] = metrics.accuracy(predict(model, split, s, batch_size), split.y)
        phi = metrics.shapley_values(v, mods)
        delta = metrics.deviations(phi, v[full], v[frozenset()])
        uni = {m: v[frozenset([m])] for m in mods}
    else:
        phi, delta, uni = {m: float("nan") for m in mods}, {m: float("nan") for m in mods}, {m: float("nan") for m in mods}
    return Report(v, v[full], metrics.macro_f1(pred_full, split.y, spec.num_classes), uni, phi, delta,
                  metrics.edm(delta) if subsets else float("nan"), pred_full, loss)


# --- training ----------------------------------------------------------------------------------
@dataclass
class FitResult:
    model: torch.nn.Module
    config: TrainConfig
    epochs: list[dict]
    best_epoch: int
    val: Report
    test: Report
    seconds: float
    epochs_run: int  # fewer than config.epochs when a grid pruned the run


class Trainer:
    """One run, trainable in stages: ``run(until)`` trains up to an epoch, ``finish`` selects and tests.

    Staged training is what lets a grid prune configs at epoch milestones (successive halving)
    without a second copy of the loop. ``fit`` is the whole run in one call.
    """

    def __init__(self, data: HeadData, cfg: TrainConfig, model=None):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cfg = resolve_training(cfg)
        seed_everything(cfg.seed)
        self.data, self.cfg = data, cfg
        self.train, self.val, self.test = data.train, data.val, data.test
        if cfg.missing_train > 0:
            self.train = self.train.with_missing(cfg.missing_train, cfg.seed + 101)
            self.val = self.val.with_missing(cfg.missing_train, cfg.seed + 202)
            self.test = self.test.with_missing(cfg.missing_train, cfg.seed + 303)
        if cfg.missing_test > 0:
            self.test = self.test.with_missing(cfg.missing_test, cfg.seed + 404)
        self.model = model or build_model(cfg, data.spec)
        if not bool(self.model.standardizer.fitted):
            self.model.standardizer.fit(self.train)  # training statistics only, as the model will be used
        self.model.optimizer = self.model.configure_optimizer()
        self.eval_batch_size = cfg.eval_batch_size or cfg.batch_size
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.rows: list[dict] = []
        self.epoch, self.best, self.best_epoch, self.best_state = 0, -1.0, 0, None
        self.seconds = 0.0
        # Each trainer owns its RNG stream so that interleaved trainers (a pruned grid) reproduce
        # exactly what they would do alone.
        self.rng_state = torch.get_rng_state()

    def run(self, until: int, on_epoch=None) -> None:
        """Train epochs ``self.epoch + 1 … until`` (capped at ``cfg.epochs``)."""
        start = time.perf_counter()
        torch.set_rng_state(self.rng_state)
        model = self.model
        for epoch in range(self.epoch + 1, min(until, self.cfg.epochs) + 1):
            model.train()
            model.start_epoch(epoch)  # may rebuild the optimizer (ccat's stage switch): set the rate after it
            set_lr(model.optimizer, scheduled_lr(self.cfg.lr, self.cfg.schedule, epoch, self.cfg.epochs))
            total, count = torch.zeros(()), 0
            for batch in self.train.batches(self.cfg.batch_size, self.shuffle):
                total += model.train_step(model.standardizer(batch)) * len(batch)
                count += len(batch)
            report = evaluate(model, self.val, self.data.spec, self.eval_batch_size)
            extra = model.end_epoch(report)
            self.rows.append({"epoch": epoch, "train_loss": float(total) / max(count, 1), **report.row("val_"), **extra})
            if report.acc >= self.best:  # ties: the later epoch (README, "Selection and reproducibility")
                self.best, self.best_epoch = report.acc, epoch
                self.best_state = copy.deepcopy(model.state_dict())
            self.epoch = epoch
            if on_epoch is not None:
                on_epoch(self, report)
        self.rng_state = torch.get_rng_state()
        self.seconds += time.perf_counter() - start

    def finish(self, run_dir: str | Path | None = None) -> "FitResult":
        """Restore the best-on-validation state, evaluate validation and test once, write the run."""
        start = time.perf_counter()
        self.model.load_state_dict(self.best_state)
        val_report = evaluate(self.model, self.val, self.data.spec, self.eval_batch_size)
        test_report = evaluate(self.model, self.test, self.data.spec, self.eval_batch_size)
        self.seconds += time.perf_counter() - start
        result = FitResult(self.model, self.cfg, self.rows, self.best_epoch, val_report, test_report, self.seconds,
                           self.epoch)
        if run_dir is not None:
            write_run(Path(run_dir), result, self.data)
        return result


def fit(data: HeadData, cfg: TrainConfig, run_dir: str | Path | None = None, progress: bool = True,
        model=None) -> FitResult:
    """Train ``cfg.method`` on ``data``, select the epoch with the best validation accuracy, test it once."""
    trainer = Trainer(data, cfg, model)
    with _progress(progress) as bar:
        task = bar.add_task(f"{cfg.method} seed {cfg.seed}", total=cfg.epochs)

        def show(t: Trainer, report: Report) -> None:
            bar.update(task, advance=1, description=f"{cfg.method} seed {cfg.seed} · val {report.acc:.1f}% "
                                                   f"(best {t.best:.1f}% @ {t.best_epoch})")

        trainer.run(cfg.epochs, show)
    return trainer.finish(run_dir)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=True)


# --- run folders -------------------------------------------------------------------------------
def write_run(run_dir: Path, result: FitResult, data: HeadData) -> None:
    """``config.json`` (resolved), ``epochs.csv``, ``results.json``, ``table.md``, ``model.pt``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(result.config)
    cfg["options"] = resolve_options(result.config.method, result.config.options)
    from cache.store import _code_version

    config = {"train": cfg, "data": data.meta, "spec": dataclasses.asdict(data.spec), "code_version": _code_version()}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    with open(run_dir / "epochs.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in result.epochs for k in r))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result.epochs)
    c = result.config
    training = (f"{c.optimizer} lr {c.lr:g} wd {c.weight_decay:g} {c.schedule} batch {c.batch_size}"
                f"{'' if c.standardize == 'feature' else f' standardize {c.standardize}'}")
    results = {"method": result.config.method, "seed": result.config.seed, "training": training, "best_epoch": result.best_epoch,
               "epochs_run": result.epochs_run, "seconds": result.seconds, "val": result.val.to_json(), "test": result.test.to_json()}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    from heads.report import results_table

    (run_dir / "table.md").write_text(results_table([results], data.spec.modalities))
    torch.save({"config": config, "state": result.model.state_dict()}, run_dir / "model.pt")


def load_run(run_dir: str | Path):
    """Rebuild a trained model from a run folder (its config + selected state)."""
    from heads.data import DataSpec

    saved = torch.load(Path(run_dir) / "model.pt", map_location="cpu", weights_only=False)
    cfg = TrainConfig(**saved["config"]["train"])
    model = build_model(cfg, DataSpec(**saved["config"]["spec"]))
    model.load_state_dict(saved["state"])
    model.eval()
    return model, cfg
