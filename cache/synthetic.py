"""The built-in data: deterministic synthetic caches that show modality imbalance.

Each modality m sees the label through its own noisy channel: a class prototype in a low-dimensional
latent space, scaled by the modality's *strength*, plus latent noise; a fraction of its samples
(``confusion``) carries the prototype of a random class instead, which caps what the modality alone
can reach. The latent code is lifted to the backbone's width by a fixed random linear map, passed
through a saturating nonlinearity and blurred with isotropic noise, like a frozen encoder's output.

A strong modality (high strength, little confusion) is fitted within a few epochs by joint training,
after which the weak modality receives little gradient: exactly the imbalance the methods address.
Presets mirror the papers' datasets by shape: ``av`` is CREMA-D-like (6 classes, 6698 train +
validation and 744 test samples, audio 1280-d as Whisper, visual 768-d as CLIP), ``avt`` is
IEMOCAP-like (4 classes, 5531 samples, 60/20/20, audio, visual and text).

``resolve_caches`` reads a ``--cache`` value: cache folders, or preset names whose caches are
generated under ``BUILTIN_ROOT`` on first use.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cache.replace import available_memory, check_space, write_folder
from cache.store import CacheError
from cache.writer import write_arrays

# Where the CLI keeps the built-in caches: beside the code, so that a preset name means the same
# cache whatever the current folder.
BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "data" / "builtin"


@dataclass
class ModalitySpec:
    dim: int
    strength: float  # signal-to-noise of the class prototype in latent space
    confusion: float  # fraction of samples whose signal shows a random class
    symmetric: bool = False  # signal ±prototype with a random sign: invisible to a linear read-out
    tokens: int = 1


@dataclass
class SyntheticSpec:
    classes: list[str]
    modalities: dict[str, ModalitySpec]
    n_trainval: int
    n_test: int
    val_fraction: float
    latent: int = 16
    feature_noise: float = 0.3
    class_weights: list[float] = field(default_factory=list)  # empty = balanced


PRESETS: dict[str, SyntheticSpec] = {
    "av": SyntheticSpec(
        classes=["neutral", "happy", "sad", "fear", "disgust", "anger"],
        modalities={
            "audio": ModalitySpec(dim=1280, strength=3.0, confusion=0.03),
            "visual": ModalitySpec(dim=768, strength=0.7, confusion=0.1, symmetric=True),
        },
        n_trainval=6698, n_test=744, val_fraction=0.1,
        class_weights=[1087, 1271, 1271, 1271, 1271, 1271],
    ),
    "avt": SyntheticSpec(
        classes=["anger", "sadness", "neutral", "happiness"],
        modalities={
            "audio": ModalitySpec(dim=1280, strength=0.6, confusion=0.1, symmetric=True),
            "visual": ModalitySpec(dim=768, strength=0.45, confusion=0.1, symmetric=True),
            "text": ModalitySpec(dim=768, strength=2.5, confusion=0.1),
        },
        n_trainval=4425, n_test=1106, val_fraction=0.25,
        class_weights=[1103, 1084, 1708, 1636],
    ),
    # Six views of one object, shaped like the public multi-feature handwritten-digits set (10 classes,
    # 2000 samples, views of 76, 216, 64, 240, 47 and 6 features): 1400 train, 200 val, 400 test. For
    # what scales with the number of modalities (2^6 − 1 = 63 subsets) and for methods' M > 2 rules.
    "mv6": SyntheticSpec(
        classes=[str(d) for d in range(10)],
        modalities={
            "fourier": ModalitySpec(dim=76, strength=1.2, confusion=0.1),
            "profile": ModalitySpec(dim=216, strength=2.0, confusion=0.05),
            "karhunen": ModalitySpec(dim=64, strength=1.5, confusion=0.08),
            "pixels": ModalitySpec(dim=240, strength=2.5, confusion=0.03),
            "zernike": ModalitySpec(dim=47, strength=0.8, confusion=0.15),
            "morphology": ModalitySpec(dim=6, strength=0.5, confusion=0.3),
        },
        n_trainval=1600, n_test=400, val_fraction=0.125,
    ),
}


def make_synthetic(
    out: str | Path,
    preset: str = "av",
    seed: int = 0,
    strength: dict[str, float] | None = None,
    confusion: dict[str, float] | None = None,
    scale: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write the ``preset`` cache to ``out`` (a complete cache folder). Same arguments, same bytes.

    ``strength`` / ``confusion`` override per-modality knobs; ``scale`` multiplies the sample counts
    (tests use small caches). Every knob is checked before anything is written; an existing non-empty
    ``out`` is refused unless ``overwrite``, and then replaced atomically (``cache/replace.py``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    if not scale > 0 or not np.isfinite(scale):
        raise CacheError(f"--scale must be a positive number, got {scale:g}")
    spec = PRESETS[preset]
    mods = {m: ModalitySpec(**asdict(s)) for m, s in spec.modalities.items()}
    for knob, values in (("strength", strength or {}), ("confusion", confusion or {})):
        for m, value in values.items():
            if m not in mods:
                raise ValueError(f"preset {preset!r} has no modality {m!r}; it has {', '.join(mods)}")
            value = float(value)
            if knob == "strength" and not (value >= 0 and np.isfinite(value)):
                raise CacheError(f"--strength {m}={value:g}: a strength must be a finite number >= 0")
            if knob == "confusion" and not 0 <= value <= 1:
                raise CacheError(f"--confusion {m}={value:g}: a confusion is a fraction of samples, in [0, 1]")
            setattr(mods[m], knob, value)
    rng = np.random.default_rng(seed)
    n_tv, n_test = max(int(spec.n_trainval * scale), 2 * len(spec.classes)), max(int(spec.n_test * scale), len(spec.classes))
    n = n_tv + n_test
    values = n * sum(ms.tokens * ms.dim + spec.latent for ms in mods.values())
    # float64 intermediates and float32 features, about three copies at a time (choice: 24 bytes a value)
    need, have = 24 * values, available_memory()
    if need > have:
        raise MemoryError(f"--scale {scale:g} makes {n:,} samples, which need about {need / 2**30:,.1f} GiB of memory "
                          f"to generate; this machine has {have / 2**30:,.1f} GiB available — use a smaller --scale")
    check_space(Path(out).parent, 2 * values + 2**20)  # float16 on disk
    weights = np.asarray(spec.class_weights or [1.0] * len(spec.classes), float)
    labels = rng.choice(len(spec.classes), size=n, p=weights / weights.sum())
    features = {}
    for m, ms in mods.items():
        prototypes = rng.standard_normal((len(spec.classes), spec.latent))
        prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True) / np.sqrt(spec.latent)
        shown = labels.copy()
        confused = rng.random(n) < ms.confusion
        shown[confused] = rng.integers(0, len(spec.classes), confused.sum())
        sign = rng.choice([-1.0, 1.0], size=(n, 1)) if ms.symmetric else 1.0
        z = sign * ms.strength * prototypes[shown] + rng.standard_normal((n, spec.latent)) * np.sqrt(spec.latent) / 4
        lift = rng.standard_normal((spec.latent, ms.dim)) / np.sqrt(spec.latent)
        x = np.tanh(z @ lift / 2) + spec.feature_noise * rng.standard_normal((n, ms.dim))
        if ms.tokens > 1:
            x = x[:, None, :] + 0.1 * rng.standard_normal((n, ms.tokens, ms.dim))
        features[m] = x.astype(np.float32)
    splits = np.array(["train"] * n_tv + ["test"] * n_test, dtype=object)
    tv = np.arange(n_tv)
    for c in range(len(spec.classes)):  # stratified validation carve-out of the train+val part
        members = tv[labels[:n_tv] == c]
        k = int(round(len(members) * spec.val_fraction))
        splits[rng.choice(members, size=k, replace=False)] = "val"
    rule = (f"synthetic preset {preset!r}, seed {seed}: first {n_tv} samples train+val "
            f"({spec.val_fraction:.0%} stratified val), last {n_test} test")
    return write_folder(out, overwrite, lambda tmp: write_arrays(
        tmp, dataset=f"synthetic-{preset}", backbone="synthetic", features=features, labels=labels,
        splits=list(splits), class_names=list(spec.classes), split_rule=rule,
        extra_meta={"synthetic": {"preset": preset, "seed": seed, "scale": scale,
                                  "modalities": {m: asdict(s) for m, s in mods.items()}}},
    ))


def builtin_cache(preset: str, root: str | Path = "data/builtin") -> Path:
    """The built-in cache for ``preset``, generated on first use (deterministic, about a second)."""
    path = Path(root) / preset
    if not (path / "manifest.parquet").exists():
        make_synthetic(path, preset, overwrite=True)  # a folder left without a manifest is not a cache yet
    return path


def resolve_caches(spec: str, builtin_root: Path = BUILTIN_ROOT) -> list[Path]:
    """``--cache``: a cache folder, several joined with ',' (one per backbone), or a built-in preset."""
    paths = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path = Path(part)
        if path.exists():
            paths.append(path)
        elif part in PRESETS:
            paths.append(builtin_cache(part, builtin_root))
        else:
            raise CacheError(f"no cache at {part} (and it is not a built-in preset: {', '.join(PRESETS)})")
    if not paths:
        raise CacheError("--cache is empty")
    return paths
