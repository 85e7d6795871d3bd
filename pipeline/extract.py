"""Stage one's engine: a dataset listing through a frozen backbone into a feature cache.

DataLoader workers decode each sample's media and run the backbone's preprocessing; the main
process moves batches to the device (pinned memory, non-blocking copies), runs the backbone and
hands features to the ``CacheWriter``. On the fast path (the default) the weights are in the
compute dtype and images travel as uint8 (see ``Backbone``); the plain path (``fast=False``) runs
float32 weights under autocast. On a GPU the features of batch i come back (non-blocking, pinned)
while batch i+1 is already queued: the host never waits on the device inside the loop, only when
it stores a batch that has finished. LLM text prompts are extracted shortest first on the fast
path, so a batch pads to prompts of about its own length.

- Resumable: the writer knows every sample id already in a shard; a rerun of the same command
  skips them, so an interrupted run (Ctrl-C, kill -9) ends with every sample exactly once.
- Robust to bad media: a file that cannot be decoded costs its sample (or, with ``keep_partial``,
  only that modality, stored as absent), never the run. Every failure, with its reason, goes to
  ``failed.parquet`` (sample_id, modality, reason); features with NaN/inf are refused the same way.
- Several processes (``accelerate launch``): process r of w takes the listing's samples r, r+w,
  ... and writes its own shards; after a barrier, process 0 merges the manifest and failures.

The DataLoader workers run ``loader.py``, the device side of a batch is ``encoding.py``, and the
counts and ``failed.parquet`` are ``summary.py``.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cache import CacheError, CacheWriter, load_meta
from pipeline.backbones import BACKBONES, Backbone, BackboneError, build_backbone
from pipeline.datasets import DatasetAdapter, DatasetError, SampleRef, get_dataset
from pipeline.decode import AUDIO_RATE
from pipeline.encoding import collect, launch, refuse_non_finite
from pipeline.loader import Collate, SampleSet
from pipeline.summary import Summary, clear_failure_parts, finish, write_failure_part

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def select_modalities(dataset: DatasetAdapter, backbone: Backbone, requested: list[str] | None) -> tuple[dict, dict]:
    """(modalities to extract {name: kind}, left out {name: why}) for this dataset and backbone."""
    available = dict(dataset.modalities)
    if requested:
        unknown = [m for m in requested if m not in available]
        if unknown:
            raise DatasetError(f"dataset {dataset.name} has no modality {', '.join(unknown)}; "
                               f"it has {', '.join(available)}")
        available = {m: available[m] for m in requested}
    chosen = {m: k for m, k in available.items() if k in backbone.kinds}
    encodes = f"{backbone.family} encodes {', '.join(backbone.kinds)}"
    left_out = {m: f"{k}: {encodes}" for m, k in available.items() if m not in chosen}
    if not chosen:
        have = ", ".join(f"{m} ({k})" for m, k in available.items())
        raise BackboneError(f"backbone {encodes}; dataset {dataset.name} offers {have}: nothing to extract")
    return chosen, left_out


def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:7.1f} items/s" if task.speed else "      - items/s")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)


def _settings(backbone_name: str, backbone: Backbone, modalities: dict, frames: int, dtype: torch.dtype) -> dict:
    """What must not change between an interrupted run and its resume (JSON-normalised)."""
    extraction = {"modality_kinds": modalities, "frames": frames, "audio_rate": AUDIO_RATE,
                  "dtype": str(dtype).replace("torch.", "")}
    return json.loads(json.dumps({"backbone": backbone_name, "backbone_config": backbone.record(),
                                  "extraction": extraction}))


def _comparable(settings: dict) -> dict:
    """Settings minus the weights' location: moving the weights folder does not change the features."""
    out = json.loads(json.dumps(settings))
    (out.get("backbone_config") or {}).get("info", {}).pop("weights", None)
    return out


def _text_length(ref: SampleRef, modalities: dict) -> int:
    """A sample's text length for bucketing: characters of text given inline, bytes of a text file."""
    total = 0
    for m, kind in modalities.items():
        source = ref.sources.get(m)
        if kind != "text" or source is None:
            continue
        if isinstance(source, str):
            total += len(source)
        else:
            try:
                total += os.stat(source).st_size
            except OSError:
                pass  # the worker will report the file
    return total


