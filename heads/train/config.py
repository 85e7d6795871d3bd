"""What a run depends on: ``TrainConfig`` (written to every run's ``config.json``, resolved), the
training settings' checks that the CLI and grid axes share, and building a method's model from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cache.replace import available_memory
from heads.blocks.device import PRECISIONS, DeviceError, resolve_device
from heads.blocks.domains import LR, NONNEGATIVE, NONNEGATIVE_INT, POSITIVE_INT, SEED, UNIT_OPEN, WIDTH, option
from heads.blocks.optim import FIELDS, OPTIMIZERS, parse_schedule
from heads.blocks.standardize import MODES as STANDARDIZE_MODES
from heads.errors import OptionError
from heads.methods import method_class
from heads.train.options import check_value, resolve_options


@dataclass
class TrainConfig:
    """Everything a run depends on; written to ``config.json`` of every run, resolved.

    Each number states its domain (``heads.blocks.domains``); ``check_config`` holds a config to them.
    """

    method: str = "concat"
    epochs: int | None = option(None, "training epochs (None = the method's declared count, Training.epochs)", POSITIVE_INT)
    # None = the method's paper setting (``heads.blocks.optim``; ``resolve_training`` fills them in).
    batch_size: int | None = option(None, "batch size", POSITIVE_INT)
    lr: float | None = option(None, "learning rate", LR)
    weight_decay: float | None = option(None, "weight decay", NONNEGATIVE)
    optimizer: str | None = None
    schedule: str | None = None
    hidden: int = option(256, "hidden width d", WIDTH)
    seed: int = option(0, "seed", SEED)
    # 0 = same as batch_size (methods that look across a batch need a fixed rule)
    eval_batch_size: int = option(0, "evaluation batch size", NONNEGATIVE_INT)
    # per-modality masking rate for train and val (MLA protocol); for test only (EDM paper's Table VI)
    missing_train: float = option(0.0, "missing rate in train, val and test", UNIT_OPEN)
    missing_test: float = option(0.0, "missing rate at test only", UNIT_OPEN)
    standardize: str = "feature"  # per-feature z-scoring with training statistics (heads/blocks/standardize.py)
    threads: int = option(0, "torch threads (0 = torch's default)", NONNEGATIVE_INT)
    device: str = "auto"  # auto | cpu | cuda[:N] (heads/blocks/device.py): where the run trains and evaluates
    precision: str = "fp32"  # fp32 | bf16 autocast | auto (bf16 only on a CPU with native bf16 where a probe finds it faster)
    epoch_subsets: bool = False  # score every modality subset on validation after each epoch (methods reading φ always do)
    # with more than 8 modalities φ is estimated from this many sampled permutations
    shapley_permutations: int = option(128, "Shapley permutations", POSITIVE_INT)
    options: dict = field(default_factory=dict)  # the method's own options, resolved
    training_source: str = ""  # where the resolved optimizer settings came from (filled by resolve_training)


DOMAINS = {f.name: f.metadata["domain"] for f in dataclasses.fields(TrainConfig) if "domain" in f.metadata}


def flag(name: str) -> str:
    """``batch_size`` → ``--batch-size``: a setting as the user types it."""
    return "--" + name.replace("_", "-")


def check_setting(name: str, value):
    """One training setting (a ``TrainConfig`` field) checked; the CLI's options, grid axes and saved
    configs share it. A number is held to its declared domain."""
    if name in DOMAINS and value is not None:
        check_value(flag(name), value, DOMAINS[name])
    if name == "optimizer" and value not in OPTIMIZERS:
        raise OptionError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {value!r}")
    if name == "schedule":
        try:
            parse_schedule(value)
        except ValueError as err:
            raise OptionError(str(err)) from None
    if name == "standardize" and value not in STANDARDIZE_MODES:
        raise OptionError(f"--standardize must be one of {', '.join(STANDARDIZE_MODES)}, got {value!r}")
    return value


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Every setting of a config and every option of its method held to its domain: a config read
    from a file, or built by code, is checked as the CLI's options are."""
    for name in DOMAINS:
        check_setting(name, getattr(cfg, name))
    for name in ("optimizer", "schedule", "standardize"):
        if getattr(cfg, name) is not None:
            check_setting(name, getattr(cfg, name))
    resolve_options(cfg.method, cfg.options)
    return cfg


