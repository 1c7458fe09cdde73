"""Forgetting in the literature's units (lnull.forgetting) from fixture records computed by hand."""
from __future__ import annotations

import math

import pytest

from lnull.forgetting import (BIDERMAN_METRIC, BIDERMAN_TASKS, biderman_average, biderman_change,
                              informative_exact_match, literature_forgetting, peft_forgetting, pooled_nll)
from lnull.records import validate


def _record(model: str, bench: str, kind: str, metric: str, value: float | None, details: dict,
            stderr: float | None = None, n: int = 2, task: str | None = None) -> dict:
    rec = {"key": f"{model}-{bench}", "model": model, "weights_from": "fixture",
           "base_model": {"name": "m", "name_or_path": "m", "sha256": None, "dtype": "float32"},
           "method": None, "calibration": None, "train": None, "benchmark": bench, "kind": kind, "metric": metric,
           "value": value, "stderr": stderr, "n": n,
           "scorer": {"kind": kind, "version": "1", "lm_eval_version": None, "task": task or bench,
                      "task_version": None},
           "settings": {}, "details": details, "seconds": 1.0, "items_per_s": None, "created": "2026-12-07T00:00:00"}
    validate(rec)  # the fixtures are records lnull would accept
    return rec


def _text(model: str, items: list[float], tokens: list[int] | None) -> dict:
    details = {"items": items, "data": "asset:boolq/validation", "tokens": sum(tokens or [0])}
    if tokens is not None:
        details["item_tokens"] = tokens
    return _record(model, "wiki_text", "text_nll", "nll_per_token", sum(items) / len(items), details,
                   n=len(items), task="loglikelihood_rolling")


# two texts of 1 and 3 tokens: base 2.0 / 3.0 nats per token, trained 3.0 / 3.5
BASE = _text("base", [2.0, 3.0], [1, 3])
TRAINED = _text("trained", [3.0, 3.5], [1, 3])


def test_pooled_nll_weighs_each_text_by_its_tokens_as_peft_does():
    assert pooled_nll(BASE).value == pytest.approx((2.0 * 1 + 3.0 * 3) / 4)  # 2.75, not the per-text mean 2.5
    assert pooled_nll(TRAINED).value == pytest.approx(13.5 / 4)


def test_peft_forgetting_is_trained_minus_base_pooled_with_a_paired_ratio_stderr():
    est = peft_forgetting(BASE, TRAINED)
    assert est.value == pytest.approx(3.375 - 2.75)  # 0.625 nats/token; the per-text mean change would be 0.75
    # d = t (a - b) = [1.0, 1.5]; residuals d - R t = [0.375, -0.375]; sqrt(2 * 0.28125) / 4
    assert est.stderr == pytest.approx(math.sqrt(2 * 2 * 0.375 ** 2) / 4) == pytest.approx(0.1875)
    assert (est.n, est.unit, est.why) == (2, "nats/token", None)


def test_peft_sign_convention_positive_forgot_negative_improved():
    assert peft_forgetting(BASE, TRAINED).value > 0
    assert peft_forgetting(TRAINED, BASE).value == pytest.approx(-0.625)
    assert peft_forgetting(BASE, BASE).value == 0.0


@pytest.mark.parametrize("base, trained, why", [
    (BASE, None, "no trained record"),
    (None, TRAINED, "no base record"),
    (_text("base", [2.0, 3.0], None), TRAINED, "no per-text token counts"),
    (BASE, _text("trained", [3.0, 3.5], [2, 2]), "different tokens per text"),
])
def test_missing_or_unpaired_records_give_none_with_the_reason_never_zero(base, trained, why):
    est = peft_forgetting(base, trained)
    assert est.value is None and est.stderr is None and why in est.why


def _mc(model: str, task: str, value: float, stderr: float, metrics: dict | None = None) -> dict:
    metric = BIDERMAN_METRIC.get(task, "acc")
    return _record(model, task, "lm_eval", metric, value, {"metrics": metrics or {metric: value}}, stderr=stderr,
                   n=100)


