"""What a run depends on: ``TrainConfig`` (written to every run's ``config.json``, resolved), the
training settings' checks that the CLI and grid axes share, and building a method's model from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from heads.blocks.device import PRECISIONS, DeviceError, resolve_device
from heads.blocks.optim import FIELDS, OPTIMIZERS, parse_schedule
from heads.blocks.standardize import MODES as STANDARDIZE_MODES
from heads.errors import OptionError
from heads.methods import method_class
from heads.train.options import resolve_options


@dataclass
class TrainConfig:
    """Everything a run depends on; written to ``config.json`` of every run, resolved."""

    method: str = "concat"
    epochs: int | None = None  # None = the method's declared epoch count (``Training.epochs``)
    # None = the method's paper setting (``heads.blocks.optim``; ``resolve_training`` fills them in).
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
    standardize: str = "feature"  # per-feature z-scoring with training statistics (heads/blocks/standardize.py)
    threads: int = 0  # 0 = torch's default
    device: str = "auto"  # auto | cpu | cuda[:N] (heads/blocks/device.py): where the run trains and evaluates
    precision: str = "fp32"  # fp32 | bf16 autocast | auto (bf16 only on a CPU with native bf16 where a probe finds it faster)
    epoch_subsets: bool = False  # score every modality subset on validation after each epoch (methods reading φ always do)
    shapley_permutations: int = 128  # with more than 8 modalities φ is estimated from this many sampled permutations
    options: dict = field(default_factory=dict)  # the method's own options, resolved
    training_source: str = ""  # where the resolved optimizer settings came from (filled by resolve_training)


def flag(name: str) -> str:
    """``batch_size`` → ``--batch-size``: a setting as the user types it."""
    return "--" + name.replace("_", "-")


def check_setting(name: str, value):
    """One training setting (a ``TrainConfig`` field) checked; the CLI's options and grid axes share it."""
    if name in ("batch_size", "hidden") and value < 1:
        raise OptionError(f"{flag(name)} must be positive, got {value}")
    if name == "eval_batch_size" and value < 0:
        raise OptionError(f"{flag(name)} must be 0 (same as batch size) or positive, got {value}")
    if name == "optimizer" and value not in OPTIMIZERS:
        raise OptionError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {value!r}")
    if name == "schedule":
        try:
            parse_schedule(value)
        except ValueError as err:
            raise OptionError(str(err)) from None
    if name == "standardize" and value not in STANDARDIZE_MODES:
        raise OptionError(f"--standardize must be one of {', '.join(STANDARDIZE_MODES)}, got {value!r}")
    if name == "lr" and not value > 0:
        raise OptionError(f"--lr must be positive, got {value}")
    if name == "weight_decay" and value < 0:
        raise OptionError(f"--weight-decay must be 0 or positive, got {value}")
    if name in ("missing_train", "missing_test") and not 0 <= value < 1:
        raise OptionError(f"{flag(name)} must lie in [0, 1), got {value}")
    return value


def config_from_options(method, epochs, seed, lr, batch_size, optimizer, hidden, weight_decay, missing_train,
                        missing_test, options=None, schedule=None, standardize="feature", device="auto",
                        precision="fp32", epoch_subsets=False, shapley_permutations=128) -> TrainConfig:
    """A ``TrainConfig`` from the training commands' shared options, every one checked before any data
    loads; ``None`` leaves a setting to the method's paper default."""
    resolve_device(device)  # a device that is not here fails before the cache loads
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if shapley_permutations < 1:
        raise OptionError(f"--shapley-permutations must be positive, got {shapley_permutations}")

    if (epochs is not None and epochs < 1) or (batch_size is not None and batch_size < 1) or hidden < 1:
        raise OptionError("--epochs, --batch-size and --hidden must be positive")
    given = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "schedule": schedule,
             "standardize": standardize, "missing_train": missing_train, "missing_test": missing_test}
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


def build_model(cfg: TrainConfig, spec):
    cfg = resolve_training(cfg)
    cls = method_class(cfg.method)
    opts = cls.Options(**resolve_options(cfg.method, cfg.options))
    return cls(spec, cfg, opts)
