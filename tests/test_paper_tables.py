"""The papers' tables as data (heads/reports/paper_tables.json) and `compare --paper`."""
import copy
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from cache.importer import import_npz
from heads.reports import papers
from heads.sweeps.specs import parse_method_spec
from heads.methods import METHODS
from heads.reports.tables import paper_results_table
from tests.conftest import ROOT

PAPERS_DIR = ROOT.parent / "shared" / "papers"
# Rows of each table → our method name, as the tables print them (pinned: a wrong mapping runs the
# wrong method beside a paper's number).
MAPPING = {
    "edm": {"Sum": "sum", "Concat": "concat", "OGM": "ogm", "OGM-GE": "ogm-ge", "LFM": "lfm", "CRMT": "crmt",
            "Late Fusion": "late", "MLA": "mla", "Ours": "edm"},
    "mla": {"Sum": "sum", "Concat": "concat", "Late Fusion": "late", "FiLM": "film", "BiGated": "bigated",
            "OGM-GE": "ogm-ge", "QMF": "qmf", "MLA (Ours)": "mla"},
    "ccat": {"Sum": "sum", "Concat": "concat", "FiLM": "film", "BiGated": "bigated", "OGM-GE": "ogm-ge", "QMF": "qmf",
             "MLA": "mla", "MMPareto": "mmpareto", "LFM": "lfm", "CCAT (Ours)": "ccat"},
    "balancemm": {"Unimodal-1": None, "Unimodal-2": None, "Baseline (joint concat)": "concat", "MMCosine": "mmcosine",
                  "UMT": "umt", "MBSD": "mbsd", "CML": "cml", "GBlending": "gblend", "MMPareto": "mmpareto",
                  "LFM": "lfm", "OGM": "ogm-ge", "AGM": "agm", "PMR": "pmr", "Relearning": "relearn",
                  "ReconBoost": "reconboost", "MLA": "mla", "OPM": "opm", "Greedy": "greedy", "AMCo": "amco",
                  "Modality-valuation": "valuation"},
}
# Methods another change adds; until then `--paper` skips them with a note.
PLANNED = {"mmcosine", "cml", "mbsd", "agm", "opm", "amco", "pmr", "relearn", "mslr", "mses", "dimml", "valuation",
           "gblend", "umt", "reconboost", "greedy"}
# BalanceMM's table (METHODS-MORE.md Appendix B), read from its results figure: multimodal accuracy and
# macro-F1 of each row on Kinetics-Sounds and CREMA-D.
BALANCEMM = {"Baseline (joint concat)": (65.63, 65.28, 65.50, 65.07), "MMPareto": (74.55, 74.21, 79.97, 80.57),
             "AGM": (66.62, 65.88, 71.59, 72.11), "Modality-valuation": (68.01, 68.03, 75.85, 76.68),
             "Unimodal-2": (45.31, 43.76, 58.10, 56.81)}


def test_tables_parse_and_every_row_names_its_source():
    tables = papers.load_tables()
    assert list(tables) == ["edm", "mla", "ccat", "balancemm"]
    for name, table in tables.items():
        if name == "balancemm":
            continue  # a results figure, not a paper's text: its own test below
        ids = [c["id"] for c in table["columns"]]
        assert len(set(ids)) == len(ids) and table["rows"] and set(table["metrics"]) <= {"acc", "edm"}
        assert re.fullmatch(r"Table [IVX0-9]+", table["table"]) and table["text"].endswith(".txt")
        for col in table["columns"]:
            assert col["matches"] == [papers._key(m) for m in col["matches"]] and col["backbone_matches"]
        for row in table["rows"]:
            assert row["table"] == table["table"] and row["row"], row  # the source: table and row name
            assert set(row["values"]) == set(ids), (name, row["row"])
            for cid, values in row["values"].items():
                if values is None:  # the paper prints '-'
                    assert cid in row.get("notes", {}), (name, row["row"], cid)
                    continue
                col = next(c for c in table["columns"] if c["id"] == cid)
                expected = {"acc"} | {f"acc_{m}" for m in col["modalities"]}
                if "edm" in table["metrics"]:
                    expected |= {"edm"} | {f"abs_delta_{m}" for m in col["modalities"]}
                assert {k for k in values if not k.endswith("_std")} == expected, (name, row["row"], cid)
                assert all(isinstance(v, float) and 0 <= v <= 200 for v in values.values())
            assert set(row.get("notes", {})) <= set(ids) and set(row.get("options", {})) <= set(ids)


