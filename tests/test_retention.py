"""Knowledge kept vs task learned: the likelihood scorers against hand computations on the tiny model, the held-out
task scorer, the paired bootstrap, and the demo table built from fixture records."""
from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch

from conftest import REPO, lnull
from lnull.cli import compose
from lnull.data.synthetic import arithmetic, facts
from lnull.evaluate.heldout import score as score_heldout
from lnull.evaluate.likelihood import score_answers, score_text
from lnull.tables import retention

NQ_CONTEXT = "Answer these questions:\n\nQ: {q}?\nA:"  # lm-eval nq_open: description + doc_to_text


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= start, in one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return float(sum(logp[i - 1, ids[i]] for i in range(start, len(ids))))


def test_answer_nll_is_log_p_of_the_gold_answer_under_lm_evals_prompt(tiny_base_context, tmp_path):
    cfg, ctx = tiny_base_context("eval.batch_size=3")
    rows = facts(5, seed=7)
    bench = {"kind": "lm_eval_nll", "task": "nq_open", "dataset": _jsonl(tmp_path / "nq.jsonl", rows)}
    rec = score_answers("nq_open_nll", bench, ctx)
    tok, bos = ctx.tokenizer, ctx.tokenizer.bos_token_id
    by_hand = []
    for r in rows:
        context = NQ_CONTEXT.format(q=r["question"])
        whole = [bos] + tok.encode(context + " " + r["answer"][0], add_special_tokens=False)
        start = len([bos] + tok.encode(context, add_special_tokens=False))
        by_hand.append(-_logprob(ctx.model, whole, start) / (len(whole) - start))
    assert rec["items"] == pytest.approx(by_hand, abs=1e-4)
    assert rec["value"] == pytest.approx(statistics.fmean(by_hand), abs=1e-4) and rec["n"] == 5
    assert rec["stderr"] == pytest.approx(statistics.stdev(by_hand) / math.sqrt(5), abs=1e-4)
    assert rec["metric"] == "nll_per_token" and rec["examples"][0]["target"] == " " + rows[0]["answer"][0]


@pytest.mark.parametrize("task, row, answer", [
    ("triviaqa", {"question": "Who wrote Emma", "answer": {"value": "Jane Austen", "aliases": ["Austen"]}},
     "Jane Austen"),
    ("webqs", {"question": "what is the capital of Mivor?", "answers": ["Lo Ka", "Ka"]}, "Lo Ka"),
])
def test_answer_nll_uses_each_tasks_gold_answer(tiny_base_context, tmp_path, task, row, answer):
    _, ctx = tiny_base_context()
    rec = score_answers(f"{task}_nll", {"kind": "lm_eval_nll", "task": task,
                                        "dataset": _jsonl(tmp_path / "d.jsonl", [row])}, ctx)
    assert rec["examples"][0]["target"] == " " + answer and rec["n"] == 1


def test_text_nll_scores_every_token_after_bos_once_per_distinct_text(tiny_base_context, tmp_path):
    cfg, ctx = tiny_base_context()
    texts = ["the capital of kalo is mivor .", "zuter has three coins and two pens .", "the capital of kalo is mivor ."]
    bench = {"kind": "text_nll", "target": "{{passage}}",
             "dataset": _jsonl(tmp_path / "t.jsonl", [{"passage": t} for t in texts])}
    rec = score_text("wiki_text", bench, ctx)
    tok, bos = ctx.tokenizer, ctx.tokenizer.bos_token_id
    by_hand = []
    for t in texts[:2]:  # the repeated text is scored once
        ids = [bos] + tok.encode(t, add_special_tokens=False)
        by_hand.append(-_logprob(ctx.model, ids, 1) / (len(ids) - 1))
    assert rec["n"] == 2 and rec["items"] == pytest.approx(by_hand, abs=1e-4)


