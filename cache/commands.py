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


def _key_values(text: str) -> dict[str, float]:
    """``audio=2.5,visual=0.7`` -> ``{"audio": 2.5, "visual": 0.7}``; anything else is a ``ValueError``."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"expected modality=number, got {item!r}")
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
        preset: str = typer.Option("av", help="av (CREMA-D-like, 2 modalities), avt (IEMOCAP-like, 3) or mv6 (6-view handwritten digits)."),
        seed: int = typer.Option(0, help="Generator seed."),
        strength: str = typer.Option("", help="Per-modality signal strength, e.g. audio=2.5,visual=0.7."),
        confusion: str = typer.Option("", help="Per-modality fraction of uninformative samples, e.g. visual=0.2."),
        scale: float = typer.Option(1.0, help="Multiply the preset's sample counts."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (atomically)."),
    ):
        """Generate a built-in-style imbalanced cache with your own modality strengths."""
        from cache import cache_info
        from cache.synthetic import make_synthetic

        path = make_synthetic(out, preset, seed, _key_values(strength), _key_values(confusion), scale, overwrite)
        info = cache_info(path)
        typer.echo(f"wrote {path}: " + ", ".join(f"{s} {n}" for s, n in info["counts"].items()))
