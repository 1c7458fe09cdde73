"""Paper tables: derived columns, rows from stored records, bold / underline, LaTeX, the audit of the reported
tables, every experiment and table config, the make targets, and one table end to end at demo scale."""
from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from conftest import REPO, lnull
from lnull.cli import CONFIG_DIR, compose
from lnull.tables import paper, render
from lnull.tables.derived import derive
from lnull.tables.reported import audit, find, load

REPORTED = REPO / "results" / "reported"
TABLES = sorted(p.stem for p in (CONFIG_DIR / "table").glob("*.yaml") if p.stem != "summary")
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_derived_columns_of_aaai_table_3a_lora():
    base = {"triviaqa": 52.51, "nq_open": 18.83, "webqs": 5.91}
    lora = {"triviaqa": 45.95, "nq_open": 1.16, "webqs": 6.64, "gsm8k": 42.99, "math": 6.26}
    got = derive(lora, base, ["triviaqa", "nq_open", "webqs"], ["gsm8k", "math"], ["avg1", "avg1_per", "avg2", "gm"])
    assert got["avg1_per"] == pytest.approx(64.56, abs=0.005) and got["gm"] == pytest.approx(21.00, abs=0.005)
    assert got["avg1"] == pytest.approx(17.9167, abs=1e-4) and got["avg2"] == pytest.approx(24.625)
    above = derive({**lora, "webqs": 8.0}, base, ["webqs"], [], ["avg1_per"])  # min(100, .) caps a gain
    assert above["avg1_per"] == 100.0
    assert derive({**lora, "math": None}, base, ["triviaqa"], ["gsm8k", "math"], ["avg2", "gm", "avg"]) == \
        {"avg2": None, "gm": None, "avg": None}


def _record(key: str, which: str, bench: str, value, method=None, params=None) -> dict:
    """A valid stored record (lnull.records) with ``value`` for benchmark ``bench``."""
    return {"key": key, "model": which, "identity": "fixture",
            "base_model": {"name": "m", "name_or_path": "m", "sha256": None, "dtype": "bfloat16"},
            "method": None if method is None else {"name": method, "rank": 128, "alpha": 128.0, "options": {},
                                                   "trainable_params": params},
            "calibration": None, "train": None, "benchmark": bench, "kind": "lm_eval", "metric": "exact_match",
            "value": value, "stderr": None if value is None else 0.5, "n": 100,
            "scorer": {"kind": "lm_eval", "version": "1", "lm_eval_version": None, "task": bench, "task_version": None},
            "settings": {}, "details": {}, "seconds": 0.0, "items_per_s": None, "created": "2026-11-24T00:00:00"}


def _store_reported(rows, tcfg, printed, skip=()):
    """Write the papers' printed raw values as the rows' stored records (except rows in ``skip``)."""
    from lnull.evaluate import expected_records
    from lnull.layout import RunLayout

    for row in rows:
        rep = find(printed, row.reported_as, row.paper_rank, row.paper_calib)
        if row.label in skip or rep is None:
            continue
        layout = RunLayout(row.cfg)
        keys = expected_records(layout, "base" if row.is_base else "trained")
        for bench in tcfg["knowledge"] + tcfg["downstream"]:
            value = rep.values.get(bench)  # the pre-trained downstream scores are not printed: "not scored"
            layout.store.write_record(keys[bench], _record(
                keys[bench], "base" if row.is_base else "trained", bench, value,
                None if row.is_base else row.method, None if row.is_base else 320_000_000))


def test_table_rows_are_filled_from_the_store_and_match_the_paper(tmp_path):
    cfg = compose(["table=aaai_3a", f"run.root={tmp_path}"])
    rows = paper.compose_rows(cfg)
    tcfg = cfg["table"]
    printed = load(REPORTED)["aaai:3a"]
    _store_reported(rows, tcfg, printed, skip=("MiLoRA",))
    paper.fill(rows, tcfg)
    by_label = {r.label: r for r in rows}
    lora = by_label["LoRA"]
    assert lora.cells["avg1_per"].value == pytest.approx(64.56, abs=0.005)
    assert lora.cells["gm"].value == pytest.approx(21.00, abs=0.005) and lora.params == 320_000_000
    assert lora.cells["triviaqa"].stderr == 0.5
    assert by_label["MiLoRA"].cells["gsm8k"].missing == "not run"  # never 0
    assert by_label["MiLoRA"].cells["gm"].value is None
    assert [label for label, ok in paper.status(rows) if not ok] == ["MiLoRA"]

    md = render.markdown("t", rows, paper.columns(tcfg))
    milora = next(line for line in md.splitlines() if line.startswith("| MiLoRA"))
    assert "0.00" not in milora and render.MISSING in milora and "not run yet" in md
    assert next(line for line in md.splitlines() if line.startswith("| LoRA |")).startswith("| LoRA | 320M |")
    reported = [find(printed, r.reported_as, 128, 256) for r in rows]
    comparison = render.comparison_markdown(rows, paper.columns(tcfg), reported)
    assert "45.95 / 45.95 (+0.00)" in comparison


