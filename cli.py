"""Command line of the tool: extract features once (stage one), train heads on them many times (stage two).

Run ``python cli.py --help`` for the commands and ``python cli.py methods`` for every method's options.
This file only parses arguments and reports errors; the work lives in ``cache/``, ``heads/`` and
``pipeline/``. Stage-two commands import torch and the cache only.
"""
from __future__ import annotations

import functools
import signal
import sys
import threading
from pathlib import Path

try:
    import typer
except ModuleNotFoundError:  # `python cli.py` with a Python that is not the project's environment
    sys.exit("error: typer is not installed for this Python; run `make env`, then `.venv/bin/python cli.py …` "
             "(or `source .venv/bin/activate`)")

ROOT = Path(__file__).resolve().parent
BUILTIN_ROOT = ROOT / "data" / "builtin"

# rich_markup_mode=None: help is plain text, so option syntax in brackets (edm[order=strong-to-weak])
# shows as written instead of being read as rich markup and dropped.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Study and fix modality imbalance: extract features once, train heads fast.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature caches.")
app.add_typer(cache_app, name="cache")

from heads import commands as heads_commands  # noqa: E402  (stage two: train-head, compare, grid, …; lazy inside)
from heads import commands_runs as heads_runs_commands  # noqa: E402  (stage two's readers: report, runs, predict, methods)
from pipeline import commands as pipeline_commands  # noqa: E402  (stage one: extract, datasets, backbones; lazy inside)


def fail(message: str, code: int = 2):
    """One clear line on stderr and a non-zero exit: bad input never produces a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds exactly like Ctrl-C.

    A subclass of KeyboardInterrupt on purpose: every ``except KeyboardInterrupt`` / ``finally`` that
    stops workers and keeps finished runs handles a scheduler's SIGTERM too.
    """


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def friendly(func):
    """Turn the tool's own error types, Ctrl-C and SIGTERM into one-line messages."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from cache import CacheError
        from heads.errors import OptionError

        main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
        previous = signal.signal(signal.SIGTERM, _terminate) if main else None
        try:
            return func(*args, **kwargs)
        except (CacheError, OptionError, FileNotFoundError, ValueError) as err:
            fail(str(err))
        except Terminated:
            fail("terminated; finished runs are kept, rerun the same command to resume", 143)
        except KeyboardInterrupt:
            fail("interrupted; finished runs are kept", 130)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
    return wrapper


@cache_app.command("info")
@friendly
def cache_info_cmd(path: str = typer.Argument(..., help="Cache folder or built-in preset name.")):
    """Summarise a cache: dataset, backbone, modalities, classes, split sizes, coverage, failures."""
    from cache import cache_info

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
        from cache.scales import scale_warnings, value_scales

        scales = value_scales(info["path"])
        for m, s in scales.items():
            typer.echo(f"scale       {m:10s} rms {s['rms']:.3g}  std {s['std']:.3g}  max |x| {s['max_abs']:.3g}  "
                       f"largest feature spread {s['outlier']:.1f}× the median (train, present samples)")
        for line in scale_warnings(scales):
            typer.echo(f"warning: {line}", err=True)


@cache_app.command("verify")
@friendly
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
        fail(f"{len(report.problems)} problem(s) in {target}", 1)
    typer.echo(f"ok: {target} is consistent")


@app.command("import-features")
@friendly
def import_features(
    file: Path = typer.Argument(..., help=".npz with x_<modality> [N,D] or [N,T,D], y, optional split, class_names."),
    out: Path = typer.Option(..., "--out", help="Cache folder to create."),
    dataset: str = typer.Option(None, help="Dataset name for meta.json (default: file stem)."),
    seed: int = typer.Option(0, help="Seed of the stratified 80/10/10 split made when the file has none."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (atomically)."),
):
    """Import features made elsewhere into a cache, so every head method can use them."""
    from heads.importer import import_npz

    path, counts = import_npz(file, out, dataset or file.stem, seed, overwrite)
    typer.echo(f"imported {sum(counts.values())} samples into {path} (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")


@app.command("make-synthetic")
@friendly
def make_synthetic_cmd(
    out: Path = typer.Option(..., "--out", help="Cache folder to create."),
    preset: str = typer.Option("av", help="av (CREMA-D-like, 2 modalities) or avt (IEMOCAP-like, 3)."),
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


def _split_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _key_values(text: str) -> dict[str, float]:
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


pipeline_commands.register(app)
heads_commands.register(app, friendly)
heads_runs_commands.register(app, friendly)


def main():
    """The installed commands (`modality-balance`, `mb`; see pyproject.toml) are this file."""
    app()


if __name__ == "__main__":
    main()
