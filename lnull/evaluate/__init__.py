"""Stage `evaluate`: score base / init / trained models of a run (or any HF model) and write
``eval/results.json``.

Each benchmark's record is written to ``eval.partial/<model>/<benchmark>.json`` as soon as it is done,
so a killed evaluation resumes at the first benchmark without a record.  Scorers live one per module
behind ``lnull.evaluate.registry``.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from lnull.config import ConfigError
from lnull.evaluate.base import EvalContext
from lnull.evaluate.registry import RUN_MODELS, check_benchmark_inputs, scorer
from lnull.modeling import load_model, load_tokenizer, pick_device, resolve_model


def model_source(cfg: dict[str, Any], run_dir: Path, which: str) -> tuple[str, Optional[str], str]:
    """(base model folder or hub name, PEFT adapter folder or None, identity) of ``which``: base | init |
    trained, a model folder, a PEFT adapter folder (a run's ``init/adapter`` or ``train/adapter`` on that run's
    ``init/base``, any other on its ``base_model_name_or_path``) or a hub name."""
    if which not in RUN_MODELS:
        path = resolve_model(which, cfg.get("cache_dir"))
        adapter_cfg = Path(path) / "adapter_config.json"
        if not adapter_cfg.exists():
            return path, None, path
        run_base = Path(path).parent.parent / "init" / "base"  # a run's init/ or train/ adapter: its residual
        base = str(run_base) if (run_base / "config.json").exists() else \
            json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        return base, path, path
    if which == "base":
        path = resolve_model(cfg["model"]["name_or_path"], cfg.get("cache_dir"))
        return path, None, path
    full_model = run_dir / "train" / "model"
    if which == "trained" and full_model.exists():
        return str(full_model), None, str(full_model)
    base, adapter = run_dir / "init" / "base", run_dir / ("init/adapter" if which == "init" else "train/adapter")
    return (str(base), str(adapter), str(adapter)) if adapter.exists() else (str(base), None, str(base))


def load_for_eval(cfg: dict[str, Any], run_dir: Path, which: str, device, weights: bool = True) -> tuple[Any, Any, str]:
    """(model, tokenizer, identity) for ``which`` (see :func:`model_source`); model None when not ``weights``
    (vLLM or the bigcode harness load the folders themselves)."""
    base, adapter, identity = model_source(cfg, run_dir, which)
    tokenizer = load_tokenizer(base)
    if not weights:
        return None, tokenizer, identity
    model = load_model(base, cfg["model"]["dtype"], device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, tokenizer, identity


def needs_weights(benches: list[dict[str, Any]], ev: dict[str, Any]) -> bool:
    """Whether scoring ``benches`` needs the model in this process: lm-eval always; generation unless it
    runs in vLLM; code unless the bigcode harness runs it."""
    for bench in benches:
        if bench["kind"] == "lm_eval":
            return True
        if bench["kind"] == "code" and ev["code"]["backend"] == "bigcode":
            continue
        if ev["engine"] == "hf":
            return True
    return False


def model_slug(which: str) -> str:
    """Folder-safe name of an evaluated model (``base``, or a path/hub name flattened)."""
    return which if which in RUN_MODELS else re.sub(r"[^A-Za-z0-9_.-]+", "_", which).strip("_")


def score_one(name: str, bench: dict[str, Any], ctx: EvalContext) -> dict[str, Any]:
    """Run one scorer and complete its record with the fields every record carries."""
    start = time.perf_counter()
    rec = scorer(bench["kind"])(name, bench, ctx)
    seconds = time.perf_counter() - start
    n = rec.get("n") or 0
    return {"model": ctx.which, "identity": ctx.identity, "benchmark": name, "kind": bench["kind"],
            "seed": ctx.eval_cfg["seed"], "engine": ctx.eval_cfg["engine"], "seconds": round(seconds, 3),
            "items_per_s": round(n / seconds, 3) if n and seconds > 0 else None, **rec}


def run(cfg: dict[str, Any], out_dir: Path, run_dir: Path) -> dict[str, Any]:
    from lnull.runs import atomic_write_json

    benchmarks = cfg["eval"]["benchmarks"]
    if not benchmarks:
        raise ConfigError("eval.benchmarks is empty; pick an eval= config (e.g. eval=[knowledge,math])")
    for name, bench in benchmarks.items():  # unknown kinds, missing data, unknown tasks: before any model loads
        scorer(bench["kind"])
        check_benchmark_inputs(name, bench, cfg.get("cache_dir"))
    device = pick_device(cfg["device"])
    records = []
    for which in cfg["eval"]["models"]:
        model_dir = out_dir / model_slug(which)
        pending = [n for n in benchmarks if not (model_dir / f"{n}.json").exists()]
        weights = needs_weights([benchmarks[n] for n in pending], cfg["eval"])
        loaded = load_for_eval(cfg, run_dir, which, device, weights) if pending else (None, None, "")
        for name, bench in benchmarks.items():
            done = model_dir / f"{name}.json"
            if not done.exists():
                ctx = EvalContext(loaded[0], loaded[1], cfg, which, loaded[2], model_dir / f"{name}.work")
                ctx.work_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(done, score_one(name, bench, ctx))
            records.append(json.loads(done.read_text()))
    atomic_write_json(out_dir / "results.json", {"experiment": cfg["experiment"], "method": cfg["method"]["name"],
                                                 "rank": cfg["method"]["rank"], "results": records})
    return {r["model"] + "/" + r["benchmark"]: (round(r["value"], 2) if r["value"] is not None else None)
            for r in records}