def run_extraction(
    dataset: DatasetAdapter,
    backbone: Backbone,
    backbone_name: str,
    cache_path: str | Path,
    *,
    frames: int = 3,
    batch_size: int = 32,
    workers: int = 4,
    modalities: list[str] | None = None,
    shard_size: int = 1024,
    limit: int | None = None,
    keep_partial: bool = False,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = lambda msg: None,
    timings: dict | None = None,
) -> Summary:
    """Extract every sample of ``dataset`` not yet in the cache at ``cache_path``; see the module doc.

    ``timings`` (a dict, filled in): seconds spent on the listing, starting the loader's workers,
    waiting for the first batch and encoding it: where the time before the first batch goes.
    """
    timings = {} if timings is None else timings
    path = Path(cache_path)
    chosen, left_out = select_modalities(dataset, backbone, modalities)
    shapes = {m: backbone.output_shape(kind, frames) for m, kind in chosen.items()}
    settings = _settings(backbone_name, backbone, chosen, frames, backbone.dtype)
    if (path / "meta.json").exists():
        meta = load_meta(path)
        old = {k: meta.get(k) for k in ("backbone", "backbone_config")} | {
            "extraction": {k: v for k, v in (meta.get("extraction") or {}).items() if k in settings["extraction"]}}
        if _comparable(old) != _comparable(settings):
            raise CacheError(f"cache at {path} was made with other settings (backbone, its config or prompts, "
                             f"frames, dtype); use another --out or delete it")
    clock = time.perf_counter()
    listing = dataset.listing()
    timings["listing"] = time.perf_counter() - clock
    ids = [r.sample_id for r in listing.samples]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"dataset {dataset.name} lists some sample ids twice")

    def writer():
        return CacheWriter(
            path, dataset=dataset.name, backbone=backbone_name, modalities=shapes, class_names=dataset.class_names,
            split_rule=listing.split_rule, backbone_config=settings["backbone_config"], shard_size=shard_size,
            rank=rank, extra_meta={"extraction": {
                **settings["extraction"], "data_root": str(dataset.data_root.resolve()),
                "runtime": backbone.runtime(),
                "dataset_options": {k: str(v) for k, v in dataset.options.items()}}},
        )

    if rank == 0:  # process 0 writes meta.json and clears failure parts a crashed run left, before anyone writes
        out = writer()
        clear_failure_parts(path)
    barrier()
    if rank != 0:
        out = writer()
    done_at_start = set(out.done_ids)
    todo = [r for r in listing.samples[rank::world] if r.sample_id not in done_at_start]
    todo = todo[:limit] if limit is not None else todo
    if backbone.fast and backbone.bucket_text and "text" in chosen.values():
        todo = sorted(todo, key=lambda ref: _text_length(ref, chosen))  # stable: ties keep the listing's order
    summary = Summary(cache=path, rank=rank, listed=len(ids), rejected_by_listing=len(listing.skipped),
                      data_root=dataset.data_root,
                      attempted=len(todo), already_done=len(done_at_start & set(ids)), left_out=left_out)
    if rank == 0:
        for m, why in left_out.items():
            log(f"left out modality {m} ({why})")
        if done_at_start:
            log(f"resuming: {summary.already_done} of {len(ids)} samples already in {path}")

    pre = backbone.preprocessor()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads and forked workers
    if workers > cores and rank == 0:
        log(f"warning: --workers {workers} on {cores} core(s): the decoding workers will wait on each other; "
            f"--workers {max(1, cores - 1)} is usually faster")
    with warnings.catch_warnings():
        # torch says the same thing in three lines, once when the loader is built and again when it
        # starts its workers; the one line above replaces both.
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader = torch.utils.data.DataLoader(
            SampleSet(todo, chosen, pre, frames), batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=Collate(chosen, pre, keep_partial), pin_memory=backbone.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
        )
        clock = time.perf_counter()
        batches = iter(loader)  # forks the workers
        timings["workers_start"] = time.perf_counter() - clock
    extras = {f"{m}_{name}": dt for m, kind in chosen.items() for name, dt in backbone.extras(kind).items()}
    failures: list[tuple[str, str, str]] = []
    threads = torch.get_num_threads()
    if backbone.device.type == "cpu" and workers > 0:
        # The model and the decoding workers share the cores: more intra-op threads than the cores
        # left over make OpenMP threads wait on each other (5-10x slower on a busy 2-core machine).
        torch.set_num_threads(max(1, cores - workers))
    start = time.perf_counter()

    def store(batch, launched):
        if launched is not None:
            feats, extra, bad = collect(launched, len(batch["ids"]), shapes, extras, chosen)
            keep = refuse_non_finite(batch["ids"], feats, failures, bad)
            out.add([batch["ids"][i] for i in keep], np.asarray(batch["labels"])[keep],
                    [batch["splits"][i] for i in keep], {m: x[keep] for m, x in feats.items()},
                    {m: p[keep] for m, p in batch["present"].items()}, {k: v[keep] for k, v in extra.items()})
        bar.advance(task, batch["size"])

    pending = None  # the batch queued on the device, stored once the next one is queued
    overlap = backbone.device.type == "cuda"
    try:
        with _progress(progress and rank == 0) as bar, torch.inference_mode():
            task = bar.add_task(f"{dataset.name} · {backbone_name}", total=len(todo))
            for batch in batches:
                if "first_batch" not in timings:
                    timings["first_batch"] = time.perf_counter() - start
                failures += batch["failures"]
                launched = launch(backbone, batch, chosen) if batch["ids"] else None
                if pending is not None:
                    store(*pending)
                pending = (batch, launched)
                if not overlap or "first_encode" not in timings:  # on the CPU there is nothing to overlap
                    store(*pending)
                    pending = None
                    timings.setdefault("first_encode", time.perf_counter() - start - timings["first_batch"])
            if pending is not None:
                store(*pending)
                pending = None
    except BaseException:
        if pending is not None:  # its features are computed: keep them too
            try:
                with torch.inference_mode():
                    store(*pending)
            except Exception:
                pass
        out.close(finalize=False)  # keep what is whole; the rerun resumes from there
        raise
    finally:
        torch.set_num_threads(threads)
    out.close(finalize=False)
    summary.seconds = time.perf_counter() - start
    rows = failures + ([(s.sample_id, "", s.reason) for s in listing.skipped] if rank == 0 else [])
    write_failure_part(path, rank, rows)
    barrier()
    if rank == 0:
        finish(path, listing, done_at_start, summary)
    barrier()
    return summary


