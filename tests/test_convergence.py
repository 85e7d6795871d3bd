"""Convergence diagnostics (heads/reports/convergence.py): hand-computed on per-epoch rows, the marks
the tables put on a row, and the flag firing on a run cut short."""
import json

import pytest

from heads.reports import convergence as cv
from heads.reports.tables import results_table


def rows(val_loss, val_acc=None, train_loss=None):
    n = len(val_loss)
    val_acc = val_acc or [50.0] * n
    train_loss = train_loss or [1.0] * n
    return [{"epoch": i + 1, "val_loss": val_loss[i], "val_acc": val_acc[i], "train_loss": train_loss[i]}
            for i in range(n)]


def test_window_is_a_tenth_of_the_run_and_at_least_three_epochs():
    assert [cv.window(n) for n in (1, 2, 3, 10, 30, 31, 100)] == [1, 2, 3, 3, 3, 4, 10]


def test_slope_is_the_least_squares_slope():
    assert cv.slope([3.0, 1.0, 2.0]) == pytest.approx(-0.5)  # x̄ = 1, ȳ = 2: (−1·1 + 1·0) / 2
    assert cv.slope([5.0]) == 0.0


def test_loss_still_falling_reads_only_the_last_tenth():
    # 20 epochs: the window is the last 3. Falling there by 0.01 per epoch on a mean of 1.0 (> 0.1%).
    falling = [2.0] * 17 + [1.01, 1.0, 0.99]
    assert cv.loss_still_falling(falling)
    # A fall before the window does not count; a flat window does not either.
    assert not cv.loss_still_falling([3.0 - 0.1 * i for i in range(17)] + [1.0, 1.0, 1.0])
    # A slope within the tolerance (0.0005 per epoch on a mean of 1: 0.05% < 0.1%) is noise.
    assert not cv.loss_still_falling([1.0] * 17 + [1.0005, 1.0, 0.9995])
    assert not cv.loss_still_falling([1.0] * 17 + [0.99, 1.0, 1.01])


def test_diagnose_by_hand():
    r = rows([1.0, 0.8, 0.7, 0.75, 0.9], val_acc=[40.0, 60.0, 70.0, 64.0, 62.0], train_loss=[2.0, 1.0, 0.5, 0.3, 0.2])
    d = cv.diagnose(r, best_epoch=3)
    assert d == {"selected_fraction": 3 / 5, "val_loss_falling": False, "val_acc_drop": 8.0,
                 "final_train_loss": 0.2, "flag": cv.FELL}
    # A drop below DROP_POINTS marks nothing.
    assert cv.diagnose(rows([1.0] * 5, val_acc=[40, 60, 70, 66, 65.5]), 3)["flag"] == ""
    # Still falling wins over a drop: the run was cut short.
    assert cv.diagnose(rows([1.0, 0.9, 0.8, 0.7, 0.6], val_acc=[40, 60, 70, 60, 60]), 3)["flag"] == cv.IMPROVING


def test_row_flag_needs_half_the_runs():
    up, down, none = ({"convergence": {"flag": f}} for f in (cv.IMPROVING, cv.FELL, ""))
    assert cv.row_flag([up, none, none]) == ""
    assert cv.row_flag([up, up, none]) == cv.IMPROVING
    assert cv.row_flag([up, down]) == cv.IMPROVING  # a tie: ↗ first
    assert cv.row_flag([down, down, up]) == cv.FELL
    assert cv.row_flag([{}]) == ""  # written before the diagnostics: no mark


def _result(method, flag):
    test = {"acc": 80.0, "f1": 79.0, "edm": 10.0, "acc_a": 70.0, "delta_a": 5.0, "acc_b": 60.0, "delta_b": -5.0}
    return {"method": method, "training": "adam", "test": test, "convergence": {"flag": flag}}


def test_tables_mark_rows_and_say_what_to_do_once():
    results = [_result("concat", cv.IMPROVING), _result("concat", cv.IMPROVING), _result("mla", ""),
               _result("edm", cv.FELL)]
    table = results_table(results, ["a", "b"])
    assert "| concat ↗ | 2 |" in table and "| mla | 1 |" in table and "| edm ↘ | 1 |" in table
    assert table.count(cv.FOOTNOTE[cv.IMPROVING]) == 1 and table.count(cv.FOOTNOTE[cv.FELL]) == 1
    assert "↗" not in results_table([_result("mla", "")], ["a", "b"])
    line = cv.summary_line({"concat": results[:2], "mla": results[2:3], "edm": results[3:]})
    assert line.startswith("convergence: ↗ concat; ↘ edm")
    assert cv.summary_line({"mla": results[2:3]}) == ""


@pytest.mark.trains
def test_the_flag_fires_on_a_run_cut_short(small_av, tmp_path):
    """Two epochs of SGD at a small rate: validation loss still falls at the end, and results.json says so;
    the same run trained long at a large rate is not marked ↗."""
    from heads.blocks.loading import load_head_data
    from heads.train.config import TrainConfig
    from heads.train.trainer import fit

    data = load_head_data([small_av])
    short = TrainConfig(method="concat", epochs=3, hidden=16, optimizer="sgd", lr=1e-3, schedule="none", batch_size=64)
    fit(data, short, tmp_path / "short", progress=False)
    record = json.loads((tmp_path / "short" / "results.json").read_text())
    assert record["convergence"]["val_loss_falling"] and record["convergence"]["flag"] == cv.IMPROVING
    assert record["convergence"]["selected_fraction"] == record["best_epoch"] / 3
    assert {"best_epoch", "epochs_run", "val", "test", "training"} <= set(record)  # the old keys stay
    assert "↗" in (tmp_path / "short" / "table.md").read_text()
    long = TrainConfig(method="concat", epochs=30, hidden=16, optimizer="adam", lr=1e-2, schedule="none", batch_size=64)
    fit(data, long, tmp_path / "long", progress=False)
    assert json.loads((tmp_path / "long" / "results.json").read_text())["convergence"]["flag"] != cv.IMPROVING
