"""One run in the trackers researchers already watch: TensorBoard, MLflow and Weights & Biases.

What a run logs is what its folder holds, under the same names: the hyperparameters are
``config.json`` (flattened: ``train.lr``, ``train.options.tau``, ``data.caches``, ``code_version``,
``used.device``; the class names are left out), each epoch is one row of ``epochs.csv`` at step =
epoch (train loss, validation accuracy / macro-F1 / loss, per-modality accuracy, φ_m, δ_m and EDM
when the epoch scored them, and whatever the method's ``end_epoch`` returns), and the end is
``results.json``: ``selected/epoch``, ``selected/val_<key>`` and ``selected/test_<key>`` for every
number of the two reports, ``selected/seconds``, and for a robustness run
``selected/test_missing<η>_<key>``. A single run (``train-head``) logs as it trains, through the
trainer's per-epoch callback; a sweep logs each run when it finishes, from its folder
(``heads/sweeps/tracking.py``), with the same ``RunLog``.

**(choice)** The libraries directly, not ``accelerate``'s tracker classes: ``accelerate`` is only in
the ``extract`` extra here; its trackers go through its process-wide ``PartialState`` and MLflow's
global active run (and set ``MLFLOW_TRACKING_URI`` in the environment), while a sweep logs many
runs, one after another, from one process. ``MlflowClient`` with an explicit store, one
``SummaryWriter`` per run and one ``wandb`` run object each keep every run's logging separate.

Local and offline unless the user configures otherwise: TensorBoard event files under
``<log-dir>/tensorboard/``; MLflow's file store ``<log-dir>/mlruns`` (unless ``MLFLOW_TRACKING_URI``
names another store; MLflow 3 keeps the file store only behind ``MLFLOW_ALLOW_FILE_STORE``, which is
set for this process when unset); W&B in offline mode under ``<log-dir>/wandb/`` (unless
``WANDB_MODE`` says otherwise; ``wandb sync`` uploads later). Values are exact: TensorBoard scalars
are written as float64 tensors, so what is read back equals ``epochs.csv``.

Text values (edm's ``order``) go to TensorBoard as text and to W&B as strings each epoch; MLflow
metrics are numbers only, so MLflow gets the text of the selected epoch as a tag
(``selected/order``) **(choice)**.

A tracker that fails says so in one ``warning:`` line and stops; training and the run folder go on.
Each tracked run's folder gets ``tracked.json``: where it was logged (a rerun of a sweep uses it so
that no run is logged twice).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from heads.errors import OptionError
from heads.train.rundir import results_record, run_config

INSTALL = "pip install -e '.[tracking]'"
# tracker name → (module it needs, the package that provides it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}
MARKER = "tracked.json"
# The selected model's numbers TensorBoard's HParams view shows beside the hyperparameters.
HPARAM_METRICS = ("selected/val_acc", "selected/test_acc", "selected/test_f1", "selected/test_edm")


def parse_log_with(text: str | None) -> tuple[str, ...]:
    """``tensorboard,mlflow`` → the trackers, each checked to be installed before anything trains."""
    names = tuple(dict.fromkeys(t.strip().lower() for t in (text or "").split(",") if t.strip()))
    for name in names:
        if name not in TRACKERS:
            raise OptionError(f"--log-with takes {', '.join(TRACKERS)} (comma-separated), got {name!r}")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise OptionError(f"--log-with {name} needs the {package} package: {INSTALL}")
    return names


@dataclass(frozen=True)
class Where:
    """Where one run is logged: ``root`` is the log dir, ``path`` the run's TensorBoard sub-folder
    under ``root/tensorboard`` (``""``: that folder itself), ``group`` the sweep (MLflow experiment,
    W&B group; ``None`` for a single run), ``shown`` what ``tracked.json`` calls ``root``."""

    root: Path
    path: str
    name: str
    group: str | None = None
    shown: str = ""

    def place(self, tracker: str) -> str:
        """What identifies the place a run was logged to (``tracked.json``; a sweep's rerun skips a
        run already logged there): the log dir, or for MLflow the store the user configured."""
        if tracker == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return self.shown or str(self.root.resolve())


# --- what is logged -------------------------------------------------------------------------------
def flat_params(config: dict) -> dict:
    """``config.json`` as one level of ``a.b.c`` keys: numbers, text and booleans as they are, lists as
    JSON text, ``None`` as ``None`` (the class names, which can run to thousands of characters, left out)."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if f"{prefix}{key}" != "spec.class_names":
                    walk(f"{prefix}{key}.", item)
        else:
            out[prefix[:-1]] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    walk("", config)
    return out


