"""The progress helper: a plain line with rate and ETA off a terminal, at most every ``every`` seconds."""
import io

from heads.blocks import progress as progress_mod
from heads.blocks.progress import Progress, plain_line


def test_the_plain_line_by_hand():
    # 12 of 24 epochs in 4 s: 3 epochs/s, 12 left → ETA 4 s.
    assert plain_line("grid", 12, 24, 4.0, "epochs") == "grid: 12/24 epochs · 3.00 epochs/s · elapsed 0:04 · ETA 0:04"
    assert plain_line("c", 5, None, 3725.0, "epochs").endswith("elapsed 1:02:05")  # no total: no ETA


def test_off_a_terminal_one_line_at_most_every_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    out = io.StringIO()  # not a tty
    with Progress("train", total=10, stream=out, every=30) as bar:
        for _ in range(10):
            clock[0] += 10  # an epoch every 10 s: a line at 30, 60 and 90 s
            bar.update(advance=1)
    lines = out.getvalue().splitlines()
    assert lines == ["train: 3/10 epochs · 0.10 epochs/s · elapsed 0:30 · ETA 1:10",
                     "train: 6/10 epochs · 0.10 epochs/s · elapsed 1:00 · ETA 0:40",
                     "train: 9/10 epochs · 0.10 epochs/s · elapsed 1:30 · ETA 0:10"]


def test_quiet_prints_nothing():
    out = io.StringIO()
    with Progress("train", total=3, stream=out, every=0, enabled=False) as bar:
        bar.update(advance=3)
    assert out.getvalue() == ""
