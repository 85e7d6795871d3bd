"""Missing-modality sweeps: methods × missing rates × seeds, under the two protocols of the papers.

- ``mla`` (the MLA paper): each modality of each sample is masked independently with rate η in
  train, validation and test, a sample always keeping one (``SplitTensors.with_missing``); one
  training per rate.
- ``test-only`` (the EDM paper's Table VI): train on complete data, drop modalities at test only.
  The trained model does not depend on η, so each (method, seed) trains once and its selected model is
  tested at every rate: R rates cost one training, not R.

η = 0 is the same clean run under both protocols and trains once. Runs go through the grid's sweep
runner, so they use every core, share the loaded cache and resume after an interruption.
"""
from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path

from heads.blocks.data import HeadData
from heads.errors import OptionError
from heads.reports import figures
from heads.reports.tables import robustness_markdown
from heads.sweeps.backends import LOCAL, Backend
from heads.sweeps.grid import write_table
from heads.sweeps.jobs import RunSpec
from heads.sweeps.specs import parse_method_spec
from heads.sweeps.sweep import run_sweep
from heads.sweeps.tracking import SweepLog
from heads.train.config import TrainConfig, resolve_training

PROTOCOLS = ("mla", "test-only")


def parse_rates(text: str) -> list[float]:
    """``0,0.1,0.3`` → rates in [0, 1), sorted, 0 included (the clean reference every curve starts from)."""
    try:
        rates = {float(f"{float(t):.12g}") for t in text.split(",") if t.strip()}
    except ValueError:
        raise OptionError(f"--missing takes rates like 0,0.1,0.3, got {text!r}") from None
    bad = [r for r in rates if not 0 <= r < 1]
    if bad:
        raise OptionError(f"missing rates must lie in [0, 1), got {', '.join(map(str, sorted(bad)))}")
    return sorted(rates | {0.0})


def parse_protocols(text: str) -> list[str]:
    names = ["mla", "test-only"] if text.strip() == "both" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown or not names:
        raise OptionError(f"--protocol must be mla, test-only or both, got {text!r}")
    return names


def robustness_specs(labels: list[str], rates: list[float], seeds: list[int], protocols: list[str],
                     base: TrainConfig) -> list[RunSpec]:
    """The runs both protocols need: one clean run per (method, seed), plus one per masked training rate."""
    specs = []
    test_rates = tuple(r for r in rates if r > 0) if "test-only" in protocols else ()
    train_rates = rates if "mla" in protocols else [0.0]
    for label in labels:
        name, options = parse_method_spec(label)
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)
        for rate in train_rates:
            cfg = replace(base, method=name, options=options, missing_train=rate, missing_test=0.0)
            for seed in seeds:
                specs.append(RunSpec(f"{slug}-miss{rate}-seed{seed}", f"{slug}-miss{rate}", replace(cfg, seed=seed),
                                     {"label": label, "missing_train": rate}, test_rates if rate == 0 else ()))
    return specs


def robustness_rows(records: list[dict], rates: list[float], protocols: list[str], modalities: list[str]) -> list[dict]:
    """Long table: one row per protocol × method × rate × seed with the test metrics and realised mask."""
    rows = []
    for r in records:
        for protocol in protocols:
            if protocol == "mla":
                if r["missing_train"] not in rates:
                    continue
                points = [(r["missing_train"], r["test"], r["masks"]["test"])]
            else:
                if r["missing_train"] != 0:
                    continue
                points = [(0.0, r["test"], r["masks"]["test"])] + [
                    (rate, r["missing_test"][str(rate)], r["missing_test"][str(rate)]) for rate in rates if rate > 0]
            for rate, test, mask in points:
                row = {"protocol": protocol, "method": r["label"], "rate": rate, "seed": r["seed"],
                       "test_acc": test["acc"], "test_f1": test["f1"], "test_edm": test["edm"]}
                row.update({f"test_acc_{m}": test[f"acc_{m}"] for m in modalities})
                row.update(missing_realised=mask["missing"], empty_samples=mask["empty"], run=r["run"])
                row.update({f"missing_realised_{m}": mask[f"missing_{m}"] for m in modalities if f"missing_{m}" in mask})
                rows.append(row)
    return rows


def robustness_summary(rows: list[dict]) -> list[dict]:
    """Mean ± std of test accuracy over seeds for each protocol × method × rate (first-seen order)."""
    groups: dict[tuple, list[float]] = {}
    realised: dict[tuple, str] = {}
    for row in rows:
        key = (row["protocol"], row["method"], row["rate"])
        groups.setdefault(key, []).append(row["test_acc"])
        per = {k[len("missing_realised_"):]: v for k, v in row.items() if k.startswith("missing_realised_")}
        realised.setdefault(key, " · ".join(f"{m} {100 * v:.1f}%" for m, v in per.items()))
    return [{"protocol": p, "method": m, "rate": rate, "seeds": len(a), "test_acc": statistics.mean(a),
             "test_acc_std": statistics.stdev(a) if len(a) > 1 else 0.0, "missing_realised": realised[(p, m, rate)]}
            for (p, m, rate), a in groups.items()]


def run_robustness(data: HeadData, labels: list[str], rates: list[float], seeds: list[int], protocols: list[str],
                   base: TrainConfig, folder: Path, workers: int = 0, progress: bool = True,
                   overwrite: bool = False, track: SweepLog | None = None, backend: Backend = LOCAL) -> list[dict]:
    """Run (or resume) the sweep; write ``robustness.json``, ``.parquet``/``.csv``, ``.md`` and ``.png``.

    Returns the summary rows (mean ± std per protocol, method and rate).
    """
    start = time.perf_counter()
    specs = robustness_specs(labels, rates, seeds, protocols, base)
    records = run_sweep(data, specs, folder, workers, progress=progress, label="robustness", overwrite=overwrite, track=track,
                        backend=backend)
    rows = robustness_rows(records, rates, protocols, data.spec.modalities)
    summary = robustness_summary(rows)
    write_table(rows, folder / "robustness")
    info = {"methods": labels, "rates": rates, "seeds": seeds, "protocols": protocols,
            "epochs": base.epochs or {label: resolve_training(replace(base, method=parse_method_spec(label)[0])).epochs
                                      for label in labels},
            "dataset": data.meta.get("dataset"), "runs": [r["run"] for r in records], "summary": summary,
            "wall_seconds": time.perf_counter() - start}
    (folder / "robustness.json").write_text(json.dumps(info, indent=2))
    (folder / "robustness.md").write_text(robustness_markdown(summary))
    figures.robustness_curves(summary, folder / "robustness.png")
    return summary