def test_balancemm_table_is_its_results_figure():
    """Every row of BalanceMM's figure, accuracy and macro-F1 on both datasets; the note says it selects on test."""
    table = papers.load_tables()["balancemm"]
    assert table["metrics"] == ["acc", "f1"] and [c["id"] for c in table["columns"]] == ["ks", "cremad"]
    assert len(table["rows"]) == 20 and "selects every number on the test split" in table["remark"]
    for row in table["rows"]:
        assert row["table"] == table["table"] and set(row["values"]) == {"ks", "cremad"}
        assert all(set(v) == {"acc", "f1"} and all(isinstance(x, float) for x in v.values())
                   for v in row["values"].values())
    rows = {r["row"]: r["values"] for r in table["rows"]}
    for name, (ks_acc, ks_f1, cd_acc, cd_f1) in BALANCEMM.items():
        assert rows[name] == {"ks": {"acc": ks_acc, "f1": ks_f1}, "cremad": {"acc": cd_acc, "f1": cd_f1}}


def test_rows_map_to_our_method_names():
    for name, table in papers.load_tables().items():
        assert {row["row"]: row["ours"] for row in table["rows"]} == MAPPING[name]
        for row in table["rows"]:
            assert row["ours"] is None or row["ours"] in METHODS or row["ours"] in PLANNED, row


# --- the stored numbers, read back out of the papers' text ------------------------------------------
def _text(name: str) -> str:
    path = PAPERS_DIR / papers.load_tables()[name]["text"]
    if not path.exists():
        pytest.skip(f"paper text {path} is not here")
    return path.read_text(encoding="utf-8")


def _edm_table_i() -> list[list[float]]:
    """EDM paper Table I, flattened to Markdown rows: 18 numbers a row (9 methods × accuracy, |δ| or EDM)."""
    lines = _text("edm").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Type | Data | Sum | Concat | OGM |"))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        rows.append([float(c) for c in (c.strip() for c in line.strip("|").split("|")) if re.fullmatch(r"\d+\.\d+", c)])
    return rows


def test_edm_table_i_numbers_are_the_papers():
    table = papers.load_tables()["edm"]
    printed = _edm_table_i()
    assert len(printed) == 22 and all(len(r) == 18 for r in printed)
    # Rows of the text in order: each column's modalities (paper order), then Multi.
    stored = []
    for col in table["columns"]:
        for key in [f"_{m}" for m in col["modalities"]] + [""]:  # the paper's order
            line = []
            for row in table["rows"]:
                v = row["values"][col["id"]]
                line += [v[f"acc{key}"], v[f"abs_delta{key}"] if key else v["edm"]]
            stored.append(line)
    for i, (ours, paper) in enumerate(zip(stored, printed)):
        assert ours == paper, f"line {i + 1} of Table I"
    # Spot pins, as the paper's prose states them (§V-B and Table V).
    ours = {r["ours"]: r["values"] for r in table["rows"]}
    assert (ours["edm"]["cremad-resnet"]["acc"], ours["lfm"]["cremad-resnet"]["acc"]) == (84.95, 81.59)
    assert ours["edm"]["mvsa-ola7b"]["acc"] == 80.92 and ours["mla"]["cremad15-ola7b"]["acc"] == 52.42


def test_edm_table_i_columns_are_aligned():
    """EDM = Σ|δ_m| in every cell but the two the data notes: a column shift would break it everywhere."""
    table = papers.load_tables()["edm"]
    for row in table["rows"]:
        for col in table["columns"]:
            v = row["values"][col["id"]]
            total = sum(v[f"abs_delta_{m}"] for m in col["modalities"])
            assert (abs(total - v["edm"]) < 0.025) != (col["id"] in row.get("notes", {})), (row["row"], col["id"])


