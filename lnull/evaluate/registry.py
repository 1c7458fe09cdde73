"""The one registry of benchmark kinds: ``eval.benchmarks.<name>.kind`` -> scorer function.

Scorers are imported lazily (``module:function``) so that, e.g., lm-eval is only imported when an
``lm_eval`` benchmark is asked for.  Every scorer has the signature
``score(name: str, bench: dict, ctx: EvalContext) -> dict`` (see ``lnull.evaluate.base``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from lnull.errors import ConfigError

KINDS = {
    "lm_eval": "lnull.evaluate.harness:score",
    "math": "lnull.evaluate.math:score",
    "code": "lnull.evaluate.code:score",
    "mtbench": "lnull.evaluate.mtbench:score",
    "qa_exact_match": "lnull.evaluate.qa:score",
    "lm_eval_nll": "lnull.evaluate.likelihood:score_answers",
    "text_nll": "lnull.evaluate.likelihood:score_text",
    "task_heldout": "lnull.evaluate.heldout:score",
}
LM_EVAL_KINDS = ("lm_eval", "lm_eval_nll", "text_nll")  # run by lm-eval: its version is part of the scorer's
# Kinds whose value is lower-is-better (a negative log-likelihood); every other kind's is higher-is-better.
LOWER_IS_BETTER = ("lm_eval_nll", "text_nll")
# Allowed ``task`` values per kind (None: any, checked by the scorer, e.g. lm-eval's task index).
TASKS = {"math": ("gsm8k", "math"), "code": ("humaneval", "mbpp")}
# lnull's version of each scorer's protocol: bump it when a scorer's output for the same input changes, so
# stored records of the old protocol are not reused.
SCORER_VERSIONS = {kind: "1" for kind in KINDS}
RUN_MODELS = ("base", "init", "trained")
ENGINES = ("hf", "vllm")


def scorer(kind: str) -> Callable[..., dict[str, Any]]:
    if kind not in KINDS:
        raise ConfigError(f"unknown benchmark kind '{kind}'; known: {', '.join(KINDS)}")
    module, _, func = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), func)


def check_eval_config(ev: Any) -> None:
    """Raise ConfigError on the first bad value of an ``eval`` section (before any model is loaded)."""
    for name, bench in ev.benchmarks.items():
        if bench.kind not in KINDS:
            raise ConfigError(f"unknown benchmark kind '{bench.kind}' for eval.benchmarks.{name}; "
                              f"known: {', '.join(KINDS)}")
        allowed = TASKS.get(bench.kind)
        if allowed and (bench.task or name) not in allowed:
            raise ConfigError(f"eval.benchmarks.{name}.task '{bench.task}' is not one of {', '.join(allowed)}")
        if bench.kind in KINDS and not bench.dataset:
            raise ConfigError(f"eval.benchmarks.{name}.dataset is not set")
        if bench.kind in ("lm_eval", "lm_eval_nll") and not bench.task:
            raise ConfigError(f"eval.benchmarks.{name}.task (the lm-eval task name) is not set")
        if bench.kind == "text_nll" and not bench.target:
            raise ConfigError(f"eval.benchmarks.{name}.target (the text's template, e.g. '{{{{passage}}}}') is not set")
        if bench.limit is not None and bench.limit < 1:
            raise ConfigError(f"eval.benchmarks.{name}.limit must be >= 1 or null, got {bench.limit}")
        if bench.max_new_tokens < 1:
            raise ConfigError(f"eval.benchmarks.{name}.max_new_tokens must be >= 1, got {bench.max_new_tokens}")
    for model in ev.models:
        if model not in RUN_MODELS and not Path(model).expanduser().exists() and "/" not in model:
            raise ConfigError(f"eval.models entry '{model}' is not base, init, trained, an existing model "
                              "folder or a hub name (org/name)")
    if ev.limit is not None and ev.limit < 1:
        raise ConfigError(f"eval.limit must be >= 1 or null, got {ev.limit}")
    if ev.batch_size < 1:
        raise ConfigError(f"eval.batch_size must be >= 1, got {ev.batch_size}")
    if ev.engine not in ENGINES:
        raise ConfigError(f"eval.engine must be one of {', '.join(ENGINES)}, got '{ev.engine}'")
    if ev.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("eval.engine=vllm but vllm is not installed (pip install vllm)")
    if ev.code.backend not in ("builtin", "bigcode"):
        raise ConfigError(f"eval.code.backend must be builtin or bigcode, got '{ev.code.backend}'")
    if ev.code.backend == "bigcode" and not (ev.code.bigcode_path and Path(ev.code.bigcode_path).is_dir()):
        raise ConfigError(f"eval.code.backend=bigcode needs eval.code.bigcode_path, a bigcode-evaluation-harness "
                          f"checkout; got '{ev.code.bigcode_path}'")
    check_code_settings(ev.code)
    if ev.mtbench.judge_url and any(b.kind == "mtbench" for b in ev.benchmarks.values()):
        judge_key(ev.mtbench.judge_url, ev.mtbench.judge_key_env)


def check_code_settings(code: Any) -> None:
    """ConfigError on an ``eval.code`` value that cannot work (checked at compose time and by the scorer)."""
    for key, low in (("n_samples", 1), ("workers", 1), ("max_length", 1), ("timeout_s", 1e-3), ("temperature", 0),
                     ("memory_mb", 0)):
        if code[key] < low:
            raise ConfigError(f"eval.code.{key} must be >= {low}, got {code[key]}")
    if not 0.0 < code["top_p"] <= 1.0:
        raise ConfigError(f"eval.code.top_p must be in (0, 1], got {code['top_p']}")
    from lnull.evaluate.sandbox import check_isolation

    check_isolation(code["isolation"], probe=False)  # the name only: the machine is probed before scoring


def judge_key(url: str, key_env: str) -> Optional[str]:
    """The MT-Bench judge's API key from ``$key_env``; ConfigError when a non-local judge has none."""
    key = os.environ.get(key_env)
    if not key and (urlparse(url).hostname or "") not in ("localhost", "127.0.0.1", "::1"):
        raise ConfigError(f"eval.mtbench.judge_url={url} needs an API key in the environment variable "
                          f"{key_env} (eval.mtbench.judge_key_env), which is not set")
    return key


def check_benchmark_inputs(name: str, bench: dict[str, Any], cache_dir: Any,
                           eval_cfg: Optional[dict[str, Any]] = None) -> None:
    """Before any model is loaded: the benchmark's data is here, an lm-eval task name exists, and (given
    ``eval_cfg``) this machine can isolate the programs a code benchmark runs."""
    from lnull.data.sources import check_available

    if bench["kind"] == "code" and eval_cfg is not None and eval_cfg["code"]["backend"] == "builtin":
        from lnull.evaluate.sandbox import check_isolation

        check_isolation(eval_cfg["code"]["isolation"])

    if bench.get("dataset") and bench["dataset"] != "hub":
        check_available(bench["dataset"], cache_dir, f"eval.benchmarks.{name}.dataset")
    if bench["kind"] in ("lm_eval", "lm_eval_nll"):
        from lnull.evaluate.harness import builtin_task_yaml

        builtin_task_yaml(bench["task"])
