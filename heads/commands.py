"""Stage two's training commands for the tool's CLI: ``train-head``, ``compare``, ``grid`` and
``robustness`` (the commands that read runs, ``report``, ``runs``, ``predict`` and ``methods``, are
``heads/commands_runs.py``).

``register(app, guard)`` adds them to a typer app; ``guard`` is the CLI's decorator that turns the
tool's errors, Ctrl-C and SIGTERM into one ``error:`` line. Only typer and the standard library are
imported here: each command imports its implementation (torch, the cache, the wings of ``heads``)
inside its body, so ``--help`` stays fast. The commands parse and report; the work, and its checks,
live in ``heads.train`` (one run) and ``heads.sweeps`` (many), testable without typer.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import typer

from heads.command_options import (  # noqa: F401  (the shared options, by name)
    CACHE, NONFINITE, JOIN, SWEEP_OVERWRITE, EPOCHS, LR, BATCH, OPTIM, SCHEDULE, STANDARDIZE, HIDDEN, WD, MISS_TRAIN, MISS_TEST, MODALITIES, OUT, QUIET, WORKERS, DEVICE, PRECISION, SHAPLEY, EPOCH_SUBSETS, FEATURE_DTYPE, IN_MEMORY, STREAM_BUFFER, LOG_WITH, LOG_DIR, SWEEP_FILE, EXTRA, TRAIN_KEYS,
    BACKEND, RAY_ADDRESS, CPUS_PER_RUN, GPUS_PER_RUN,
    epoch_text, split_list,
)

def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was typed (or set through the environment) rather than left to its default."""
    return getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def _with_file(ctx: typer.Context, command, values: dict, axes: bool = False) -> tuple[SimpleNamespace, dict]:
    """A sweep command's options with its ``--config`` file's values where none was typed, and the
    file's grid axes (``{name: text}``); each value is read as the option's declared type."""
    import typing

    from heads.train.configfile import coerce, read_config_file, sweep_file

    kinds = {k: v for k, v in typing.get_type_hints(command).items() if k not in ("ctx", "config", "return")}
    values = {k: values[k] for k in kinds} | {"config": values["config"]}
    path = values["config"]
    if path is None:
        return SimpleNamespace(**values), {}
    found, axis_text = sweep_file(read_config_file(path), path, list(kinds), axes)
    for key, raw in found.items():
        if not _typed(ctx, key):
            values[key] = coerce(f"--config {path}: {key}", raw, kinds[key], none=True)
    return SimpleNamespace(**values), axis_text


def _sweep_log(log_with: str | None, log_dir: Path | None):
    from heads.sweeps.tracking import SweepLog
    from heads.train.tracking import parse_log_with

    trackers = parse_log_with(log_with)
    return SweepLog(trackers, log_dir) if trackers else None


def _backend(o: SimpleNamespace):
    """``--backend`` and its Ray options, checked (and Ray's import) before the cache loads."""
    from heads.sweeps.backends import parse_backend

    return parse_backend(o.backend, o.ray_address, o.cpus_per_run, o.gpus_per_run)


def _rerun(ctx: typer.Context, config: Path, values: dict):
    """``train-head --config``: the file's run, the options typed on the command line replacing its keys."""
    from cache import code_version
    from cache.synthetic import resolve_caches
    from heads.errors import OptionError
    from heads.train.configfile import config_from_file, read_config_file, run_file
    from heads.train.options import given_option_args

    doc = read_config_file(config)
    run = run_file(doc, config)
    given = {k: values[k] for k in TRAIN_KEYS if _typed(ctx, k)}
    method = given.get("method", run.train.get("method", "concat"))
    cfg = config_from_file(run, config, given, given_option_args(method, list(ctx.args)))
    if _typed(ctx, "cache") or not run.caches:
        if not _typed(ctx, "cache") and not run.caches:
            raise OptionError(f"--config {config} names no data.caches; give --cache")
        caches = resolve_caches(values["cache"])
    else:
        caches = [path for entry in run.caches for path in resolve_caches(entry)]
    mods = split_list(values["modalities"]) if _typed(ctx, "modalities") else run.modalities
    if doc.get("code_version") not in (None, code_version()):
        typer.echo(f"warning: {config} was trained by code {doc['code_version']}, this is {code_version()}; "
                   "the numbers may differ", err=True)
    return cfg, caches, mods


