"""The scorer registry (one ``Scorer`` per benchmark kind, registered by its own module) and what a scorer
gets: the loaded model, its tokenizer, the run config and a scratch folder (``EvalContext``).

A scorer module of ``lnull/evaluate/`` calls ``register(Scorer(...))`` at import time, once per kind it scores
(``lnull.evaluate.registry`` finds and imports such modules); everything the evaluate stage, the record key and
the compose-time checks need to know about a kind is a field of its ``Scorer``, so no other module compares a
kind name.  A scorer module imports heavy libraries (lm-eval, vLLM) inside its functions, so registering costs
nothing.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lnull.data.sources import load_records, require_fields
from lnull.errors import ConfigError
from lnull.evaluate.generate import generate

# (benchmark name, its resolved ``eval.benchmarks.<name>`` section, EvalContext) -> the raw record
# {"metric", "value", "n", optional "stderr", "settings", anything else kept as details}.
ScoreFn = Callable[[str, dict, "EvalContext"], dict]


def loads_unless_vllm(ev: Any) -> bool:
    """Default ``Scorer.needs_weights`` of a generating scorer: the HF weights here unless vLLM generates."""
    return ev["engine"] == "hf"


def loads_always(ev: Any) -> bool:
    """``Scorer.needs_weights`` of a scorer that runs the model in this process whatever the engine (lm-eval's
    runner, likelihoods, teacher-forced passes)."""
    return True


def no_key_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Default ``Scorer.key_settings``: the benchmark's own section and the common eval settings are all."""
    return {}


# A likelihood pass (lm-eval's HFLM, the held-out scorer) holds a batch's fp32 logits and their log-softmax, [b, tokens, vocab] each: a large-vocabulary model
# (Gemma-3: 262,144) at the demo's batch of 32 on 271-token passages needs ~17 GB for them alone.
LOGITS_BUDGET_BYTES = 4 * 2**30
LOGITS_PLANNING_TOKENS = 256


def logits_batch(batch_size: int, model: Any) -> int:
    """``eval.batch_size`` capped so that a batch of :data:`LOGITS_PLANNING_TOKENS`-token sequences keeps its fp32
    logits and log-softmax under :data:`LOGITS_BUDGET_BYTES` (SmolLM2's 49,152 vocabulary: 42, so the demo's 32
    stands; Gemma-3's 262,144: 8). The records' key keeps ``eval.batch_size`` (a score depends on the batch only through float rounding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        return batch_size
    return max(1, min(batch_size, LOGITS_BUDGET_BYTES // (LOGITS_PLANNING_TOKENS * vocab * 4 * 2)))


@dataclass(frozen=True)
class Scorer:
    """One benchmark kind: what ``eval.benchmarks.<name>.kind: <kind>`` selects, and every fact about it the
    evaluate stage, the record key and the config checks need."""

    kind: str  # the name ``eval.benchmarks.<name>.kind`` gives
    score: ScoreFn  # the scoring function; the stage calls it through :meth:`function`
    # lnull's version of the kind's protocol, part of every record key: bump it when the output for the same
    # input changes, so stored records of the old protocol are not reused
    version: str = "1"
    # installed distributions whose versions are part of the scorer's (("lm_eval",): a new lm-eval re-scores)
    packages: tuple[str, ...] = ()
    # (resolved ``eval`` section) -> True: scoring needs the HF weights loaded in this process; False: an engine
    # loads the model folders itself (vLLM, the bigcode harness)
    needs_weights: Callable[[Any], bool] = loads_unless_vllm
    # (resolved run config) -> {name: value}: the settings outside the benchmark's own section its records depend
    # on (e.g. ``eval.code``); they enter the record key under those names
    key_settings: Callable[[dict[str, Any]], dict[str, Any]] = no_key_settings
    # (name, benchmark section, ``eval`` section) -> None raising ConfigError: compose time, values only
    check: Optional[Callable[[str, Any, Any], None]] = None
    # (name, benchmark section, cache dir, ``eval`` section or None) -> None raising ConfigError when this machine
    # or library cannot score it (an unknown lm-eval task, no sandbox): before any model loads
    check_inputs: Optional[Callable[[str, Any, Any, Optional[dict[str, Any]]], None]] = None
    lower_is_better: bool = False  # the value is a loss (an NLL); otherwise higher is better
    # the value is a percentage of ``n`` independent items: a record without the scorer's stderr gets the binomial
    proportion: bool = False
    description: str = ""  # one line for people

    def full_version(self) -> str:
        """``version`` plus ``+<package>-<installed version>`` per entry of ``packages`` (the record's
        ``scorer.version``)."""
        return "+".join([self.version, *(f"{p}-{installed_version(p)}" for p in self.packages)])

    def function(self) -> ScoreFn:
        """The scoring function as its module holds it now (so patching ``<module>.<function>`` takes effect,
        as with a ``module:function`` lookup)."""
        module = importlib.import_module(self.score.__module__)
        return getattr(module, self.score.__name__, self.score)


def benchmark_task(name: str, bench: Any, allowed: Sequence[str]) -> str:
    """The benchmark's ``task`` (default: its name); ConfigError unless it is one of ``allowed``."""
    task = bench.get("task") or name
    if task not in allowed:
        raise ConfigError(f"eval.benchmarks.{name}.task '{task}' is not one of {', '.join(allowed)}")
    return task