def _tab_table(text: str, caption: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(caption))
    head = next(i for i in range(start, len(lines)) if lines[i].startswith(header))
    rows = []
    for line in lines[head + 1:]:
        if not line.strip():
            return rows
        rows.append([re.sub(r"<[^>]+>", "", c).strip() for c in line.split("\t")])


@pytest.mark.parametrize("caption, with_std", [("Table 1. Results on audio-video", False),
                                               ("Table 5. The full results", True)])
def test_mla_table_numbers_are_the_papers(caption, with_std):
    table = papers.load_tables()["mla"]
    printed = _tab_table(_text("mla"), caption, "Type\tData")
    names = {"cremad": "CREMA-D", "ks": "KS", "food101": "Food-101", "mvsa": "MVSA", "iemocap": "IEMOCAP"}
    dataset, checked = None, 0
    for cells in printed:
        dataset = cells[1] or dataset
        col = next(c for c in table["columns"] if names[c["id"]] == dataset)
        key = "acc" if cells[2] == "Multi" else "acc_" + next(m for m, p in col["modalities"].items() if p == cells[2])
        assert len(cells[3:]) == len(table["rows"]) == 8
        for row, text in zip(table["rows"], cells[3:]):
            v = row["values"][col["id"]]
            mean, _, std = text.partition(" ± ")
            assert v[key] == float(mean) and (not with_std or v[f"{key}_std"] == float(std)), (row["row"], dataset, key)
            checked += 1
    assert checked == 16 * 8


def test_ccat_table_numbers_are_the_papers():
    table = papers.load_tables()["ccat"]
    printed = _tab_table(_text("ccat"), "Table 1: Performance comparison", "Method\tCREMA-D")[1:]  # [1:]: sub-header
    assert [cells[0] for cells in printed] == [row["row"] for row in table["rows"]]
    keys = [("cremad", "acc"), ("cremad", "acc_audio"), ("cremad", "acc_visual"), ("ks", "acc"), ("ks", "acc_audio"),
            ("ks", "acc_visual"), ("mvsa", "acc"), ("mvsa", "acc_image"), ("mvsa", "acc_text")]
    for row, cells in zip(table["rows"], printed):
        numbers = [c for c in cells[1:] if c]
        assert len(numbers) == 9
        for (cid, key), text in zip(keys, numbers):
            v = row["values"][cid]
            assert (v is None and text == "-") or v[key] == float(text), (row["row"], cid, key)


# --- which methods run, and which column is the cache's ------------------------------------------------
def test_paper_mla_selects_exactly_its_implemented_methods():
    table = papers.load_tables()["mla"]
    rows = papers.plan(table, METHODS, [])
    assert [r.spec.split("[")[0] for r in rows if r.spec] == [row["ours"] for row in table["rows"] if row["ours"] in METHODS]
    assert {r.row["ours"] for r in rows if r.status == papers.NOT_REGISTERED} == set(MAPPING["mla"].values()) - set(METHODS)
    everything = set(MAPPING["mla"].values())
    assert [r.spec.split("[")[0] for r in papers.plan(table, everything, [])] == list(MAPPING["mla"].values())
    unknown = copy.deepcopy(table)
    unknown["rows"].append({"row": "AGM", "ours": None, "table": "Table 1", "values": {}})
    rows = papers.plan(unknown, everything, [])
    assert rows[-1].status == papers.NOT_IMPLEMENTED and rows[-1].spec is None
    assert "note: not implemented, skipped: AGM (their rows" in papers.plan_lines("mla", unknown, rows)
    printed = paper_results_table([], ["audio", "visual"], unknown, rows, unknown["columns"][:1])
    assert "| - | AGM | not implemented | - |" in printed  # kept, not dropped


def test_ccat_runs_with_the_options_of_the_matched_dataset():
    table = papers.load_tables()["ccat"]
    ks = papers.match_columns(table, "ks", ["resnet18"])
    assert [c["id"] for c in ks] == ["ks"]
    assert [r.spec for r in papers.plan(table, {"ccat"}, ks) if r.spec] == ["ccat[rank=2;beta=0.3]"]
    assert [r.spec for r in papers.plan(table, {"ccat"}, []) if r.spec] == ["ccat"]


