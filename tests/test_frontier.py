"""The learning-forgetting frontier (``lnull frontier``): interpolation at matched learning, the paired bootstrap,
Pareto marks, grid widening, and the table built from fixture records with missing points shown as missing."""
from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from conftest import REPO
from lnull.cli import compose
from lnull.tables import frontier
from lnull.tables.frontier_stats import (PointItems, bootstrap_matched, log_grid, loss_at, matched_level, pareto,
                                         widened)


def test_loss_at_interpolates_along_the_curve_and_takes_the_least_loss_where_it_crosses_twice():
    curve = [(10.0, 0.0), (30.0, 0.2), (50.0, 0.6)]
    assert loss_at(curve, 20.0) == pytest.approx(0.1)
    assert loss_at(curve, 40.0) == pytest.approx(0.4)
    assert loss_at(curve, 50.0) == pytest.approx(0.6) and loss_at(curve, 60.0) is None
    # past its best rate the curve comes back: at 40 % it is (0.4 on the way up, 0.9 on the way down)
    assert loss_at(curve + [(30.0, 1.0)], 40.0) == pytest.approx(0.4)
    assert matched_level({"a": curve, "b": [(10.0, 0.0), (45.0, 0.3)]}) == 45.0


def test_pareto_marks_only_points_no_other_point_beats_on_both_axes():
    points = [(50.0, 0.5), (40.0, 0.2), (45.0, 0.6), (50.0, 0.5), (30.0, 0.3)]
    assert pareto(points) == [True, True, False, True, False]  # equal points do not dominate each other


def _items(rng, n, shift, spread=0.05):
    return np.asarray([[shift + rng.gauss(0, spread) for _ in range(n)]])


def _task(hits, n=100):
    return np.asarray([[100.0] * hits + [0.0] * (n - hits)])


def test_a_method_below_another_at_every_task_level_is_reported_as_keeping_more():
    rng = random.Random(1)
    base = np.asarray([0.0] * 95 + [100.0] * 5)
    curve = {"lora": [(20, 0.2), (40, 0.5), (60, 1.0)], "null": [(20, 0.1), (40, 0.25), (60, 0.5)]}
    methods = {m: [PointItems(lr, _task(hits), [_items(rng, 80, lost), _items(rng, 60, lost)])
                   for lr, (hits, lost) in zip((1e-4, 1e-3, 1e-2), pts)] for m, pts in curve.items()}
    per_method, per_pair = bootstrap_matched(base, methods, 50.0, [("null", "lora"), ("lora", "null")], iters=300)
    assert per_method["lora"].value == pytest.approx(0.75, abs=0.02)  # between (40, 0.5) and (60, 1.0)
    assert per_method["null"].value == pytest.approx(0.375, abs=0.02)
    keeps_more = per_pair[("null", "lora")]
    assert keeps_more.hi < 0 and keeps_more.below_zero == 1.0 and keeps_more.resamples > 250
    assert per_pair[("lora", "null")].lo > 0
    again = bootstrap_matched(base, methods, 50.0, [("null", "lora")], iters=300)[1][("null", "lora")]
    assert (again.lo, again.hi) == (keeps_more.lo, keeps_more.hi)  # seeded: the same intervals every build


def test_the_grid_is_log_spaced_around_the_recommended_rate_and_widens_past_an_edge():
    assert log_grid(5e-4, 5, 3.1623) == [5e-05, 0.000158, 0.0005, 0.00158, 0.005]
    assert log_grid(1e-3, 4, 10.0) == [1e-4, 1e-3, 1e-2, 1e-1]
    grid = [1e-4, 1e-3, 1e-2]
    assert widened(grid, 1e-2, 10.0) == 0.1 and widened(grid, 1e-4, 10.0) == 1e-5
    assert widened(grid, 1e-3, 10.0) is None and widened(grid, None, 10.0) is None


# ---- the table from fixture records -------------------------------------------------------------------------

ROWS = "[{method:lora,label:LoRA,lr:0.001},{method:lora_null_v1,label:LoRA-Null v1,lr:0.001}," \
       "{method:pissa,label:PiSSA,lr:0.001}]"
