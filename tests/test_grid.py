"""Grids, seeds, missing-modality sweeps and reports: selection on validation, resume, pruning, masks, CLI.

Every grid here trains the real EDM head on a 5% `av` cache for a few epochs, with one thread (as a
grid worker does), so runs are reproducible across processes and the file stays fast on two cores.
"""
import json
import math
import re
import shutil
import statistics
from collections import Counter
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import cli
from heads.sweeps import axes as grid_axes
from heads.sweeps import grid, jobs, sweep
from heads.errors import OptionError
from heads.train.config import TrainConfig
from heads.train.trainer import fit, Trainer
from heads.blocks.data import SplitTensors
from heads.blocks.loading import load_head_data
from heads.sweeps.robustness import parse_protocols, parse_rates, run_robustness

BASE = TrainConfig(method="edm", epochs=4, hidden=16, batch_size=64)


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Every test here on one thread (the shared fixture in conftest.py)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The `av` preset at 5% size: 300 train, 34 validation, 37 test samples."""
    from cache.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("caches") / "av-tiny", "av-saturated", seed=0, scale=0.05)


@pytest.fixture(scope="module")
def data(tiny):
    return load_head_data([tiny])


@pytest.fixture(scope="module")
def joint(data, tmp_path_factory):
    """An unpruned grid: τ ∈ {0.1, 0.5, 0.9} × seeds {0, 1}, 4 epochs."""
    folder = tmp_path_factory.mktemp("grids") / "joint"
    return grid.run_grid(data, "edm", {"tau": [0.1, 0.5, 0.9]}, [0, 1], BASE, folder, workers=1, progress=False)


PRUNED_AXES = {"tau": [0.1, 0.3, 0.5, 0.7]}
PRUNED_BASE = replace(BASE, epochs=8)


@pytest.fixture(scope="module")
def pruned(data, tmp_path_factory):
    """A pruned grid: 4 configs × seeds {0, 1}, 8 epochs, so milestones 1, 2, 4, 8."""
    folder = tmp_path_factory.mktemp("grids") / "pruned"
    return grid.run_grid(data, "edm", PRUNED_AXES, [0, 1], PRUNED_BASE, folder, prune=True, workers=1, progress=False)


def count_epochs(monkeypatch) -> Counter:
    """Epochs trained in this process, per (τ or method, missing rate, seed), whatever path trains them."""
    trained = Counter()
    real = Trainer.run

    def run(self, until, on_epoch=None):
        before = self.epoch
        real(self, until, on_epoch)
        trained[(self.cfg.options.get("tau", self.cfg.method), self.cfg.missing_train, self.cfg.seed)] += self.epoch - before

    monkeypatch.setattr(Trainer, "run", run)
    return trained


def outcome_of(records):
    return {r["run"]: (r["val"]["acc"], r["test"]["acc"], r["best_epoch"], r["epochs_run"], r["stopped_at"])
            for r in records}


# --- axes ----------------------------------------------------------------------------------------
def test_ranges_are_inclusive_and_exact():
    taus = grid_axes.parse_values("edm", "tau", "0.0:0.9:0.1")
    assert taus == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert 0.3 in taus and 0.30000000000000004 not in taus
    assert grid_axes.parse_values("edm", "tau", "0.1:0.7:0.2") == [0.1, 0.3, 0.5, 0.7]  # 0.6/0.2 = 2.9999…
    assert grid_axes.parse_values("edm", "memory_dim", "0:64:32") == [0, 32, 64]
    assert grid_axes.parse_values("edm", "lr", "1e-3,3e-3,1e-3") == [0.001, 0.003]  # duplicates dropped


def test_axis_words_become_axes():
    axes = grid_axes.parse_axis_args("edm", ["--tau=0.3", "--no-align", "--order", "fixed,random", "--batch-size", "32,64",
                                        "--initial-order", "audio,visual|visual,audio", "--memory"])
    assert axes == {"tau": [0.3], "align": [False], "order": ["fixed", "random"], "batch_size": [32, 64],
                    "initial_order": ["audio,visual", "visual,audio"], "memory": [True]}


@pytest.mark.parametrize("words, message", [
    (["--tau", "0.5:0.1:0.1"], "needs step > 0 and stop ≥ start"),
    (["--tau", "0:0.5:0"], "needs step > 0"),
    (["--tau", "0:0.5"], "a range is start:stop:step"),
    (["--tau", "x"], "--tau expects float values"),
    (["--memory-dim", "0.5"], "--memory-dim expects int values"),
    (["--order", "sideways"], "--order must be one of"),
    (["--batch-size", "0:128:64"], "--batch-size must be positive"),
    (["--missing-train", "0:1:0.5"], "--missing-train must lie in [0, 1)"),
    (["--optimizer", "adam,rmsprop"], "--optimizer must be one of adam, adamw, sgd"),
    (["--rank", "2"], "--rank is neither an option of method 'edm'"),
    (["--tau"], "option --tau needs a value"),
    (["--tau", "0.1", "--tau", "0.2"], "--tau given twice"),
    (["tau", "0.1"], "unexpected argument 'tau'"),
    (["--tau", ","], "--tau has no values"),
])
def test_bad_axes_are_refused(words, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        grid_axes.parse_axis_args("edm", words)


def test_expand_names_runs_by_the_varying_axes():
    specs = grid_axes.expand("edm", {"tau": [0.1, 0.5], "order": ["fixed"], "lr": [0.01]}, BASE, [0, 3])
    assert [s.name for s in specs] == ["tau=0.1-seed0", "tau=0.1-seed3", "tau=0.5-seed0", "tau=0.5-seed3"]
    assert {s.cfg.options["order"] for s in specs} == {"fixed"} and {s.cfg.lr for s in specs} == {0.01}
    assert [s.cfg.options["tau"] for s in specs] == [0.1, 0.1, 0.5, 0.5] and specs[1].cfg.seed == 3


# --- selection -----------------------------------------------------------------------------------
def record(label, seed, val, test, stopped_at=None, loss=1.0, f1=50.0):
    return {"label": label, "values": {"tau": float(label)}, "seed": seed, "stopped_at": stopped_at,
            "val": {"acc": val, "loss": loss, "f1": f1}, "test": {"acc": test, "edm": 0.0}}


def test_selection_reads_validation_never_test():
    records = [record("0.1", 0, 70, 90), record("0.1", 1, 72, 92),  # best test, middle validation
               record("0.5", 0, 80, 60), record("0.5", 1, 78, 64),  # best validation
               record("0.9", 0, 60, 70), record("0.9", 1, 62, 70)]
    sel = grid.select(records)
    assert (sel.config, sel.seeds, sel.val_mean, sel.test_mean) == ("0.5", 2, 79, 62)
    assert sel.val_std == pytest.approx(math.sqrt(2)) and sel.test_std == pytest.approx(math.sqrt(8))
    rows = grid.summarize(records)
    assert [r["config"] for r in rows] == ["0.1", "0.5", "0.9"] and rows[0]["test_acc"] == 91


def test_selection_skips_pruned_configs_and_breaks_ties_by_order():
    records = [record("0.1", 0, 99, 99, stopped_at=2), record("0.5", 0, 80, 50), record("0.9", 0, 80, 90)]
    sel = grid.select(records)
    assert sel.config == "0.5"  # 0.1 looks best but stopped early; 0.5 and 0.9 tie on everything: listed first
    assert sel.tied == ["0.5", "0.9"]


def test_ties_on_validation_accuracy_go_to_lower_loss_then_higher_f1():
    """The stated rule (grid.TIE_RULE): accuracy, then loss (lower), then macro-F1 (higher), then order."""
    tied = [record("0.1", 0, 80, 10, loss=0.9, f1=70), record("0.3", 0, 80, 20, loss=0.7, f1=60),
            record("0.5", 0, 80, 30, loss=0.7, f1=65), record("0.7", 0, 79, 99, loss=0.1, f1=99)]
    sel = grid.select(tied)
    assert sel.config == "0.5" and sel.tied == ["0.1", "0.3", "0.5"]
    assert grid.select(tied[:2]).config == "0.3"  # loss decides before F1
    assert grid.select([record("0.1", 0, 81, 0, loss=5.0)] + tied).tied == []  # no tie, nothing to report


def test_grid_selects_the_best_mean_validation_and_writes_its_files(joint):
    by_config = {}
    for r in joint.records:
        by_config.setdefault(r["label"], []).append(r)
    val = {c: statistics.mean(r["val"]["acc"] for r in rs) for c, rs in by_config.items()}
    best = max(val, key=val.get)
    assert joint.selection.config == best and joint.selection.val_mean == pytest.approx(val[best])
    assert joint.selection.test_mean == pytest.approx(statistics.mean(r["test"]["acc"] for r in by_config[best]))
    folder = joint.folder
    info = json.loads((folder / "grid.json").read_text())
    assert info["selected"]["config"] == best and info["epochs_trained"] == 3 * 2 * 4
    assert len((folder / "grid.csv").read_text().splitlines()) == 1 + 6
    assert all((folder / f).stat().st_size > 0 for f in ("grid.parquet", "grid.md", "grid.png"))
    marked = [line for line in (folder / "grid.md").read_text().splitlines() if "◀" in line]
    assert len(marked) == 1 and marked[0].startswith(f"| {best.split('=')[1]} |")


def test_tampered_test_scores_do_not_move_the_selection(joint, data, tmp_path):
    """Rerun on stored runs whose test (then validation) accuracy was edited: only validation matters."""
    folder = tmp_path / "joint"
    shutil.copytree(joint.folder, folder)
    other = next(c for c in ("tau=0.1", "tau=0.5", "tau=0.9") if c != joint.selection.config)

    def edit(split):
        """Give ``other`` an accuracy above any real one (the selected config may already be at 100)."""
        for seed in (0, 1):
            path = folder / f"{other}-seed{seed}" / "results.json"
            stored = json.loads(path.read_text())
            stored[split]["acc"] = 101.0
            path.write_text(json.dumps(stored))
        return grid.run_grid(data, "edm", {"tau": [0.1, 0.5, 0.9]}, [0, 1], BASE, folder, workers=1, progress=False)

    after = edit("test")
    assert after.selection.config == joint.selection.config
    assert {r["config"]: r["test_acc"] for r in grid.summarize(after.records)}[other] == 101.0
    assert edit("val").selection.config == other


# --- resume --------------------------------------------------------------------------------------
def test_rerun_trains_nothing_and_a_lost_run_trains_alone(joint, data, tmp_path, monkeypatch):
    folder = tmp_path / "joint"
    shutil.copytree(joint.folder, folder)
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*/results.json")}
    trained = count_epochs(monkeypatch)
    again = grid.run_grid(data, "edm", {"tau": [0.1, 0.5, 0.9]}, [0, 1], BASE, folder, workers=1, progress=False)
    assert sum(trained.values()) == 0
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*/results.json")} == stamps
    assert outcome_of(again.records) == outcome_of(joint.records)

    shutil.rmtree(folder / "tau=0.5-seed1")
    again = grid.run_grid(data, "edm", {"tau": [0.1, 0.5, 0.9]}, [0, 1], BASE, folder, workers=1, progress=False)
    assert trained == {(0.5, 0.0, 1): 4}
    assert outcome_of(again.records) == outcome_of(joint.records)  # same seed, same run


def test_changed_settings_are_not_taken_for_stored_runs(joint, data, tmp_path, monkeypatch):
    folder = tmp_path / "joint"
    shutil.copytree(joint.folder, folder)
    trained = count_epochs(monkeypatch)
    # Issue 21: another config under the same name is refused, naming the setting, unless overwrite.
    with pytest.raises(OptionError, match=r"--lr \S+ → 0.003"):
        grid.run_grid(data, "edm", {"tau": [0.1, 0.5, 0.9]}, [0, 1], replace(BASE, lr=3e-3), folder, workers=1,
                      progress=False)
    assert sum(trained.values()) == 0
    grid.run_grid(data, "edm", {"tau": [0.1, 0.5, 0.9]}, [0, 1], replace(BASE, lr=3e-3), folder, workers=1, progress=False,
                  overwrite=True)
    assert sum(trained.values()) == 3 * 2 * 4


def test_interrupted_pruned_grid_completes_each_run_exactly_once(pruned, data, tmp_path, monkeypatch):
    folder = tmp_path / "interrupted"
    trained = count_epochs(monkeypatch)
    real, calls = sweep.advance, []

    def advance(data, job, on_epoch=None):
        calls.append(job.spec.name)
        if len(calls) == 14:  # rungs 1 and 2 took 8 + 4 jobs; one survivor has finished
            raise KeyboardInterrupt
        return real(data, job, on_epoch)

    monkeypatch.setattr(sweep, "advance", advance)
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(data, "edm", PRUNED_AXES, [0, 1], PRUNED_BASE, folder, prune=True, workers=1, progress=False)
    assert any(folder.glob("*/results.json")) and any((folder / ".checkpoints").glob("*.pt"))
    (folder / ".checkpoints" / ".tau=0.1-seed0.pt.4242.tmp").write_bytes(b"half")  # a worker killed mid-save
    monkeypatch.setattr(sweep, "advance", real)
    resumed = grid.run_grid(data, "edm", PRUNED_AXES, [0, 1], PRUNED_BASE, folder, prune=True, workers=1, progress=False)
    assert outcome_of(resumed.records) == outcome_of(pruned.records)  # as if never interrupted
    assert trained == {(r["values"]["tau"], 0.0, r["seed"]): r["epochs_run"] for r in pruned.records}
    assert not (folder / ".checkpoints").exists()


# --- pruning -------------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs, milestones", [
    (100, [12, 25, 50, 100]),  # 12.5 rounds to even
    (80, [10, 20, 40, 80]),
    (8, [1, 2, 4, 8]),
    (4, [1, 2, 4]),  # E/8 = 0.5 → at least epoch 1, the same as E/4
    (1, [1]),
])
def test_halving_milestones(epochs, milestones):
    assert sweep.halving_milestones(epochs) == milestones


def test_pruning_halves_configs_at_milestones_keeping_seeds_together(pruned):
    by_config = {}
    for r in pruned.records:
        by_config.setdefault(r["label"], []).append(r)
    stops = {c: {r["stopped_at"] for r in rs} for c, rs in by_config.items()}
    assert all(len(s) == 1 for s in stops.values())  # every seed of a config stops at the same epoch
    assert sorted(next(iter(s)) or 8 for s in stops.values()) == [1, 1, 2, 8]
    survivor = next(c for c, rs in by_config.items() if rs[0]["stopped_at"] is None)
    assert pruned.selection.config == survivor and pruned.selection.seeds == 2
    assert all(r["epochs_run"] == 8 for r in by_config[survivor])

    def score(config, epoch):
        """Mean over seeds of the best validation accuracy up to ``epoch``, from the runs' epochs.csv."""
        return statistics.mean(max(jobs.csv_column(pruned.folder / r["run"] / "epochs.csv", "val_acc")[:epoch])
                               for r in by_config[config])

    kept_1 = [c for c, rs in by_config.items() if (rs[0]["stopped_at"] or 8) > 1]
    assert max(score(c, 1) for c in by_config if c not in kept_1) <= min(score(c, 1) for c in kept_1)
    dropped_2 = next(c for c, rs in by_config.items() if rs[0]["stopped_at"] == 2)
    assert score(dropped_2, 2) <= score(survivor, 2)
    info = json.loads((pruned.folder / "grid.json").read_text())
    assert info["epochs_trained"] == 2 * (1 + 1 + 2 + 8) and "epoch 1 |" in (pruned.folder / "grid.md").read_text()


