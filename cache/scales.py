"""How large a cache's values are, per modality: what ``cache info`` reports before anyone trains on it.

Real features are not on one scale. Modalities can differ by orders of magnitude (a public 6-view set
spans ±0.8 to 17,600), and MLLM ``[CLASS]`` vectors carry a few outlier dimensions in the hundreds
beside ordinary ones near 1. Unstandardised, either decides which modality a joint head learns first;
the heads z-score per feature by default (``heads/blocks/standardize.py``). These figures say how exposed a
cache is, and the warnings say when it matters.
"""
from __future__ import annotations

import math
from pathlib import Path

from cache.reader import load_split

ORDERS_WARN = 1.0  # warn when two modalities' typical magnitudes differ by 10× or more
OUTLIER_WARN = 100.0  # warn when one feature's spread is 100× the median feature's


def value_scales(path: str | Path, split: str = "train") -> dict[str, dict[str, float]]:
    """Per modality, over the present samples of ``split`` (tokens pooled): ``rms`` (root mean square of
    the values), ``std`` (spread around the mean), ``max_abs``, and ``outlier`` (the largest
    per-feature std over the median per-feature std)."""
    part = load_split(path, split)
    out = {}
    for m, tokens in part.features.items():
        values = tokens[part.present[m]].reshape(-1, tokens.shape[-1]).double()
        if values.shape[0] == 0:
            continue
        per_feature = values.std(0, unbiased=False)
        median = float(per_feature.median())
        out[m] = {"rms": float(values.pow(2).mean().sqrt()), "std": float(values.std(unbiased=False)),
                  "max_abs": float(values.abs().max()),
                  "outlier": float(per_feature.max()) / median if median > 0 else math.inf}
    return out


def scale_warnings(scales: dict[str, dict[str, float]]) -> list[str]:
    """One line per problem: modalities whose magnitudes differ by ≥ 10×, modalities with outlier features."""
    lines = []
    rms = {m: s["rms"] for m, s in scales.items() if s["rms"] > 0}
    if len(rms) > 1:
        big, small = max(rms, key=rms.get), min(rms, key=rms.get)
        orders = math.log10(rms[big] / rms[small])
        if orders >= ORDERS_WARN:
            lines.append(f"modality scales differ by {orders:.1f} orders of magnitude ({big} rms {rms[big]:.3g}, "
                         f"{small} rms {rms[small]:.3g}): train with the default --standardize feature")
    for m, s in scales.items():
        if s["outlier"] >= OUTLIER_WARN:
            lines.append(f"{m} has outlier features (largest per-feature std {s['outlier']:.0f}× the median): "
                         "per-feature standardisation (the default) matters here")
    return lines