def test_paper_rows_run_with_their_sources_ogm_alpha_and_ratio_and_the_official_roles():
    """MLA's code produced MLA Table 1's OGM-GE row: α 0.3 and the ratio over the sum of the other scores
    (the EDM table's row follows it, choice); CCAT's keeps the method's defaults. FiLM and BiGated run
    with the official code's role (audio conditions and gates), text where the cache has no audio, the
    method's default where it has neither."""
    tables = papers.load_tables()
    for name in ("mla", "edm"):
        (spec,) = [r.spec for r in papers.plan(tables[name], METHODS, [], ["visual", "audio"]) if r.row["ours"] == "ogm-ge"]
        assert spec == "ogm-ge[alpha=0.3;ratio=sum]"
        assert parse_method_spec(spec) == ("ogm-ge", {"alpha": 0.3, "ratio": "sum"})
    specs = {r.row["ours"]: r.spec for r in papers.plan(tables["ccat"], METHODS, [], ["visual", "audio"]) if r.spec}
    assert (specs["ogm-ge"], specs["film"], specs["bigated"]) == ("ogm-ge", "film[condition=audio]", "bigated[gate=audio]")
    specs = {r.row["ours"]: r.spec for r in papers.plan(tables["mla"], METHODS, [], ["image", "text"]) if r.spec}
    assert (specs["film"], specs["bigated"]) == ("film[condition=text]", "bigated[gate=text]")
    specs = {r.row["ours"]: r.spec for r in papers.plan(tables["mla"], METHODS, [], ["a", "b"]) if r.spec}
    assert (specs["film"], specs["bigated"]) == ("film", "bigated")
    ks = papers.match_columns(tables["ccat"], "ks", ["resnet18"])
    assert papers.row_options({"run_options": {"x": 1}, "options": {"ks": {"x": 2, "y": 3}}}, ks) == {"x": 2, "y": 3}


def test_columns_match_the_caches_dataset_and_backbone():
    edm = papers.load_tables()["edm"]
    ids = lambda dataset, backbones: [c["id"] for c in papers.match_columns(edm, dataset, backbones)]  # noqa: E731
    assert ids("synthetic-av", ["synthetic"]) == [] and ids(None, [None]) == []
    assert ids("CREMA-D", ["resnet18"]) == ids("crema_d", ["resnet18"]) == ["cremad-resnet"]
    assert ids("cremad", ["ola7b"]) == ["cremad15-ola7b"]
    assert ids("cremad", ["whisper-large-v3", "clip-vit-l14"]) == ["cremad-resnet", "cremad15-ola7b"]
    assert ids("mvsa", ["llava7b"]) == ["mvsa-llava7b"] and ids("k400", ["clip"]) == ["k400-resnet"]


