"""Stage two's commands that read runs rather than train them: ``report``, ``runs``, ``predict`` and
``methods``.

``register(app, guard)`` adds them to a typer app, as ``heads/commands.py`` does the training
commands. Each imports its implementation inside its body, so ``--help`` stays fast; the work lives in
``heads.reports`` (reading result files) and ``heads.train.predictions`` (scoring a saved model).
"""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, guard) -> None:
    """Add the commands that read runs to ``app``, each wrapped in ``guard``."""

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
        from heads.methods.base import HeadMethod

        refused = [n for n, c in METHODS.items() if c.epoch_split is not HeadMethod.epoch_split]
        typer.echo("streamed from the shards (--in-memory no, or auto when a cache does not fit): every method, those "
                   "that read their attached splits between epochs (H1) through streamed views with the same "
                   f"batches; refused: {', '.join(refused) or 'none'} (an epoch split of re-sampled rows), and --stack on")


    @app.command("runs")
    @guard
    def runs_cmd(
        folders: list[Path] = typer.Argument(None, help="Run folders, sweep folders, or folders of them (default: runs)."),
        where: str = typer.Option(None, "--where", help="Keep rows whose columns equal these values: 'method=edm,dataset=cremad'."),
        group_by: str = typer.Option(None, "--group-by", help="Columns to group by (e.g. method, or sweep,label): mean ± std of every metric over the group's runs (its seeds)."),
        out: Path = typer.Option(None, "--out", help="Also write the table: .parquet or .csv (every column) or .md (the printed table)."),
    ):
        """One table of every finished run under the folders: single runs and the runs of compares, grids and robustness sweeps.

        Columns: run, sweep, kind, label, method, options, caches, dataset, backbone, seed, device, epochs,
        best_epoch (the selected epoch), training settings, val_/test_ acc, f1, edm and acc_<modality>, seconds.
        A folder that is not a whole run is listed on stderr and skipped.
        """
        from heads.reports.runs import group, markdown, scan, where as keep, write_frame

        frame, damaged = scan(folders or [Path("runs")])
        for path, reason in damaged:
            typer.echo(f"skipped {path}: {reason}", err=True)
        if frame.height == 0:
            typer.echo("no finished runs found")
            return
        frame = keep(frame, where)
        if group_by:
            frame = group(frame, group_by)
        typer.echo(markdown(frame, grouped=bool(group_by)).rstrip())
        typer.echo(f"{frame.height} row(s)" + (f" · written to {write_frame(frame, out, bool(group_by))}" if out else ""))


    @app.command("predict")
    @guard
    def predict_cmd(
        run: Path = typer.Option(..., "--run", help="A finished run folder (with its model.pt)."),
        cache: str = typer.Option(..., "--cache", help="Cache folder(s), ',' to join backbones; or built-in preset av / avt; its modalities and widths must be the run's."),
        split: str = typer.Option("test", "--split", help="train, val or test."),
        missing_test: float = typer.Option(None, "--missing-test", help="Mask each modality with this rate (test split; default: the run's own rate)."),
        out: Path = typer.Option(..., "--out", help="The table: .parquet (or .csv)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    ):
        """Per-sample predictions of a run: id, label, and the prediction and probability of the full model and of every modality subset."""
        from cache.synthetic import resolve_caches
        from heads.train.predictions import predictions, write_predictions

        if out.suffix not in (".parquet", ".csv"):
            raise ValueError(f"--out must end in .parquet or .csv, got {out.name!r}")
        columns = predictions(run, resolve_caches(cache), split, missing_test, device)
        right = sum(p == y for p, y in zip(columns["pred"], columns["label"]))
        path = write_predictions(columns, out)
        typer.echo(f"{len(columns['id'])} {split} samples · full-set accuracy {100 * right / max(len(columns['id']), 1):.2f}% · "
                   f"written to {path}")
