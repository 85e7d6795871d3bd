"""Stage two's commands for the tool's CLI: ``train-head``, ``compare``, ``grid``, ``robustness``,
``report`` and ``methods``.

``register(app, guard)`` adds them to a typer app; ``guard`` is the CLI's decorator that turns the
tool's errors, Ctrl-C and SIGTERM into one ``error:`` line. Only typer and the standard library are
imported here: each command imports its implementation (torch, the cache, the wings of ``heads``)
inside its body, so ``--help`` stays fast. The commands parse and report; the work, and its checks,
live in ``heads.train`` (one run) and ``heads.sweeps`` (many), testable without typer.
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
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def epoch_text(epochs: int | None) -> str:
    return f"{epochs} epochs" if epochs else "each method's epochs (trained with)"


def _split_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


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
        shapley_permutations: int = SHAPLEY, feature_dtype: str = FEATURE_DTYPE,
    ):
        """Train one head on cached features; method options follow as --name value (e.g. --tau 0.3 --no-align).

        Writes runs/<name>/: config.json (resolved), epochs.csv, results.json, table.md, model.pt.
        An existing run of the same --name is refused unless --overwrite; --name is a folder name inside --out.
        """
        from cache.replace import claim
        from cache.synthetic import resolve_caches
        from heads.blocks.data import load_head_data
        from heads.errors import OptionError
        from heads.methods import method_class
        from heads.train.config import config_from_options
        from heads.train.options import parse_option_args
        from heads.train.resume import checkpointer, drop, resumable_trainer
        from heads.train.rundir import run_folder, timestamp, write_whole
        from heads.train.trainer import fit

        def new_run(folder_name: str) -> Path:
            run_dir = run_folder(out, folder_name)
            if (run_dir.exists() or run_dir.is_symlink()) and not overwrite:
                raise OptionError(f"run {run_dir} exists; add --overwrite to replace it, or choose another --name")
            return run_dir

        method_class(method)
        options = parse_option_args(method, list(ctx.args))
        cfg = config_from_options(method, epochs, seed, lr, batch_size, optimizer, hidden, weight_decay, missing_train,
                            missing_test, options, schedule, standardize, device, precision, epoch_subsets,
                            shapley_permutations)
        if name is not None:
            new_run(name)  # refused before the cache loads
        data = load_head_data(resolve_caches(cache), _split_list(modalities), allow_nonfinite, join, feature_dtype)
        run_dir = run_folder(out, name or f"{method}-{data.meta['dataset']}-seed{seed}-{timestamp()}")
        # How to come back to this run after a stop: the same command, with --name when it was generated.
        again = "rerun the same command" + ("" if name else f" with --name {run_dir.name}")
        with claim(run_dir, "run"):  # a second writer of the same name gets one line, not a lost run
            new_run(run_dir.name)
            trainer = resumable_trainer(data, cfg, run_dir, overwrite)
            if trainer.epoch:
                typer.echo(f"resuming {run_dir} from its checkpoint at epoch {trainer.epoch}/{trainer.cfg.epochs}", err=True)
            elif not name and not quiet:
                typer.echo(f"training into {run_dir}; if it is stopped, {again} to resume", err=True)
            try:
                result = write_whole(run_dir, lambda tmp: fit(data, cfg, tmp, progress=not quiet, trainer=trainer,
                                                                on_epoch=checkpointer(run_dir, cfg, data)))
            except KeyboardInterrupt as err:
                raise type(err)(f"{'terminated' if type(err) is not KeyboardInterrupt else 'interrupted'} at epoch "
                                f"{trainer.epoch}/{trainer.cfg.epochs}; its checkpoint is kept: {again} to resume") from None
            drop(run_dir)
        typer.echo((run_dir / "table.md").read_text().rstrip())
        typer.echo(f"best epoch {result.best_epoch}/{result.config.epochs} · {result.seconds:.1f} s · {run_dir}")


    @app.command()
    @guard
    def compare(
        methods: str = typer.Option(None, help="Comma-separated method specs, NAME[key=value;...] sets options (default: every method)."),
        paper: str = typer.Option(None, "--paper", help="edm, mla, ccat or balancemm: run the methods of that paper's main table (BalanceMM: its results table) that this tool has, each with its own training settings, and print the paper's numbers beside ours."),
        seeds: str = typer.Option("3", help="A count (3 → seeds 0,1,2) or a list (0,5,9)."),
        cache: str = CACHE, allow_nonfinite: bool = NONFINITE, join: str = JOIN, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIM,
        hidden: int = HIDDEN, weight_decay: float = WD, missing_train: float = MISS_TRAIN,
        missing_test: float = MISS_TEST, modalities: str = MODALITIES,
        name: str = typer.Option(None, help="Folder name under --out (default: compare-time); an existing folder of that name is resumed."),
        out: Path = OUT, quiet: bool = QUIET, workers: int = WORKERS, schedule: str = SCHEDULE,
        standardize: str = STANDARDIZE, device: str = DEVICE, precision: str = PRECISION, epoch_subsets: bool = EPOCH_SUBSETS,
        shapley_permutations: int = SHAPLEY, feature_dtype: str = FEATURE_DTYPE,
        overwrite: bool = SWEEP_OVERWRITE,
        same_optimizer: bool = typer.Option(False, "--same-optimizer", help="Train every method under one setting (adam, lr 1e-3, wd 1e-4, no schedule, batch 256, 100 epochs, or the options given) instead of each paper's."),
        tune: str = typer.Option(None, "--tune", help="Each method at its best validated setting: a grid per method, selected on validation, test of the selected setting only. 'lr' = the method's lr × 0.1, 1, 10; or lr=1e-4,1e-3,epochs=50,100 (x0.1 = a factor of the method's own)."),
        prune: bool = typer.Option(False, "--prune", help="With --tune: successive halving within each method's grid."),
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
        from heads.blocks.data import load_head_data
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

        if paper is not None:
            if methods:
                raise OptionError("--paper runs the methods of that paper's table; give --paper or --methods, not both")
            if same_optimizer:
                raise OptionError("--paper trains each method with its paper's settings; drop --same-optimizer "
                                  "(or give --methods for a same-setting comparison)")
            if tune is not None:
                raise OptionError("--paper trains each method with its paper's exact settings; drop --tune "
                                  "(or give --methods to tune them)")
            printed, first = paper_table(paper)
        else:
            specs = split_specs(methods or ",".join(METHODS))
            first = specs[0].split("[")[0]
        seed_list = parse_seeds(seeds)
        if prune and tune is None:
            raise OptionError("--prune applies to --tune's grids; add --tune")
        if tune is not None:  # refused before the cache loads
            check_given(parse_tune(tune), {"lr": lr, "batch_size": batch_size, "optimizer": optimizer,
                                           "weight_decay": weight_decay, "schedule": schedule, "hidden": hidden
                                           if hidden != HIDDEN.default else None, "standardize": None})
        if same_optimizer:
            optimizer, lr, weight_decay = optimizer or SHARED.optimizer, lr or SHARED.lr, SHARED.weight_decay if weight_decay is None else weight_decay
            schedule, batch_size = schedule or SHARED.schedule, batch_size or SHARED.batch_size
            epochs = epochs or SHARED.epochs
        base = config_from_options(first, epochs, 0, lr, batch_size, optimizer, hidden, weight_decay,
                                   missing_train, missing_test, schedule=schedule, standardize=standardize, device=device,
                                   precision=precision, epoch_subsets=epoch_subsets,
                                   shapley_permutations=shapley_permutations)
        folder = run_folder(out, name or f"compare-{paper + '-' if paper else ''}{timestamp()}")
        data = load_head_data(resolve_caches(cache), _split_list(modalities), allow_nonfinite, join, feature_dtype)
        summary = (f"test split of {data.meta['dataset']} · {len(seed_list)} seed(s) · {epoch_text(epochs)} · selection on "
                   f"validation · features standardised: {standardize}")
        if paper is None:
            if tune is None:
                table, results = run_compare(data, specs, seed_list, base, folder, progress=not quiet, workers=workers,
                                             overwrite=overwrite)
            else:
                table, results, _ = compare_tune(data, specs, seed_list, base, folder, tune, prune, progress=not quiet,
                                                 workers=workers)
                summary += " · each method at its best validated setting (--tune; tuned.json)"
            typer.echo(f"{summary}\n{table.rstrip()}")
            line = summary_line(run_groups(results))
            if line:
                typer.echo(line)
            typer.echo(f"written to {folder}")
            return
        body = compare_paper(data, paper, printed, seed_list, base, folder, summary, progress=not quiet,
                             workers=workers, echo=typer.echo, overwrite=overwrite)
        typer.echo(body)
        typer.echo(f"written to {folder} (paper.md beside table.md)")


    @app.command("grid", context_settings=EXTRA)
    @guard
    def grid_cmd(
        ctx: typer.Context,
        method: str = typer.Option(..., help="Method to tune; `cli.py methods` lists its options."),
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
        shapley_permutations: int = SHAPLEY, feature_dtype: str = FEATURE_DTYPE,
        overwrite: bool = SWEEP_OVERWRITE,
        stack: str = typer.Option("auto", "--stack", help="auto (on a GPU, train the configs of a stackable method together as batched tensors), on, or off."),
    ):
        """Tune a method over seeds and select on validation; axes follow as --name values.

        Values: 0.1,0.5 (a list), 0.0:0.9:0.1 (an inclusive range), 'a,b|c,d' (values with commas).
        Any method option or training setting is an axis: --tau 0.0:0.9:0.1 --lr 1e-3,3e-3 --no-align.
        Writes OUT/NAME/: one folder per run, grid.json, grid.parquet, grid.csv, grid.md, grid.png;
        model.pt only in the selected config's runs unless --keep-models. More than 200 runs need --yes.
        """
        from cache.synthetic import resolve_caches
        from heads.blocks.data import load_head_data
        from heads.sweeps.axes import check_size, parse_axis_args
        from heads.sweeps.grid import run_grid
        from heads.sweeps.specs import parse_seeds
        from heads.train.config import config_from_options
        from heads.train.rundir import run_folder, timestamp

        axes = parse_axis_args(method, list(ctx.args))
        seed_list = parse_seeds(seeds)
        check_size(axes, seed_list, protocol, yes)  # before the cache loads
        # Settings that are not axes keep the defaults of train-head, read from the shared options.
        base = config_from_options(method, epochs, 0, None, None, None, HIDDEN.default, None, 0.0, 0.0, device=device,
                             precision=precision, epoch_subsets=epoch_subsets, shapley_permutations=shapley_permutations)
        folder = run_folder(out, name or f"grid-{method}-{timestamp()}")
        data = load_head_data(resolve_caches(cache), _split_list(modalities), allow_nonfinite, join, feature_dtype)
        outcome = run_grid(data, method, axes, seed_list, base, folder, prune, protocol, workers, progress=not quiet,
                           yes=yes, keep_models=keep_models, stack=stack, overwrite=overwrite)
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
        methods: str = typer.Option("concat,edm", help="Comma-separated method specs, NAME[key=value;...] sets options."),
        missing: str = typer.Option("0,0.1,0.2,0.3,0.4,0.5", help="Missing rates η in [0, 1), comma-separated (0 is always added); each modality loses exactly η of its samples, so η ≤ (M−1)/M."),
        protocol: str = typer.Option("both", help="mla (masked in train, val and test), test-only (masked at test only) or both."),
        seeds: str = typer.Option("3", help="A count (3 → seeds 0,1,2) or a list (0,5,9)."),
        cache: str = CACHE, allow_nonfinite: bool = NONFINITE, join: str = JOIN, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH, optimizer: str = OPTIM,
        hidden: int = HIDDEN, weight_decay: float = WD, modalities: str = MODALITIES,
        workers: int = WORKERS,
        name: str = typer.Option(None, help="Folder name under --out (default: robustness-time); the same name resumes."),
        out: Path = OUT, quiet: bool = QUIET, schedule: str = SCHEDULE, standardize: str = STANDARDIZE,
        device: str = DEVICE, precision: str = PRECISION, shapley_permutations: int = SHAPLEY, feature_dtype: str = FEATURE_DTYPE,
        overwrite: bool = SWEEP_OVERWRITE,
    ):
        """Test accuracy of methods as modalities go missing, under the MLA and the EDM-paper protocols.

        Writes OUT/NAME/: one folder per run, robustness.json, .parquet, .csv, .md and .png.
        """
        from cache.synthetic import resolve_caches
        from heads.blocks.data import load_head_data
        from heads.sweeps.robustness import parse_protocols, parse_rates, run_robustness
        from heads.train.config import config_from_options
        from heads.sweeps.specs import parse_method_spec, parse_seeds, split_specs
        from heads.train.rundir import run_folder, timestamp

        labels = split_specs(methods)
        names = [parse_method_spec(label)[0] for label in labels]  # every spec is checked before the cache loads
        rates, protocols, seed_list = parse_rates(missing), parse_protocols(protocol), parse_seeds(seeds)
        base = config_from_options(names[0], epochs, 0, lr, batch_size, optimizer, hidden, weight_decay, 0.0, 0.0,
                             schedule=schedule, standardize=standardize, device=device, precision=precision,
                             shapley_permutations=shapley_permutations)
        folder = run_folder(out, name or f"robustness-{timestamp()}")
        data = load_head_data(resolve_caches(cache), _split_list(modalities), allow_nonfinite, join, feature_dtype)
        run_robustness(data, labels, rates, seed_list, protocols, base, folder, workers, progress=not quiet,
                       overwrite=overwrite)
        typer.echo(f"test split of {data.meta['dataset']} · {len(seed_list)} seed(s) · {epoch_text(epochs)} · selection on validation")
        typer.echo((folder / "robustness.md").read_text().rstrip())
        typer.echo(f"written to {folder} (robustness.json, .parquet, .csv, .md, .png)")


    @app.command("report")
    @guard
    def report_cmd(
        folders: list[Path] = typer.Argument(..., help="Run, compare, grid or robustness folders."),
        out: Path = typer.Option(None, "--out", help="One report.md for all folders here (default: a report.md in each folder)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out: a file of that name, or the report.md in it."),
    ):
        """Paper-style Markdown tables and PNG figures (per-epoch EDM, φ, order; τ/β curves; robustness curves)."""
        from heads.reports.folders import write_report

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
