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

# rich_markup_mode=None: help is plain text, so option syntax in brackets (edm[order=strong-to-weak])
# shows as written instead of being read as rich markup and dropped.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Study and fix modality imbalance: extract features once, train heads fast.")

from pipeline.commands import register  # noqa: E402  (stage one: extract, datasets, backbones; lazy inside)
from cache import commands as cache_commands  # noqa: E402  (cache info/verify, import-features, make-synthetic)

register(app)


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
        from heads.core import OptionError

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


def _train_config(method, epochs, seed, lr, batch_size, optimizer, hidden, weight_decay, missing_train,
                  missing_test, options=None, schedule=None, standardize="feature", device="auto", precision="fp32",
                  epoch_subsets=False, shapley_permutations=128):
    """A ``TrainConfig`` from the shared options; ``None`` leaves a setting to the method's paper default."""
    from heads.core import OptionError, TrainConfig
    from heads.device import PRECISIONS, DeviceError, resolve_device
    from heads.grid import check_setting

    resolve_device(device)  # a device that is not here fails before the cache loads
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if shapley_permutations < 1:
        raise OptionError(f"--shapley-permutations must be positive, got {shapley_permutations}")

    if epochs < 1 or (batch_size is not None and batch_size < 1) or hidden < 1:
        raise OptionError("--epochs, --batch-size and --hidden must be positive")
    given = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "schedule": schedule,
             "standardize": standardize, "missing_train": missing_train, "missing_test": missing_test}
    for name, value in given.items():
        if value is not None:
            check_setting(name, value)
    return TrainConfig(method=method, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size,
                       optimizer=optimizer, hidden=hidden, weight_decay=weight_decay, schedule=schedule,
                       missing_train=missing_train, missing_test=missing_test, standardize=standardize,
                       options=options or {}, device=device, precision=precision, epoch_subsets=epoch_subsets,
                       shapley_permutations=shapley_permutations)


# Options shared by every training command.
CACHE = typer.Option("av", "--cache", help="Cache folder(s), ',' to join backbones; or built-in preset av / avt.")
EPOCHS = typer.Option(100, help="Training epochs; the epoch with the best validation accuracy is kept.")
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
QUIET = typer.Option(False, "--quiet", help="No progress bar.")
WORKERS = typer.Option(0, help="Worker processes, one thread each (0 = one per core on the CPU, 1 = in this process; on a GPU runs share this process).")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N.")
PRECISION = typer.Option("fp32", "--precision", help="fp32, bf16 (autocast) or auto (bf16 only on a CPU with native bf16 where a probe finds it faster; recorded in results.json).")
SHAPLEY = typer.Option(128, "--shapley-permutations", help="With more than 8 modalities, φ is estimated from this many sampled permutations (reported with its standard error); up to 8 it is exact.")
EPOCH_SUBSETS = typer.Option(False, "--epoch-subsets", help="Score every modality subset on validation after each epoch (φ, δ, EDM per epoch in epochs.csv); methods that read φ, like edm, always do.")
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("train-head", context_settings=EXTRA)
@friendly
def train_head(
    ctx: typer.Context,
    method: str = typer.Option("concat", help="Method name; `cli.py methods` lists them and their options."),
    cache: str = CACHE, epochs: int = EPOCHS,
    seed: int = typer.Option(0, help="Seed for initialisation, shuffling and masks."),
    lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIM, hidden: int = HIDDEN,
    weight_decay: float = WD, missing_train: float = MISS_TRAIN, missing_test: float = MISS_TEST,
    modalities: str = MODALITIES, name: str = typer.Option(None, help="Run folder name (default: method-dataset-seed-time)."),
    out: Path = OUT, quiet: bool = QUIET, schedule: str = SCHEDULE, standardize: str = STANDARDIZE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder of the same --name (whole, not merged)."),
    device: str = DEVICE, precision: str = PRECISION, epoch_subsets: bool = EPOCH_SUBSETS,
    shapley_permutations: int = SHAPLEY,
):
    """Train one head on cached features; method options follow as --name value (e.g. --tau 0.3 --no-align).

    Writes runs/<name>/: config.json (resolved), epochs.csv, results.json, table.md, model.pt.
    An existing run of the same --name is refused unless --overwrite; --name is a folder name inside --out.
    """
    from cache.synthetic import resolve_caches
    from heads.core import OptionError, fit, method_class, parse_option_args
    from heads.data import load_head_data
    from heads.runner import run_folder, timestamp, write_whole

    def new_run(folder_name: str) -> Path:
        run_dir = run_folder(out, folder_name)
        if (run_dir.exists() or run_dir.is_symlink()) and not overwrite:
            raise OptionError(f"run {run_dir} exists; add --overwrite to replace it, or choose another --name")
        return run_dir

    method_class(method)
    options = parse_option_args(method, list(ctx.args))
    cfg = _train_config(method, epochs, seed, lr, batch_size, optimizer, hidden, weight_decay, missing_train,
                        missing_test, options, schedule, standardize, device, precision, epoch_subsets,
                        shapley_permutations)
    if name is not None:
        new_run(name)  # refused before the cache loads
    data = load_head_data(resolve_caches(cache), _split_list(modalities))
    run_dir = new_run(name or f"{method}-{data.meta['dataset']}-seed{seed}-{timestamp()}")
    result = write_whole(run_dir, lambda tmp: fit(data, cfg, tmp, progress=not quiet))
    typer.echo((run_dir / "table.md").read_text().rstrip())
    typer.echo(f"best epoch {result.best_epoch}/{epochs} · {result.seconds:.1f} s · {run_dir}")


