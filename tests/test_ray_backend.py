"""Sweeps on Ray (``--backend ray``, heads/sweeps/backends.py): the same runs, folders and numbers as
``--backend local``, resume that skips finished runs, a worker process killed mid-run and retried by
Ray, and one line when Ray is not installed.

The grids go through the CLI as users type them, on the `av` preset at 5% size (300 train samples)
for 2–4 epochs, on a local Ray instance of 2 CPUs started once for the module. This process trains
the local reference with one thread, as each Ray task does, so the numbers agree bit for bit.
"""
import json
import sys

import pytest
from typer.testing import CliRunner

import cli
from heads.sweeps.backends import INSTALL, KILL_ENV

pytestmark = pytest.mark.ray

GRID = ["grid", "--method", "edm", "--tau", "0.1,0.9", "--hidden", 16, "--batch-size", 64, "--quiet"]
# (sweep, run) whose worker the kill hook ends once: while it trains, after it wrote a checkpoint,
# after it put its finished folder in place (and deleted the checkpoint its retry starts from); and a
# stacked group's task after all its runs were finished.
KILLED = {("killed", "tau=0.1-seed1"): "epoch", ("killed", "tau=0.9-seed0"): "checkpoint",
          ("killed", "tau=0.9-seed1"): "finished", ("stacked-ray", "tau=0.9-seed1"): "finished"}


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """This process trains the local reference with one thread, as a Ray task with one CPU does."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from cache.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("caches") / "av-tiny", "av", seed=0, scale=0.05)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("sweeps")


@pytest.fixture(scope="module")
def cluster(out):
    """A local Ray instance of 2 CPUs, whose workers carry the kill plan of ``KILLED`` (sweep ``killed``)."""
    ray = pytest.importorskip("ray")
    plan = {str(out / sweep / run): when for (sweep, run), when in KILLED.items()}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {KILL_ENV: json.dumps(plan)}})
    yield ray
    ray.shutdown()


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def grid(cache, out, name, *extra):
    result = invoke(*GRID, "--cache", cache, "--out", out, "--name", name, *extra)
    assert result.exit_code == 0, result.output
    return out / name


def numbers(folder) -> dict:
    """Per run: best-epoch validation and test accuracy, epochs trained and where pruning stopped it."""
    runs = {}
    for path in sorted(folder.glob("*/results.json")):
        r = json.loads(path.read_text())
        runs[path.parent.name] = (r["val"]["acc"], r["test"]["acc"], r["epochs_run"], r["stopped_at"])
    return runs


def test_ray_grid_equals_the_local_grid_and_a_rerun_skips_finished_runs(cluster, cache, out):
    local = grid(cache, out, "local", "--seeds", "0,1", "--epochs", 3, "--workers", 1)
    # An interrupted sweep: the seed-0 runs finished, the seed-1 runs never started.
    first = grid(cache, out, "ray", "--seeds", "0,", "--epochs", 3, "--backend", "ray")
    assert sorted(numbers(first)) == ["tau=0.1-seed0", "tau=0.9-seed0"]
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.glob("*/results.json")}
    again = grid(cache, out, "ray", "--seeds", "0,1", "--epochs", 3, "--backend", "ray")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stamps} == stamps  # not retrained, not rewritten
    assert numbers(again) == numbers(local) and len(numbers(local)) == 4
    assert (again / "grid.md").read_text() == (local / "grid.md").read_text()
    assert json.loads((again / "grid.json").read_text())["selected"] == json.loads((local / "grid.json").read_text())["selected"]
    assert not (again / ".checkpoints").exists()


def test_a_killed_worker_is_retried_and_the_sweep_completes_with_the_same_numbers(cluster, cache, out):
    """Pruned (milestones 1, 2, 4), so runs are chains of jobs that end in checkpoints, then a finish
    from one: a retry starts from the checkpoint its first attempt started from, which that attempt
    may have moved on or (finishing) deleted; ``jobs.already_done`` hands back what it wrote."""
    pruned = ["--seeds", "0,1", "--epochs", 4, "--prune"]
    local = grid(cache, out, "pruned-local", *pruned, "--workers", 1)
    killed = grid(cache, out, "killed", *pruned, "--backend", "ray")
    for sweep, run in KILLED:
        assert sweep != "killed" or (killed / f"{run}.killed").exists()  # the hook did end a worker for each
    assert numbers(killed) == numbers(local)
    assert any(stopped is not None for *_, stopped in numbers(local).values())  # pruning did stop runs
    assert (killed / "grid.md").read_text() == (local / "grid.md").read_text()


def test_a_retried_finishing_job_returns_what_its_first_attempt_wrote(cache, tmp_path):
    """A worker that died after putting its run folder in place (checkpoint already deleted): the
    retry, from the same checkpoint epoch, returns the finished run instead of failing to load it."""
    from heads.blocks.loading import load_head_data
    from heads.sweeps.jobs import Job, RunSpec, advance, checkpoint_paths
    from heads.train.config import TrainConfig, resolve_training

    data = load_head_data([cache])
    spec = RunSpec("r", "r", resolve_training(TrainConfig(method="concat", epochs=2, hidden=16)), {"label": "r"})
    first = advance(data, Job(spec, str(tmp_path), 0, 1, False, None))
    assert advance(data, Job(spec, str(tmp_path), 0, 1, False, None)) == first  # the checkpoint already holds epoch 1
    finish = Job(spec, str(tmp_path), 1, 2, True, None)
    done = advance(data, finish)
    assert not checkpoint_paths(tmp_path, "r")[0].exists()
    stamp = (tmp_path / "r" / "results.json").stat().st_mtime_ns
    retried = advance(data, finish)
    assert retried["record"] == json.loads(json.dumps(done["record"])) and retried["epoch"] == 2
    assert (tmp_path / "r" / "results.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("lost, kind", [("WorkerCrashedError", OSError), ("OutOfMemoryError", MemoryError)])
def test_a_task_lost_on_every_attempt_is_one_line_naming_its_run(lost, kind):
    """After Ray's retries a lost task is an error the CLI prints as one line (OSError, MemoryError)."""
    from types import SimpleNamespace

    from heads.sweeps.backends import RayRunner

    errors = pytest.importorskip("ray.exceptions")

    class Lost:
        exceptions = errors

        def wait(self, refs, num_returns):
            return refs[:num_returns], refs[num_returns:]

        def get(self, ref):
            raise getattr(errors, lost)(*(["killed: the node ran low on memory.\nMemory on the node: …"]
                                          if lost == "OutOfMemoryError" else []))

    runner = RayRunner.__new__(RayRunner)  # the runner's wait, on a cluster that loses every attempt
    runner.ray, runner.pending = Lost(), {"ref": (0, SimpleNamespace(spec=SimpleNamespace(name="tau=0.3-seed1")))}
    with pytest.raises(kind, match=r"^run tau=0.3-seed1 failed on Ray \(retried up to 3 times\): \w") as err:
        runner.wait()
    assert "\n" not in str(err.value) and str(err.value).endswith("rerun the same command to resume")


