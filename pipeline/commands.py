"""Stage one's commands for the tool's CLI: ``extract``, ``datasets``, ``backbones``.

``register(app)`` adds them to a typer app. Only typer and the standard library are imported here;
torch, the backbones and the media libraries load inside the command bodies, so the rest of the CLI
stays fast. The tool's own errors print one line on stderr and exit non-zero, without a traceback.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import typer

_LOADED = time.perf_counter()  # when cli.py reached its commands: start-up is measured from here


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _one_line_errors(func):
    """The errors a user can cause (bad paths, names, layouts, configs) become one line and exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from cache import CacheError
        from pipeline.backbones.base import BackboneError
        from pipeline.datasets.base import DatasetError
        from pipeline.decode import DecodeError

        try:
            return func(*args, **kwargs)
        except (BackboneError, CacheError, DatasetError, DecodeError) as err:
            _fail(str(err))
        except OSError as err:  # the disk, not the code: a full disk, a folder one may not write to
            _fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
        except MemoryError as err:
            _fail(f"out of memory: {err}" if str(err) else "out of memory; use a smaller --batch-size")
        except KeyboardInterrupt:
            _fail("interrupted; whole shards are kept: rerun the same command to resume", 130)

    return wrapper


def _count(n: int, one: str, many: str | None = None) -> str:
    """``1 sample``, ``2 samples``; ``many`` for irregular plurals."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def _key_values(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=what)
        out[key.strip()] = value
    return out


def _backbone_config(config: str | None, prompt: list[str] | None, prompts: Path | None) -> dict:
    """``--config`` (JSON text or a .json file), then prompts from ``--prompts FILE`` and ``--prompt``."""
    from pipeline.backbones.base import BackboneError

    cfg: dict = {}
    if config:
        text = Path(config).read_text() if config.endswith(".json") and Path(config).is_file() else config
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as err:
            raise BackboneError(f"--config is neither a .json file nor valid JSON ({err.msg})") from None
        if not isinstance(cfg, dict):
            raise BackboneError("--config must be a JSON object")
    given = {}
    if prompts:
        try:
            given = json.loads(prompts.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BackboneError(f"--prompts {prompts}: {err}") from None
        if not isinstance(given, dict):
            raise BackboneError(f"--prompts {prompts} must hold a JSON object {{kind: message}}")
    # On a command line "\n" arrives as two characters; a prompt means a newline.
    given.update({k: v.replace("\\n", "\n") for k, v in _key_values(prompt, "--prompt").items()})
    if given:
        cfg["prompts"] = {**cfg.get("prompts", {}), **given}
    return cfg


def register(app: typer.Typer) -> None:
    """Add ``extract``, ``datasets`` and ``backbones`` to ``app``."""

    @app.command("extract")
    @_one_line_errors
    def extract_cmd(
        dataset: str = typer.Argument(..., help="Dataset name (`datasets` lists them), e.g. mvsa, cremad, folder."),
        backbone: str = typer.Option(..., "--backbone", help="Backbone name (`backbones` lists them), e.g. ola7b, clip-vit-l14."),
        weights: Path = typer.Option(None, "--weights", help="Local weights file or folder (never downloaded)."),
        data_root: Path = typer.Option(..., "--data-root", help="The dataset's folder, in its official layout."),
        out: Path = typer.Option(Path("features"), "--out", help="Cache root; the cache is <out>/<dataset>/<backbone>/."),
        batch_size: int = typer.Option(32, "--batch-size", help="Samples per batch."),
        workers: int = typer.Option(4, "--workers", help="DataLoader worker processes decoding media (0: in-process)."),
        dtype: str = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on CPU)."),
        frames: int = typer.Option(3, "--frames", help="K frames per video, at the middles of K equal segments."),
        config: str = typer.Option(None, "--config", help="Backbone config over its defaults: JSON text or a .json file."),
        prompt: list[str] = typer.Option(None, "--prompt", help="LLM prompt for one kind: KIND=MESSAGE (repeatable)."),
        prompts: Path = typer.Option(None, "--prompts", help="JSON file {kind: message} of LLM prompts."),
        modalities: str = typer.Option(None, "--modalities", help="Extract only these modalities (comma-separated)."),
        option: list[str] = typer.Option(None, "--option", "-o", help="Dataset option KEY=VALUE (repeatable)."),
        shard_size: int = typer.Option(1024, "--shard-size", help="Samples per HDF5 shard (the unit kept on a kill)."),
        limit: int = typer.Option(None, "--limit", help="At most this many new samples per process (a trial run)."),
        keep_partial: bool = typer.Option(
            False, "--keep-partial", help="Keep a sample with one undecodable modality, that one stored as absent."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
        plain: bool = typer.Option(
            False, "--plain", help="The plain path, for comparison: float32 weights under autocast, the whole "
                                   "preprocessing in the workers, eager attention (default: the fast path)."),
        image_decode: str = typer.Option(
            "auto", "--image-decode", help="JPEG decoding: cpu (PIL in the workers), device (nvJPEG on the GPU, "
                                           "where this build has it), auto (device when available)."),
        whisper_window: str = typer.Option(
            None, "--whisper-window", help="Whisper only: 30s (default) or valid: encode only the clip's frames. "
                                           "valid CHANGES THE FEATURES (about 10x faster on 3 s clips)."),
        verbose: bool = typer.Option(False, "--verbose", help="Also print where the time before the first batch went."),
    ):
        """Extract features of one dataset with one frozen backbone into a cache (resumable).

        Rerun the same command after an interruption to continue. Files that cannot be decoded are
        skipped and listed with the reason in <cache>/failed.parquet. Several GPUs:
        `accelerate launch cli.py extract ...`.
        """
        from pipeline.backbones.base import BackboneError
        from pipeline.extract import extract

        timings = {"imports": time.perf_counter() - _LOADED}  # torch, numpy, polars, the cache and the engine
        if batch_size < 1 or workers < 0 or frames < 1 or shard_size < 1 or (limit is not None and limit < 0):
            raise BackboneError("--batch-size, --frames and --shard-size must be positive; "
                                "--workers and --limit not negative")
        if not data_root.is_dir():
            raise BackboneError(f"--data-root {data_root} is not a folder")
        if image_decode not in ("auto", "cpu", "device"):
            raise BackboneError(f"--image-decode must be auto, cpu or device, got {image_decode!r}")
        cfg = _backbone_config(config, prompt, prompts)
        if whisper_window is not None:
            from pipeline.backbones import BACKBONES
            from pipeline.backbones.whisper import WhisperBackbone

            if BACKBONES.get(backbone, (None, None))[0] is not WhisperBackbone:
                raise BackboneError(f"--whisper-window is for the whisper backbones, not {backbone!r}")
            if whisper_window not in ("30s", "valid"):
                raise BackboneError(f"--whisper-window must be 30s or valid, got {whisper_window!r}")
            cfg["window"] = whisper_window
        summary = extract(
            dataset, data_root, backbone, weights, out=out, config=cfg, fast=not plain, image_decode=image_decode,
            timings=timings,
            dataset_options=_key_values(option, "--option"), dtype=dtype, frames=frames, batch_size=batch_size,
            workers=workers, modalities=[m.strip() for m in modalities.split(",") if m.strip()] if modalities else None,
            shard_size=shard_size, limit=limit, keep_partial=keep_partial, progress=not quiet, log=typer.echo,
        )
        if summary.rank != 0:
            return
        if verbose:
            parts = ("imports", "setup", "libraries", "weights", "listing", "workers_start", "first_batch",
                     "first_encode")
            total = sum(timings.get(k, 0.0) for k in parts)
            typer.echo("start-up    " + ", ".join(f"{k.replace('_', ' ')} {timings[k]:.2f} s" for k in parts
                                                  if k in timings) + f"; first batch stored after {total:.2f} s")
        typer.echo(f"cache       {summary.cache}")
        typer.echo(f"samples     {summary.written} new, {summary.already_done} already there, "
                   f"{summary.in_cache} in cache of {summary.listed} listed")
        typer.echo(f"failed      {_count(summary.failed_samples, 'sample')} skipped, "
                   f"{_count(summary.failed_modalities, 'modality', 'modalities')} stored absent, "
                   f"{_count(summary.rejected_by_listing, 'listed sample')} rejected by the dataset listing")
        for reason, count in list(summary.reasons.items())[:8]:  # by cause: the file names are in failed.parquet
            typer.echo(f"            {count:6d} × {reason}")
        if summary.reasons:
            typer.echo(f"            all reasons, per file: {summary.cache / 'failed.parquet'}")
        typer.echo(f"speed       {summary.rate:.1f} items/s over {summary.seconds:.1f} s (this process)")
        n = summary.lfs_pointers
        lfs = (f"{n} {'file is a Git LFS pointer' if n == 1 else 'files are Git LFS pointers'}, not media: "
               f"run `git lfs pull` in {summary.data_root}")
        if summary.in_cache == 0:
            _fail(lfs if summary.lfs_pointers else
                  f"nothing could be read: every sample failed (see {summary.cache / 'failed.parquet'})", 1)
        if summary.lfs_pointers:
            typer.echo(f"warning: {lfs}", err=True)

    @app.command("datasets")
    def datasets_cmd():
        """List the dataset adapters: modalities with their kinds, classes, expected layout."""
        from pipeline.datasets import DATASETS

        for name, cls in DATASETS.items():
            mods = ", ".join(f"{m} ({k})" for m, k in cls.modalities.items()) or "from its files (see layout)"
            classes = getattr(cls, "class_names", None)
            typer.echo(f"{name}: {cls.description}")
            typer.echo(f"    modalities  {mods}")
            if isinstance(classes, (list, tuple)):
                more = " …" if len(classes) > 10 else ""
                typer.echo(f"    classes     {len(classes)}: {', '.join(classes[:10])}{more}")
            typer.echo(f"    layout      {cls.layout}")

    @app.command("backbones")
    def backbones_cmd():
        """List the backbone names, the input kinds each encodes, its output [T, D] per kind, and its weights."""
        from pipeline.backbones import BACKBONES, output_shapes

        for name, (cls, preset) in BACKBONES.items():
            extra = f"  {json.dumps(preset)}" if preset else ""
            typer.echo(f"{name:20s} {cls.family:8s} kinds {', '.join(cls.kinds):24s}{extra}")
            typer.echo(f"{'':20s} output:  {output_shapes(name)}  (K = --frames)" if "video" in cls.kinds else
                       f"{'':20s} output:  {output_shapes(name)}")
            typer.echo(f"{'':20s} weights: {cls.weights_layout}")