def extract(
    dataset_name: str,
    data_root: str | Path,
    backbone_name: str,
    weights: str | Path | None,
    *,
    out: str | Path = "features",
    config: dict | None = None,
    dataset_options: dict | None = None,
    dtype: str | None = None,
    fast: bool = True,
    image_decode: str = "auto",
    timings: dict | None = None,
    **options,
) -> Summary:
    """Set up one process (under ``accelerate launch``, one of several) and run the extraction.

    The cache goes to ``<out>/<dataset>/<backbone>/``. ``dtype`` defaults to bf16 on a GPU and fp32
    on the CPU; ``fast``/``image_decode`` are the backbone's (see ``Backbone``); ``options`` are those
    of ``run_extraction``. ``timings`` (a dict) receives where the start-up went, in seconds.
    """
    timings = {} if timings is None else timings
    clock = time.perf_counter()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Without a GPU (or with `accelerate launch --cpu`) the processes talk over gloo on the CPU.
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    timings["setup"] = time.perf_counter() - clock
    if dtype is not None and dtype not in DTYPES:
        raise BackboneError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    compute = DTYPES[dtype or ("bf16" if state.device.type == "cuda" else "fp32")]
    dataset = get_dataset(dataset_name, data_root, **(dataset_options or {}))
    clock = time.perf_counter()
    if backbone_name in BACKBONES:
        BACKBONES[backbone_name][0].import_libraries()
    timings["libraries"] = time.perf_counter() - clock
    clock = time.perf_counter()
    backbone = build_backbone(backbone_name, weights, config, state.device, compute, fast=fast,
                              image_decode=image_decode)
    timings["weights"] = time.perf_counter() - clock
    return run_extraction(
        dataset, backbone, backbone_name, Path(out) / dataset.name / backbone_name,
        rank=state.process_index, world=state.num_processes, barrier=state.wait_for_everyone, timings=timings,
        **options,
    )
