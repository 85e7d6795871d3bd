"""The cache's commands for the tool's CLI: ``cache info``, ``cache verify``, ``import-features``, ``make-synthetic``.

``register(app, guard)`` adds them to a typer app; ``guard`` is the CLI's decorator that turns the
tool's errors into one ``error:`` line. Only typer and the standard library are imported here; the
readers, the verifier, the importer and the generator load inside the command bodies, so the rest
of the CLI stays fast.
"""
from __future__ import annotations

from pathlib import Path

import typer


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _key_values(text: str, kind=float) -> dict:
    """``audio=2.5,visual=0.7`` -> ``{"audio": 2.5, "visual": 0.7}``; anything else is a ``ValueError``.

    ``kind`` reads each value: ``float``, ``str`` or ``bool`` (true/false)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            if kind is bool:
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                out[key] = value.lower() == "true"
            else:
                out[key] = kind(value)
        except ValueError:
            sep = ""
        if not sep:
            what = {float: "number", str: "value", bool: "true|false"}[kind]
            raise ValueError(f"expected modality={what}, got {item!r}")
    return out


def register(app: typer.Typer, guard) -> None:
    """Add the ``cache`` group (``info``, ``verify``), ``import-features`` and ``make-synthetic`` to ``app``."""
    cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature caches.")
    app.add_typer(cache_app, name="cache")

    @cache_app.command("info")
    @guard
    def cache_info_cmd(path: str = typer.Argument(..., help="Cache folder or built-in preset name.")):
        """Summarise a cache: dataset, backbone, modalities, classes, split sizes, coverage, failures."""
        from cache import cache_info
        from cache.scales import scale_warnings, value_scales
        from cache.synthetic import resolve_caches

        info = cache_info(resolve_caches(path)[0])
        typer.echo(f"cache       {info['path']}")
        typer.echo(f"dataset     {info['dataset']}   backbone {info['backbone']}   schema v{info['schema_version']}")
        for m, spec in info["modalities"].items():
            typer.echo(f"modality    {m:10s} [T={spec['tokens']}, D={spec['dim']}]  present {info['present_rate'][m]:.1%}")
        typer.echo(f"classes     {len(info['class_names'])}: {', '.join(info['class_names'][:12])}{' …' if len(info['class_names']) > 12 else ''}")
        typer.echo("samples     " + "  ".join(f"{s} {n}" for s, n in info["counts"].items()) + f"   failed {info['failed']}")
        mem = info["memory"]
        typer.echo(f"memory      in memory (--in-memory yes): {mem['fp16'] / 1e6:,.0f} MB with --feature-dtype fp16 "
                   f"(the default), {mem['fp32'] / 1e6:,.0f} MB with fp32 (features of all splits while heads train)")
        typer.echo(f"            streamed (--in-memory no): {mem['streamed'] / 1e6:,.0f} MB (the {mem['buffer'] / 1e6:,.0f} MB "
                   f"shuffle buffer of --stream-buffer, one window read ahead and one being read, ids, labels and masks)")
        typer.echo(f"split rule  {info.get('split_rule') or '-'}")
        typer.echo(f"created     {info.get('created')}  code {info.get('code_version')}")
        if info["counts"].get("train"):
            scales = value_scales(info["path"])
            for m, s in scales.items():
                typer.echo(f"scale       {m:10s} rms {s['rms']:.3g}  std {s['std']:.3g}  max |x| {s['max_abs']:.3g}  "
                           f"largest feature spread {s['outlier']:.1f}× the median (train, present samples)")
            for line in scale_warnings(scales):
                typer.echo(f"warning: {line}", err=True)

    @cache_app.command("verify")
    @guard
    def cache_verify_cmd(path: str = typer.Argument(..., help="Cache folder or built-in preset name.")):
        """Check every shard against its checksums, the manifest and meta: bytes, ids, labels, splits, dims."""
        from cache import check
        from cache.synthetic import resolve_caches

        target = resolve_caches(path)[0]
        report = check(target)
        for w in report.warnings:
            typer.echo(f"warning: {w}", err=True)
        if report.problems:
            for p in report.problems:
                typer.echo(f"problem: {p}", err=True)
            _fail(f"{len(report.problems)} problem(s) in {target}", 1)
        typer.echo(f"ok: {target} is consistent")

    @app.command("import-features")
    @guard
    def import_features(
        file: Path = typer.Argument(..., help=".npz with x_<modality> [N,D] or [N,T,D], y, optional split, class_names."),
        out: Path = typer.Option(..., "--out", help="Cache folder to create."),
        dataset: str = typer.Option(None, help="Dataset name for meta.json (default: file stem)."),
        seed: int = typer.Option(0, help="Seed of the stratified 80/10/10 split made when the file has none."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (atomically)."),
    ):
        """Import features made elsewhere into a cache, so every head method can use them."""
        from cache.importer import import_npz

        path, counts = import_npz(file, out, dataset or file.stem, seed, overwrite)
        typer.echo(f"imported {sum(counts.values())} samples into {path} (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")

    @app.command("make-synthetic")
    @guard
    def make_synthetic_cmd(
        out: Path = typer.Option(..., "--out", help="Cache folder to create."),
        preset: str = typer.Option("av", help="The preset to start from: av, avt (balancing matters), av-saturated, avt-saturated (before issue 25), mv6; README's preset table."),
        seed: int = typer.Option(0, help="Generator seed."),
        strength: str = typer.Option("", help="Per-modality signal strength (class prototype's scale against unit latent noise), e.g. audio=3,visual=1.3."),
        confusion: str = typer.Option("", help="Per-modality fraction of samples that do not show their class (drawn independently per modality), e.g. visual=0.4."),
        confused: str = typer.Option("", help="Per-modality: what a confused sample shows, other-class (a random class's prototype: a confident wrong vote) or blank (no signal: the modality abstains), e.g. audio=blank."),
        noise: str = typer.Option("", help="Per-modality isotropic feature noise (default: --feature-noise); louder hides the signal from an untrained projection, e.g. visual=2."),
        symmetric: str = typer.Option("", help="Per-modality true|false: the signal is ±prototype with a random sign, invisible to a linear read-out (slow to fit), e.g. visual=true."),
        classes: int = typer.Option(None, help="Number of classes (named c0, c1, …, balanced) instead of the preset's."),
        n_trainval: int = typer.Option(None, "--n-trainval", help="Train + validation samples (before --scale)."),
        n_test: int = typer.Option(None, "--n-test", help="Test samples (before --scale)."),
        val_fraction: float = typer.Option(None, "--val-fraction", help="Share of train + validation carved out as validation (stratified)."),
        latent: int = typer.Option(None, help="Dimension of the latent space the prototypes live in."),
        feature_noise: float = typer.Option(None, "--feature-noise", help="Feature noise of every modality without its own --noise."),
        scale: float = typer.Option(1.0, help="Multiply the preset's sample counts."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (atomically)."),
    ):
        """Generate a built-in-style imbalanced cache with your own knobs (meta.json records them)."""
        from cache import cache_info
        from cache.synthetic import make_synthetic

        knobs = {"noise": _key_values(noise), "confused": _key_values(confused, str),
                 "symmetric": _key_values(symmetric, bool)}
        path = make_synthetic(out, preset, seed, _key_values(strength), _key_values(confusion), scale, overwrite,
                              {k: v for k, v in knobs.items() if v}, classes=classes, n_trainval=n_trainval,
                              n_test=n_test, val_fraction=val_fraction, latent=latent, feature_noise=feature_noise)
        info = cache_info(path)
        typer.echo(f"wrote {path}: " + ", ".join(f"{s} {n}" for s, n in info["counts"].items()))
