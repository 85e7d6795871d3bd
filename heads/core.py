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

from heads.data import HeadData
from heads.evaluation import Report, evaluate
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
    device: str = "auto"  # auto | cpu | cuda[:N] (heads/device.py): where the run trains and evaluates
    precision: str = "fp32"  # fp32 | bf16 autocast | auto (bf16 only on a CPU with native bf16 where a probe finds it faster)
    epoch_subsets: bool = False  # score every modality subset on validation after each epoch (methods reading φ always do)
    shapley_permutations: int = 128  # with more than 8 modalities φ is estimated from this many sampled permutations
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
    device: str = "cpu"  # where it trained (the config keeps what was asked, e.g. auto)
    precision: str = "fp32"  # the precision it trained in


def prepared(split, standardizer, device: torch.device):
    """``split`` standardised and on ``device``, made once per process for each (device, statistics):
    the runs of a sweep that read the same split with the same statistics (every seed without
    ``--missing-train``, a stack of 30 configs) share one copy instead of holding one each. Kept on
    the raw split, so it lives as long as the data does; the copies are never written to."""
    if any(b.device.type == "meta" for b in standardizer.buffers()):  # no values to tell statistics apart
        return standardizer.apply_split(split.to(device))
    stats = torch.cat([b.detach().flatten().double().cpu() for b in standardizer.buffers()]) if standardizer.active \
        else torch.zeros(0, dtype=torch.float64)
    key = (str(device), standardizer.mode, stats.numpy().tobytes())
    cache = split.__dict__.setdefault("_prepared", {})
    if key not in cache:
        cache[key] = standardizer.apply_split(split.to(device))
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
        from heads.device import resolve_device, resolve_precision

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
        from heads.device import autocast

        start = time.perf_counter()
        torch.set_rng_state(self.rng_state)
        if self.cuda_rng_state is not None:
            torch.cuda.set_rng_state(self.cuda_rng_state, self.device)
        model, train = self.model, self.ready["train"]
        for epoch in range(self.epoch + 1, min(until, self.cfg.epochs) + 1):
            model.train()
            model.start_epoch(epoch)  # may rebuild the optimizer (ccat's stage switch): set the rate after it
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
            if report.acc >= self.best:  # ties: the later epoch (README, "Selection and reproducibility")
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

    def finish(self, run_dir: str | Path | None = None) -> "FitResult":
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
    from cache import code_version

    config = {"train": cfg, "data": data.meta, "spec": dataclasses.asdict(data.spec), "code_version": code_version(),
              "used": {"device": result.device, "precision": result.precision}}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    with open(run_dir / "epochs.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in result.epochs for k in r))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result.epochs)
    c = result.config
    training = (f"{c.optimizer} lr {c.lr:g} wd {c.weight_decay:g} {c.schedule} batch {c.batch_size}"
                f"{'' if c.standardize == 'feature' else f' standardize {c.standardize}'}")
    results = {"method": result.config.method, "seed": result.config.seed, "training": training, "device": result.device,
               "precision": result.precision, "best_epoch": result.best_epoch,
               "epochs_run": result.epochs_run, "seconds": result.seconds, "val": result.val.to_json(), "test": result.test.to_json()}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    from heads.report import results_table

    (run_dir / "table.md").write_text(results_table([results], data.spec.modalities))
    torch.save({"config": config, "state": result.model.state_dict()}, run_dir / "model.pt")


def load_run(run_dir: str | Path, device: str = "cpu"):
    """Rebuild a trained model from a run folder (its config + selected state), on ``device`` (any
    device, whichever the run trained on: the state is saved from the host's view)."""
    from heads.data import DataSpec
    from heads.device import resolve_device

    saved = torch.load(Path(run_dir) / "model.pt", map_location="cpu", weights_only=False)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved["config"]["train"].items() if k in fields})
    model = build_model(cfg, DataSpec(**saved["config"]["spec"]))
    model.load_state_dict(saved["state"])
    model.precision = saved["config"].get("used", {}).get("precision", "fp32")  # as it was trained and selected
    model.to(resolve_device(device))
    model.eval()
    return model, cfg