@pytest.mark.parametrize("args, message", [
    (["--backend", "ray"], f"--backend ray needs Ray, which is not installed: {INSTALL}"),
    (["--backend", "spark"], "--backend must be one of local, ray, got 'spark'"),
    (["--gpus-per-run", "0.25"], "--gpus-per-run applies only to --backend ray; add --backend ray or drop it"),
])
def test_backend_errors_are_one_line(args, message, cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    for command in (GRID, ["compare", "--methods", "concat"], ["robustness", "--methods", "concat"]):
        result = invoke(*command, "--seeds", 1, "--epochs", 1, "--cache", cache, "--out", tmp_path, *args)
        assert result.exit_code == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0] == f"error: {message}", result.output
        assert not list(tmp_path.iterdir())


def test_stacked_groups_and_compare_run_as_tasks_with_the_local_numbers(cluster, cache, out):
    """``--stack on``: each stacked group is one task (a list of jobs), its runs' numbers those of the
    local stacked grid, also when the group's worker died after finishing them; ``compare`` goes
    through the same runner."""
    stacked = ["--seeds", "0,1", "--epochs", 2, "--stack", "on", "--prune"]  # rung 1, then finishes from checkpoints
    local = grid(cache, out, "stacked-local", *stacked, "--workers", 1)
    remote = grid(cache, out, "stacked-ray", *stacked, "--backend", "ray")
    assert numbers(remote) == numbers(local) and (remote / "tau=0.9-seed1.killed").exists()
    assert {json.loads(p.read_text())["stacked_with"] for p in remote.glob("*/results.json")} == {2}  # the last rung's pairs
    runs = {}
    for name, extra in (("compare-local", ["--workers", 1]), ("compare-ray", ["--backend", "ray"])):
        result = invoke("compare", "--methods", "concat,late", "--seeds", "0,1", "--epochs", 2, "--hidden", 16, "--quiet",
                        "--cache", cache, "--out", out, "--name", name, *extra)
        assert result.exit_code == 0, result.output
        runs[name] = numbers(out / name)
    assert runs["compare-ray"] == runs["compare-local"] and len(runs["compare-ray"]) == 4
