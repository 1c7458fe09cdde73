"""Stage `evaluate`: score base / init / trained models of a run and write ``eval/results.json``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lnull.config import ConfigError
from lnull.data.sources import load_records, require_fields
from lnull.evaluate.generate import generate
from lnull.evaluate.qa import answers_of, exact_match
from lnull.modeling import load_model, load_tokenizer, pick_device, resolve_model

KINDS = ("qa_exact_match",)


def load_for_eval(cfg: dict[str, Any], run_dir: Path, which: str, device) -> tuple[Any, Any, str]:
    """(model, tokenizer, identity) for ``which`` in base | init | trained."""
    dtype = cfg["model"]["dtype"]
    if which == "base":
        path = resolve_model(cfg["model"]["name_or_path"], cfg.get("cache_dir"))
        return load_model(path, dtype, device), load_tokenizer(path), path
    base = run_dir / "init" / "base"
    adapter = run_dir / ("init/adapter" if which == "init" else "train/adapter")
    full_model = run_dir / "train" / "model"
    if which == "trained" and full_model.exists():
        return load_model(str(full_model), dtype, device), load_tokenizer(str(full_model)), str(full_model)
    model = load_model(str(base), dtype, device)
    if adapter.exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model, load_tokenizer(str(base)), str(adapter if adapter.exists() else base)


def score_benchmark(name: str, bcfg: dict[str, Any], model: Any, tokenizer: Any, cfg: dict[str, Any]) -> dict:
    """One benchmark's record: metric, value (%), n, settings."""
    rows = load_records(bcfg["dataset"], cfg.get("cache_dir"), cfg["eval"]["limit"])
    require_fields(rows, [bcfg["question_field"], bcfg["answer_field"]], bcfg["dataset"])
    prompts = [bcfg["prompt"].format(question=r[bcfg["question_field"]]) for r in rows]
    start = time.perf_counter()
    preds = generate(model, tokenizer, prompts, bcfg["max_new_tokens"], ["\n", ".", ","], cfg["eval"]["batch_size"],
                     cfg["model"]["add_bos"], cfg["progress"])
    seconds = time.perf_counter() - start
    hits = [exact_match(p, answers_of(r, bcfg["answer_field"])) for p, r in zip(preds, rows)]
    return {"benchmark": name, "metric": "exact_match", "value": 100.0 * sum(hits) / len(hits), "n": len(hits),
            "dataset": bcfg["dataset"], "items_per_s": len(hits) / seconds,
            "settings": {"greedy": True, "max_new_tokens": bcfg["max_new_tokens"], "prompt": bcfg["prompt"],
                         "add_bos": cfg["model"]["add_bos"], "engine": "hf-generate"},
            "examples": [{"prompt": p, "prediction": x} for p, x in list(zip(prompts, preds))[:3]]}


def run(cfg: dict[str, Any], out_dir: Path, run_dir: Path) -> dict[str, Any]:
    from lnull.runs import atomic_write_json

    benchmarks = cfg["eval"]["benchmarks"]
    if not benchmarks:
        raise ConfigError("eval.benchmarks is empty; pick an eval= config")
    for name, b in benchmarks.items():
        if b["kind"] not in KINDS:
            raise ConfigError(f"unknown benchmark kind '{b['kind']}' for {name}; known: {', '.join(KINDS)}")
    device = pick_device(cfg["device"])
    records = []
    for which in cfg["eval"]["models"]:
        model, tokenizer, identity = load_for_eval(cfg, run_dir, which, device)
        for name, bcfg in benchmarks.items():
            rec = score_benchmark(name, bcfg, model, tokenizer, cfg)
            records.append({"model": which, "identity": identity, **rec})
    atomic_write_json(out_dir / "results.json", {"experiment": cfg["experiment"], "method": cfg["method"]["name"],
                                                 "rank": cfg["method"]["rank"], "results": records})
    return {r["model"] + "/" + r["benchmark"]: round(r["value"], 2) for r in records}
