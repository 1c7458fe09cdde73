"""The one table of stages: name, folder, what each reads, what enters its key, and how it runs.

``lnull run``, every stage command, the CLI help, the store keys and the invalidation of a run's views all
read :data:`STAGES`. A stage's key is the hash of exactly what it reads: the config values of
``key_inputs(cfg)`` plus the keys of the upstream stages it reads (``reads(cfg)``), so

- calibration is keyed by (model weights, target modules, BOS, calibration section): a rank sweep, or
  LoRA-Null v1/v2 and CorDA on one model, calibrate once;
- init by (calibration key when the method reads a statistic, model, dtype, the method's own options; for a method
  reading the fine-tuning data, EVA and LoRA-GA, the task, its data fingerprint, train.max_length and BOS);
- train by (init key, task and its data, train recipe, launch), export by the train key;
- evaluation per record (``lnull.evaluate.stage``), by (scored model's key, benchmark settings, scorer version).

Resource and logging knobs that do not change a result (``calibration.device_budget_gb``, ``train.log_every``,
``train.checkpoint_every``, ``train.wandb*``) are left out of the keys. Every stage runs as
``run(cfg, ctx) -> summary`` with a :class:`StageContext` (``lnull.pipeline`` builds it); a stage module
imports nothing of the pipeline.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from lnull.io import stable_hash

Config = dict[str, Any]

UNHASHED = {"calibration": ("device_budget_gb",),
            "train": ("log_every", "checkpoint_every", "wandb", "wandb_project")}


def _section(cfg: Config, name: str) -> Any:
    """A config section without its unhashed knobs."""
    value = cfg.get(name)
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in UNHASHED.get(name, ())}
    return value


def _method(cfg: Config) -> Any:
    from lnull.methods import REGISTRY

    return REGISTRY[cfg["method"]["name"]]


def model_fingerprint_of(cfg: Config) -> dict[str, Any]:
    """The run's pre-trained model in a key: its name_or_path and weight fingerprint (``lnull.modeling``)."""
    from lnull.modeling import model_fingerprint

    return model_fingerprint(cfg["model"]["name_or_path"], cfg.get("cache_dir"))


def _calibrate_inputs(cfg: Config) -> dict[str, Any]:
    m = cfg["model"]
    return {"model": model_fingerprint_of(cfg), "target_modules": m["target_modules"], "add_bos": m["add_bos"],
            "calibration": _section(cfg, "calibration")}


def _init_inputs(cfg: Config) -> dict[str, Any]:
    m = cfg["model"]
    # "residual": inits are an adapter only since the residual is rebuilt on load (lnull.residual); entries
    # written before held a stored residual whose rounding the rebuilt one need not match bit for bit
    inputs = {"model": model_fingerprint_of(cfg), "dtype": m["dtype"], "target_modules": m["target_modules"],
              "method": _method(cfg).key_options(cfg["method"]), "residual": "rebuilt on load"}
    if _method(cfg).reads_task_data:  # EVA's activations, LoRA-GA's gradients: what build_examples reads
        from lnull.data.sources import data_fingerprint

        task = cfg["task"]
        inputs["task_data"] = {"task": task, "data": data_fingerprint(task["dataset"], cfg.get("cache_dir")),
                               "max_length": cfg["train"]["max_length"], "add_bos": m["add_bos"]}
    return inputs


def _train_inputs(cfg: Config) -> dict[str, Any]:
    from lnull.data.sources import data_fingerprint

    task = cfg["task"]
    # micro-batches > 1 average each example's token mean since the loss change (ResponseLoss): not the entries
    # trained before with a pooled token mean; micro-batch 1 (the paper recipe) computes what it always did
    pooled = {"loss": "per-example mean"} if cfg["train"]["micro_batch_size"] > 1 else {}
    return {"task": task, "data": data_fingerprint(task["dataset"], cfg.get("cache_dir")),
            "train": _section(cfg, "train"), "accelerate": cfg.get("accelerate"), "add_bos": cfg["model"]["add_bos"],
            **pooled}


