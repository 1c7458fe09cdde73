"""The evaluate stage around the scorers: inputs checked before any model loads, per-benchmark records
that survive a killed run, combined eval configs, any model folder."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lnull.config import ConfigError
from lnull.layout import RunLayout
from lnull.pipeline import run_pipeline


def test_combined_eval_configs_merge():
    from lnull.cli import compose

    cfg = compose(["+experiment=tiny", "eval=[knowledge,math,code,mtbench,commonsense]"])
    assert {"nq_open", "gsm8k", "math", "humaneval", "mbpp", "mt_bench", "arc_easy", "winogrande"} <= set(
        cfg["eval"]["benchmarks"])


@pytest.mark.parametrize("bench, message", [
    ({"kind": "math", "task": "gsm8k", "dataset": "asset:gsm8k/test"}, "asset 'gsm8k' missing: run `lnull assets`"),
    ({"kind": "lm_eval", "task": "nq_opne", "dataset": "synthetic:facts:4"}, "unknown lm-eval task 'nq_opne'"),
    ({"kind": "qa_exact_match", "dataset": "/no/such.jsonl"}, "'/no/such.jsonl' not found"),
])
def test_missing_data_or_task_fails_before_any_model_loads(bench, message, tiny_cfg, monkeypatch, tmp_path):
    import lnull.evaluate.stage as evaluate

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(evaluate, "load_for_eval", no_model)
    cfg = tiny_cfg("eval.models=[base]")
    full = {"question_field": "question", "answer_field": "answer", "max_new_tokens": 4, "prompt": None,
            "num_fewshot": 0, "task": None, **bench}
    cfg["eval"]["benchmarks"] = {"probe": full}
    for check in (lambda: run_pipeline(cfg, stages=["evaluate"]),  # before the first stage, and in the stage
                  lambda: evaluate.run(cfg, SimpleNamespace(layout=RunLayout(cfg), out=tmp_path, log=print))):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("`", ".")):
            check()


def test_killed_evaluation_resumes_at_the_first_unscored_benchmark(tiny_cfg, monkeypatch, tmp_path):
    from lnull.evaluate import qa

    cfg = tiny_cfg("eval.models=[base]", "eval.limit=2")
    bench = dict(cfg["eval"]["benchmarks"]["synthetic_facts"])
    cfg["eval"]["benchmarks"] = {"first": bench, "second": bench}
    real, calls = qa.score, []

    def dies_on_second(name, *args):
        calls.append(name)
        if name == "second" and calls.count("second") == 1:
            raise KeyboardInterrupt
        return real(name, *args)

    monkeypatch.setattr(qa, "score", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, stages=["evaluate"], log=lambda m: None)
    layout = RunLayout(cfg)
    assert len(list((layout.store.root / "eval").glob("*.json"))) == 1  # first's record, stored as it finished
    run_pipeline(cfg, stages=["evaluate"], log=lambda m: None)
    assert calls == ["first", "second", "second"]  # first was not scored again
    results = json.loads((layout.view("evaluate") / "results.json").read_text())["results"]
    assert [r["benchmark"] for r in results] == ["first", "second"]
    assert not list(layout.dir.glob("*.partial"))


def test_a_runs_adapter_folder_scores_as_the_trained_model(tiny_cfg):
    import torch

    from lnull.evaluate.stage import load_for_eval
    from lnull.modeling import original_path

    cfg = tiny_cfg("method=pissa", "train.lr=1e-2")
    run = run_pipeline(cfg, stages=["calibrate", "init", "train"])
    adapter = run.dir / "train" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == original_path(cfg)
    ids = torch.arange(3, 40).unsqueeze(0)
    trained, _, _ = load_for_eval(cfg, run, "trained", "cpu")
    by_path, _, source = load_for_eval(cfg, run, str(adapter), "cpu")
    weights_from = source.weights_from
    assert source.init_adapter == str(run.dir / "init" / "adapter")  # PiSSA's residual model, rebuilt
    original, _, _ = load_for_eval(cfg, run, "base", "cpu")
    with torch.no_grad():
        want, got, orig = (m(input_ids=ids).logits for m in (trained, by_path, original))
    assert weights_from == str(adapter) and torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(orig, want, atol=1e-3)  # training moved the model: the check is not vacuous


def test_run_checks_eval_data_before_the_first_stage(tmp_path):
    from lnull.cli import compose

    cfg = compose(["+experiment=tiny", "eval=math", f"run.dir={tmp_path / 'run'}", "progress=false"])
    with pytest.raises(ConfigError, match="eval.benchmarks.gsm8k.dataset 'asset:gsm8k/test': asset 'gsm8k' missing"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "calibration").exists()


def test_weights_are_loaded_only_when_a_scorer_runs_the_model_here(tiny_cfg, tmp_path):
    from lnull.evaluate.stage import load_for_eval, needs_weights

    hf = {"engine": "hf", "code": {"backend": "builtin"}}
    vllm = {"engine": "vllm", "code": {"backend": "builtin"}}
    bigcode = {"engine": "hf", "code": {"backend": "bigcode"}}
    gen, code, harness = {"kind": "math"}, {"kind": "code"}, {"kind": "lm_eval"}
    assert needs_weights([gen], hf) and needs_weights([harness], vllm) and needs_weights([code, gen], bigcode)
    assert not needs_weights([gen, code], vllm) and not needs_weights([code], bigcode)
    cfg = tiny_cfg()
    model, tokenizer, source = load_for_eval(cfg, RunLayout(cfg), "base", "cpu", weights=False)
    weights_from = source.weights_from
    assert model is None and tokenizer is not None and weights_from.endswith("tiny-llama")


def test_likelihood_batches_are_capped_by_the_vocabulary():
    """A large vocabulary's fp32 logits and log-softmax stay under the budget (Gemma-3: 262,144 -> batch 8 of
    the demo's 32); SmolLM2 (49,152) keeps 32; a model without an output head keeps eval.batch_size."""
    from lnull.evaluate.base import logits_batch

    def model(vocab):
        return SimpleNamespace(get_output_embeddings=lambda: SimpleNamespace(out_features=vocab))

    assert logits_batch(32, model(262_144)) == 8 and logits_batch(32, model(49_152)) == 32
    assert logits_batch(4, model(262_144)) == 4 and logits_batch(32, model(10**9)) == 1
    assert logits_batch(32, SimpleNamespace()) == 32