REGISTRY: dict[str, Scorer] = {}  # kind -> Scorer; filled by importing scorer modules (lnull.evaluate.registry)


def register(scorer: Scorer) -> Scorer:
    """Add ``scorer`` under its kind (a kind registered twice is an error)."""
    if scorer.kind in REGISTRY:
        raise ValueError(f"benchmark kind '{scorer.kind}' registered twice")
    REGISTRY[scorer.kind] = scorer
    return scorer


def read_saved_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl cache a scorer appends to line by line; a line cut short by a kill is dropped."""
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class EvalContext:
    """One evaluated model.

    ``which``: base | init | trained | a model path; ``weights_from``: the folder (or hub name) the weights
    came from (the adapter folder when there is one); ``base_path`` / ``adapter_path``: the model folder (or
    hub name) and the PEFT adapter folder loaded on it (None without one); ``init_adapter_path``: the run's
    ``init/adapter`` whose s B0 A0 the weights of ``base_path`` lose first (the residual model, ``lnull.residual``;
    None: ``base_path`` as it is); ``work_dir``: the record's scratch
    folder in the store (kept when a run is killed, so scorers may cache generations there).
    """

    model: Any
    tokenizer: Any
    cfg: dict[str, Any]
    which: str
    weights_from: str
    work_dir: Path
    base_path: str = ""
    adapter_path: Optional[str] = None
    init_adapter_path: Optional[str] = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def eval_cfg(self) -> dict[str, Any]:
        return self.cfg["eval"]

    @property
    def add_bos(self) -> bool:
        return bool(self.cfg["model"]["add_bos"])

    def limit(self, bench: dict[str, Any]) -> Optional[int]:
        """Items to score of ``bench``: its own ``limit``, else ``eval.limit`` (None: all)."""
        return bench.get("limit") or self.eval_cfg["limit"]

    def records(self, bench: dict[str, Any], fields: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The benchmark's records, first :meth:`limit` of them; ConfigError if a field is missing."""
        rows = load_records(bench["dataset"], self.cfg.get("cache_dir"), self.limit(bench))
        require_fields(rows, list(fields), bench["dataset"])
        return rows

    def generate(self, prompts: list[str], max_new_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, desc: str = "generate",
                 max_length: Optional[int] = None) -> list[str]:
        """Completions with the configured engine (at most ``eval.max_new_tokens`` new tokens when set); wall
        time accumulates in ``timings['generate_s']``."""
        if self.eval_cfg.get("max_new_tokens"):
            max_new_tokens = min(max_new_tokens, self.eval_cfg["max_new_tokens"])
        start = time.perf_counter()
        if self.eval_cfg["engine"] == "vllm":
            from lnull.evaluate.vllm_engine import generate_vllm

            outs = generate_vllm(self, prompts, max_new_tokens, stop, temperature, top_p,
                                 self.eval_cfg["seed"] if seed is None else seed, max_length)
        else:
            outs = generate(self.model, self.tokenizer, prompts, max_new_tokens, stop, self.eval_cfg["batch_size"],
                            self.add_bos, self.cfg["progress"], temperature, top_p,
                            self.eval_cfg["seed"] if seed is None else seed, desc, max_length)
        self.timings["generate_s"] = self.timings.get("generate_s", 0.0) + time.perf_counter() - start
        return outs

    def settings(self, **extra: Any) -> dict[str, Any]:
        """Generation settings every record carries, plus the scorer's own."""
        return {"engine": self.eval_cfg["engine"], "add_bos": self.add_bos, "batch_size": self.eval_cfg["batch_size"],
                "seed": self.eval_cfg["seed"], "max_new_tokens_cap": self.eval_cfg.get("max_new_tokens"), **extra}
