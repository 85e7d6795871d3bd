"""``predict``: a trained run's per-sample predictions on a split of a cache, for error analysis — the
label, and the prediction and its probability with every modality subset present (which samples a
modality gets wrong, which ones only the pair gets right).

The run is reloaded from its folder (``rundir.load_run``) and scored with the evaluation's own
``predict_subsets``, on the split as the run saw it: masked with the run's seed at its
``missing_train`` (all splits) and ``missing_test`` (test; ``--missing-test`` replaces the rate, with
the masks a run trained with that option draws). So on the run's own cache the full set's accuracy is
the run's ``results.json`` accuracy.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from cache import load_meta
from heads import metrics
from heads.blocks.data import DataSpec, HeadData
from heads.blocks.loading import load_head_data
from heads.errors import OptionError
from heads.train.evaluation import predict_subsets
from heads.train.rundir import load_run
from heads.train.trainer import masked_splits

SPLITS = ("train", "val", "test")


def check_cache(caches: list[Path], spec: DataSpec, run_dir: Path) -> None:
    """Refuse, in one line, a cache whose modalities, widths or classes are not the run's model's."""
    found: dict[str, int] = {}
    metas = {path: load_meta(path) for path in caches}
    for meta in metas.values():
        found.update({m: int(v["dim"]) for m, v in meta["modalities"].items()})
    missing = [m for m in spec.modalities if m not in found]
    if missing:
        raise OptionError(f"cache {', '.join(map(str, caches))} lacks modality {', '.join(missing)} of run {run_dir} "
                          f"(the cache has {', '.join(found) or 'none'}; the run's model reads {', '.join(spec.modalities)})")
    wrong = [f"{m} {found[m]} (the model reads {spec.dims[m]})" for m in spec.modalities if found[m] != spec.dims[m]]
    if wrong:
        raise OptionError(f"cache {', '.join(map(str, caches))} does not fit run {run_dir}: feature width of {'; '.join(wrong)}")
    for path, meta in metas.items():
        if meta.get("class_names") != spec.class_names:
            raise OptionError(f"cache {path} has other classes than run {run_dir} was trained on "
                              f"({len(meta.get('class_names') or [])} vs {spec.num_classes})")


def subset_name(subset: frozenset, modalities: list[str]) -> str:
    return "+".join(m for m in modalities if m in subset)


def scored_subsets(modalities: list[str]) -> list[frozenset]:
    """Every non-empty subset up to ``EXACT_SHAPLEY_MAX`` modalities (the full set first); beyond,
    the full set and each modality alone **(choice)**: 2^M columns would outgrow any table."""
    full = frozenset(modalities)
    if len(modalities) <= metrics.EXACT_SHAPLEY_MAX:
        rest = [s for s in metrics.all_subsets(modalities) if s and s != full]
    else:
        rest = [frozenset([m]) for m in modalities]
    return [full] + rest


def predictions(run_dir: Path, caches: list[Path], split: str = "test", missing_test: float | None = None,
                device: str = "cpu") -> dict[str, list]:
    """Columns of the per-sample table: ``id``, ``label``, ``label_name``, ``present_<m>``, then
    ``pred``/``prob`` (the full set: the predicted class and the probability the model gives it)
    and ``pred_<S>``/``prob_<S>`` for each other subset S (``audio``, ``audio+visual``, …)."""
    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise OptionError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not (run_dir / "model.pt").exists() or not (run_dir / "config.json").exists():
        raise OptionError(f"{run_dir} is not a finished run folder with its model (config.json and model.pt); "
                          "a grid keeps model.pt only for the selected config unless --keep-models")
    spec = DataSpec(**json.loads((run_dir / "config.json").read_text())["spec"])
    check_cache(caches, spec, run_dir)
    data: HeadData = load_head_data(caches, spec.modalities)
    model, cfg = load_run(run_dir, device)
    if missing_test is not None:
        if not 0 <= missing_test < 1:
            raise OptionError(f"--missing-test must lie in [0, 1), got {missing_test}")
        cfg = replace(cfg, missing_test=missing_test)
    try:
        chosen = dict(zip(SPLITS, masked_splits(data, cfg)))[split]
    except ValueError as err:  # a rate the split cannot reach
        raise OptionError(str(err)) from None
    on = chosen.to(next(model.parameters()).device)
    subsets = scored_subsets(spec.modalities)
    probs: dict = {}
    preds, _ = predict_subsets(model, on, subsets, cfg.eval_batch_size or cfg.batch_size, probs=probs)
    columns: dict[str, list] = {"id": list(chosen.ids), "label": chosen.y.tolist(),
                                "label_name": [spec.class_names[int(y)] for y in chosen.y]}
    columns.update({f"present_{m}": chosen.present[m].tolist() for m in spec.modalities})
    for s in subsets:
        suffix = "" if s == subsets[0] else f"_{subset_name(s, spec.modalities)}"
        pred = preds[s].cpu()
        columns[f"pred{suffix}"] = pred.tolist()
        p = probs[s].cpu() if probs.get(s) is not None else torch.zeros(0, spec.num_classes)
        columns[f"prob{suffix}"] = p.gather(1, pred[:, None]).squeeze(1).tolist() if len(pred) else []
    return columns


def write_predictions(columns: dict[str, list], out: Path) -> Path:
    """``out`` as parquet (or ``.csv``), written to a temporary name and renamed: never half a file."""
    import polars as pl

    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise OptionError(f"--out must end in .parquet or .csv, got {out.name!r}")
    frame = pl.DataFrame(columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    (frame.write_parquet if out.suffix == ".parquet" else frame.write_csv)(tmp)
    os.replace(tmp, out)
    return out
