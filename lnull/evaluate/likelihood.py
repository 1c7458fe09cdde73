"""Likelihood scorers: knowledge kept and general forgetting as negative log-likelihoods, run by lm-eval.

Exact match on NQ-Open / TriviaQA / WebQS is ~0-2 % for a 135M model before and after fine-tuning, so it cannot
show what a method forgets at that scale; the likelihood of the gold answer can.  Both kinds are lm-eval tasks
(lm-eval's runner, batching, tokenisation and BOS handling), generated next to the data like ``harness.py``'s:

- ``kind: lm_eval_nll`` (``task``: a built-in QA task): a task that ``include:``s the built-in one, so the
  prompt is lm-eval's own (description, ``doc_to_text``, target delimiter), with ``output_type: loglikelihood``
  and the gold answer as the continuation (``target``, default :data:`ANSWER_TARGET`: the first listed gold
  answer, TriviaQA's canonical value).  Per question: NLL of the answer per answer token (nats), with the
  answer's tokens counted exactly as lm-eval split context and continuation (``_encode_pair``).
- ``kind: text_nll``: held-out general text (``target``: the text field's template, e.g. ``{{passage}}``)
  scored with ``output_type: loglikelihood_rolling`` (lm-eval's perplexity tasks, e.g. wikitext); per text: NLL
  per token (nats) of every token, the first one conditioned on lm-eval's prefix token (BOS).  Texts repeated
  in the data are scored once.  This is the forgetting measure of PEFT's method comparison suite: the change in
  cross-entropy on general text the fine-tune never saw.

Records: ``value`` = mean over items of the per-item NLL per token (lower is better), ``stderr`` = its standard
error over items, ``details.items`` = the per-item values in document order (paired comparisons between models
of the same data, e.g. the demo table's bootstrap), ``details.greedy`` = % of answers that are the greedy
continuation (lm_eval_nll), ``details.item_tokens`` = each text's scored tokens (text_nll; so the pooled
per-token mean PEFT reports, ``lnull.forgetting.peft_forgetting``, is sum(items x item_tokens) / tokens).
"""
from __future__ import annotations

import math
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from lnull.errors import ConfigError
from lnull.evaluate.base import Scorer, loads_always, register
from lnull.evaluate.harness import check_task_exists, check_task_named

# The gold answer each built-in task's documents carry (offline assets use the hub's field names).
ANSWER_TARGET = {"nq_open": "{{answer[0]}}", "triviaqa": "{{answer.value}}", "webqs": "{{answers[0]}}"}
METRIC = "nll_per_token"
N_EXAMPLES = 3


def mean_and_stderr(items: list[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean) of per-item values; stderr None for fewer than 2 items."""
    n = len(items)
    mean = sum(items) / n
    if n < 2:
        return mean, None
    var = sum((x - mean) ** 2 for x in items) / (n - 1)
    return mean, math.sqrt(var / n)


def _evaluate(lm: Any, spec: str, folder: Path, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """lm-eval's ``simple_evaluate`` of the generated task ``spec`` in ``folder``: (results dict, samples in
    document order)."""
    from lm_eval.tasks import TaskManager

    from lnull.evaluate.harness import simple_evaluate

    out = simple_evaluate(model=lm, tasks=[spec], num_fewshot=0, limit=None, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed, bootstrap_iters=0)
    key = next(iter(out["results"]))
    return out, sorted(out["samples"][key], key=lambda s: s["doc_id"])


def _args(sample: dict[str, Any]) -> list[str]:
    """The request's string arguments (lm-eval logs them as a list of tuples or as nested dicts)."""
    args = sample["arguments"]
    first = args[0] if isinstance(args, list) else next(iter(args.values()))
    return list(first) if isinstance(first, (list, tuple)) else list(first.values())