def test_worker_processes_give_the_same_grid_as_one_process(data, tmp_path, monkeypatch):
    """Three seeds on two workers: the last rung's runs are cut into pieces handed between processes.

    Two cores are assumed so that each worker runs one thread, like this process: then the arithmetic,
    and so every accuracy, is the same.
    """
    monkeypatch.setattr(sweep, "default_workers", lambda: 2)
    axes, base = {"tau": [0.1, 0.5]}, replace(BASE, epochs=6)
    alone = grid.run_grid(data, "edm", axes, [0, 1, 2], base, tmp_path / "one", prune=True, workers=1, progress=False)
    pooled = grid.run_grid(data, "edm", axes, [0, 1, 2], base, tmp_path / "two", prune=True, workers=2, progress=False)
    assert outcome_of(pooled.records) == outcome_of(alone.records)
    assert {r["threads"] for r in pooled.records} == {1}
    assert pooled.selection == alone.selection


def test_ccat_protocol_tunes_rank_then_beta_at_the_best_rank(data, tmp_path, monkeypatch):
    trained = count_epochs(monkeypatch)
    base = replace(BASE, method="ccat", epochs=2)
    out = grid.run_grid(data, "ccat", {"rank": [1, 2], "beta": [0.15, 0.3]}, [0], base, tmp_path / "c",
                        protocol="ccat", workers=1, progress=False)
    stage1 = [r for r in out.records if r["stage"] == 1]
    stage2 = [r for r in out.records if r["stage"] == 2]
    assert [r["values"] for r in stage1] == [{"rank": 1, "beta": 0.15}, {"rank": 2, "beta": 0.15}]  # β at its default
    rank = grid.select(stage1).values["rank"]
    assert [r["values"] for r in stage2] == [{"rank": rank, "beta": 0.15}, {"rank": rank, "beta": 0.3}]
    assert out.selection == grid.select(stage2)
    # (rank, 0.15) belongs to both stages and is one run: three runs, six epochs.
    assert len(list((tmp_path / "c").glob("*/results.json"))) == 3 and sum(trained.values()) == 3 * 2
    assert "Stage 1" in (tmp_path / "c" / "grid.md").read_text()
    with pytest.raises(OptionError, match="give --lr one value"):
        grid.run_grid(data, "ccat", {"lr": [1e-3, 3e-3]}, [0], base, tmp_path / "d", protocol="ccat", workers=1)