def config_from_options(method, epochs, seed, lr, batch_size, optimizer, hidden, weight_decay, missing_train,
                        missing_test, options=None, schedule=None, standardize="feature", device="auto",
                        precision="fp32", epoch_subsets=False, shapley_permutations=128) -> TrainConfig:
    """A ``TrainConfig`` from the training commands' shared options, every one checked before any data
    loads; ``None`` leaves a setting to the method's paper default."""
    resolve_device(device)  # a device that is not here fails before the cache loads
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    given = {"epochs": epochs, "seed": seed, "batch_size": batch_size, "hidden": hidden,
             "shapley_permutations": shapley_permutations, "optimizer": optimizer, "lr": lr,
             "weight_decay": weight_decay, "schedule": schedule, "standardize": standardize,
             "missing_train": missing_train, "missing_test": missing_test}
    for name, value in given.items():
        if value is not None:
            check_setting(name, value)
    return TrainConfig(method=method, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size,
                       optimizer=optimizer, hidden=hidden, weight_decay=weight_decay, schedule=schedule,
                       missing_train=missing_train, missing_test=missing_test, standardize=standardize,
                       options=options or {}, device=device, precision=precision, epoch_subsets=epoch_subsets,
                       shapley_permutations=shapley_permutations)


def resolve_training(cfg: TrainConfig) -> TrainConfig:
    """Fill the settings left ``None`` from the method's declared paper setting (the epoch count
    included); record the source.

    Idempotent. A setting the user gave is kept; ``training_source`` then says which were given.
    """
    defaults = method_class(cfg.method).training
    given = [name for name in (*FIELDS, "epochs") if getattr(cfg, name) is not None]
    if not cfg.training_source:
        source = f"{cfg.method}: {defaults.source}"
        if given:
            source += "; given: " + ", ".join(f"{n.replace('_', '-')} {getattr(cfg, n)}" for n in given)
        cfg = dataclasses.replace(cfg, training_source=source)
    cfg = dataclasses.replace(cfg, **{n: getattr(defaults, n) for n in (*FIELDS, "epochs") if getattr(cfg, n) is None})
    parse_schedule(cfg.schedule)
    return cfg


def check_memory(cfg: TrainConfig, spec) -> int:
    """Refuse, in one line, a model that cannot fit: the weights of the projections (hidden × dims), a
    few hidden × hidden blocks per modality and the classifier (hidden × classes), each held four times
    (weights, gradients, two optimizer moments) in fp32. A lower bound (choice): activations and the
    method's extras come on top, so what passes may still be tight, but what fails cannot run."""
    d, m = cfg.hidden, len(spec.modalities)
    params = d * sum(spec.dims.values()) + 8 * m * d * d + d * spec.num_classes * (m + 1)
    need = 16 * params
    have = available_memory()
    if need > have:
        raise MemoryError(f"a {cfg.method} head with --hidden {d} on {sum(spec.dims.values()):,} input features and "
                          f"{spec.num_classes:,} classes needs at least {need / 2**30:.1f} GiB; this machine has "
                          f"{have / 2**30:.1f} GiB available — use a smaller --hidden")
    return need


def build_model(cfg: TrainConfig, spec):
    cfg = check_config(resolve_training(cfg))
    check_memory(cfg, spec)
    cls = method_class(cfg.method)
    opts = cls.Options(**resolve_options(cfg.method, cfg.options))
    return cls(spec, cfg, opts)