@app.command()
@friendly
def compare(
    methods: str = typer.Option(None, help="Comma-separated method specs, NAME[key=value;...] sets options (default: every method)."),
    paper: str = typer.Option(None, "--paper", help="edm, mla or ccat: run the methods of that paper's main table that this tool has, each with its paper's settings, and print the paper's numbers beside ours."),
    seeds: str = typer.Option("3", help="A count (3 → seeds 0,1,2) or a list (0,5,9)."),
    cache: str = CACHE, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIM,
    hidden: int = HIDDEN, weight_decay: float = WD, missing_train: float = MISS_TRAIN,
    missing_test: float = MISS_TEST, modalities: str = MODALITIES,
    name: str = typer.Option(None, help="Folder name under --out (default: compare-time); an existing folder of that name is resumed."),
    out: Path = OUT, quiet: bool = QUIET, workers: int = WORKERS, schedule: str = SCHEDULE,
    standardize: str = STANDARDIZE, device: str = DEVICE, precision: str = PRECISION, epoch_subsets: bool = EPOCH_SUBSETS,
    shapley_permutations: int = SHAPLEY,
    same_optimizer: bool = typer.Option(False, "--same-optimizer", help="Train every method under one setting (adam, lr 1e-3, wd 1e-4, no schedule, batch 256, or the options given) instead of each paper's."),
):
    """Train several methods over several seeds; print and write the paper-style table (mean ± std).

    By default each method trains with its paper's optimizer, rate, schedule and batch size
    (`cli.py methods`); --optimizer/--lr/... override one setting for every method, and
    --same-optimizer runs all of them under one setting for a controlled comparison.

    Methods with options: --methods 'concat,edm[order=weak-to-strong],edm[order=strong-to-weak]'
    (inside brackets separate options with ';' or ',').

    --paper edm|mla|ccat runs the rows of that paper's main table instead (EDM paper Table I, MLA
    Table 1, CCAT Table 1) and adds the paper's number for the cache's dataset beside ours; also
    written to OUT/NAME/paper.md.
    """
    from cache.synthetic import resolve_caches
    from heads import papers
    from heads.core import OptionError
    from heads.data import load_head_data
    from heads.methods import METHODS
    from heads.report import paper_report
    from heads.runner import compare as run_compare
    from heads.runner import parse_seeds, run_folder, split_specs, timestamp

    if paper is not None:
        if methods:
            raise OptionError("--paper runs the methods of that paper's table; give --paper or --methods, not both")
        if same_optimizer:
            raise OptionError("--paper trains each method with its paper's settings; drop --same-optimizer "
                              "(or give --methods for a same-setting comparison)")
        printed = papers.paper_table(paper)
        first = next((row["ours"] for row in printed["rows"] if row["ours"] in METHODS), None)
        if first is None:
            raise OptionError(f"none of the methods of the {paper} table is registered yet")
    else:
        specs = split_specs(methods or ",".join(METHODS))
        first = specs[0].split("[")[0]
    seed_list = parse_seeds(seeds)
    if same_optimizer:
        from heads.training import SHARED

        optimizer, lr, weight_decay = optimizer or SHARED.optimizer, lr or SHARED.lr, SHARED.weight_decay if weight_decay is None else weight_decay
        schedule, batch_size = schedule or SHARED.schedule, batch_size or SHARED.batch_size
    base = _train_config(first, epochs, 0, lr, batch_size, optimizer, hidden, weight_decay,
                         missing_train, missing_test, schedule=schedule, standardize=standardize, device=device,
                         precision=precision, epoch_subsets=epoch_subsets, shapley_permutations=shapley_permutations)
    folder = run_folder(out, name or f"compare-{paper + '-' if paper else ''}{timestamp()}")
    data = load_head_data(resolve_caches(cache), _split_list(modalities))
    summary = (f"test split of {data.meta['dataset']} · {len(seed_list)} seed(s) · {epochs} epochs · selection on "
               f"validation · features standardised: {standardize}")
    if paper is None:
        table, _ = run_compare(data, specs, seed_list, base, folder, progress=not quiet, workers=workers)
        typer.echo(f"{summary}\n{table.rstrip()}")
        typer.echo(f"written to {folder}")
        return
    # --paper: the rows of its table that we implement; the paper's number for the cache's dataset beside ours.
    columns = papers.match_columns(printed, data.meta["dataset"], data.meta["backbones"])
    rows = papers.plan(printed, METHODS, columns)
    head = papers.plan_lines(paper, printed, rows)
    typer.echo(head)
    specs = list(dict.fromkeys(r.spec for r in rows if r.spec))
    _, results = run_compare(data, specs, seed_list, base, folder, progress=not quiet, workers=workers)
    body = f"{summary}\n{paper_report(printed, rows, columns, results, data)}"
    (folder / "paper.md").write_text(f"{head}\n{body}\n")
    typer.echo(body)
    typer.echo(f"written to {folder} (paper.md beside table.md)")


