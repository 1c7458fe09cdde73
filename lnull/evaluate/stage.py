"""Stage `evaluate` (``lnull.evaluate.stage:run``): score base / init / trained models of a run (or any HF model) into stored result records,
and write the run's ``eval/results.json``.

Each (scored model, benchmark) is one record in the store (``store/eval/<key>.json``), keyed by the scored
model's key (the base model's weights, or the run's init / train key), the benchmark's settings and the
scorer's version: the base model is scored once for every run on it, a new benchmark scores only itself, and
removing one deletes nothing. What a record says was scored (``lnull.records``) is read from the store entries that
produced the scored model. Scorers live one per module, each registering a ``Scorer`` (``lnull.evaluate.base``)
found through ``lnull.evaluate.registry``; a killed
evaluation resumes at the first record not written (and inside it, from the scorer's cache in its work folder).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

from lnull.errors import ConfigError
from lnull.evaluate.base import EvalContext
from lnull.evaluate.registry import RUN_MODELS, check_benchmark_inputs, scorer_of
from lnull.io import atomic_write_json, stable_hash
from lnull.modeling import (load_tokenizer, model_fingerprint, original_path, pick_device,
                            release_accelerator_memory, resolve_model)
from lnull.records import BaseModelInfo, ResultRecord, ScorerInfo, lineage, record_digest, validate
from lnull.residual import load_residual_model
from lnull.stages import StageContext
from lnull.store import RECORDS


class ModelSource(NamedTuple):
    """Where the weights of a scored model come from. ``base``: model folder or hub name; ``adapter``: PEFT
    adapter folder loaded on it (None without one); ``weights_from``: the folder (or hub name) the weights came
    from; ``init_adapter``: the run's ``init/adapter`` whose s B0 A0 is subtracted from ``base`` first (the
    residual model, :mod:`lnull.residual`), None when ``base`` is used as it is."""

    base: str
    adapter: Optional[str]
    weights_from: str
    init_adapter: Optional[str] = None


def model_source(layout: Any, which: str) -> ModelSource:
    """The :class:`ModelSource` of ``which``: base | init | trained of the layout's run, a model folder, a PEFT
    adapter folder (a run's ``init/adapter`` or ``train/adapter`` goes on that run's residual model, any other
    on its ``base_model_name_or_path``) or a hub name."""
    cfg = layout.cfg
    if which not in RUN_MODELS:
        path = resolve_model(which, cfg.get("cache_dir"))
        adapter_cfg = Path(path) / "adapter_config.json"
        if not adapter_cfg.exists():
            return ModelSource(path, None, path)
        recorded = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        run_init = Path(path).absolute().parent.parent / "init"  # the run's (or its store entry's) init
        if (run_init / "base" / "config.json").exists():  # initialised before residuals were rebuilt on load
            return ModelSource(str(run_init / "base"), path, path)
        init_adapter = run_init / "adapter"
        return ModelSource(recorded, path, path, str(init_adapter) if init_adapter.is_dir() else None)
    original = original_path(cfg)
    if which == "base":
        return ModelSource(original, None, original)
    init = layout.input("init")
    adapter = init / "adapter"
    if which == "trained":
        train = layout.input("train")
        if (train / "model").exists():
            return ModelSource(str(train / "model"), None, str(train / "model"))
        return ModelSource(original, str(train / "adapter"), str(train / "adapter"), str(adapter))
    if not adapter.exists():  # full fine-tuning starts from the original model itself
        return ModelSource(original, None, original)
    return ModelSource(original, str(adapter), str(adapter), str(adapter))


def scored_key(layout: Any, which: str) -> str:
    """Key of the weights ``which`` scores: the run's init or train key, or a hash of the weights of the base
    model or of a model folder, so every run on one model shares its base records."""
    cfg = layout.cfg
    if which in ("init", "trained"):
        return layout.keys["train" if which == "trained" else "init"]
    name = cfg["model"]["name_or_path"] if which == "base" else which
    return stable_hash({"base" if which == "base" else "path": model_fingerprint(name, cfg.get("cache_dir"))})


def scored_model(layout: Any, which: str) -> tuple[str, dict[str, Any], BaseModelInfo]:
    """(:func:`scored_key`, the complete.json markers of the store entries the weights came from, the
    pre-trained model it starts from)."""
    cfg, keys = layout.cfg, layout.keys
    m = cfg["model"]
    markers: dict[str, Any] = {}
    if which in ("init", "trained"):
        stages = ("train", "init") if which == "trained" else ("init",)
        for stage in stages + tuple(s for s in ("calibrate",) if s in keys.upstream("init")):
            markers[stage] = layout.marker(stage)
        weights = markers["init"]["inputs"]["model"]
    else:
        weights = model_fingerprint(m["name_or_path"] if which == "base" else which, cfg.get("cache_dir"))
    base = BaseModelInfo(name=m["name"], name_or_path=weights["name_or_path"], sha256=weights["sha256"],
                             dtype=m["dtype"])
    return scored_key(layout, which), markers, base


def expected_records(layout: Any, which: str) -> dict[str, str]:
    """{benchmark: record key} of the layout's config for the model ``which`` (nothing is computed)."""
    model_key = scored_key(layout, which)
    return {name: record_key(layout.cfg, model_key, name, bench) for name, bench in
            layout.cfg["eval"]["benchmarks"].items()}