def _board(model: str, hs: float, arc: float, wg: float) -> list[dict]:
    return [_mc(model, "hellaswag", hs, 1.0), _mc(model, "arc_challenge", arc, 2.0), _mc(model, "winogrande", wg, 2.0),
            _mc(model, "boolq", 99.0, 1.0)]  # a fourth benchmark never enters the average


def test_biderman_average_is_the_mean_of_hellaswag_arc_challenge_and_winogrande():
    assert BIDERMAN_TASKS == ("hellaswag", "arc_challenge", "winogrande")
    assert BIDERMAN_METRIC == {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "winogrande": "acc"}
    est = biderman_average(_board("base", 40.0, 30.0, 50.0))
    assert est.value == pytest.approx(40.0) and est.unit == "%"
    assert est.stderr == pytest.approx(math.sqrt(1 + 4 + 4) / 3)


def test_biderman_change_is_trained_minus_base_in_points():
    est = biderman_change(_board("base", 40.0, 30.0, 50.0), _board("trained", 37.0, 27.0, 51.0))
    assert est.value == pytest.approx((37 + 27 + 51) / 3 - 40.0) and est.unit == "pp"
    assert est.stderr == pytest.approx(math.sqrt(2) * 1.0)


def test_biderman_reads_acc_norm_from_the_metrics_when_the_record_reports_another():
    rec = _record("base", "hellaswag", "lm_eval", "acc", 45.0, {"metrics": {"acc": 45.0, "acc_norm": 48.0}},
                  stderr=1.0, n=100)
    board = [rec, _mc("base", "arc_challenge", 30.0, 2.0), _mc("base", "winogrande", 51.0, 2.0)]
    est = biderman_average(board)
    assert est.value == pytest.approx((48.0 + 30.0 + 51.0) / 3)
    assert est.stderr is None  # lm-eval's stderr of acc_norm is not in that record


def test_biderman_with_a_benchmark_missing_is_none():
    est = biderman_average(_board("base", 40.0, 30.0, 50.0)[:2])
    assert est.value is None and "winogrande" in est.why


def test_exact_match_is_shown_only_where_it_is_not_about_zero():
    em = lambda m, v: _record(m, "nq_open", "lm_eval", "exact_match", v, {}, stderr=1.0, n=100)  # noqa: E731
    low = informative_exact_match(em("base", 0.5), em("trained", 1.0))
    assert low.value is None and "~0" in low.why
    high = informative_exact_match(em("base", 20.0), em("trained", 18.0))
    assert high.value == pytest.approx(-2.0) and high.stderr == pytest.approx(math.sqrt(2))


def test_literature_forgetting_of_a_runs_records():
    records = [BASE, TRAINED, *_board("base", 40.0, 30.0, 50.0), *_board("trained", 37.0, 27.0, 51.0)]
    out = literature_forgetting(records)
    assert out["peft_forgetting"]["value"] == pytest.approx(0.625)
    assert out["biderman"]["base"]["value"] == pytest.approx(40.0)
    assert out["biderman"]["change"]["value"] == pytest.approx(-5 / 3)
    assert out["exact_match"]["nq_open"]["value"] is None  # no such records: None with why, never 0
    assert out["exact_match"]["nq_open"]["why"] == "no base record"
    assert out["mmlu"]["value"] is None and out["mmlu"]["why"] == "no base score"
    mmlu = [_record(m, "mmlu", "lm_eval", "acc", v, {}, stderr=1.0, n=570)
            for m, v in (("base", 30.0), ("trained", 28.5))]
    assert literature_forgetting(records + mmlu)["mmlu"]["value"] == pytest.approx(-1.5)


def test_the_literature_eval_config_declares_the_benchmarks_it_needs():
    from lnull.cli import compose

    benches = compose(["+experiment=tiny", "eval=literature"])["eval"]["benchmarks"]
    tasks = {benches[b]["task"] for b in benches if benches[b]["kind"] == "lm_eval"}
    assert set(BIDERMAN_TASKS) <= tasks and {"nq_open", "triviaqa", "webqs"} <= tasks
    assert benches["wiki_text"]["kind"] == "text_nll"
    assert {benches[t]["dataset"] for t in BIDERMAN_TASKS} == {
        "asset:hellaswag/validation", "asset:arc_challenge/test", "asset:winogrande/validation"}