@app.command("grid", context_settings=EXTRA)
@friendly
def grid_cmd(
    ctx: typer.Context,
    method: str = typer.Option(..., help="Method to tune; `cli.py methods` lists its options."),
    seeds: str = typer.Option("3", help="A count (3 → seeds 0,1,2) or a list (0,5,9)."),
    cache: str = CACHE, epochs: int = EPOCHS,
    prune: bool = typer.Option(False, help="Successive halving: the worse half of the configs stops at E/8, E/4, E/2."),
    protocol: str = typer.Option("joint", help="joint (every combination of the axes) or ccat (--rank first, then --beta at the best rank)."),
    workers: int = WORKERS,
    modalities: str = MODALITIES,
    name: str = typer.Option(None, help="Folder name under --out (default: grid-METHOD-time); the same name resumes."),
    out: Path = OUT, quiet: bool = QUIET,
    yes: bool = typer.Option(False, "--yes", help="Start a grid of more than 200 runs (without it such a grid is refused, with its size)."),
    keep_models: bool = typer.Option(False, "--keep-models", help="Keep model.pt of every run (default: only the selected config's runs keep theirs)."),
    device: str = DEVICE, precision: str = PRECISION, epoch_subsets: bool = EPOCH_SUBSETS,
    shapley_permutations: int = SHAPLEY,
    stack: str = typer.Option("auto", "--stack", help="auto (on a GPU, train the configs of a stackable method together as batched tensors), on, or off."),
):
    """Tune a method over seeds and select on validation; axes follow as --name values.

    Values: 0.1,0.5 (a list), 0.0:0.9:0.1 (an inclusive range), 'a,b|c,d' (values with commas).
    Any method option or training setting is an axis: --tau 0.0:0.9:0.1 --lr 1e-3,3e-3 --no-align.
    Writes OUT/NAME/: one folder per run, grid.json, grid.parquet, grid.csv, grid.md, grid.png;
    model.pt only in the selected config's runs unless --keep-models. More than 200 runs need --yes.
    """
    from cache.synthetic import resolve_caches
    from heads.data import load_head_data
    from heads.grid import check_size, parse_axis_args, run_grid
    from heads.runner import parse_seeds, run_folder, timestamp

    axes = parse_axis_args(method, list(ctx.args))
    seed_list = parse_seeds(seeds)
    check_size(axes, seed_list, protocol, yes)  # before the cache loads
    # Settings that are not axes keep the defaults of train-head, read from the shared options.
    base = _train_config(method, epochs, 0, None, None, None, HIDDEN.default, None, 0.0, 0.0, device=device,
                         precision=precision, epoch_subsets=epoch_subsets, shapley_permutations=shapley_permutations)
    folder = run_folder(out, name or f"grid-{method}-{timestamp()}")
    data = load_head_data(resolve_caches(cache), _split_list(modalities))
    outcome = run_grid(data, method, axes, seed_list, base, folder, prune, protocol, workers, progress=not quiet,
                       yes=yes, keep_models=keep_models, stack=stack)
    sel = outcome.selection
    typer.echo((folder / "grid.md").read_text().rstrip())
    typer.echo(f"selected on validation: {sel.config} · val {sel.val_mean:.2f} ± {sel.val_std:.2f} · "
               f"test {sel.test_mean:.2f} ± {sel.test_std:.2f} ({sel.seeds} seed(s))")
    runs = len({r["run"] for r in outcome.records})  # a config in both CCAT stages is one run
    typer.echo(f"{runs} runs in {outcome.seconds:.1f} s · written to {folder} "
               "(grid.json, grid.parquet, grid.csv, grid.md, grid.png)")


