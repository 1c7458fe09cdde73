"""Stage `train`: fine-tune the model from ``init/`` on the task data (response-only loss).

This is the single-process loop; frozen adapter parts follow ``init/adapter/lnull_method.json``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lnull.config import ConfigError
from lnull.data.prompts import IGNORE_INDEX, encode_example
from lnull.data.sources import load_records, require_fields
from lnull.initialize import METHOD_FILE
from lnull.methods.oplora import PROJECTIONS_FILE, attach_projections, bake_projections
from lnull.modeling import load_model, load_tokenizer, pick_device


def build_examples(cfg: dict[str, Any], tokenizer: Any) -> list[dict[str, list[int]]]:
    """Tokenised, response-masked examples of the task; errors before training on bad data."""
    task, tcfg = cfg["task"], cfg["train"]
    rows = load_records(task["dataset"], cfg.get("cache_dir"), task["max_examples"])
    require_fields(rows, [task["query_field"], task["response_field"]], task["dataset"])
    examples = [encode_example(tokenizer, r[task["query_field"]], r[task["response_field"]], tcfg["max_length"],
                               task["prompt"], cfg["model"]["add_bos"]) for r in rows]
    examples = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"])]
    if not examples:
        raise ConfigError(f"every example of '{task['dataset']}' has its response cut by train.max_length="
                          f"{tcfg['max_length']}")
    return examples


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into input_ids/labels/attention_mask [b, max_len]."""
    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_trainable(init_dir: Path, dtype: str, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """Model from ``init/`` with the method's freezing rule applied; returns (model, method info)."""
    model = load_model(str(init_dir / "base"), dtype, device)
    adapter = init_dir / "adapter"
    if not adapter.exists():  # full fine-tuning
        model.requires_grad_(True)
        return model, {"method": "full", "frozen": []}
    from peft import PeftModel

    info = json.loads((adapter / METHOD_FILE).read_text())
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    if (adapter / PROJECTIONS_FILE).exists():  # OPLoRA: train through its frozen projections
        attach_projections(model, adapter)
    # PEFT re-enables grads on every LoRA part in from_pretrained(is_trainable): freeze after it.
    for name, param in model.named_parameters():
        if any(f".{part}." in name for part in info["frozen"]):
            param.requires_grad_(False)
    leaked = [n for n, p in model.named_parameters() if p.requires_grad and any(f".{f}." in n for f in info["frozen"])]
    if leaked:
        raise ConfigError(f"frozen parameter {leaked[0]} would get gradients")
    return model, info


def run(cfg: dict[str, Any], out_dir: Path, init_dir: Path) -> dict[str, Any]:
    tcfg = cfg["train"]
    device = pick_device(cfg["device"])
    tokenizer = load_tokenizer(str(init_dir / "base"))
    examples = build_examples(cfg, tokenizer)
    torch.manual_seed(tcfg["seed"])
    model, info = load_trainable(init_dir, cfg["model"]["dtype"], device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    per_step = tcfg["micro_batch_size"] * tcfg["grad_accum"]
    steps = tcfg["max_steps"] or max(1, math.floor(len(examples) * tcfg["epochs"] / per_step))
    from transformers import get_scheduler

    opt = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    sched = get_scheduler(tcfg["scheduler"], opt, num_warmup_steps=math.ceil(tcfg["warmup_ratio"] * steps),
                          num_training_steps=steps)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(tcfg["seed"])).tolist()
    cursor, log = 0, []
    bar = tqdm(range(steps), desc=f"train {info['method']}", unit="step", disable=not cfg["progress"])
    start = time.perf_counter()
    tokens = 0
    for step in bar:
        total = torch.zeros((), device=device)
        for _ in range(tcfg["grad_accum"]):
            idx = [order[(cursor + i) % len(order)] for i in range(tcfg["micro_batch_size"])]
            cursor += tcfg["micro_batch_size"]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], tokenizer.pad_token_id).items()}
            loss = model(**batch).loss / tcfg["grad_accum"]
            loss.backward()
            total += loss.detach()
            tokens += int(batch["attention_mask"].sum())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % tcfg["log_every"] == 0 or step + 1 == steps:
            rec = {"step": step + 1, "loss": float(total), "lr": sched.get_last_lr()[0],
                   "tokens_per_s": tokens / (time.perf_counter() - start)}
            log.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    with open(out_dir / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in log)
    if (init_dir / "adapter" / PROJECTIONS_FILE).exists():  # saved adapter = plain PEFT LoRA P_U B A P_V
        bake_projections(model, init_dir / "adapter")
    model.save_pretrained(out_dir / ("adapter" if info["method"] != "full" else "model"))
    if info["method"] == "full":
        tokenizer.save_pretrained(out_dir / "model")
    return {"steps": steps, "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "seconds": time.perf_counter() - start}
