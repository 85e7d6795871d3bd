"""The built-in data: deterministic synthetic caches that show modality imbalance.

Each modality m sees the label through its own noisy channel: a class prototype in a low-dimensional
latent space, scaled by the modality's *strength*, plus latent noise; a fraction of its samples
(``confusion``, drawn independently per modality) carries the prototype of a random class instead
(``other-class``) or no prototype (``blank``), which caps what the modality alone can reach. The
latent code is lifted to the backbone's width by a fixed random linear map, passed through a
saturating nonlinearity and blurred with isotropic noise, like a frozen encoder's output.

A modality whose signal is linear is fitted within a few epochs by joint training, after which a
symmetric (slow) modality receives little gradient: exactly the imbalance the methods address.
Presets mirror the papers' datasets by shape: ``av`` is CREMA-D-like (6 classes, 6698 train +
validation and 744 test samples, audio 1280-d as Whisper, visual 768-d as CLIP), ``avt`` is
IEMOCAP-like (4 classes, 5531 samples, 60/20/20, audio, visual and text). On ``av`` and ``avt``
(issue 25) each modality alone reaches about 60% and abstains on its own samples, so using all of
them fully gains 15+ points (``tests/test_synthetic.py``); ``av-saturated`` and ``avt-saturated``
are the presets before, where the strong modality alone reaches the data's ceiling.

``resolve_caches`` reads a ``--cache`` value: cache folders, or preset names whose caches are
generated under ``BUILTIN_ROOT`` on first use.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from cache.replace import available_memory, check_space, write_folder
from cache.store import CacheError
from cache.writer import write_arrays

# Where the CLI keeps the built-in caches: beside the code, so that a preset name means the same
# cache whatever the current folder.
ROWS = 8192  # samples generated at a time by make-synthetic (bounded memory at any --scale)
BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "data" / "builtin"


@dataclass
class ModalitySpec:
    dim: int
    strength: float  # signal-to-noise of the class prototype in latent space
    confusion: float  # fraction of samples whose signal is not their own class's (see ``confused``)
    symmetric: bool = False  # signal ±prototype with a random sign: invisible to a linear read-out
    tokens: int = 1
    # What a confused sample shows: ``other-class`` the prototype of a random class (a confident
    # wrong vote, which fusion cannot outvote), ``blank`` no prototype at all (noise only: the
    # modality abstains, and another modality's vote decides). **(choice)**
    confused: str = "other-class"
    # Isotropic feature noise of this modality (None: the preset's ``feature_noise``). Louder noise
    # hides the latent signal from random projections, so a head must learn its directions: slower
    # to fit, not capped lower (a learned read-out averages the noise over ``dim`` features).
    noise: float | None = None


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


_CREMAD = dict(classes=["neutral", "happy", "sad", "fear", "disgust", "anger"], n_trainval=6698, n_test=744,
               val_fraction=0.1, class_weights=[1087, 1271, 1271, 1271, 1271, 1271])
_IEMOCAP = dict(classes=["anger", "sadness", "neutral", "happiness"], n_trainval=4425, n_test=1106, val_fraction=0.25,
                class_weights=[1103, 1084, 1708, 1636])

PRESETS: dict[str, SyntheticSpec] = {
    # Balancing matters (issue 25): each modality alone reaches about 60%, each abstains (``blank``)
    # on its own independently drawn share of samples, so a combination that uses both reaches ~20
    # points more; audio is linear and fits (then memorises) within a few epochs, visual's
    # symmetric signal under louder noise needs its projection trained.
    "av": SyntheticSpec(
        modalities={
            "audio": ModalitySpec(dim=1280, strength=3.0, confusion=0.45, confused="blank"),
            "visual": ModalitySpec(dim=768, strength=1.0, confusion=0.4, symmetric=True, confused="blank", noise=1.5),
        },
        **_CREMAD,
    ),
    "avt": SyntheticSpec(
        modalities={
            "audio": ModalitySpec(dim=1280, strength=1.0, confusion=0.45, symmetric=True, confused="blank", noise=1.5),
            "visual": ModalitySpec(dim=768, strength=1.0, confusion=0.55, symmetric=True, confused="blank", noise=1.5),
            "text": ModalitySpec(dim=768, strength=3.0, confusion=0.5, confused="blank"),
        },
        **_IEMOCAP,
    ),
    # The presets ``av`` and ``avt`` were before issue 25 (same bytes): the strong modality alone
    # reaches the data's ceiling (audio 98%, text 93%), so no method can change the fused accuracy;
    # the imbalance shows only in the weak modalities' in-model accuracy.
    "av-saturated": SyntheticSpec(
        classes=["neutral", "happy", "sad", "fear", "disgust", "anger"],
        modalities={
            "audio": ModalitySpec(dim=1280, strength=3.0, confusion=0.03),
            "visual": ModalitySpec(dim=768, strength=0.7, confusion=0.1, symmetric=True),
        },
        n_trainval=6698, n_test=744, val_fraction=0.1,
        class_weights=[1087, 1271, 1271, 1271, 1271, 1271],
    ),
    "avt-saturated": SyntheticSpec(
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


MODALITY_KNOBS = ("strength", "confusion", "noise", "confused", "symmetric")
CONFUSED = ("other-class", "blank")


def customised(preset: str, modality_knobs: dict[str, dict] | None = None, **knobs) -> SyntheticSpec:
    """``preset``'s spec with knobs changed, each checked (one clear error, nothing written).

    ``modality_knobs``: ``{knob: {modality: value}}`` for the ``MODALITY_KNOBS``; ``knobs``: the
    preset-wide ``classes`` (a count: classes c0, c1, …, balanced), ``n_trainval``, ``n_test``,
    ``val_fraction``, ``latent`` and ``feature_noise`` (None keeps the preset's).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    mods = {m: ModalitySpec(**asdict(s)) for m, s in spec.modalities.items()}
    for knob, values in (modality_knobs or {}).items():
        if knob not in MODALITY_KNOBS:
            raise ValueError(f"unknown modality knob {knob!r}; knobs: {', '.join(MODALITY_KNOBS)}")
        for m, value in values.items():
            if m not in mods:
                raise ValueError(f"preset {preset!r} has no modality {m!r}; it has {', '.join(mods)}")
            setattr(mods[m], knob, _checked(knob, m, value))
    fields = {k: v for k, v in knobs.items() if v is not None}
    unknown = set(fields) - {"classes", "n_trainval", "n_test", "val_fraction", "latent", "feature_noise"}
    if unknown:
        raise ValueError(f"unknown knob(s) {', '.join(sorted(unknown))}")
    changed = {}
    if "classes" in fields:
        if not (isinstance(fields["classes"], int) and fields["classes"] >= 2):
            raise CacheError(f"--classes must be a whole number >= 2, got {fields['classes']}")
        changed.update(classes=[f"c{i}" for i in range(fields.pop("classes"))], class_weights=[])
    for name in ("n_trainval", "n_test", "latent"):
        if name in fields and not (isinstance(fields[name], int) and fields[name] >= 1):
            raise CacheError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {fields[name]}")
    if "val_fraction" in fields and not 0 < fields["val_fraction"] < 1:
        raise CacheError(f"--val-fraction must lie in (0, 1), got {fields['val_fraction']:g}")
    if "feature_noise" in fields and not (fields["feature_noise"] >= 0 and np.isfinite(fields["feature_noise"])):
        raise CacheError(f"--feature-noise must be a finite number >= 0, got {fields['feature_noise']:g}")
    return replace(spec, modalities=mods, **changed, **fields)


def _checked(knob: str, m: str, value):
    if knob == "confused":
        if value not in CONFUSED:
            raise CacheError(f"--confused {m}={value}: a confused sample shows one of {', '.join(CONFUSED)}")
        return value
    if knob == "symmetric":
        if not isinstance(value, bool):
            raise CacheError(f"--symmetric {m}={value}: true or false")
        return value
    value = float(value)
    if knob in ("strength", "noise") and not (value >= 0 and np.isfinite(value)):
        raise CacheError(f"--{knob} {m}={value:g}: a {knob} must be a finite number >= 0")
    if knob == "confusion" and not 0 <= value <= 1:
        raise CacheError(f"--confusion {m}={value:g}: a confusion is a fraction of samples, in [0, 1]")
    return value


def make_synthetic(
    out: str | Path,
    preset: str = "av",
    seed: int = 0,
    strength: dict[str, float] | None = None,
    confusion: dict[str, float] | None = None,
    scale: float = 1.0,
    overwrite: bool = False,
    modality_knobs: dict[str, dict] | None = None,
    **knobs,
) -> Path:
    """Write the ``preset`` cache to ``out`` (a complete cache folder). Same arguments, same bytes.

    ``strength`` / ``confusion`` (and any of ``MODALITY_KNOBS`` in ``modality_knobs``) override
    per-modality knobs, ``knobs`` the preset-wide ones (``customised``); ``scale`` multiplies the
    sample counts (tests use small caches). Every knob is checked before anything is written; an
    existing non-empty ``out`` is refused unless ``overwrite``, and then replaced atomically
    (``cache/replace.py``). ``meta.json`` records the spec the cache was made from.
    """
    if not scale > 0 or not np.isfinite(scale):
        raise CacheError(f"--scale must be a positive number, got {scale:g}")
    per_modality = {**(modality_knobs or {})}
    for knob, values in (("strength", strength), ("confusion", confusion)):
        if values:
            per_modality[knob] = {**per_modality.get(knob, {}), **values}
    spec = customised(preset, per_modality, **knobs)
    mods = spec.modalities
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
    with TemporaryDirectory(prefix="synthetic-", dir=Path(out).parent if Path(out).parent.exists() else None) as scratch:
        features = {m: _modality(rng, spec, ms, labels, n, Path(scratch) / m) for m, ms in mods.items()}
        splits = _splits(rng, spec, labels, n_tv, n_test)
        rule = (f"synthetic preset {preset!r}, seed {seed}: first {n_tv} samples train+val "
                f"({spec.val_fraction:.0%} stratified val), last {n_test} test")
        return write_folder(out, overwrite, lambda tmp: write_arrays(
            tmp, dataset=f"synthetic-{preset}", backbone="synthetic", features=features, labels=labels,
            splits=list(splits), class_names=list(spec.classes), split_rule=rule,
            extra_meta={"synthetic": {"preset": preset, "seed": seed, "scale": scale,
                                      "modalities": {m: asdict(s) for m, s in mods.items()},
                                      "generator": _generator(spec)}},
        ))


def _modality(rng, spec: SyntheticSpec, ms: ModalitySpec, labels: np.ndarray, n: int, scratch: Path) -> np.ndarray:
    """One modality's features, generated ``ROWS`` samples at a time into a float16 memory map on disk.

    Why a memory map: at ``--scale 32`` the float64 noise of one modality alone is 2.4 GB, and the
    whole-array version peaked at 6.75 GB. The random stream is consumed in exactly the order of that
    version (draws of ``standard_normal`` in consecutive row blocks give the same values as one draw),
    and each block goes float64 → float32 → float16 as before, so the cache holds the same bytes;
    only the memory is bounded (a block, plus pages the kernel can drop). Token features (T > 1) add
    noise drawn after the whole modality's, so their base is kept in a float64 map until then.
    """
    prototypes = rng.standard_normal((len(spec.classes), spec.latent))
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True) / np.sqrt(spec.latent)
    shown = labels.copy()
    confused = rng.random(n) < ms.confusion
    shown[confused] = rng.integers(0, len(spec.classes), confused.sum())
    sign = rng.choice([-1.0, 1.0], size=(n, 1)) if ms.symmetric else 1.0
    signal = ms.strength * prototypes[shown]
    if ms.confused == "blank":  # the sample shows no class at all in this modality: it abstains
        signal[confused] = 0.0
    z = sign * signal + rng.standard_normal((n, spec.latent)) * np.sqrt(spec.latent) / 4
    lift = rng.standard_normal((spec.latent, ms.dim)) / np.sqrt(spec.latent)
    noise = spec.feature_noise if ms.noise is None else ms.noise
    out = np.lib.format.open_memmap(scratch.with_suffix(".f16.npy"), "w+", np.float16, (n, ms.tokens, ms.dim))
    base = out if ms.tokens == 1 else np.lib.format.open_memmap(scratch.with_suffix(".f64.npy"), "w+", np.float64,
                                                                   (n, ms.dim))
    for start in range(0, n, ROWS):
        rows = slice(start, min(start + ROWS, n))
        x = np.tanh(z[rows] @ lift / 2) + noise * rng.standard_normal((rows.stop - start, ms.dim))
        if ms.tokens == 1:
            out[rows, 0] = x.astype(np.float32)
        else:
            base[rows] = x
    if ms.tokens > 1:
        for start in range(0, n, ROWS):
            rows = slice(start, min(start + ROWS, n))
            noise = rng.standard_normal((rows.stop - start, ms.tokens, ms.dim))
            out[rows] = (base[rows][:, None, :] + 0.1 * noise).astype(np.float32)
    return out