@app.command("robustness")
@friendly
def robustness_cmd(
    methods: str = typer.Option("concat,edm", help="Comma-separated method specs, NAME[key=value;...] sets options."),
    missing: str = typer.Option("0,0.1,0.2,0.3,0.4,0.5", help="Missing rates η in [0, 1), comma-separated (0 is always added); each modality loses exactly η of its samples, so η ≤ (M−1)/M."),
    protocol: str = typer.Option("both", help="mla (masked in train, val and test), test-only (masked at test only) or both."),
    seeds: str = typer.Option("3", help="A count (3 → seeds 0,1,2) or a list (0,5,9)."),
    cache: str = CACHE, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIM,
    hidden: int = HIDDEN, weight_decay: float = WD, modalities: str = MODALITIES,
    workers: int = WORKERS,
    name: str = typer.Option(None, help="Folder name under --out (default: robustness-time); the same name resumes."),
    out: Path = OUT, quiet: bool = QUIET, schedule: str = SCHEDULE, standardize: str = STANDARDIZE,
    device: str = DEVICE, precision: str = PRECISION, shapley_permutations: int = SHAPLEY,
):
    """Test accuracy of methods as modalities go missing, under the MLA and the EDM-paper protocols.

    Writes OUT/NAME/: one folder per run, robustness.json, .parquet, .csv, .md and .png.
    """
    from cache.synthetic import resolve_caches
    from heads.data import load_head_data
    from heads.robustness import parse_protocols, parse_rates, run_robustness
    from heads.runner import parse_method_spec, parse_seeds, run_folder, split_specs, timestamp

    labels = split_specs(methods)
    names = [parse_method_spec(label)[0] for label in labels]  # every spec is checked before the cache loads
    rates, protocols, seed_list = parse_rates(missing), parse_protocols(protocol), parse_seeds(seeds)
    base = _train_config(names[0], epochs, 0, lr, batch_size, optimizer, hidden, weight_decay, 0.0, 0.0,
                         schedule=schedule, standardize=standardize, device=device, precision=precision,
                         shapley_permutations=shapley_permutations)
    folder = run_folder(out, name or f"robustness-{timestamp()}")
    data = load_head_data(resolve_caches(cache), _split_list(modalities))
    run_robustness(data, labels, rates, seed_list, protocols, base, folder, workers, progress=not quiet)
    typer.echo(f"test split of {data.meta['dataset']} · {len(seed_list)} seed(s) · {epochs} epochs · selection on validation")
    typer.echo((folder / "robustness.md").read_text().rstrip())
    typer.echo(f"written to {folder} (robustness.json, .parquet, .csv, .md, .png)")


@app.command("report")
@friendly
def report_cmd(
    folders: list[Path] = typer.Argument(..., help="Run, compare, grid or robustness folders."),
    out: Path = typer.Option(None, "--out", help="One report.md for all folders here (default: a report.md in each folder)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out: a file of that name, or the report.md in it."),
):
    """Paper-style Markdown tables and PNG figures (per-epoch EDM, φ, order; τ/β curves; robustness curves)."""
    from heads.report import write_report

    for path in write_report(folders, out, overwrite):
        typer.echo(f"wrote {path} (figures beside it)")


@app.command()
def methods():
    """List the head methods and their options with defaults."""
    import dataclasses

    from heads.methods import METHODS

    for name, cls in METHODS.items():
        typer.echo(f"{name}: {cls.summary}")
        typer.echo(f"    trains with {cls.training.describe()}")
        typer.echo(f"        ({cls.training.source})")
        typer.echo(f"    modalities: {cls.modality_rule}")
        for f in dataclasses.fields(cls.Options):
            flag = f"--{f.name.replace('_', '-')}"
            if f.type in (bool, "bool"):
                flag = f"{flag} / --no-{f.name.replace('_', '-')}"
            typer.echo(f"    {flag:34s} default {f.default!r:18s} {f.metadata.get('help', '')}")


cache_commands.register(app, friendly)


def _split_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main():
    """The installed commands (`modality-balance`, `mb`; see pyproject.toml) are this file."""
    app()


if __name__ == "__main__":
    main()