def _record(out: dict[str, Any], items: list[float], extra: dict[str, Any], ctx: Any, task: str,
            examples: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    key = next(iter(out["results"]))
    value, stderr = mean_and_stderr(items)
    return {"metric": METRIC, "value": value, "stderr": stderr, "n": len(items), "task": task,
            "task_version": out["versions"][key], "lm_eval_version": version("lm_eval"),
            "items": [round(x, 6) for x in items], **extra, "examples": examples,
            "settings": ctx.settings(**settings)}


def _target_delimiter(builtin: Path) -> str:
    """The built-in task's ``target_delimiter`` (its YAML may hold ``!function`` tags: read as text)."""
    import re

    import yaml
    from lm_eval.api.task import TaskConfig

    found = re.search(r"^target_delimiter:(.*)$", builtin.read_text(), re.M)
    return yaml.safe_load(found.group(1)) if found else TaskConfig.__dataclass_fields__["target_delimiter"].default


def score_answers(name: str, bench: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Mean NLL per answer token (nats) of each question's gold answer under lm-eval's prompt of
    ``bench['task']``, on ``ctx.model``; n = questions."""
    from lnull.evaluate.harness import _explicit_bos_lm, _local_task, builtin_task_yaml

    task = bench.get("task")
    if not task:
        raise ConfigError(f"eval.benchmarks.{name}.task (the lm-eval QA task whose prompt is used) is not set")
    target = bench.get("target") or ANSWER_TARGET.get(task)
    if not target:
        raise ConfigError(f"eval.benchmarks.{name}.target (a template of the gold answer, e.g. '{{{{answer[0]}}}}') "
                          f"is not set and task '{task}' has no default; defaults exist for {', '.join(ANSWER_TARGET)}")
    builtin = builtin_task_yaml(task)
    rows = ctx.records(bench)
    # lm-eval puts no delimiter between context and a loglikelihood target: the task's own goes in the template
    overrides = {"output_type": "loglikelihood", "doc_to_target": _target_delimiter(builtin) + target,
                 "doc_to_choice": None,
                 "generation_kwargs": None, "filter_list": None, "should_decontaminate": False,
                 "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                 {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    lm = _explicit_bos_lm(ctx.model, ctx.tokenizer, ctx.eval_cfg["batch_size"], ctx.add_bos)
    with tempfile.TemporaryDirectory(prefix="lnull-lm-eval-") as hf_cache:
        spec, folder = _local_task(task, builtin, rows, ctx.work_dir, Path(hf_cache), name=f"lnull_{task}_nll",
                                   overrides=overrides)
        out, samples = _evaluate(lm, spec, folder, ctx.eval_cfg["seed"])
    items, greedy, examples = [], 0, []
    for s in samples:
        context, continuation = _args(s)[:2]
        loglik, is_greedy = s["resps"][0][0]
        tokens = len(lm._encode_pair(context, continuation)[1])
        items.append(-float(loglik) / tokens)
        greedy += bool(is_greedy)
        if len(examples) < N_EXAMPLES:
            examples.append({"prompt": context, "target": continuation, "tokens": tokens,
                             METRIC: round(items[-1], 4), "greedy": bool(is_greedy)})
    if not items:
        raise ConfigError(f"eval.benchmarks.{name}: no questions to score in {bench['dataset']}")
    config = out["configs"][next(iter(out["results"]))]
    return _record(out, items, {"greedy": 100.0 * greedy / len(items), "data": bench["dataset"]}, ctx, task,
                   examples, {"output_type": "loglikelihood", "target": target,
                              "description": config.get("description"),
                              "doc_to_text": config.get("doc_to_text"),
                              "target_delimiter": config.get("target_delimiter")})


def score_text(name: str, bench: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Mean NLL per token (nats) of each distinct text ``bench['target']`` renders from the records (the first
    ``limit`` distinct ones), with lm-eval's rolling log-likelihood on ``ctx.model``; n = texts."""
    from lm_eval.utils import apply_template

    from lnull.data.sources import load_records
    from lnull.evaluate.harness import _explicit_bos_lm, _local_task

    target = bench.get("target")
    if not target:
        raise ConfigError(f"eval.benchmarks.{name}.target (the text field's template, e.g. '{{{{passage}}}}') "
                          "is not set")
    texts: dict[str, None] = {}
    for row in load_records(bench["dataset"], ctx.cfg.get("cache_dir")):
        text = apply_template(target, row).strip()
        if text:
            texts.setdefault(text)
        if ctx.limit(bench) and len(texts) >= ctx.limit(bench):
            break
    if not texts:
        raise ConfigError(f"eval.benchmarks.{name}: '{target}' renders no text from {bench['dataset']}")
    overrides = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in
                                 (("word_perplexity", "weighted_perplexity"),
                                  ("byte_perplexity", "weighted_perplexity"), ("bits_per_byte", "bits_per_byte"))]}
    # BOS: lm-eval's rolling windows already condition the first token on its prefix token (BOS), so the texts
    # themselves are encoded without one (add_bos False) and every text token is scored.
    lm = _explicit_bos_lm(ctx.model, ctx.tokenizer, ctx.eval_cfg["batch_size"], False)
    with tempfile.TemporaryDirectory(prefix="lnull-lm-eval-") as hf_cache:
        spec, folder = _local_task(f"{name}_text", None, [{"text": t} for t in texts], ctx.work_dir, Path(hf_cache),
                                   name=f"lnull_{name}_text", overrides=overrides)
        out, samples = _evaluate(lm, spec, folder, ctx.eval_cfg["seed"])
    items, item_tokens, examples = [], [], []
    for s in samples:
        (text,) = _args(s)[:1]
        tokens = len(lm.tok_encode(text))
        loglik = s["resps"][0][0]
        items.append(-float(loglik if not isinstance(loglik, (list, tuple)) else loglik[0]) / tokens)
        item_tokens.append(tokens)
        if len(examples) < N_EXAMPLES:
            examples.append({"text": text[:200], "tokens": tokens, METRIC: round(items[-1], 4)})
    return _record(out, items, {"tokens": sum(item_tokens), "item_tokens": item_tokens, "data": bench["dataset"]},
                   ctx, "loglikelihood_rolling",
                   examples, {"output_type": "loglikelihood_rolling", "target": target,
                              "prefix_token_id": lm.prefix_token_id})


def check_target(name: str, bench: Any, ev: Any) -> None:
    """Compose time: ``target`` says which text of a record to score."""
    if not bench["target"]:
        raise ConfigError(f"eval.benchmarks.{name}.target (the text's template, e.g. '{{{{passage}}}}') is not set")


register(Scorer(kind="lm_eval_nll", score=score_answers, packages=("lm_eval",), needs_weights=loads_always,
                check=check_task_named, check_inputs=check_task_exists, lower_is_better=True,
                description="NLL per token (nats) of the gold answer under an lm-eval QA task's prompt"))
# version 2: records keep each text's token count (details.item_tokens), which PEFT's pooled forgetting needs
# (lnull.forgetting.peft_forgetting); version-1 records lack it, so they are re-scored rather than shown as n/a
register(Scorer(kind="text_nll", score=score_text, version="2", packages=("lm_eval",), needs_weights=loads_always,
                check=check_target, lower_is_better=True,
                description="NLL per token (nats) of held-out general text (lm-eval's rolling loglikelihood)"))
