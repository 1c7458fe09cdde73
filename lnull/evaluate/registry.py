"""Finding the registered scorers (``eval.benchmarks.<name>.kind`` -> :class:`lnull.evaluate.base.Scorer`) and
the checks of an ``eval`` section: at compose time (values) and before any model loads (data, machine).

A scorer module is a module of the ``lnull.evaluate`` package whose source calls ``register(Scorer(``; the first
lookup of a kind not yet registered imports every such module (each registers its kinds), so adding a benchmark
kind is one new module plus an eval config, nothing else edited.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional

from lnull.errors import ConfigError
from lnull.evaluate.base import REGISTRY, Scorer

RUN_MODELS = ("base", "init", "trained")
ENGINES = ("hf", "vllm")
SCORER_MARK = "register(Scorer("  # what makes a module of this package a scorer module


def import_scorers() -> None:
    """Import every scorer module of the ``lnull.evaluate`` package (those already imported are not re-run); its
    folders are the package's ``__path__``."""
    package = sys.modules[__package__]  # imported before any of its modules
    for folder in package.__path__:
        for path in sorted(Path(folder).glob("*.py")):
            if SCORER_MARK in path.read_text():
                importlib.import_module(f"{package.__name__}.{path.stem}")


def scorer_of(kind: str, where: str = "") -> Scorer:
    """The registered :class:`Scorer` of ``kind``; ConfigError naming the known kinds when there is none
    (``where``: e.g. " for eval.benchmarks.x", said after the kind)."""
    if kind not in REGISTRY:
        import_scorers()
    if kind not in REGISTRY:
        raise ConfigError(f"unknown benchmark kind '{kind}'{where}; known: {', '.join(kinds())}")
    return REGISTRY[kind]


def kinds() -> list[str]:
    """Every registered benchmark kind, sorted."""
    import_scorers()
    return sorted(REGISTRY)


def check_eval_config(ev: Any) -> None:
    """Raise ConfigError on the first bad value of an ``eval`` section (before any model is loaded)."""
    for name, bench in ev.benchmarks.items():
        scorer = scorer_of(bench.kind, f" for eval.benchmarks.{name}")
        if not bench.dataset:
            raise ConfigError(f"eval.benchmarks.{name}.dataset is not set")
        if bench.limit is not None and bench.limit < 1:
            raise ConfigError(f"eval.benchmarks.{name}.limit must be >= 1 or null, got {bench.limit}")
        if bench.max_new_tokens < 1:
            raise ConfigError(f"eval.benchmarks.{name}.max_new_tokens must be >= 1, got {bench.max_new_tokens}")
        if scorer.check is not None:
            scorer.check(name, bench, ev)
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


def check_benchmark_inputs(name: str, bench: dict[str, Any], cache_dir: Any,
                           eval_cfg: Optional[dict[str, Any]] = None) -> None:
    """Before any model is loaded: the kind's own input check (``Scorer.check_inputs``: an lm-eval task name
    exists; given ``eval_cfg``, this machine can isolate the programs a code benchmark runs), then the
    benchmark's data is here."""
    from lnull.data.sources import check_available

    check = scorer_of(bench["kind"]).check_inputs
    if check is not None:
        check(name, bench, cache_dir, eval_cfg)
    if bench.get("dataset") and bench["dataset"] != "hub":
        check_available(bench["dataset"], cache_dir, f"eval.benchmarks.{name}.dataset")