def test_a_benchmarks_own_limit_and_target_override_the_defaults(tiny_base_context, tmp_path):
    _, ctx = tiny_base_context("eval.limit=5")
    row = {"question": "what is the capital of Mivor?", "answers": ["Lo Ka", "Ka"]}
    rec = score_answers("webqs_nll", {"kind": "lm_eval_nll", "task": "webqs", "target": "{{answers[1]}}",
                                      "dataset": _jsonl(tmp_path / "w.jsonl", [row])}, ctx)
    assert rec["examples"][0]["target"] == " Ka"
    texts = [{"passage": f"text number {i} ."} for i in range(4)]
    bench = {"kind": "text_nll", "target": "{{passage}}", "dataset": _jsonl(tmp_path / "t.jsonl", texts)}
    assert score_text("wiki_text", bench, ctx)["n"] == 4  # eval.limit=5
    assert score_text("wiki_text", {**bench, "limit": 2}, ctx)["n"] == 2
    held = {"kind": "task_heldout", "dataset": _jsonl(tmp_path / "h.jsonl", arithmetic(6, seed=5)), "limit": 3}
    assert score_heldout("task_heldout", held, ctx)["n"] == 3


@pytest.mark.parametrize("override, message", [
    ("eval.benchmarks.task_heldout.limit=0", "eval.benchmarks.task_heldout.limit must be >= 1"),
    ("eval.benchmarks.wiki_text.target=null", "eval.benchmarks.wiki_text.target"),
    ("task.heldout=null", "eval.benchmarks.task_heldout.dataset is not set"),
])
def test_bad_likelihood_benchmark_settings_fail_at_compose(override, message):
    from lnull.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose(["+experiment=demo", override])


def test_heldout_drops_trained_examples_and_is_greedy_exact_match(tiny_base_context, tmp_path):
    from lnull.data.prompts import encode_example

    cfg, ctx = tiny_base_context("task=demo_math", "task.dataset=synthetic:arithmetic:8")
    train, new = arithmetic(8), arithmetic(6, seed=5)
    bench = {"kind": "task_heldout", "dataset": _jsonl(tmp_path / "h.jsonl", train[:3] + new)}
    rec = score_heldout("task_heldout", bench, ctx)
    assert rec["excluded"] == 3 and rec["n"] == 6
    ex = encode_example(ctx.tokenizer, new[0]["query"], new[0]["response"], cfg["train"]["max_length"],
                        cfg["task"]["prompt"], cfg["model"]["add_bos"])
    with torch.no_grad():
        logits = ctx.model(torch.tensor([ex["input_ids"]])).logits[0, :-1].float()
    labels = torch.tensor(ex["labels"][1:])
    scored = labels != -100
    hits = logits.argmax(-1)[scored] == labels[scored]
    nll = -torch.log_softmax(logits, -1)[scored].gather(1, labels[scored].unsqueeze(1)).mean()
    assert rec["items_token_accuracy"][0] == pytest.approx(100.0 * hits.float().mean().item(), abs=1e-3)
    assert rec["items_nll"][0] == pytest.approx(nll.item(), abs=1e-4)
    assert rec["items"][0] == (100.0 if bool(hits.all()) else 0.0)
    with pytest.raises(Exception, match="every example"):
        score_heldout("task_heldout", {"kind": "task_heldout", "dataset": _jsonl(tmp_path / "s.jsonl", train)}, ctx)


def test_paired_bootstrap_matches_the_normal_interval_and_is_deterministic():
    rng = random.Random(3)
    diffs = {"a": [0.1 + rng.gauss(0, 1) for _ in range(400)], "b": [0.1 + rng.gauss(0, 1) for _ in range(400)]}
    got = retention.paired_bootstrap(diffs, 4000)
    assert got == retention.paired_bootstrap(diffs, 4000)
    mean = statistics.fmean([statistics.fmean(d) for d in diffs.values()])
    se = math.sqrt(sum(statistics.variance(d) / len(d) for d in diffs.values())) / 2
    assert got["mean"] == pytest.approx(mean)
    assert got["lo"] == pytest.approx(mean - 1.96 * se, abs=0.2 * se)
    assert got["hi"] == pytest.approx(mean + 1.96 * se, abs=0.2 * se)
    assert got["below_zero"] == pytest.approx(0.5 * math.erfc(mean / se / math.sqrt(2)), abs=0.02)
    shifted = retention.paired_bootstrap({k: [x - 1.0 for x in v] for k, v in diffs.items()}, 2000)
    assert shifted["hi"] < 0 and shifted["below_zero"] == 1.0