def test_rows_of_a_calibration_sweep_stay_distinct(tmp_path):
    cfg = compose(["table=aaai_4a", f"run.root={tmp_path}"])
    rows = paper.compose_rows(cfg)[1:]
    assert sorted(r.cfg["calibration"]["samples"] for r in rows) == [64, 64, 256, 256, 1024, 1024]
    from lnull.evaluate import expected_records
    from lnull.layout import RunLayout

    keys = {expected_records(RunLayout(r.cfg), "trained")["gsm8k"] for r in rows}
    assert len(keys) == 6  # one record per (method, calibration size)
    _store_reported([paper.compose_rows(cfg)[0]] + rows, cfg["table"], load(REPORTED)["aaai:4a"])
    rows = paper.compose_rows(cfg)
    paper.fill(rows, cfg["table"])
    printed = load(REPORTED)["aaai:4a"]
    for row in rows[1:]:  # each row reads its own record: the one stored for its calibration size
        assert row.cells["avg1"].value == pytest.approx(find(printed, row.reported_as, 128, row.x).values["avg1"],
                                                        abs=0.01)
    assert len({r.cells["avg1"].value for r in rows[1:]}) == 6
    assert [r.x for r in rows[1:4]] == [64, 256, 1024]


def _rows_with(values: dict[str, float], stderr: dict[str, float] | None = None) -> list[paper.Row]:
    rows = []
    for label, v in values.items():
        row = paper.Row(label, "base" if label == "pre" else "m", {}, "m")
        row.cells["x"] = paper.Cell(v, (stderr or {}).get(label, 0.0))
        rows.append(row)
    return rows


def test_best_is_bold_and_runner_up_underlined_among_methods_only():
    rows = _rows_with({"pre": 9.0, "a": 3.0, "b": 5.0, "c": 4.5, "d": 4.0, "e": None})
    assert render.ranks(rows, "x") == {2: 1, 3: 2}  # the pre-trained row never ranks
    md = render.markdown("t", rows, ["x"])
    assert "| b | - | **5.00 ± 0.00** |" in md and "| c | - | <u>4.50 ± 0.00</u> |" in md and "| pre | - | 9.00 ± 0.00 |" in md
    assert render.MARKS_NOTE in md and "| e | - | — |" in md
    tex = render.latex("t", rows, ["x"])
    assert r"\textbf{5.00}" in tex and r"\underline{4.50}" in tex
    assert render.ranks(rows, "x", lower_is_better=True) == {1: 1, 4: 2}


def test_ties_and_differences_within_one_standard_error_get_no_mark():
    tied = _rows_with({"pre": 9.0, "a": 3.0, "b": 5.0, "c": 5.0, "d": 4.0})
    assert render.ranks(tied, "x") == {}  # a shared best is no best, and no runner-up below it
    md = render.markdown("t", tied, ["x"])
    assert "**" not in md.split(render.MARKS_NOTE)[0].replace("**bold**", "") and "<u>5" not in md
    zeros = _rows_with({"pre": 0.0, "a": 0.0, "b": 0.0})
    assert render.ranks(zeros, "x") == {}
    # 5.0 vs 4.5 with standard errors 0.4 and 0.3: 0.5 apart, within sqrt(0.4² + 0.3²) = 0.5 -> no best
    close = _rows_with({"a": 5.0, "b": 4.5, "c": 1.0}, {"a": 0.4, "b": 0.3, "c": 0.1})
    assert render.ranks(close, "x") == {}
    # a clear best, then a runner-up within the noise of the third: bold only
    runner = _rows_with({"a": 9.0, "b": 4.5, "c": 4.0}, {"a": 0.1, "b": 0.4, "c": 0.4})
    assert render.ranks(runner, "x") == {0: 1}
    # 1 of 4 (25.00 ± 21.65) against two 0 of 4: 25 apart, more than the difference's 21.65: bold; the tie at 0
    # below it gets no underline
    mbpp = _rows_with({"a": 25.0, "b": 0.0, "c": 0.0}, {"a": 21.65, "b": 0.0, "c": 0.0})
    assert render.ranks(mbpp, "x") == {0: 1}
    assert render.ranks(_rows_with({"a": 25.0, "b": 5.0}, {"a": 21.65, "b": 0.0}), "x") == {}
    # no standard error known (a derived Kept % or GM): no mark, whatever the values
    unknown = _rows_with({"a": 9.0, "b": 1.0, "c": 0.0})
    for row in unknown:
        row.cells["x"].stderr = None
    assert render.ranks(unknown, "x") == {}