def record_key(cfg: dict[str, Any], model_key: str, name: str, bench: dict[str, Any]) -> str:
    """Hash of exactly what a record depends on: the scored weights, the benchmark, the evaluation settings
    its scorer reads (``Scorer.key_settings``), how prompts are built (BOS) and the weights loaded (dtype), and
    the scorer's version."""
    ev, scorer = cfg["eval"], scorer_of(bench["kind"])
    inputs = {"model": model_key, "benchmark": name, "bench": bench, "dtype": cfg["model"]["dtype"],
              "add_bos": cfg["model"]["add_bos"], "scorer": scorer.full_version(),
              "eval": {k: ev.get(k) for k in ("limit", "batch_size", "engine", "seed", "max_new_tokens")}}
    extra = scorer.key_settings(cfg)
    clash = sorted(extra.keys() & inputs.keys())
    if clash:
        raise ValueError(f"benchmark kind '{bench['kind']}': key_settings names {clash}, which every key already has")
    return stable_hash({**inputs, **extra})


def scorer_version(kind: str) -> str:
    """The record's ``scorer.version`` of ``kind`` (``Scorer.full_version``): a change re-scores, an equal one
    reuses."""
    return scorer_of(kind).full_version()


def load_for_eval(cfg: dict[str, Any], layout: Any, which: str, device, weights: bool = True
                  ) -> tuple[Any, Any, ModelSource]:
    """(model, tokenizer, :class:`ModelSource`) for ``which`` (see :func:`model_source`); model None when not
    ``weights`` (vLLM or the bigcode harness load the folders themselves)."""
    from lnull.methods import attach

    source = model_source(layout, which)
    base, adapter = source.base, source.adapter
    tokenizer = load_tokenizer(base)
    if not weights:
        return None, tokenizer, source
    model = load_residual_model(base, source.init_adapter and Path(source.init_adapter), cfg["model"]["dtype"],
                                device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
        attach(model, Path(adapter))  # a method's hooks, if the adapter was saved without them baked in
    return model, tokenizer, source


def needs_weights(benches: list[dict[str, Any]], ev: dict[str, Any]) -> bool:
    """Whether scoring ``benches`` needs the model in this process (any of their ``Scorer.needs_weights``)."""
    return any(scorer_of(bench["kind"]).needs_weights(ev) for bench in benches)


def _release_vllm() -> None:
    """Drop a kept vLLM engine, if vLLM generation ran in this process."""
    import sys

    engine = sys.modules.get("lnull.evaluate.vllm_engine")
    if engine is not None:
        engine.release_engine()


def model_slug(which: str) -> str:
    """Folder-safe name of an evaluated model (``base``, or a path/hub name flattened)."""
    return which if which in RUN_MODELS else re.sub(r"[^A-Za-z0-9_.-]+", "_", which).strip("_")


def stderr_of(rec: dict[str, Any], kind: str) -> Optional[float]:
    """The scorer's standard error, or for a percentage of n independent items the binomial one (in %)."""
    if rec.get("stderr") is not None:
        return float(rec["stderr"])
    value, n = rec.get("value"), rec.get("n") or 0
    if scorer_of(kind).proportion and value is not None and n > 0:
        p = value / 100.0
        return 100.0 * (p * (1 - p) / n) ** 0.5
    return None


def score_one(name: str, bench: dict[str, Any], ctx: EvalContext, key: str = "",
              lineage_: Optional[dict[str, Any]] = None) -> dict:
    """Run one scorer and build its validated record (``lineage_`` None: a pre-trained model of ``ctx.cfg``)."""
    if lineage_ is None:
        m = ctx.cfg["model"]
        lineage_ = lineage({}, BaseModelInfo(name=m["name"], name_or_path=m["name_or_path"], sha256=None,
                                             dtype=m["dtype"]))
    start = time.perf_counter()
    rec = scorer_of(bench["kind"]).function()(name, bench, ctx)
    seconds = time.perf_counter() - start
    n = int(rec.get("n") or 0)
    core = {"metric", "value", "n", "stderr", "settings", "task", "task_version", "lm_eval_version"}
    record = ResultRecord(
        key=key, model=ctx.which, weights_from=ctx.weights_from, **lineage_, benchmark=name, kind=bench["kind"],
        metric=rec.get("metric", bench["kind"]), value=None if rec.get("value") is None else float(rec["value"]),
        stderr=stderr_of(rec, bench["kind"]), n=n,
        scorer=ScorerInfo(kind=bench["kind"], version=scorer_version(bench["kind"]),
                              lm_eval_version=rec.get("lm_eval_version"), task=rec.get("task", bench.get("task")),
                              task_version=None if rec.get("task_version") is None else str(rec["task_version"])),
        settings={**rec.get("settings", {}), "seed": ctx.eval_cfg["seed"], "engine": ctx.eval_cfg["engine"]},
        details={k: v for k, v in rec.items() if k not in core}, seconds=round(seconds, 3),
        items_per_s=round(n / seconds, 3) if n and seconds > 0 else None,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    data = json.loads(json.dumps(record.to_dict(), default=str))
    validate(data, f"record {key}")
    return data


def check_inputs(layout: Any) -> bool:
    """The stage's pre-flight (``Stage.check``): the benchmarks' inputs (``Scorer.check_inputs``) and every
    ``eval.models`` entry that is a model folder or hub id exist; True when the base model is scored and one of
    its records is missing (so the run loads the base model)."""
    from lnull.modeling import check_model_available

    cfg, cache = layout.cfg, layout.cfg.get("cache_dir")
    for name, bench in cfg["eval"]["benchmarks"].items():
        check_benchmark_inputs(name, bench, cache, cfg["eval"])
    loads_model = False
    for model in cfg["eval"]["models"]:
        if model not in RUN_MODELS:
            check_model_available(model, cache, "eval.models entry")
        elif model == "base" and any(layout.store.read_record(k) is None
                                     for k in expected_records(layout, "base").values()):
            loads_model = True
    return loads_model


def records_used(layout: Any) -> list[str]:
    """``Stage.writes_records``: the record key of every (scored model, benchmark) of the run's config, in
    ``eval.models`` order."""
    return [key for which in layout.cfg["eval"]["models"] for key in expected_records(layout, which).values()]


def run(cfg: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Stage entry: every (model, benchmark) record of this config, computed when the store lacks it; the run's
    ``eval/results.json`` lists them and ``eval/<model>/<benchmark>.json`` links each."""
    layout, store, log = ctx.layout, ctx.layout.store, ctx.log
    benchmarks = cfg["eval"]["benchmarks"]
    if not benchmarks:
        raise ConfigError("eval.benchmarks is empty; pick an eval= config (e.g. eval=[knowledge,math])")
    for name, bench in benchmarks.items():  # unknown kinds, missing data, unknown tasks: before any model loads
        check_benchmark_inputs(name, bench, cfg.get("cache_dir"), cfg["eval"])
    device = pick_device(cfg["device"])
    records, counts = [], {"scored": 0, "reused": 0}
    for which in cfg["eval"]["models"]:
        _, markers, base_model = scored_model(layout, which)
        scored = lineage(markers, base_model)
        keys = expected_records(layout, which)
        loaded = None
        # benchmarks scored in this process first, then those whose engine loads the weights itself (vLLM,
        # bigcode): the HF copy is freed before them, and a vLLM engine before an HF copy loads
        order = sorted(benchmarks, key=lambda n: not needs_weights([benchmarks[n]], cfg["eval"]))
        by_name: dict[str, dict[str, Any]] = {}
        for name in order:
            bench, key = benchmarks[name], keys[name]
            with store.lock(RECORDS, key, log):
                stored, why = store.inspect_item(RECORDS, key)
                if stored is None:
                    if store.item_path(RECORDS, key).exists():
                        log(f"[evaluate] {why}; re-scoring it")
                    weights = needs_weights([bench], cfg["eval"])
                    if loaded is not None and loaded[0] is not None and not weights:
                        loaded = ectx = None  # drop the HF copy before an engine that loads the weights itself
                        release_accelerator_memory()
                    if loaded is None or (weights and loaded[0] is None):
                        if weights:
                            _release_vllm()
                        loaded = load_for_eval(cfg, layout, which, device, weights)
                    source = loaded[2]
                    work = store.item_work(RECORDS, key)
                    work.mkdir(parents=True, exist_ok=True)
                    ectx = EvalContext(loaded[0], loaded[1], cfg, which, source.weights_from, work, source.base,
                                       source.adapter, source.init_adapter)
                    stored = score_one(name, bench, ectx, key, scored)
                    store.write_item(RECORDS, key, stored)
                    counts["scored"] += 1
                    log(f"[evaluate] {which}/{name}: scored ({key})")
                else:
                    counts["reused"] += 1
                    log(f"[evaluate] {which}/{name}: stored record reused ({key})")
            path = store.item_path(RECORDS, key)
            by_name[name] = validate(stored, str(path)).to_dict()
            link = ctx.out / model_slug(which) / f"{name}.json"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            os.symlink(os.path.relpath(path, link.parent), link)
        records.extend(by_name[n] for n in benchmarks)
        loaded = ectx = None  # this model's weights are done with: freed before the next model loads
        release_accelerator_memory()
    _release_vllm()
    atomic_write_json(ctx.out / "results.json", {"run": str(layout.dir), "experiment": cfg["experiment"],
                                                 "results": records,
                                                 "sha256": {r["key"]: record_digest(r) for r in records}})
    return {**counts, **{r["model"] + "/" + r["benchmark"]: (round(r["value"], 2) if r["value"] is not None
                                                             else None) for r in records}}