def _nothing(cfg: Config) -> dict[str, Any]:
    return {}


def _never(layout: Any) -> bool:
    return False


def _pending(name: str) -> Callable[[Any], bool]:
    """``loads_model`` of a stage that loads the run's model: while its output is not complete."""
    return lambda layout: not layout.is_complete(name)


def _lazy(target: str) -> Callable[..., Any]:
    """The function ``target`` ("module:function"), imported only when called, as a stage's runner is (so this
    table imports no stage module: they import it)."""

    def call(*args: Any) -> Any:
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)(*args)

    return call


def _check_pending(name: str, check: str) -> Callable[[Any], None]:
    """``check`` ("module:function" given the layout, :func:`_lazy`) unless the stage's output is complete."""

    def check_unless_complete(layout: Any) -> None:
        if not layout.is_complete(name):
            _lazy(check)(layout)

    return check_unless_complete


class StageContext(Protocol):
    """What a stage's ``run(cfg, ctx)`` gets besides the config: ``out``, the folder to write (the store's
    partial folder of the key, or the run-local ``<folder>.partial``); ``input(stage)``, the completed output of
    an upstream stage it reads (``maybe_input``: of one it uses when present, else None); ``layout``, the run's
    :class:`lnull.layout.RunLayout` (paths, store, keys; typed ``Any`` here because ``lnull.layout`` imports
    this module); ``log``, where progress lines go."""

    stage: Stage
    out: Path
    layout: Any
    log: Callable[[str], None]

    def input(self, stage: str) -> Path: ...

    def maybe_input(self, stage: str) -> Optional[Path]: ...