def test_latex_is_balanced_and_escaped():
    rows = _rows_with({"pre": 1.0, "LoRA_FA (r=235) 50% & #1": 2.0})
    rows[1].cells["x"].value = None
    tex = render.latex("Table_3a: 100% & more", rows, ["x"])
    assert r"LoRA\_FA (r=235) 50\% \& \#1" in tex and r"Table\_3a: 100\% \& more" in tex
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    assert tex.count("{") == tex.count("}")
    body = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert len(body) == 3 and all(line.count(" & ") == 2 for line in body)  # header + 2 rows, 3 columns each
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex
    assert "---" in tex  # the missing cell


def test_audit_finds_the_papers_inconsistencies_and_planted_ones(tmp_path):
    real = {(d.table, d.row, d.column) for d in audit(load(REPORTED))}
    assert real == {("aaai:3b", "pissa r=128 n=256", "avg1_per"), ("aaai:3d", "lora_null r=128 n=256", "avg1_per"),
                    ("extended:3a", "lora_null_v2 r=128 n=256", "avg")}
    text = (REPORTED / "lora_null_results.csv").read_text()
    planted = text.replace("aaai,3a,llama-2-7b,math,lora,128,256,320M,gm,21.00",
                           "aaai,3a,llama-2-7b,math,lora,128,256,320M,gm,21.05")
    planted = planted.replace("extended,1a,llama-2-7b,math,full,128,256,6738M,avg,22.86",
                              "extended,1a,llama-2-7b,math,full,128,256,6738M,avg,22.88")
    assert planted != text
    (tmp_path / "lora_null_results.csv").write_text(planted)
    found = {(d.table, d.row, d.column) for d in audit(load(tmp_path))}
    assert found - real == {("aaai:3a", "lora r=128 n=256", "gm"), ("extended:1a", "full r=128 n=256", "avg")}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_with_every_method(name):
    for method in ("lora", "full", "oplora", "corda_kpm"):
        cfg = compose([f"+experiment={name}", f"method={method}"])
        assert cfg["method"]["name"] == method


@pytest.mark.parametrize("name", TABLES)
def test_every_table_config_composes_its_rows_at_both_scales(name, tmp_path):
    for scale in ([], ["+scale=demo"]):
        cfg = compose([f"table={name}", f"run.root={tmp_path}", *scale])
        rows = paper.compose_rows(cfg)
        if cfg["table"]["kind"] == "results":
            paper.check_benchmarks(rows, cfg["table"])
            assert paper.columns(cfg["table"])[:3] == ["triviaqa", "nq_open", "webqs"]
        if scale:
            assert all(r.cfg["model"]["name"] == "smollm2-135m-instruct" for r in rows)
            assert all(r.cfg["method"]["rank"] <= 16 for r in rows[1:])  # 235 / 16 -> 15
        if cfg["table"]["reported"] and cfg["table"]["kind"] == "results":
            printed = load(REPORTED)[cfg["table"]["reported"]]
            transcribed = {p.method for p in printed}  # extended 1c has no LoRA-FA rows in the CSV
            for r in rows:
                found = find(printed, r.reported_as, r.paper_rank, r.paper_calib)
                assert found is not None or r.reported_as not in transcribed, (name, r.label)


@pytest.mark.parametrize("sweep, table, scale", [("sweep_rank", "aaai_4b", ""), ("sweep_calib", "aaai_4a", ""),
                                                 ("sweep_rank_demo", "aaai_4b", "demo"),
                                                 ("sweep_calib_demo", "aaai_4a", "demo")])
def test_sweep_files_run_the_rows_of_their_table(sweep, table, scale):
    import yaml

    spec = yaml.safe_load((CONFIG_DIR / "experiment" / f"{sweep}.yaml").read_text())["hydra"]["sweeper"]["params"]
    grid = {(m, int(v)) for m in spec["method"].split(",") for v in next(
        val for key, val in spec.items() if key != "method").split(",")}
    cfg = compose([f"table={table}", *(["+scale=demo"] if scale else [])])
    key = "rank" if table == "aaai_4b" else "samples"
    rows = {(r.method, r.cfg["method"]["rank"] if key == "rank" else r.cfg["calibration"]["samples"])
            for r in paper.compose_rows(cfg)[1:]}
    assert grid == rows


