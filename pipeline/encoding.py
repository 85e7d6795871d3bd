"""The device side of an extraction: one collated batch through the backbone, and its features back.

``launch`` queues a batch on the device without waiting for it; ``collect`` waits for it and
scatters the features into ``[n, T, D]`` arrays (zeros where a modality is absent). On CUDA the
engine launches batch i+1 before it collects batch i, so the host never waits on the device inside
the loop. ``refuse_non_finite`` turns features the cache would refuse (NaN, inf, beyond float16)
into failures of their samples.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from pipeline.backbones.base import Backbone

_F16_MAX = float(np.finfo(np.float16).max)


def to_device(obj, device: torch.device):
    """Tensors in nested dicts/lists/tuples to ``device`` (non-blocking: the loader pinned them)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def launch(backbone: Backbone, batch: dict, modalities: dict) -> dict:
    """Queue one collated batch on the device: ``{m: (rows, features, extras, failed rows)}``, copies under way.

    Inputs go to the device without blocking (the loader pinned them); the plain path with bf16/fp16
    runs under autocast. On CUDA the outputs are copied back without blocking into pinned memory, and
    an event marks when they are there (``collect`` waits on it), so the host can fetch the next
    batch while the device still works on this one.
    """
    device, out = backbone.device, {}
    for m, kind in modalities.items():
        rows = batch["rows"][m]
        if not len(rows):
            continue
        inputs = to_device(batch["inputs"][m], device)
        # (no autocast context at all on the fast path: torch 2.1, Ola's, refuses an fp32 one even disabled)
        with torch.autocast(device.type, dtype=backbone.dtype) if backbone.autocast else contextlib.nullcontext():
            x, ext = backbone.encode(kind, inputs)
        failed = inputs.get("failed_rows", {}) if isinstance(inputs, dict) else {}
        x = x.float().to("cpu", non_blocking=True)
        ext = {name: value.to("cpu", non_blocking=True) for name, value in ext.items()}
        out[m] = (rows, x, ext, failed)
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
        out["_done"] = done
    return out


def collect(launched: dict, n: int, shapes: dict, extras: dict, modalities: dict):
    """Wait for a launched batch: ``{m: [n, T, D]}`` (zeros where absent), extras, and ``[(row, m, reason)]``."""
    if "_done" in launched:
        launched["_done"].synchronize()
    feats = {m: np.zeros((n, *shapes[m]), np.float32) for m in modalities}
    extra = {k: np.zeros(n, dt) for k, dt in extras.items()}
    bad = []
    for m in modalities:
        if m not in launched:
            continue
        rows, x, ext, failed = launched[m]
        feats[m][rows] = x.numpy()
        for name, value in ext.items():
            extra[f"{m}_{name}"][rows] = value.numpy()
        bad += [(int(rows[r]), m, reason) for r, reason in failed.items()]
    return feats, extra, bad


def refuse_non_finite(ids: list[str], feats: dict, failures: list, bad=()) -> np.ndarray:
    """Indices of the samples whose features are all finite and fit float16; the others become failures.

    ``bad``: ``(row, modality, reason)`` of inputs the device could not decode (those samples fail too).
    """
    good = np.ones(len(ids), bool)
    for row, m, reason in bad:
        failures.append((ids[row], m, reason))
        good[row] = False
    for m, x in feats.items():
        flat = x.reshape(len(ids), -1)
        finite = np.isfinite(flat).all(1)
        huge = finite & (np.abs(flat).max(1, initial=0) > _F16_MAX)
        failures += [(ids[i], m, "non-finite features (NaN or inf); refused") for i in np.flatnonzero(~finite)]
        failures += [(ids[i], m, "features beyond the float16 range; refused") for i in np.flatnonzero(huge)]
        good &= finite & ~huge
    return np.flatnonzero(good)