StageRun = Callable[[Config, StageContext], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    ``folder``: its folder in a run (and namespace in the store); ``stored``: output content-addressed in the
    store (the run holds a view) or written into the run itself; ``reads(cfg)``: upstream stages it reads;
    ``optional_reads``: upstream stages it uses when complete but never requires; ``applies(cfg)``: whether ``lnull run`` runs it
    for this config (calibration only for methods that read a statistic).

    Pre-flight (``lnull.pipeline.check_inputs``, before any stage of ``lnull run`` starts and before any model
    loads), each given the run's layout: ``loads_model``, asked first of every pending stage (in table order),
    whether it will load the run's model (``model.name_or_path``); then ``check`` (``check_first`` stages
    first, then table order) checks what the stage will read that no stage produces (task data, the rank
    against the model's shapes, benchmark inputs, the models ``eval.models`` names): a one-line ConfigError if
    something is missing; it returns True when it finds that the stage loads the run's model after all
    (evaluate: a record of the base model is missing). The run's model is checked last, once, if any stage
    loads it. ``writes_records(layout)``: the result record keys the stage writes (registered with the store
    when it starts, so gc keeps them)."""

    name: str
    folder: str
    help: str
    runner: str  # "module:function", imported when the stage runs
    key_inputs: Callable[[Config], dict[str, Any]] = _nothing
    reads: Callable[[Config], tuple[str, ...]] = lambda cfg: ()
    optional_reads: tuple[str, ...] = ()
    stored: bool = True
    applies: Callable[[Config], bool] = lambda cfg: True
    loads_model: Callable[[Any], bool] = _never
    check: Optional[Callable[[Any], Optional[bool]]] = None
    check_first: bool = False
    writes_records: Callable[[Any], list[str]] = lambda layout: []

    def function(self) -> StageRun:
        module, _, name = self.runner.partition(":")
        return getattr(importlib.import_module(module), name)


STAGES: tuple[Stage, ...] = (
    Stage("calibrate", "calibration", "collect input covariances of the targeted linear layers on calibration text",
          "lnull.calibrate:run", key_inputs=_calibrate_inputs, applies=lambda cfg: _method(cfg).needs_calibration,
          loads_model=_pending("calibrate")),
    Stage("init", "init", "initialise adapters with the chosen method; write the initial PEFT adapter",
          "lnull.initialize:run", key_inputs=_init_inputs,
          reads=lambda cfg: ("calibrate",) if _method(cfg).needs_calibration else (),
          loads_model=_pending("init"),
          check=_check_pending("init", "lnull.initialize:check_inputs")),
    Stage("train", "train", "fine-tune the initialised model on the task data", "lnull.train:run",
          key_inputs=_train_inputs, reads=lambda cfg: ("init",),
          check=_check_pending("train", "lnull.train:check_inputs"), check_first=True),
    Stage("evaluate", "eval", "score base / init / trained models on the eval benchmarks (one stored record each)",
          "lnull.evaluate.stage:run", stored=False,
          key_inputs=lambda cfg: {"eval": cfg["eval"], "model": model_fingerprint_of(cfg), "dtype": cfg["model"]["dtype"],
                                  "add_bos": cfg["model"]["add_bos"]},
          reads=lambda cfg: tuple(s for s, which in (("init", ("init", "trained")), ("train", ("trained",)))
                                  if set(which) & set(cfg["eval"]["models"])),
          check=_lazy("lnull.evaluate.stage:check_inputs"), writes_records=_lazy("lnull.evaluate.stage:records_used")),
    Stage("export", "export", "write a merged HF model and a LoRA adapter on the original model",
          "lnull.export:run", reads=lambda cfg: ("init", "train"), loads_model=_pending("export")),
    Stage("analyze", "analysis", "effective ranks, spectra, projection profile, Table 1, rho_k, relative change",
          "lnull.analysis:run", key_inputs=lambda cfg: {"analysis": cfg["analysis"]},
          optional_reads=("calibrate", "init", "train"), stored=False, loads_model=_pending("analyze")),
)
BY_NAME = {stage.name: stage for stage in STAGES}
DEFAULT_CHAIN = ("calibrate", "init", "train", "evaluate")


def upstream(stage: Stage, cfg: Config) -> tuple[str, ...]:
    """Every stage whose key ``stage``'s key depends on: what it reads and, optionally, uses."""
    return tuple(dict.fromkeys(stage.reads(cfg) + stage.optional_reads))


class StageKeys:
    """Key of each stage for one config (16 hex): hash(stage name, its key inputs, its upstream stages' keys).

    Computed on first use, so a stage command never needs what only later stages read (a task file, say).
    ``complete(stage)`` (given by a run layout) tells which optional upstream outputs exist: only those enter
    the key of a stage that uses them when present (``analyze``), so it is redone when one appears."""

    def __init__(self, cfg: Config, complete: Optional[Callable[[str], bool]] = None):
        self.cfg = cfg
        self.complete = complete
        self._inputs: dict[str, dict[str, Any]] = {}
        self._keys: dict[str, str] = {}

    def inputs(self, name: str) -> dict[str, Any]:
        if name not in self._inputs:
            self._inputs[name] = BY_NAME[name].key_inputs(self.cfg)
        return self._inputs[name]

    def upstream(self, name: str) -> dict[str, str]:
        stage = BY_NAME[name]
        used = [u for u in upstream(stage, self.cfg) if u in stage.reads(self.cfg) or self.complete is None
                or self.complete(u)]
        return {u: self[u] for u in used}

    def __getitem__(self, name: str) -> str:
        if BY_NAME[name].optional_reads and self.complete is not None:  # depends on what exists now
            return stable_hash({"stage": name, "inputs": self.inputs(name), "upstream": self.upstream(name)})
        if name not in self._keys:
            self._keys[name] = stable_hash({"stage": name, "inputs": self.inputs(name),
                                            "upstream": self.upstream(name)})
        return self._keys[name]

    def record(self, name: str) -> dict[str, Any]:
        """What a stage entry's ``complete.json`` records of what made it: its inputs and upstream keys."""
        return {"stage": name, "key": self[name], "inputs": self.inputs(name), "upstream": self.upstream(name)}