def register(app: typer.Typer, guard) -> None:
    """Add stage two's commands to ``app``, each wrapped in ``guard``."""

    @app.command("train-head", context_settings=EXTRA)
    @guard
    def train_head(
        ctx: typer.Context,
        method: str = typer.Option("concat", help="Method name; `cli.py methods` lists them and their options."),
        cache: str = CACHE, allow_nonfinite: bool = NONFINITE, join: str = JOIN, epochs: int = EPOCHS,
        seed: int = typer.Option(0, help="Seed for initialisation, shuffling and masks."),
        lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIM, hidden: int = HIDDEN,
        weight_decay: float = WD, missing_train: float = MISS_TRAIN, missing_test: float = MISS_TEST,
        modalities: str = MODALITIES, name: str = typer.Option(None, help="Run folder name (default: method-dataset-seed-time)."),
        out: Path = OUT, quiet: bool = QUIET, schedule: str = SCHEDULE, standardize: str = STANDARDIZE,
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder of the same --name (whole, not merged)."),
        device: str = DEVICE, precision: str = PRECISION, epoch_subsets: bool = EPOCH_SUBSETS,
        shapley_permutations: int = SHAPLEY, feature_dtype: str = FEATURE_DTYPE, in_memory: str = IN_MEMORY, stream_buffer: float = STREAM_BUFFER,
        config: Path = typer.Option(None, "--config", help="Train the run of this config.json (or a YAML file with its keys, docs/configs.md) again; options typed here replace single keys."),
        log_with: str = LOG_WITH, log_dir: Path = LOG_DIR,
    ):
        """Train one head on cached features; method options follow as --name value (e.g. --tau 0.3 --no-align).

        Writes runs/<name>/: config.json (resolved), epochs.csv, results.json, table.md, model.pt.
        An existing run of the same --name is refused unless --overwrite; --name is a folder name inside --out.
        `--config runs/x/config.json` trains that run again (the same numbers).
        """
        import contextlib

        from cache.replace import claim
        from cache.synthetic import resolve_caches
        from heads.blocks.loading import load_head_data
        from heads.errors import OptionError
        from heads.methods import method_class
        from heads.train.config import config_from_options
        from heads.train.options import parse_option_args
        from heads.train.resume import checkpointer, drop, resumable_trainer
        from heads.train.rundir import run_folder, timestamp, write_whole
        from heads.train.tracking import parse_log_with, run_log
        from heads.train.trainer import fit

        def new_run(folder_name: str) -> Path:
            run_dir = run_folder(out, folder_name)
            if (run_dir.exists() or run_dir.is_symlink()) and not overwrite:
                raise OptionError(f"run {run_dir} exists; add --overwrite to replace it, or choose another --name")
            return run_dir

        trackers = parse_log_with(log_with)
        if config is None:
            method_class(method)
            options = parse_option_args(method, list(ctx.args))
            cfg = config_from_options(method, epochs, seed, lr, batch_size, optimizer, hidden, weight_decay, missing_train,
                                missing_test, options, schedule, standardize, device, precision, epoch_subsets,
                                shapley_permutations)
            caches, mods = resolve_caches(cache), split_list(modalities)
        else:
            cfg, caches, mods = _rerun(ctx, config, locals())
        if name is not None:
            new_run(name)  # refused before the cache loads
        data = load_head_data(caches, mods, allow_nonfinite, join, feature_dtype, in_memory, stream_buffer)
        run_dir = run_folder(out, name or f"{cfg.method}-{data.meta['dataset']}-seed{cfg.seed}-{timestamp()}")
        # How to come back to this run after a stop: the same command, with --name when it was generated.
        again = "rerun the same command" + ("" if name else f" with --name {run_dir.name}")
        with claim(run_dir, "run"):  # a second writer of the same name gets one line, not a lost run
            new_run(run_dir.name)
            trainer = resumable_trainer(data, cfg, run_dir, overwrite)
            if trainer.epoch:
                typer.echo(f"resuming {run_dir} from its checkpoint at epoch {trainer.epoch}/{trainer.cfg.epochs}", err=True)
            elif not name and not quiet:
                typer.echo(f"training into {run_dir}; if it is stopped, {again} to resume", err=True)

            def train(tmp: Path):
                log = run_log(trackers, log_dir, tmp, run_dir.name)
                with log or contextlib.nullcontext():
                    return fit(data, cfg, tmp, progress=not quiet, trainer=trainer,
                               on_epoch=checkpointer(run_dir, cfg, data), log=log)

            try:
                result = write_whole(run_dir, train)
            except KeyboardInterrupt as err:
                raise type(err)(f"{'terminated' if type(err) is not KeyboardInterrupt else 'interrupted'} at epoch "
                                f"{trainer.epoch}/{trainer.cfg.epochs}; its checkpoint is kept: {again} to resume") from None
            drop(run_dir)
        typer.echo((run_dir / "table.md").read_text().rstrip())
        typer.echo(f"best epoch {result.best_epoch}/{result.config.epochs} · {result.seconds:.1f} s · {run_dir}")

    @app.command()
    @guard
    def compare(
        ctx: typer.Context,
        methods: str = typer.Option(None, help="Comma-separated method specs, NAME[key=value;...] sets options (default: every method)."),
        paper: str = typer.Option(None, "--paper", help="edm, mla, ccat or balancemm: run the methods of that paper's main table (BalanceMM: its results table) that this tool has, each with its own training settings, and print the paper's numbers beside ours."),
        seeds: str = typer.Option("3", help="A count (3 → seeds 0,1,2) or a list (0,5,9)."),
        cache: str = CACHE, allow_nonfinite: bool = NONFINITE, join: str = JOIN, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIM,
        hidden: int = HIDDEN, weight_decay: float = WD, missing_train: float = MISS_TRAIN,
        missing_test: float = MISS_TEST, modalities: str = MODALITIES,
        name: str = typer.Option(None, help="Folder name under --out (default: compare-time); an existing folder of that name is resumed."),
        out: Path = OUT, quiet: bool = QUIET, workers: int = WORKERS, schedule: str = SCHEDULE,
        standardize: str = STANDARDIZE, device: str = DEVICE, precision: str = PRECISION, epoch_subsets: bool = EPOCH_SUBSETS,
        shapley_permutations: int = SHAPLEY, feature_dtype: str = FEATURE_DTYPE, in_memory: str = IN_MEMORY, stream_buffer: float = STREAM_BUFFER,
        overwrite: bool = SWEEP_OVERWRITE,
        same_optimizer: bool = typer.Option(False, "--same-optimizer", help="Train every method under one setting (adam, lr 1e-3, wd 1e-4, no schedule, batch 256, 100 epochs, or the options given) instead of each paper's."),
        tune: str = typer.Option(None, "--tune", help="Each method at its best validated setting: a grid per method, selected on validation, test of the selected setting only. 'lr' = the method's lr × 0.1, 1, 10; or lr=1e-4,1e-3,epochs=50,100 (x0.1 = a factor of the method's own)."),
        prune: bool = typer.Option(False, "--prune", help="With --tune: successive halving within each method's grid."),
        config: Path = SWEEP_FILE, log_with: str = LOG_WITH, log_dir: Path = LOG_DIR,
        backend: str = BACKEND, ray_address: str = RAY_ADDRESS, cpus_per_run: float = CPUS_PER_RUN, gpus_per_run: float = GPUS_PER_RUN,
    ):
        """Train several methods over several seeds; print and write the paper-style table (mean ± std).

        By default each method trains with its paper's optimizer, rate, schedule and batch size
        (`cli.py methods`); --optimizer/--lr/... override one setting for every method, and
        --same-optimizer runs all of them under one setting for a controlled comparison.

        Methods with options: --methods 'concat,edm[order=weak-to-strong],edm[order=strong-to-weak]'
        (inside brackets separate options with ';' or ',').

        --paper edm|mla|ccat|balancemm runs the rows of that paper's main table instead (EDM paper
        Table I, MLA Table 1, CCAT Table 1, BalanceMM's results table) and adds the paper's number for
        the cache's dataset beside ours; also written to OUT/NAME/paper.md.
        """
        from cache.synthetic import resolve_caches
        from heads.blocks.loading import load_head_data
        from heads.blocks.optim import SHARED
        from heads.errors import OptionError
        from heads.methods import METHODS
        from heads.sweeps.compare import compare as run_compare
        from heads.reports.convergence import summary_line
        from heads.reports.tables import run_groups
        from heads.sweeps.compare import compare_paper, compare_tune, paper_table
        from heads.sweeps.tune import check_given, parse_tune
        from heads.sweeps.specs import parse_seeds, split_specs
        from heads.train.config import config_from_options
        from heads.train.rundir import run_folder, timestamp

        o, _ = _with_file(ctx, compare, locals())
        track, where = _sweep_log(o.log_with, o.log_dir), _backend(o)
        if o.paper is not None:
            if o.methods:
                raise OptionError("--paper runs the methods of that paper's table; give --paper or --methods, not both")
            if o.same_optimizer:
                raise OptionError("--paper trains each method with its paper's settings; drop --same-optimizer "
                                  "(or give --methods for a same-setting comparison)")
            if o.tune is not None:
                raise OptionError("--paper trains each method with its paper's exact settings; drop --tune "
                                  "(or give --methods to tune them)")
            printed, first = paper_table(o.paper)
        else:
            specs = split_specs(o.methods or ",".join(METHODS))
            first = specs[0].split("[")[0]
        seed_list = parse_seeds(o.seeds)
        if o.prune and o.tune is None:
            raise OptionError("--prune applies to --tune's grids; add --tune")
        if o.tune is not None:  # refused before the cache loads
            check_given(parse_tune(o.tune), {"lr": o.lr, "batch_size": o.batch_size, "optimizer": o.optimizer,
                                           "weight_decay": o.weight_decay, "schedule": o.schedule, "hidden": o.hidden
                                           if o.hidden != HIDDEN.default else None, "standardize": None})
        if o.same_optimizer:
            o.optimizer, o.lr, o.weight_decay = o.optimizer or SHARED.optimizer, o.lr or SHARED.lr, SHARED.weight_decay if o.weight_decay is None else o.weight_decay
            o.schedule, o.batch_size = o.schedule or SHARED.schedule, o.batch_size or SHARED.batch_size
            o.epochs = o.epochs or SHARED.epochs
        base = config_from_options(first, o.epochs, 0, o.lr, o.batch_size, o.optimizer, o.hidden, o.weight_decay,
                                   o.missing_train, o.missing_test, schedule=o.schedule, standardize=o.standardize, device=o.device,
                                   precision=o.precision, epoch_subsets=o.epoch_subsets,
                                   shapley_permutations=o.shapley_permutations)
        folder = run_folder(o.out, o.name or f"compare-{o.paper + '-' if o.paper else ''}{timestamp()}")
        data = load_head_data(resolve_caches(o.cache), split_list(o.modalities), o.allow_nonfinite, o.join, o.feature_dtype,
                              o.in_memory, o.stream_buffer)
        summary = (f"test split of {data.meta['dataset']} · {len(seed_list)} seed(s) · {epoch_text(o.epochs)} · selection on "
                   f"validation · features standardised: {o.standardize}")
        if o.paper is None:
            if o.tune is None:
                table, results = run_compare(data, specs, seed_list, base, folder, progress=not o.quiet, workers=o.workers,
                                             overwrite=o.overwrite, track=track, backend=where)
            else:
                table, results, _ = compare_tune(data, specs, seed_list, base, folder, o.tune, o.prune, progress=not o.quiet,
                                                 workers=o.workers, backend=where)
                summary += " · each method at its best validated setting (--tune; tuned.json)"
            typer.echo(f"{summary}\n{table.rstrip()}")
            line = summary_line(run_groups(results))
            if line:
                typer.echo(line)
            typer.echo(f"written to {folder}")
            return
        body = compare_paper(data, o.paper, printed, seed_list, base, folder, summary, progress=not o.quiet,
                             workers=o.workers, echo=typer.echo, overwrite=o.overwrite, track=track, backend=where)
        typer.echo(body)
        typer.echo(f"written to {folder} (paper.md beside table.md)")

    @app.command("grid", context_settings=EXTRA)
    @guard
    def grid_cmd(
        ctx: typer.Context,
        method: str = typer.Option(None, help="Method to tune; `cli.py methods` lists its options."),
        seeds: str = typer.Option("3", help="A count (3 → seeds 0,1,2) or a list (0,5,9)."),
        cache: str = CACHE, allow_nonfinite: bool = NONFINITE, join: str = JOIN, epochs: int = EPOCHS,
        prune: bool = typer.Option(False, help="Successive halving: the worse half of the configs stops at E/8, E/4, E/2."),
        protocol: str = typer.Option("joint", help="joint (every combination of the axes) or ccat (--rank first, then --beta at the best rank)."),
        workers: int = WORKERS,
        modalities: str = MODALITIES,
        name: str = typer.Option(None, help="Folder name under --out (default: grid-METHOD-time); the same name resumes."),
        out: Path = OUT, quiet: bool = QUIET,
        yes: bool = typer.Option(False, "--yes", help="Start a grid of more than 200 runs (without it such a grid is refused, with its size)."),
        keep_models: bool = typer.Option(False, "--keep-models", help="Keep model.pt of every run (default: only the selected config's runs keep theirs)."),
        device: str = DEVICE, precision: str = PRECISION, epoch_subsets: bool = EPOCH_SUBSETS,
        shapley_permutations: int = SHAPLEY, feature_dtype: str = FEATURE_DTYPE, in_memory: str = IN_MEMORY, stream_buffer: float = STREAM_BUFFER,
        overwrite: bool = SWEEP_OVERWRITE,
        stack: str = typer.Option("auto", "--stack", help="auto (on a GPU, train the configs of a stackable method together as batched tensors), on, or off."),
        config: Path = SWEEP_FILE, log_with: str = LOG_WITH, log_dir: Path = LOG_DIR,
        backend: str = BACKEND, ray_address: str = RAY_ADDRESS, cpus_per_run: float = CPUS_PER_RUN, gpus_per_run: float = GPUS_PER_RUN,
    ):
        """Tune a method over seeds and select on validation; axes follow as --name values.

        Values: 0.1,0.5 (a list), 0.0:0.9:0.1 (an inclusive range), 'a,b|c,d' (values with commas).
        Any method option or training setting is an axis: --tau 0.0:0.9:0.1 --lr 1e-3,3e-3 --no-align.
        Writes OUT/NAME/: one folder per run, grid.json, grid.parquet, grid.csv, grid.md, grid.png;
        model.pt only in the selected config's runs unless --keep-models. More than 200 runs need --yes.
        A --config file gives the options and an `axes:` mapping (docs/configs.md).
        """
        from cache.synthetic import resolve_caches
        from heads.blocks.loading import load_head_data
        from heads.errors import OptionError
        from heads.sweeps.axes import check_size, parse_axis_args
        from heads.sweeps.grid import run_grid
        from heads.sweeps.specs import parse_seeds
        from heads.train.config import config_from_options
        from heads.train.rundir import run_folder, timestamp

        o, file_axes = _with_file(ctx, grid_cmd, locals(), axes=True)
        if o.method is None:
            raise OptionError("grid needs --method (or method: in its --config file)")
        words = [w for k, v in file_axes.items() for w in (f"--{k}", v)]
        axes = {**parse_axis_args(o.method, words), **parse_axis_args(o.method, list(ctx.args))}
        seed_list = parse_seeds(o.seeds)
        check_size(axes, seed_list, o.protocol, o.yes)  # before the cache loads
        track, where = _sweep_log(o.log_with, o.log_dir), _backend(o)
        # Settings that are not axes keep the defaults of train-head, read from the shared options.
        base = config_from_options(o.method, o.epochs, 0, None, None, None, HIDDEN.default, None, 0.0, 0.0,
                                   device=o.device, precision=o.precision, epoch_subsets=o.epoch_subsets,
                                   shapley_permutations=o.shapley_permutations)
        folder = run_folder(o.out, o.name or f"grid-{o.method}-{timestamp()}")
        data = load_head_data(resolve_caches(o.cache), split_list(o.modalities), o.allow_nonfinite, o.join, o.feature_dtype,
                              o.in_memory, o.stream_buffer)
        outcome = run_grid(data, o.method, axes, seed_list, base, folder, o.prune, o.protocol, o.workers,
                           progress=not o.quiet, yes=o.yes, keep_models=o.keep_models, stack=o.stack,
                           overwrite=o.overwrite, track=track, backend=where)
        sel = outcome.selection
        typer.echo((folder / "grid.md").read_text().rstrip())
        typer.echo(f"selected on validation: {sel.config} · val {sel.val_mean:.2f} ± {sel.val_std:.2f} · "
                   f"test {sel.test_mean:.2f} ± {sel.test_std:.2f} ({sel.seeds} seed(s))")
        runs = len({r["run"] for r in outcome.records})  # a config in both CCAT stages is one run
        typer.echo(f"{runs} runs in {outcome.seconds:.1f} s · written to {folder} "
                   "(grid.json, grid.parquet, grid.csv, grid.md, grid.png)")


    @app.command("robustness")
    @guard
    def robustness_cmd(
        ctx: typer.Context,
        methods: str = typer.Option("concat,edm", help="Comma-separated method specs, NAME[key=value;...] sets options."),
        missing: str = typer.Option("0,0.1,0.2,0.3,0.4,0.5", help="Missing rates η in [0, 1), comma-separated (0 is always added); each modality loses exactly η of its samples, so η ≤ (M−1)/M."),
        protocol: str = typer.Option("both", help="mla (masked in train, val and test), test-only (masked at test only) or both."),
        seeds: str = typer.Option("3", help="A count (3 → seeds 0,1,2) or a list (0,5,9)."),
        cache: str = CACHE, allow_nonfinite: bool = NONFINITE, join: str = JOIN, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIM,
        hidden: int = HIDDEN, weight_decay: float = WD, modalities: str = MODALITIES,
        workers: int = WORKERS,
        name: str = typer.Option(None, help="Folder name under --out (default: robustness-time); the same name resumes."),
        out: Path = OUT, quiet: bool = QUIET, schedule: str = SCHEDULE, standardize: str = STANDARDIZE,
        device: str = DEVICE, precision: str = PRECISION, shapley_permutations: int = SHAPLEY, feature_dtype: str = FEATURE_DTYPE, in_memory: str = IN_MEMORY, stream_buffer: float = STREAM_BUFFER,
        overwrite: bool = SWEEP_OVERWRITE,
        config: Path = SWEEP_FILE, log_with: str = LOG_WITH, log_dir: Path = LOG_DIR,
        backend: str = BACKEND, ray_address: str = RAY_ADDRESS, cpus_per_run: float = CPUS_PER_RUN, gpus_per_run: float = GPUS_PER_RUN,
    ):
        """Test accuracy of methods as modalities go missing, under the MLA and the EDM-paper protocols.

        Writes OUT/NAME/: one folder per run, robustness.json, .parquet, .csv, .md and .png.
        """
        from cache.synthetic import resolve_caches
        from heads.blocks.loading import load_head_data
        from heads.sweeps.robustness import parse_protocols, parse_rates, run_robustness
        from heads.train.config import config_from_options
        from heads.sweeps.specs import parse_method_spec, parse_seeds, split_specs
        from heads.train.rundir import run_folder, timestamp

        o, _ = _with_file(ctx, robustness_cmd, locals())
        labels = split_specs(o.methods)
        names = [parse_method_spec(label)[0] for label in labels]  # every spec is checked before the cache loads
        rates, protocols, seed_list = parse_rates(o.missing), parse_protocols(o.protocol), parse_seeds(o.seeds)
        track, where = _sweep_log(o.log_with, o.log_dir), _backend(o)
        base = config_from_options(names[0], o.epochs, 0, o.lr, o.batch_size, o.optimizer, o.hidden, o.weight_decay,
                                   0.0, 0.0, schedule=o.schedule, standardize=o.standardize, device=o.device,
                                   precision=o.precision, shapley_permutations=o.shapley_permutations)
        folder = run_folder(o.out, o.name or f"robustness-{timestamp()}")
        data = load_head_data(resolve_caches(o.cache), split_list(o.modalities), o.allow_nonfinite, o.join, o.feature_dtype,
                              o.in_memory, o.stream_buffer)
        run_robustness(data, labels, rates, seed_list, protocols, base, folder, o.workers, progress=not o.quiet,
                       overwrite=o.overwrite, track=track, backend=where)
        typer.echo(f"test split of {data.meta['dataset']} · {len(seed_list)} seed(s) · {epoch_text(o.epochs)} · selection on validation")
        typer.echo((folder / "robustness.md").read_text().rstrip())
        typer.echo(f"written to {folder} (robustness.json, .parquet, .csv, .md, .png)")