def test_kept_percent_caps_a_gain_and_reads_probabilities():
    assert retention.kept_percent({"a": 2.0, "b": 1.0}, {"a": 2.0, "b": 1.5}) == 100.0
    assert retention.kept_percent({"a": 2.0 + math.log(2)}, {"a": 2.0}) == pytest.approx(50.0)


def test_demo_experiment_composes_with_its_benchmarks():
    cfg = compose(["+experiment=demo"])
    benches = cfg["eval"]["benchmarks"]
    assert [benches[b]["kind"] for b in ("nq_open_nll", "triviaqa_nll", "webqs_nll", "wiki_text", "task_heldout")] == \
        ["lm_eval_nll"] * 3 + ["text_nll", "task_heldout"]
    assert benches["task_heldout"]["dataset"] == cfg["task"]["heldout"] != cfg["task"]["dataset"]
    assert cfg["calibration"]["dataset"] == "nq_open" and cfg["model"]["name"] == "smollm2-135m-instruct"


def _record(key, which, bench, items, method=None):
    kind = {"wiki_text": "text_nll", "task_heldout": "task_heldout"}.get(bench, "lm_eval_nll")
    value = statistics.fmean(items)
    return {"key": key, "model": which, "identity": "fixture",
            "base_model": {"name": "m", "name_or_path": "m", "sha256": None, "dtype": "float32"},
            "method": None if method is None else {"name": method, "rank": 8, "alpha": 8.0, "options": {},
                                                   "trainable_params": 12_345},
            "calibration": None, "train": None, "benchmark": bench, "kind": kind,
            "metric": "exact_match" if kind == "task_heldout" else "nll_per_token", "value": value,
            "stderr": statistics.stdev(items) / math.sqrt(len(items)), "n": len(items),
            "scorer": {"kind": kind, "version": "1", "lm_eval_version": None, "task": bench, "task_version": None},
            "settings": {}, "details": {"items": items}, "seconds": 0.0, "items_per_s": None,
            "created": "2026-11-24T00:00:00"}


# per method: (shift of every knowledge NLL, task exact match): LoRA forgets most, LoRA-Null v2 least
SHIFTS = {"lora": (0.5, 90.0), "pissa": (0.4, 95.0), "corda_kpm": (0.3, 80.0), "lora_null_v1": (0.1, 85.0),
          "lora_null_v2": (0.05, 70.0)}


def _store_fixture(cfg, skip=()):
    from lnull.evaluate import expected_records
    from lnull.layout import RunLayout

    rng = random.Random(0)
    base_items = {b: [rng.uniform(3, 7) for _ in range(50)] for b in ("nq_open_nll", "triviaqa_nll", "webqs_nll")}
    base_items["wiki_text"] = [rng.uniform(2, 4) for _ in range(20)]
    base_items["task_heldout"] = [0.0] * 40 + [100.0] * 10
    base_cfg, fits = retention.compose_fits(cfg)
    keys = expected_records(RunLayout(base_cfg), "base")
    store = RunLayout(base_cfg).store
    for bench, items in base_items.items():
        store.write_record(keys[bench], _record(keys[bench], "base", bench, items))
    for fit in fits:
        if fit.method in skip:
            continue
        shift, acc = SHIFTS[fit.method]
        keys = expected_records(RunLayout(fit.cfg), "trained")
        for bench, items in base_items.items():
            if bench == "task_heldout":
                hits = round(acc / 2)
                new = [100.0] * hits + [0.0] * (50 - hits)
            else:
                new = [x + shift + rng.gauss(0, 0.02) for x in items]
            store.write_record(keys[bench], _record(keys[bench], "trained", bench, new, fit.method))