def split_values(row: dict) -> tuple[dict[str, float], dict[str, str]]:
    """A row's numbers and its text (empty and missing cells dropped)."""
    numbers, texts = {}, {}
    for key, value in row.items():
        if isinstance(value, (bool, int, float)):
            numbers[key] = float(value)
        elif isinstance(value, str) and value:
            texts[key] = value
    return numbers, texts


def final_values(results: dict, rows: list[dict]) -> tuple[dict[str, float], dict[str, str]]:
    """``results.json`` as ``selected/…`` numbers, and the text of the selected epoch's row."""
    numbers = {"selected/epoch": float(results["best_epoch"]), "selected/epochs_run": float(results["epochs_run"]),
               "selected/seconds": float(results["seconds"])}
    for split in ("val", "test"):
        numbers.update({f"selected/{split}_{k}": float(v) for k, v in results[split].items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for rate, report in results.get("missing_test", {}).items():
        numbers.update({f"selected/test_missing{rate}_{k}": float(v) for k, v in report.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    best = next((r for r in rows if int(float(r["epoch"])) == results["best_epoch"]), {})
    texts = {f"selected/{k}": v for k, v in split_values(best)[1].items()}
    return numbers, texts


# --- the trackers ----------------------------------------------------------------------------------
class _TensorBoard:
    name = "tensorboard"

    def __init__(self, where: Where, params: dict, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.dir = where.root / "tensorboard" / where.path
        self.writer = SummaryWriter(str(self.dir), flush_secs=5)
        experiment, start, self.end = hparams({k: v for k, v in params.items()}, {k: 0.0 for k in HPARAM_METRICS})
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self.record = {"tracker": self.name, "place": where.place(self.name),
                       "dir": str(Path(where.place(self.name)) / "tensorboard" / where.path)}

    def log(self, step: int, numbers: dict, texts: dict, final: bool = False) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)
        for key, value in texts.items():
            self.writer.add_text(key, value, step)

    def close(self, ok: bool) -> None:
        if ok:
            self.writer.file_writer.add_summary(self.end)
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, where: Where, params: dict, config: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (where.root / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric, self.client = Metric, MlflowClient(tracking_uri=uri)
        experiment = where.group or "train-head"
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tags = {"method": str(config["train"]["method"]), "dataset": str(config["data"].get("dataset")),
                **({"group": where.group} if where.group else {})}
        self.run_id = self.client.create_run(exp_id, run_name=where.name, tags=tags).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        store = uri if os.environ.get("MLFLOW_TRACKING_URI") else f"file:{Path(where.place(self.name)) / 'mlruns'}"
        self.record = {"tracker": self.name, "place": where.place(self.name), "store": store, "experiment": experiment,
                       "run_id": self.run_id}

    def log(self, step: int, numbers: dict, texts: dict, final: bool = False) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self.Metric(k, v, stamp, step) for k, v in numbers.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        if final:
            for key, value in texts.items():
                self.client.set_tag(self.run_id, key, value)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class _WandB:
    name = "wandb"

    def __init__(self, where: Where, params: dict, config: dict):
        import wandb

        where.root.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", "offline")
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False,
                                  disable_job_creation=True, x_disable_stats=True, x_save_requirements=False)
        shown = {k: v for k, v in config.items() if k != "spec"}
        shown["spec"] = {k: v for k, v in config.get("spec", {}).items() if k != "class_names"}
        self.run = wandb.init(dir=str(where.root), project=os.environ.get("WANDB_PROJECT", "modality-balance"),
                              group=where.group, name=where.name, config=shown, mode=mode, settings=settings,
                              reinit="create_new")
        self.record = {"tracker": self.name, "place": where.place(self.name), "mode": mode, "run_id": self.run.id}

    def log(self, step: int, numbers: dict, texts: dict, final: bool = False) -> None:
        if final:
            self.run.summary.update({**numbers, **texts})
        else:
            self.run.log({**numbers, **texts}, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


ADAPTERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def warn(name: str, err: BaseException) -> None:
    message = " ".join(str(err).split())[:300] or type(err).__name__
    print(f"warning: {name} logging stopped ({message}); the run goes on and its folder is kept", file=sys.stderr)


class RunLog:
    """One run in every tracker asked for: ``start`` (hyperparameters), ``epoch`` (one row of
    ``epochs.csv``), ``finish`` (``results.json``, then ``tracked.json`` in the run folder).

    A tracker that raises is warned about once and dropped; the others and the run go on. Used as a
    context manager, a run left without ``finish`` (an error, Ctrl-C) is closed as failed.
    """

    def __init__(self, trackers: tuple[str, ...], where: Where):
        self.trackers, self.where, self.open, self.done = trackers, where, [], False

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        if not self.done:
            self._close(ok=False)

    def start(self, config: dict) -> None:
        params = flat_params(config)
        for name in self.trackers:
            try:
                self.open.append(ADAPTERS[name](self.where, params, config))
            except Exception as err:  # noqa: BLE001  (any tracker error: warn, go on without it)
                warn(name, err)

    def _each(self, call) -> None:
        for adapter in list(self.open):
            try:
                call(adapter)
            except Exception as err:  # noqa: BLE001
                warn(adapter.name, err)
                self.open.remove(adapter)
                try:
                    adapter.close(False)
                except Exception:  # noqa: BLE001  (already reported)
                    pass

    def epoch(self, row: dict) -> None:
        numbers, texts = split_values({k: v for k, v in row.items() if k != "epoch"})
        step = int(float(row["epoch"]))
        self._each(lambda a: a.log(step, numbers, texts))

    def start_trainer(self, trainer) -> None:
        """``start`` with what the trainer's run will write to ``config.json``."""
        self.start(run_config(trainer.cfg, trainer.data, str(trainer.device), trainer.precision))

    def finish(self, results: dict, rows: list[dict], run_dir: Path | None = None) -> None:
        """The selected epoch and the two reports; then every tracker closed, and ``tracked.json``."""
        numbers, texts = final_values(results, rows)
        step = int(results["epochs_run"])
        self._each(lambda a: a.log(step, numbers, texts, final=True))
        self.done = True
        records = self._close(ok=True)
        if run_dir is not None and records:
            marker = Path(run_dir) / MARKER
            before = json.loads(marker.read_text()) if marker.exists() else []
            tmp = marker.with_name(f".{MARKER}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(before + records, indent=2))
            os.replace(tmp, marker)

    def finish_fit(self, result, run_dir: Path | None) -> None:
        """``finish`` from a ``FitResult`` (what ``write_run`` wrote to ``results.json``)."""
        self.finish(results_record(result), result.epochs, run_dir)

    def _close(self, ok: bool) -> list[dict]:
        records = []

        def close(adapter) -> None:
            adapter.close(ok)
            records.append(adapter.record)
        self._each(close)
        self.open = []
        return records


def run_log(trackers: tuple[str, ...], log_dir: Path | None, run_dir: Path, name: str) -> RunLog | None:
    """A single run's log (``None`` without trackers): in ``log_dir`` with the run's own TensorBoard
    sub-folder ``tensorboard/<name>``, or, by default, in the folder the run is written into."""
    if not trackers:
        return None
    if log_dir is not None:
        return RunLog(trackers, Where(Path(log_dir), name, name))
    return RunLog(trackers, Where(Path(run_dir), "", name, shown="."))


def logged(run_dir: Path, tracker: str, place: str) -> bool:
    """Whether ``run_dir``'s ``tracked.json`` says it was logged to ``tracker`` at ``place``."""
    marker = Path(run_dir) / MARKER
    try:
        records = json.loads(marker.read_text()) if marker.exists() else []
    except (OSError, json.JSONDecodeError):
        return False
    return any(r.get("tracker") == tracker and r.get("place") == place for r in records)


def replay(run_dir: Path, trackers: tuple[str, ...], where: Where) -> None:
    """Log a finished run folder (``config.json``, ``epochs.csv``, ``results.json``) to ``trackers``."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    with open(run_dir / "epochs.csv", newline="") as f:
        rows = [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    with RunLog(trackers, where) as log:
        log.start(config)
        for row in rows:
            log.epoch(row)
        log.finish(results, rows, run_dir)


def _cell(text: str):
    """An ``epochs.csv`` cell back as a number where it is one (``csv`` wrote floats with ``repr``, so
    ``float`` gives back the very value)."""
    try:
        return float(text)
    except ValueError:
        return text
