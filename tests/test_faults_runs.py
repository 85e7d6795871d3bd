"""Faults and bad input in training runs, grids and comparisons: nothing lost, overwritten or leaked.

Killed sweeps leave no process behind, run folders are never silently replaced or written outside
``--out``, grids too large to be meant are refused before anything starts, and every refusal is one
line. Each test here failed before the fix it guards.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
from heads.sweeps import axes as grid_axes
from heads.sweeps import grid, sweep
from heads.errors import OptionError
from heads.train.config import TrainConfig
from heads.train.trainer import Trainer
from heads.blocks.loading import load_head_data
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The `av` preset at 5% size: 300 train, 34 validation, 37 test samples."""
    from cache.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("caches") / "av-tiny", "av-saturated", seed=0, scale=0.05)


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def one_line_error(result, message: str) -> None:
    """Exit 2, and stderr is exactly one ``error: …`` line containing ``message``; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def count_epochs(monkeypatch) -> list:
    trained = []
    real = Trainer.run

    def run(self, until, on_epoch=None):
        before = self.epoch
        real(self, until, on_epoch)
        trained.append(self.epoch - before)

    monkeypatch.setattr(Trainer, "run", run)
    return trained


# --- 1. killed sweeps leave no process behind ---------------------------------------------------------
def marked(marker: str) -> list[int]:
    """Pids of the processes whose environment carries ``marker``: the command, its workers and
    multiprocessing's resource tracker all inherit it, wherever they were reparented."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    return pids


def workers_ready(pids: list[int], parent: int) -> bool:
    """Both workers have run their initializer to its end (it arms PDEATHSIG and the watchdog first,
    and ignores SIGINT last: bit 2 of the ignored-signal mask in /proc/PID/status)."""
    ready = 0
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        if pid != parent and b"spawn_main" in cmdline and ignored & (1 << (signal.SIGINT - 1)):
            ready += 1
    return ready >= 2


@pytest.fixture
def sweep_process(tiny, tmp_path):
    """Start a long two-worker sweep command in a subprocess; yield (process, marker); kill leftovers."""
    marker = f"MB_FAULT_TEST={uuid.uuid4().hex}"
    started = []

    def start(*args):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", marker.split("=")[0]: marker.split("=")[1]}
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args), "--cache", str(tiny),
                                 "--workers", "2", "--quiet", "--out", str(tmp_path)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        deadline = time.monotonic() + 120
        while not workers_ready(marked(marker), proc.pid):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        return proc, marker

    yield start
    # A broken fix must not leave processes behind on the test machine either. Orphaned workers
    # hold the command's stdout and stderr open, so they go first, then the command is reaped.
    for pid in marked(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def assert_all_gone(marker: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in marked(marker)}
    assert not left, f"processes left behind: {left}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc")
def test_sigkill_of_a_grid_takes_its_workers_and_resource_tracker_along(sweep_process):
    proc, marker = sweep_process("grid", "--method", "concat", "--hidden", "16,32", "--seeds", "1",
                                 "--epochs", 100000, "--name", "g")
    assert len(marked(marker)) >= 4  # the command, two workers, the resource tracker
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert_all_gone(marker)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc")
def test_sigterm_of_a_compare_is_one_line_exit_143_and_stops_its_workers(sweep_process, tmp_path):
    proc, marker = sweep_process("compare", "--methods", "concat,late", "--seeds", "1", "--epochs", 100000,
                                 "--name", "c")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 143
    assert len(lines) == 1 and lines[0].startswith("error: terminated; finished runs are kept"), stderr
    assert_all_gone(marker)
    assert not (tmp_path / "c").exists()  # no run had finished: no empty sweep folder is left


# --- 2. run names: never silently replaced, never outside --out ---------------------------------------
def test_train_head_refuses_an_existing_run_and_overwrite_replaces_it_whole(tiny, tmp_path):
    small = ["--cache", tiny, "--epochs", 1, "--quiet", "--out", tmp_path, "--name", "r"]
    assert invoke("train-head", "--method", "late", *small).exit_code == 0
    run = tmp_path / "r"
    (run / "report.md").write_text("the late run's report")  # a file the new run would not write
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}

    one_line_error(invoke("train-head", "--method", "concat", *small), "exists; add --overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # untouched

    result = invoke("train-head", "--method", "concat", *small, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "results.json").read_text())["method"] == "concat"
    assert not (run / "report.md").exists()  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary folder left beside it