# (held-out hits of 50, knowledge NLL shift) per method and rate; LoRA-Null v1 loses half LoRA's at every level;
# LoRA's best rate is its highest (an edge), PiSSA's 1e-2 point is not run
POINTS = {"lora": {1e-4: (10, 0.2), 1e-3: (20, 0.5), 1e-2: (30, 1.0), 0.1: (15, 2.0)},
          "lora_null_v1": {1e-4: (10, 0.1), 1e-3: (20, 0.25), 1e-2: (30, 0.5)},
          "pissa": {1e-4: (12, 0.3), 1e-3: (25, 0.7)}}


def _table_cfg(tmp_path, *extra):
    return compose(["table=frontier", f"run.root={tmp_path}", f"table.out_dir={tmp_path / 'tables'}",
                    "table.bootstrap=300", "table.lr_points=3", "table.lr_step=10", f"table.rows={ROWS}",
                    "table.overrides=['model=tiny']", *extra])


def _write(cfg, which, records):
    from lnull.evaluate import expected_records
    from lnull.layout import RunLayout

    layout = RunLayout(cfg)
    keys = expected_records(layout, which)
    for bench, items in records.items():
        layout.store.write_record(keys[bench], _record(keys[bench], which, bench, items))


def _record(key, which, bench, items):
    kind = {"wiki_text": "text_nll", "task_heldout": "task_heldout"}.get(bench, "lm_eval_nll")
    return {"key": key, "model": which, "weights_from": "fixture", "schema": 2,
            "base_model": {"name": "m", "name_or_path": "m", "sha256": None, "dtype": "float32"},
            "method": None if which == "base" else {"name": "x", "rank": 8, "alpha": 8.0, "options": {},
                                                    "trainable_params": 1},
            "calibration": None, "train": None, "benchmark": bench, "kind": kind,
            "metric": "exact_match" if kind == "task_heldout" else "nll_per_token", "value": statistics.fmean(items),
            "stderr": statistics.stdev(items) / math.sqrt(len(items)), "n": len(items),
            "scorer": {"kind": kind, "version": "1", "lm_eval_version": None, "task": bench, "task_version": None},
            "settings": {}, "details": {"items": items, **({"item_tokens": [10] * len(items)} if kind == "text_nll"
                                                              else {})},
            "seconds": 0.0, "items_per_s": None, "created": "2026-12-07T00:00:00"}


def _fixture(cfg, methods=POINTS):
    rng = random.Random(0)
    base = {b: [rng.uniform(3, 7) for _ in range(40)] for b in ("nq_open_nll", "triviaqa_nll", "webqs_nll")}
    base["wiki_text"] = [rng.uniform(2, 4) for _ in range(10)]
    base["task_heldout"] = [0.0] * 48 + [100.0] * 2
    base_cfg, plans = frontier.compose_plans(cfg)
    _write(base_cfg, "base", base)
    for plan in plans:
        for lr, (hits, shift) in methods.get(plan.method, {}).items():
            for fit in frontier._fits(cfg, plan, lr):
                trained = {b: [x + shift + rng.gauss(0, 0.02) for x in v] for b, v in base.items()
                           if b not in ("task_heldout", "wiki_text")}
                trained["wiki_text"] = [x + shift / 2 for x in base["wiki_text"]]
                trained["task_heldout"] = [100.0] * hits + [0.0] * (50 - hits)
                _write(fit.cfg, "trained", trained)