TARGETS = ["table1", "table2", "table3", "table4", "ext-table1", "ext-table2", "ext-table3", "ext-table5",
           "sweep-rank", "sweep-calib", "figures", "list"]


@pytest.mark.parametrize("target", TARGETS)
def test_make_dry_run_of_every_target(target):
    for scale in ("paper", "demo"):
        out = subprocess.run(["make", "-n", target, f"SCALE={scale}"], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "lnull" in out.stdout
        if scale == "demo":
            assert "scale=demo" in out.stdout
    assert subprocess.run(["make", "-n", "ext-table4"], cwd=REPO, capture_output=True, text=True).returncode == 0


@pytest.mark.slow  # ~50 s: `lnull list` composes every row of every table (each spec composes in the default suite)
def test_cli_audit_and_list(tmp_path):
    audit_out = lnull("table", "--audit", f"table.out_dir={tmp_path}", check=True)
    assert "aaai:3b pissa" in audit_out.stdout and (tmp_path / "audit.md").exists()
    listed = lnull("list", f"run.root={tmp_path}", check=True).stdout
    for name in TABLES:
        assert re.search(rf"^{name}\s+\d+/\d+ rows done", listed, re.M), name


@pytest.mark.slow
@pytest.mark.integration
def test_one_table_end_to_end_at_demo_scale_on_the_tiny_model(tmp_path):
    import os
    from pathlib import Path

    from lnull.assets import asset_path

    cache = os.environ.get("LNULL_ASSETS_CACHE") or str(Path.home() / ".cache" / "lnull")
    try:
        for name in ("nq_open", "triviaqa", "webqs", "gsm8k", "math"):
            asset_path(name, "test", cache_dir=cache)
    except (FileNotFoundError, ValueError):
        pytest.skip("offline test sets absent: run `lnull assets`")
    args = ["table", "table=aaai_3a", "table.run_missing=true", "+scale=demo", "table.overrides=['model=tiny']",
            f"run.root={tmp_path / 'runs'}", f"table.out_dir={tmp_path / 'tables'}", "progress=false",
            f"cache_dir={cache}"]
    start = time.perf_counter()
    lnull(*args, check=True)
    assert time.perf_counter() - start < 600
    md = (tmp_path / "tables" / "aaai_3a.md").read_text()
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    # 6 rows in the papers' columns and in the likelihood columns, 5 paired changes (demo scale: no "ours / paper")
    assert len(body) == 6 + 6 + 5 and "not run yet" not in md and "Direction" in md
    assert (tmp_path / "tables" / "aaai_3a.tex").exists() and (tmp_path / "tables" / "aaai_3a.csv").exists()
    again = lnull(*args, check=True)  # everything stored: nothing recomputed
    assert "] done in" not in "".join(l for l in again.stdout.splitlines() if not l.startswith("[table]"))
    listed = lnull("list", "+scale=demo", "table.overrides=['model=tiny']", f"run.root={tmp_path / 'runs'}",
                   f"cache_dir={cache}", check=True).stdout
    assert re.search(r"^aaai_3a\s+6/6 rows done", listed, re.M)
    shutil.rmtree(tmp_path / "runs")


def test_demo_scale_tables_go_to_their_own_folder_whoever_builds_them(tmp_path):
    """`+scale=demo` writes under results/tables/demo/ (configs/scale/demo.yaml), not over the paper-scale files,
    whether or not the caller passes table.out_dir (the Makefile does; a plain `lnull table` does not)."""
    assert compose(["table=aaai_3a"])["table"]["out_dir"] == "results/tables"
    assert compose(["table=aaai_3a", "+scale=demo"])["table"]["out_dir"] == "results/tables/demo"
    assert compose(["table=aaai_3a", "+scale=demo", "table.out_dir=x"])["table"]["out_dir"] == "x"  # explicit wins
    lnull("table", "table=aaai_3a", "+scale=demo", "table.overrides=['model=tiny']", f"run.root={tmp_path / 'runs'}",
          "progress=false", f"table.reported_dir={REPO / 'results' / 'reported'}", cwd=tmp_path, check=True)
    assert (tmp_path / "results" / "tables" / "demo" / "aaai_3a.md").is_file()
    assert not list((tmp_path / "results" / "tables").glob("aaai_3a.*"))