def test_demo_table_builds_from_fixture_records(tmp_path):
    out = tmp_path / "tables"
    cfg = compose(["table=demo", f"run.root={tmp_path}", f"table.out_dir={out}", "table.bootstrap=500",
                   "table.overrides=['model=tiny']"])
    _store_fixture(cfg, skip=("pissa",))
    from lnull.tables import run_table

    run_table(cfg, log=lambda m: None)
    md = (out / "demo.md").read_text()
    main, change = md.split("#### Change")[0], md.split("#### Change")[1].split("####")[0]
    rows = {line.split(" | ")[0][2:]: line for line in main.splitlines() if line.startswith("| ")}
    changes = {line.split(" | ")[0][2:]: line for line in change.splitlines() if line.startswith("| ")}
    assert float(changes["LoRA"].split(" | ")[1].split(" ±")[0]) == pytest.approx(0.5, abs=0.01)  # paired change
    assert "**" in rows["LoRA-Null v2"].split(" | ")[2]  # lowest NQ-Open NLL is bold (lower is better)
    assert "<u>" in rows["LoRA-Null v1"].split(" | ")[2]
    assert "—" in rows["PiSSA"] and "0.000" not in rows["PiSSA"]  # not run: never 0
    kept = float(rows["LoRA"].split(" | ")[6].split(" ±")[0].strip("*<u>/"))
    assert kept == pytest.approx(100 * math.exp(-0.5), abs=0.2)
    assert "LoRA-Null v1 − LoRA: -0.4" in md and "(keeps more)" in md
    assert "LoRA-Null v2 − CorDA-KPM: -0.2" in md
    csv_lines = (out / "demo.csv").read_text().splitlines()
    assert any(line.startswith("LoRA,lora,") and ",nq_open_nll_change," in line for line in csv_lines)
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG" and (out / "demo.tex").exists()


def test_demo_table_seeds_and_learning_rates_pick_the_best_by_the_learning_column(tmp_path):
    cfg = compose(["table=demo", f"run.root={tmp_path}", "table.seeds=2", "table.lrs=[1e-4,1e-3]",
                   "table.overrides=['model=tiny']"])
    base_cfg, fits = retention.compose_fits(cfg)
    assert len(fits) == 5 * 2 * 2
    assert {(f.lr, f.seed) for f in fits if f.method == "lora"} == {(1e-4, 42), (1e-4, 43), (1e-3, 42), (1e-3, 43)}
    assert len({f.cfg["train"]["seed"] for f in fits}) == 2
    _store_fixture(cfg)
    pre, best, grid = retention.collect(cfg)
    assert len(grid) == 10 and all(r.cells["task_heldout"].stderr == 0.0 for r in best)  # sd over equal seeds
    out = tmp_path / "tables"
    out.mkdir()
    retention.build(cfg, out, log=lambda _: None)  # the figure draws each method's line through its rates
    md = (out / "demo.md").read_text()
    assert "Learning-rate sweep" in md and md.count("| LoRA | 0.0001 |") == 1
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_make_demo_runs_the_table_and_sweep_lr_passes_the_rates():
    import subprocess

    out = subprocess.run(["make", "-n", "demo", "SEEDS=3"], cwd=REPO, capture_output=True, text=True).stdout
    assert "table=demo table.run_missing=true table.seeds=3" in out
    out = subprocess.run(["make", "-n", "sweep-lr", "LRS=1e-4,1e-3"], cwd=REPO, capture_output=True, text=True).stdout
    assert "table.lrs=[1e-4,1e-3]" in out


def test_bad_table_values_are_one_line_errors():
    for override, word in (("table.seeds=0", "table.seeds"), ("table.lrs=[-1e-3]", "table.lrs"),
                           ("table.kind=bogus", "table.kind")):
        proc = lnull("table", "table=demo", override)
        assert proc.returncode != 0 and word in proc.stderr and "Traceback" not in proc.stderr