def test_frontier_table_builds_from_fixture_records_with_missing_points_shown_missing(tmp_path):
    cfg = _table_cfg(tmp_path, "table.widen=1")
    _fixture(cfg)
    from lnull.tables import run_table

    summary = run_table(cfg, log=lambda m: None)
    out = tmp_path / "tables"
    md = (out / "frontier.md").read_text()
    assert summary["points"] == 10 and summary["complete_points"] == 9  # LoRA widened to 0.1; PiSSA's 1e-2 missing
    assert summary["level"] == pytest.approx(50.0)  # the best score all three reach: 25 / 50 problems
    headline = md.split("#### Knowledge lost at matched learning")[1].split("####")[0]
    lines = {row.split(" | ")[0][2:]: row for row in headline.splitlines() if row.startswith("| ")}
    assert "widened to 0.1" in lines["LoRA"] and "lr 0.01: 60.0 %" in lines["LoRA"]
    assert "2 of 3" in lines["PiSSA"]
    null_vs_lora = lines["LoRA-Null v1"].split(" | ")[4]
    assert null_vs_lora.startswith("-0.") and "P(< 0) = 1.000" in null_vs_lora
    assert "LoRA-Null v1 − LoRA" in md and "(keeps more)" in md
    every = md.split("#### Every point")[1]
    assert "| PiSSA | 0.01 | — | — | — | — | — | not run |" in every
    assert every.count("◆") >= 1 and "| LoRA | 0.1 |" in every
    assert "PEFT forgetting (nats/token)" in every  # trained - base pooled NLL of the general text: shift / 2
    assert "| LoRA | 0.01 | 60.0 ± 7.0 | +1.000 ± 0.002 | 36.8 | +0.500 ± 0.000 | +0.500 ± 0.000 |" in every
    csv_text = (out / "frontier.csv").read_text()
    assert "point,pissa,PiSSA,0.01,,,,,,,,0,,,,,not run" in csv_text and "difference,lora_null_v1" in csv_text
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG" and (out / "frontier.tex").exists()


def test_a_best_rate_on_the_edge_is_named_and_frontier_runs_it(tmp_path, monkeypatch):
    without_extra = {m: {lr: v for lr, v in pts.items() if lr != 0.1} for m, pts in POINTS.items()}
    cfg = _table_cfg(tmp_path)
    _fixture(cfg, without_extra)
    _, plans = frontier.collect(cfg)
    lora = next(p for p in plans if p.method == "lora")
    assert lora.edge == 0.1 and not lora.widened
    ran = []

    extra = {"lora": {0.1: POINTS["lora"][0.1]}, "lora_null_v1": {0.1: (25, 1.0)}}

    def fake_run(jobs, stages, log):  # "run" a point: write its records as a real run would
        for label, job_cfg in jobs:
            ran.append((label.split(":")[0], job_cfg["train"]["lr"]))
            if job_cfg["train"]["lr"] == 0.1:
                _fixture(cfg, extra)

    monkeypatch.setattr(frontier, "run_configs", fake_run)
    frontier.run_missing(cfg, log=lambda m: None)
    # both methods whose best rate was the highest get one more rate; PiSSA's best is inside its grid
    assert sorted(r for r in ran if r[1] == 0.1) == [("LoRA", 0.1), ("LoRA-Null v1", 0.1)]
    assert len(ran) == 3 * 3 + 2  # every grid point is handed to the runner (it skips what the store holds)
    _, plans = frontier.collect(cfg)
    assert all(p.widened == [0.1] and p.edge is None for p in plans if p.method != "pissa")


def test_frontier_command_runs_the_frontier_table(tmp_path):
    import subprocess

    out = subprocess.run(["make", "-n", "frontier"], cwd=REPO, capture_output=True, text=True).stdout
    assert "lnull frontier" in out
    cfg = compose(["table=frontier"])
    assert cfg["table"]["kind"] == "frontier" and cfg["table"]["against"] == ["lora", "lora_null_v1"]
    assert len(cfg["table"]["rows"]) == 9 and cfg["table"]["lr_points"] >= 5


def test_match_at_sets_the_level_the_curves_are_read_at(tmp_path):
    cfg = _table_cfg(tmp_path, "table.widen=0", "table.match_at=40")
    _fixture(cfg)
    out = tmp_path / "tables"
    out.mkdir()
    summary = frontier.build(cfg, out, log=lambda m: None)
    md = (out / "frontier.md").read_text()
    assert summary["level"] == 40 and "task score = 40.0 % (table.match_at)" in md
    # LoRA's curve passes (40 %, 0.5): read there exactly
    assert "| LoRA | 3 of 3 | lr 0.01: 60.0 % | +0.50" in md