@pytest.mark.parametrize("name", ["../escape", "../../escape", "a/b", "..", ".", "/tmp/escape"])
@pytest.mark.parametrize("command", ["train-head", "compare", "grid", "robustness"])
def test_names_cannot_leave_out(command, name, tiny, tmp_path):
    out = tmp_path / "out"
    extra = {"compare": ["--methods", "concat"], "grid": ["--method", "concat"], "robustness": ["--methods", "concat"]}
    result = invoke(command, *extra.get(command, []), "--cache", tiny, "--epochs", 1, "--seeds", 1, "--quiet",
                    "--workers", 1, "--out", out, "--name", name) if command != "train-head" else \
        invoke(command, "--cache", tiny, "--epochs", 1, "--quiet", "--out", out, "--name", name)
    one_line_error(result, "must be a plain folder name inside --out")
    assert list(tmp_path.iterdir()) == []  # nothing written, inside --out or beside it


def test_an_existing_compare_name_resumes(tiny, tmp_path):
    args = ["compare", "--methods", "concat", "--seeds", 1, "--epochs", 1, "--workers", 1, "--quiet",
            "--cache", tiny, "--out", tmp_path, "--name", "c"]
    assert invoke(*args).exit_code == 0
    again = invoke(*args)
    assert again.exit_code == 0, again.output


# --- 3. report --out --------------------------------------------------------------------------------
def test_report_refuses_an_existing_out_unless_overwrite(tiny, tmp_path):
    assert invoke("train-head", "--cache", tiny, "--epochs", 1, "--quiet", "--out", tmp_path, "--name", "r").exit_code == 0
    target = tmp_path / "rep"
    target.write_text("not a folder")
    one_line_error(invoke("report", tmp_path / "r", "--out", target), "is an existing file; add --overwrite")
    assert target.read_text() == "not a folder"
    result = invoke("report", tmp_path / "r", "--out", target, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (target / "report.md").exists()
    one_line_error(invoke("report", tmp_path / "r", "--out", target), "report.md exists; add --overwrite")
    one_line_error(invoke("report", tmp_path / "r", "/no/such/run", "--out", tmp_path / "new"), "no folder /no/such/run")
    assert not (tmp_path / "new").exists()  # every folder is checked before anything is written


# --- 4. grids that cannot end -------------------------------------------------------------------------
def test_a_huge_range_is_refused_from_its_ends():
    start = time.perf_counter()
    with pytest.raises(OptionError, match="has 1,000,001 values"):
        grid_axes.parse_values("edm", "tau", "0:1000000:1")
    assert time.perf_counter() - start < 1


def test_a_large_grid_asks_for_yes_before_anything_loads(tmp_path):
    result = invoke("grid", "--method", "concat", "--hidden", "1:201:1", "--seeds", 1, "--epochs", 1, "--workers", 1,
                    "--cache", "/no/such/cache", "--quiet", "--out", tmp_path)
    one_line_error(result, "the grid has 201 runs (201 config(s) × 1 seed(s)); add --yes")  # the cache is not read
    assert grid_axes.check_size({"hidden": list(range(201))}, [0], yes=True) == 201
    with pytest.raises(OptionError, match="more than the 100,000 allowed"):
        grid_axes.check_size({"hidden": list(range(1000)), "lr": list(range(1000))}, [0], yes=True)
    assert grid_axes.planned_runs({"rank": [1, 2], "beta": [0.1, 0.2, 0.3], "tau": [0.5]}, [0, 1], "ccat") == 10
    assert not list(tmp_path.iterdir())


def test_a_bad_value_of_an_outer_axis_fails_after_a_few_builds(tiny, monkeypatch, tmp_path):
    """``validate_axes`` tries each value once before the product: 2 builds, not 150."""
    builds = []
    real = grid_axes.build_model
    monkeypatch.setattr(grid_axes, "build_model", lambda cfg, spec: builds.append(cfg) or real(cfg, spec))
    axes = {"tau": [0.1, 1.5], "hidden": list(range(1, 151))}
    with pytest.raises(ValueError, match="--tau must lie in"):
        grid.run_grid(load_head_data([tiny]), "edm", axes, [0], TrainConfig(method="edm", epochs=1),
                      tmp_path / "g", workers=1, progress=False, yes=True)
    assert len(builds) <= 3 and not (tmp_path / "g").exists()


def test_failed_sweeps_leave_no_empty_folder(tiny, tmp_path, monkeypatch):
    small = ["--cache", tiny, "--epochs", 1, "--seeds", 1, "--workers", 1, "--quiet", "--out", tmp_path / "out"]
    one_line_error(invoke("grid", "--method", "edm", "--tau", "0.1,1.5", "--name", "g", *small), "--tau must lie in")
    one_line_error(invoke("compare", "--methods", "edm[tau=1.5]", "--name", "c", *small), "--tau must lie in")
    assert not (tmp_path / "out").exists()

    def interrupted(data, job, on_epoch=None):  # Ctrl-C before any run finished
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "advance", interrupted)
    result = invoke("robustness", "--methods", "concat", "--missing", "0.5", "--name", "r", *small)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert not (tmp_path / "out").exists()