# --- the command -------------------------------------------------------------------------------------------
def _tiny_cache(tmp_path, dataset: str):
    """A 2-modality cache named like a paper dataset: 96 samples, 4 classes, 8-dim audio and visual."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 24)
    np.savez(tmp_path / "f.npz", x_audio=rng.normal(size=(96, 8)).astype("float32") + y[:, None],
             x_visual=rng.normal(size=(96, 8)).astype("float32"), y=y)
    return import_npz(tmp_path / "f.npz", tmp_path / dataset, dataset, 0, False)[0]


def _compare(cache, tmp_path, *extra):
    return CliRunner().invoke(cli.app, ["compare", "--cache", str(cache), "--epochs", "1", "--seeds", "1",
                                        "--workers", "1", "--quiet", "--out", str(tmp_path), "--name", "c", *extra])


def test_compare_paper_prints_the_papers_number_beside_ours(tmp_path):
    result = _compare(_tiny_cache(tmp_path, "cremad"), tmp_path, "--paper", "mla")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = next(line for line in lines if line.startswith("| method |"))
    assert "| acc multi | paper acc · CREMA-D (ResNet-18) | macro-F1 |" in head
    mla = next(line for line in lines if line.startswith("| mla | MLA (Ours) | 1 |"))
    assert "| 79.70 ± 0.87 |" in mla
    runs = (tmp_path / "c" / "results.csv").read_text().splitlines()[1:]
    implemented = [o for o in MAPPING["mla"].values() if o in METHODS]
    assert sorted(line.split(",")[0].split("[")[0] for line in runs) == sorted(implemented)
    assert {line.split(",")[0] for line in runs} >= {"ogm-ge[alpha=0.3;ratio=sum]", "film[condition=audio]", "bigated[gate=audio]"}
    assert "· condition audio |" in next(line for line in lines if line.startswith("| film[condition=audio] |"))
    pending = [o for o in MAPPING["mla"].values() if o not in METHODS]
    notes = [line for line in lines if line.startswith("note: not registered yet")]
    assert len(notes) == (1 if pending else 0) and all(o in notes[0] for o in pending)
    for o in pending:  # its row stays, with the paper's number only
        assert next(line for line in lines if line.startswith(f"| {o} |")).count("not registered yet") == 1
    assert (tmp_path / "c" / "paper.md").read_text().rstrip() in result.output


def test_compare_paper_on_a_synthetic_cache_says_it_is_another_dataset(tmp_path):
    """Also: CCAT's row runs the r and β that the paper's staged grid selects on validation here (its
    printed β does not transfer), and the output says which and how many samples the secondary update
    touched. Two epochs: one of pretraining (30% rounded, at least 1), one of stage 2."""
    result = _compare(_tiny_cache(tmp_path, "synthetic-av"), tmp_path, "--paper", "ccat", "--epochs", "2")
    assert result.exit_code == 0, result.output
    head = next(line for line in result.output.splitlines() if line.startswith("| method |"))
    assert "paper acc" not in head
    assert "no paper column: this cache's dataset 'synthetic-av' is none of Table 1's" in result.output
    grid = json.loads((tmp_path / "c" / "grid-ccat" / "grid.json").read_text())
    assert grid["protocol"] == "ccat" and grid["axes"] == {}
    stage1 = [r for r in grid["summary"] if r["stage"] == 1]
    stage2 = [r for r in grid["summary"] if r["stage"] == 2]
    assert sorted(r["values"]["rank"] for r in stage1) == [1, 2, 4, 8, 16] and len(stage2) == 8
    rank, beta = grid["selected"]["values"]["rank"], grid["selected"]["values"]["beta"]
    spec = f"ccat[rank={rank};beta={beta}]"
    assert f"| CCAT (Ours) | {spec} | 85.89 | 79.29 | 80.73 |" in result.output
    line = next(line for line in result.output.splitlines() if line.startswith("ccat: selected on validation"))
    assert f"r = {rank}, β = {beta:g}" in line and re.search(r"audio \d+\.\d%, visual \d+\.\d% of the training samples", line)
    assert line in (tmp_path / "c" / "paper.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--paper", "mla", "--methods", "concat"], "give --paper or --methods, not both"),
    (["--paper", "mla", "--same-optimizer"], "drop --same-optimizer"),
    (["--paper", "nope"], "unknown paper 'nope' for --paper; known: edm, mla, ccat"),
])
def test_compare_paper_errors_are_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "compare", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_balancemm_reference_lists_every_row_with_accuracy_and_f1():
    """On a cache of neither dataset (the built-in data) every BalanceMM row is printed, ours named where
    it runs, with its accuracy and macro-F1 on both datasets."""
    from heads.reports.tables import paper_reference_table

    table = papers.load_tables()["balancemm"]
    rows = papers.plan(table, METHODS, [])
    text = paper_reference_table(table, rows)
    assert "paper F1 · CREMA-D (ResNet-18, trained end to end)" in text
    body = text.splitlines()[2:]
    assert len(body) == 20 and body[2].startswith("| Baseline (joint concat) | concat | 65.63 | 65.28 | 65.50 | 65.07 |")
    assert all(("not implemented" in line) == line.startswith("| Unimodal") for line in body)