def _splits(rng, spec: SyntheticSpec, labels: np.ndarray, n_tv: int, n_test: int) -> np.ndarray:
    """train / val / test per sample: a stratified validation carve-out of the first ``n_tv``."""
    splits = np.array(["train"] * n_tv + ["test"] * n_test, dtype=object)
    tv = np.arange(n_tv)
    for c in range(len(spec.classes)):  # stratified validation carve-out of the train+val part
        members = tv[labels[:n_tv] == c]
        k = int(round(len(members) * spec.val_fraction))
        splits[rng.choice(members, size=k, replace=False)] = "val"
    return splits


def builtin_cache(preset: str, root: str | Path = "data/builtin") -> Path:
    """The built-in cache for ``preset``, generated on first use (deterministic, about a second).

    A folder without a manifest is not a cache yet; one generated from another definition of the
    preset (``av`` before issue 25 is today's ``av-saturated``) is regenerated, so a preset's name
    always means its current definition.
    """
    path = Path(root) / preset
    if not (path / "manifest.parquet").exists() or not _current(path, preset):
        make_synthetic(path, preset, overwrite=True)
    return path


def _current(path: Path, preset: str) -> bool:
    """Whether the cache at ``path`` was generated from ``preset``'s current definition (seed 0, full size)."""
    try:
        made = json.loads((path / "meta.json").read_text())["synthetic"]
    except (OSError, ValueError, KeyError):
        return False
    spec = PRESETS[preset]
    want = {m: asdict(s) for m, s in spec.modalities.items()}
    return (made.get("seed"), made.get("scale")) == (0, 1.0) and made.get("modalities") == want \
        and made.get("generator") == _generator(spec)


def _generator(spec: SyntheticSpec) -> dict:
    """The preset-wide settings a cache records (beside its modalities) so a changed preset is noticed."""
    return {"classes": list(spec.classes), "n_trainval": spec.n_trainval, "n_test": spec.n_test,
            "val_fraction": spec.val_fraction, "latent": spec.latent, "feature_noise": spec.feature_noise,
            "class_weights": list(spec.class_weights)}


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