def test_only_the_selected_config_keeps_its_model_and_resume_still_works(tiny, tmp_path, monkeypatch):
    data = load_head_data([tiny])
    base = TrainConfig(method="edm", epochs=2, hidden=16, batch_size=64)
    axes = {"tau": [0.1, 0.5, 0.9]}
    out = grid.run_grid(data, "edm", axes, [0, 1], base, tmp_path / "g", workers=1, progress=False)
    with_model = sorted(p.parent.name for p in (tmp_path / "g").glob("*/model.pt"))
    assert with_model == [f"{out.selection.config}-seed{s}" for s in (0, 1)]
    assert len(list((tmp_path / "g").glob("*/results.json"))) == 6

    trained = count_epochs(monkeypatch)
    again = grid.run_grid(data, "edm", axes, [0, 1], base, tmp_path / "g", workers=1, progress=False)
    assert sum(trained) == 0 and again.selection == out.selection  # finished runs are known without model.pt

    kept = grid.run_grid(data, "edm", axes, [0], base, tmp_path / "k", workers=1, progress=False, keep_models=True)
    assert len(list((tmp_path / "k").glob("*/model.pt"))) == len(kept.records) == 3


def test_compare_and_robustness_keep_every_model(tiny, tmp_path):
    small = ["--cache", tiny, "--epochs", 1, "--seeds", 1, "--workers", 1, "--quiet", "--out", tmp_path]
    assert invoke("compare", "--methods", "concat,late", "--name", "c", *small).exit_code == 0
    assert len(list((tmp_path / "c").glob("*/model.pt"))) == 2
    args = ["robustness", "--methods", "concat", "--protocol", "test-only", "--name", "r", *small]
    assert invoke(*args, "--missing", "0.5").exit_code == 0
    result = invoke(*args, "--missing", "0.5,0.3")  # a new rate is tested on the stored model
    assert result.exit_code == 0, result.output
    assert "η = 30%" in result.output and len(list((tmp_path / "r").glob("*/model.pt"))) == 1


# --- 5. help, progress labels, the installed command --------------------------------------------------
def test_help_shows_the_bracketed_option_syntax():
    def text(command):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        return re.sub(r"\s+", " ", re.sub(r"-\n\s*", "-", result.output))

    assert "edm[order=strong-to-weak]" in text("compare") and "NAME[key=value;...]" in text("compare")
    assert "NAME[key=value;...]" in text("robustness")


class Bar:
    """Stands in for the progress helper (heads/blocks/progress.py) and keeps every description it is given."""

    descriptions: list[str] = []

    def __init__(self, description, **kwargs):
        self.descriptions.append(description)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, description=None, **kwargs):
        if description:
            self.descriptions.append(description)


def test_progress_bars_say_what_runs(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "Progress", Bar)
    small = ["--cache", tiny, "--epochs", 1, "--seeds", 1, "--workers", 1, "--out", tmp_path]
    Bar.descriptions = []
    assert invoke("compare", "--methods", "concat,late", "--name", "c", *small).exit_code == 0
    assert Bar.descriptions[-1] == "compare: 2 run(s)"
    Bar.descriptions = []
    assert invoke("robustness", "--methods", "concat", "--missing", "0.5", "--name", "r", *small).exit_code == 0
    assert Bar.descriptions[-1] == "robustness: 2 run(s)"


def test_the_console_scripts_are_cli_main(monkeypatch, capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts and set(scripts.values()) == {"cli:main"}
    module, _, attr = next(iter(scripts.values())).partition(":")
    main = getattr(__import__(module), attr)
    monkeypatch.setattr(sys, "argv", ["mb", "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0 and "train-head" in capsys.readouterr().out


def test_cli_without_typer_says_how_to_get_the_environment():
    code = ("import sys, runpy; sys.modules['typer'] = None; sys.argv = ['cli.py', '--help']; "
            f"runpy.run_path({str(ROOT / 'cli.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "make env" in lines[0], proc.stderr