# --- missing modalities --------------------------------------------------------------------------
def complete_split(n: int, modalities: int) -> SplitTensors:
    mods = [f"m{i}" for i in range(modalities)]
    return SplitTensors([f"{i:05d}" for i in range(n)], {m: torch.ones(n, 2) for m in mods},
                        {m: torch.ones(n, 1, 2) for m in mods}, {m: torch.ones(n, dtype=torch.bool) for m in mods},
                        torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("modalities, rate", [(2, 0.1), (2, 0.5), (3, 0.1), (3, 0.5), (3, 0.66)])
def test_masks_realise_the_stated_rate_and_never_empty_a_sample(modalities, rate):
    """Each modality loses exactly round(η·N) of its N samples, and no sample loses every modality,
    up to the feasibility limit (M − 1)/M of complete data (0.66 < 2/3 for three modalities)."""
    n = 2001
    masked = complete_split(n, modalities).with_missing(rate, seed=7)
    present = torch.stack(list(masked.present.values()), 1)
    assert [int((~p).sum()) for p in masked.present.values()] == [round(rate * n)] * modalities
    assert bool(present.any(1).all())
    assert all(float(masked.x[m][~masked.present[m]].abs().sum()) == 0 for m in masked.present)


@pytest.mark.parametrize("modalities, rate", [(2, 0.51), (2, 0.7), (3, 0.7)])
def test_an_unreachable_missing_rate_is_refused(modalities, rate):
    with pytest.raises(ValueError, match="cannot be met"):
        complete_split(1000, modalities).with_missing(rate, seed=0)


def test_incomplete_samples_keep_one_modality():
    split = complete_split(2000, 3)
    split.present["m0"][:1000] = False  # half the samples came without m0
    masked = split.with_missing(0.5, seed=1)
    present = torch.stack(list(masked.present.values()), 1)
    assert bool(present.any(1).all()) and not bool(masked.present["m0"][:1000].any())
    assert int(masked.present["m0"].sum()) == 500 and int(masked.present["m1"].sum()) == 1000


def test_rates_and_protocols_parse():
    assert parse_rates("0.5,0.1,0.1") == [0.0, 0.1, 0.5]
    assert parse_protocols("both") == ["mla", "test-only"] and parse_protocols("test-only") == ["test-only"]
    for bad, parse in (("0.1,1", parse_rates), ("x", parse_rates), ("mla,other", parse_protocols)):
        with pytest.raises(OptionError):
            parse(bad)


def test_robustness_sweep_under_both_protocols(data, tmp_path, monkeypatch):
    trained = count_epochs(monkeypatch)
    base = replace(BASE, epochs=2)
    summary = run_robustness(data, ["concat", "edm"], [0.0, 0.3, 0.5], [0, 1], ["mla", "test-only"], base,
                             tmp_path / "r", workers=1, progress=False)
    # η = 0 is one clean run shared by both protocols: 2 methods × 3 rates × 2 seeds runs in all.
    assert sum(trained.values()) == 2 * 3 * 2 * 2 and len(list(tmp_path.glob("r/*/results.json"))) == 12
    assert {(r["protocol"], r["method"], r["rate"]) for r in summary} == {
        (p, m, r) for p in ("mla", "test-only") for m in ("concat", "edm") for r in (0.0, 0.3, 0.5)}
    assert all(r["seeds"] == 2 for r in summary)
    import polars as pl

    rows = pl.read_parquet(tmp_path / "r" / "robustness.parquet").to_dicts()
    assert rows and all(r["empty_samples"] == 0 for r in rows)
    for r in rows:  # the realised rate is η within one sample, per modality
        for m in data.spec.modalities:
            assert abs(r[f"missing_realised_{m}"] - r["rate"]) <= 0.5 / len(data.test) + 1e-9
    for run in tmp_path.glob("r/*-miss0.5-seed*"):  # MLA masks train too
        masks = json.loads((run / "results.json").read_text())["masks"]
        assert all(abs(masks["train"][f"missing_{m}"] - 0.5) <= 0.5 / len(data.train) for m in data.spec.modalities)
        assert masks["train"]["empty"] == masks["val"]["empty"] == masks["test"]["empty"] == 0
    text = (tmp_path / "r" / "robustness.md").read_text()
    assert "MLA protocol" in text and "Table VI" in text and "η = 50%" in text and "realised missing" in text


def test_test_only_protocol_trains_each_method_and_seed_once(data, tmp_path, monkeypatch):
    trained = count_epochs(monkeypatch)
    base = replace(BASE, method="concat", epochs=2)
    summary = run_robustness(data, ["concat"], [0.0, 0.2, 0.5], [0, 1], ["test-only"], base, tmp_path / "r",
                             workers=1, progress=False)
    assert trained == {("concat", 0.0, 0): 2, ("concat", 0.0, 1): 2}
    assert sorted(r["rate"] for r in summary) == [0.0, 0.2, 0.5]
    # The masked test of the clean model is the test of a run trained with --missing-test 0.5.
    stored = json.loads((tmp_path / "r" / "concat-miss0.0-seed1" / "results.json").read_text())
    direct = fit(data, replace(base, seed=1, missing_test=0.5), progress=False)
    assert stored["missing_test"]["0.5"]["acc"] == direct.test.acc


# --- command line --------------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def test_grid_robustness_and_report_commands(tiny, tmp_path):
    small = ["--cache", tiny, "--epochs", 2, "--workers", 1, "--quiet", "--out", tmp_path]
    result = invoke("grid", "--method", "edm", "--seeds", "0,1", "--tau", "0.2,0.6", "--lr", "1e-3,3e-3",
                    "--hidden", 16, "--name", "g", *small)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "g" / "grid.json").read_text())
    sel = info["selected"]
    assert (f"selected on validation: {sel['config']} · val {sel['val_mean']:.2f} ± {sel['val_std']:.2f} · "
            f"test {sel['test_mean']:.2f} ± {sel['test_std']:.2f}") in result.output
    assert sum(line.startswith("| 0.") for line in result.output.splitlines()) == 4 and "written to" in result.output
    config = json.loads((tmp_path / "g" / "tau=0.6_lr=0.003-seed1" / "config.json").read_text())["train"]
    # Settings not given keep edm's paper defaults (AdamW, batch 64); the source says which were given.
    assert (config["hidden"], config["lr"], config["batch_size"], config["epochs"]) == (16, 0.003, 64, 2)
    assert config["optimizer"] == "adamw" and "EDM paper" in config["training_source"] and "given: lr 0.003" in config["training_source"]

    result = invoke("robustness", "--methods", "concat", "--missing", "0.5", "--protocol", "test-only",
                    "--seeds", 1, "--hidden", 16, "--name", "r", *small)
    assert result.exit_code == 0, result.output
    assert "Missing at test only" in result.output and "η = 50%" in result.output and "MLA" not in result.output

    result = invoke("report", tmp_path / "g", tmp_path / "r", "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'rep' / 'report.md'}" in result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## g (grid)" in text and "## r (robustness)" in text
    for figure in ("g-grid.png", "g-epochs.png", "r-robustness.png"):
        assert (tmp_path / "rep" / figure).read_bytes()[:4] == b"\x89PNG" and f"({figure})" in text


@pytest.mark.parametrize("args, message", [
    (["grid", "--method", "nope"], "unknown method 'nope'"),
    (["grid", "--method", "edm", "--tau", "0.9:0.1:0.1"], "needs step > 0 and stop ≥ start"),
    (["grid", "--method", "edm", "--warmup", "3"], "--warmup is neither an option"),
    (["grid", "--method", "edm", "--protocol", "ccat"], "use --method ccat"),
    (["robustness", "--missing", "0.5,1.2"], "missing rates must lie in [0, 1)"),
    (["robustness", "--methods", "concat,nope"], "unknown method 'nope'"),
    (["report", "/no/such/run"], "no folder /no/such/run"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tiny, tmp_path):
    result = invoke(*args, *(["--cache", tiny, "--out", tmp_path] if args[0] != "report" else []))
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not list(tmp_path.iterdir())  # nothing was written


def test_masks_are_drawn_uniformly_when_the_rate_allows():
    """At a low rate the samples to mask are drawn uniformly among those that keep another modality, so
    some samples lose two of three modalities (about 3·η²·N of them); the fallback that prefers the
    fullest samples (used only when the uniform draw gets stuck) would empty none of them twice."""
    masked = complete_split(3000, 3).with_missing(0.1, seed=0)
    left = torch.stack(list(masked.present.values()), 1).sum(1)
    assert 40 < int((left == 1).sum()) < 160


def test_the_grid_report_names_the_tied_configs_and_the_rule():
    import dataclasses as dc

    from heads.reports.tables import grid_markdown

    records = [record("0.1", 0, 80, 10, loss=0.9), record("0.3", 0, 80, 20, loss=0.7), record("0.5", 0, 70, 30)]
    sel = grid.select(records)
    info = {"method": "edm", "protocol": "joint", "seeds": [0], "prune": False, "selected": dc.asdict(sel),
            "tie_rule": grid.TIE_RULE}
    text = grid_markdown(info, grid.summarize(records))
    assert "Tied on validation accuracy: `0.1`, `0.3`" in text and grid.TIE_RULE in text
    untied = {**info, "selected": {**dc.asdict(sel), "tied": []}}
    assert "Tied" not in grid_markdown(untied, grid.summarize(records))
