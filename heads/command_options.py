"""The typer options that stage two's training commands share (one declaration of each option's
flag, default and help), and the two small readers of their values. Only typer and the standard
library: ``--help`` stays fast.
"""
from __future__ import annotations

from pathlib import Path

import typer

# Options shared by every training command.
CACHE = typer.Option("av", "--cache", help="Cache folder(s), ',' to join backbones; or a built-in preset: av, avt, av-saturated, avt-saturated, mv6.")
NONFINITE = typer.Option(False, "--allow-nonfinite", help="Set NaN/inf feature values to 0 (with a warning giving their count) instead of refusing the cache.")
JOIN = typer.Option("exact", "--join", help="Joined caches (--cache a,b): exact (refuse when their sample ids differ) or inner (train on the shared ids; says how many each side loses).")
SWEEP_OVERWRITE = typer.Option(False, "--overwrite", help="Retrain runs that --name holds with another config (without it a rerun with other settings is refused, naming them).")
EPOCHS = typer.Option(None, help="Training epochs (default: the method's, from its source: 100 for most, mmpareto 50, ccat 150, crmt 140 + 45; `cli.py methods`); the epoch with the best validation accuracy is kept.")
LR = typer.Option(None, "--lr", help="Learning rate (default: the method's paper setting; `cli.py methods`).")
BATCH = typer.Option(None, "--batch-size", help="Batch size, training and evaluation (default: the method's paper setting).")
OPTIM = typer.Option(None, help="adam, adamw or sgd (momentum 0.9) (default: the method's paper setting).")
SCHEDULE = typer.Option(None, "--schedule", help="none, cosine or step:EPOCHS:GAMMA (default: the method's paper setting).")
STANDARDIZE = typer.Option("feature", "--standardize", help="feature (z-score each feature with training statistics), modality (one scale per modality) or none.")
HIDDEN = typer.Option(256, help="Hidden width d of the projections.")
WD = typer.Option(None, "--weight-decay", help="Weight decay (default: the method's paper setting).")
MISS_TRAIN = typer.Option(0.0, "--missing-train", help="Mask each modality with this rate in train, val and test (MLA protocol).")
MISS_TEST = typer.Option(0.0, "--missing-test", help="Mask each modality with this rate at test only (EDM paper, Table VI).")
MODALITIES = typer.Option(None, "--modalities", help="Use only these modalities (comma-separated).")
OUT = typer.Option(Path("runs"), "--out", help="Folder for run folders.")
QUIET = typer.Option(False, "--quiet", help="No progress (a bar on a terminal; off one, a line with rate and ETA at most every 30 s).")
WORKERS = typer.Option(0, help="Worker processes, one thread each (0 = one per core on the CPU, 1 = in this process; on a GPU runs share this process).")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N.")
PRECISION = typer.Option("fp32", "--precision", help="fp32, bf16 (autocast) or auto (bf16 only on a CPU with native bf16 where a probe finds it faster; recorded in results.json).")
SHAPLEY = typer.Option(128, "--shapley-permutations", help="With more than 8 modalities, φ is estimated from this many sampled permutations (reported with its standard error); up to 8 it is exact.")
EPOCH_SUBSETS = typer.Option(False, "--epoch-subsets", help="Score every modality subset on validation after each epoch (φ, δ, EDM per epoch in epochs.csv); methods that read φ, like edm, always do.")
FEATURE_DTYPE = typer.Option("fp16", "--feature-dtype", help="How features are held in memory: fp16 (the cache's own float16, half the memory; batches are float32) or fp32 (the earlier path, exactly).")
IN_MEMORY = typer.Option("auto", "--in-memory", help="auto (hold the features in memory when they fit, else stream them from the cache's shards), yes, or no (stream: a seeded shuffle of row chunks through --stream-buffer, read ahead by a thread; `cache info` says what each mode needs).")
STREAM_BUFFER = typer.Option(128.0, "--stream-buffer", help="MB of the shuffle buffer when streaming (--in-memory no); memory is about 3 × this (a window in use, one read ahead, one being read). A buffer holding the whole training split shuffles exactly as in memory.")
LOG_WITH = typer.Option(None, "--log-with", help="Also log to trackers: tensorboard, mlflow, wandb (comma-separated); local and offline unless configured (docs/configs.md); pip install -e '.[tracking]'.")
LOG_DIR = typer.Option(None, "--log-dir", help="Where the trackers write (default: the run's own folder; for a sweep, the sweep's folder).")
# Where a sweep's runs train (heads/sweeps/backends.py; docs/grids.md, "Several machines").
BACKEND = typer.Option("local", "--backend", help="local (this machine's cores, or its GPU) or ray (tasks of a Ray cluster: the same runs, folders and numbers; pip install -e '.[distributed]').")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="With --backend ray: the cluster to join (auto: the one `ray start` runs on this node; or HOST:PORT, ray://HOST:PORT); default: start a Ray instance on this machine.")
CPUS_PER_RUN = typer.Option(1.0, "--cpus-per-run", help="With --backend ray: CPUs each run asks Ray for (its torch threads); runs at once = the cluster's CPUs / this.")
GPUS_PER_RUN = typer.Option(0.0, "--gpus-per-run", help="With --backend ray: GPU share each run (or stacked group) asks for, e.g. 1, or 0.25 for four runs per GPU; 0 trains on CPUs.")
SWEEP_FILE = typer.Option(None, "--config", help="A YAML (or JSON) file of this command's options (docs/configs.md); options typed here replace its keys.")
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
# train-head's options that are TrainConfig fields of the same name (replace single keys of --config).
TRAIN_KEYS = ("method", "epochs", "seed", "lr", "batch_size", "optimizer", "hidden", "weight_decay", "missing_train",
              "missing_test", "schedule", "standardize", "device", "precision", "epoch_subsets", "shapley_permutations")


def epoch_text(epochs: int | None) -> str:
    return f"{epochs} epochs" if epochs else "each method's epochs (trained with)"


def split_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None
