"""The training loop on Accelerate: one code path for a single process, DDP and DeepSpeed ZeRO.

Every rank runs :func:`train_loop` on the same resolved config and the same cached examples; rank 0 writes
``metrics.jsonl``, the checkpoints' trainer state and the final ``adapter/`` (or ``model/``).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lnull.errors import ConfigError
from lnull.config import accumulation_steps, launch_processes
from lnull.training import checkpoint
from lnull.training.data import EXAMPLES_FILE, collate, load_examples, step_plan, total_steps
from lnull.modeling import DTYPES, load_tokenizer, original_path
from lnull.training.model import ResponseLoss, assert_frozen, compute_autocast, load_trainable

METRICS_FILE = "metrics.jsonl"


def make_accelerator(cfg: dict[str, Any], out_dir: Path) -> Any:
    """Accelerator for this process: precision from ``train.precision``, gloo on CPU, wandb if asked."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    tcfg = cfg["train"]
    cuda = torch.cuda.is_available() and cfg["device"] != "cpu"
    precision = tcfg["precision"]
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision != "no" and not cuda:
        raise ConfigError(f"train.precision={precision} needs a CUDA device; use auto or no on CPU")
    processes = launch_processes(cfg)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if launched and not cuda else []  # CPU DeepSpeed/DDP
    log_with = None
    if tcfg["wandb"] != "disabled":
        os.environ["WANDB_MODE"] = tcfg["wandb"]
        os.environ.setdefault("WANDB_DIR", str(out_dir))
        log_with = "wandb"
    # Accelerate only enables DeepSpeed when cpu=False; on a CPU-only machine the gloo group above makes it work.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    accelerator = Accelerator(gradient_accumulation_steps=accumulation_steps(cfg), mixed_precision=precision,
                              cpu=not cuda and not deepspeed, kwargs_handlers=kwargs, log_with=log_with)
    if accelerator.num_processes != processes:
        raise ConfigError(f"accelerate.launch.num_processes={processes} but {accelerator.num_processes} process(es) "
                          f"joined (distributed_type {accelerator.distributed_type.value})")
    if accelerator.state.deepspeed_plugin is not None:  # we feed batches ourselves, so DeepSpeed is told here
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tcfg["micro_batch_size"]
    return accelerator


def _append_metrics(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if path.exists():
        from lnull.io import atomic_write_text

        lines = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        atomic_write_text(path, "".join(l + "\n" for l in lines))


def train_loop(cfg: dict[str, Any], out_dir: Path, init_dir: Path) -> dict[str, Any]:
    """Fine-tune ``init/`` on ``out_dir/examples.safetensors``; resumes from ``out_dir/checkpoints``."""
    from transformers import get_scheduler

    tcfg = cfg["train"]
    accelerator = make_accelerator(cfg, out_dir)
    torch.manual_seed(tcfg["seed"])
    examples = load_examples(out_dir / EXAMPLES_FILE)
    lengths = [len(e["input_ids"]) for e in examples]
    steps = total_steps(len(examples), tcfg)
    model, info = load_trainable(init_dir, original_path(cfg), cfg["model"]["dtype"], tcfg["attn_implementation"],
                                 accelerator.device)
    if tcfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = assert_frozen(model, info)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    # Not prepared: Accelerate's scheduler wrapper steps num_processes times per call; we step once per update.
    scheduler = get_scheduler(tcfg["scheduler"], optimizer, num_warmup_steps=math.ceil(tcfg["warmup_ratio"] * steps),
                              num_training_steps=steps)
    wrapped, optimizer = accelerator.prepare(ResponseLoss(model), optimizer)
    accelerator.register_for_checkpointing(scheduler)
    checkpoint.keep_trainable_only(accelerator)
    assert_frozen(accelerator.unwrap_model(wrapped).model, info)  # after every wrapper had its say

    state = checkpoint.resume(accelerator, out_dir / "checkpoints") or {"step": 0, "tokens": 0, "seconds": 0.0}
    metrics = out_dir / METRICS_FILE
    if accelerator.is_main_process:
        _truncate_metrics(metrics, state["step"])
    if tcfg["wandb"] != "disabled":
        accelerator.init_trackers(tcfg["wandb_project"], config=cfg)
    pad_id = load_tokenizer(original_path(cfg)).pad_token_id
    device = accelerator.device
    bar = tqdm(total=steps, initial=state["step"], desc=f"train {info['method']}", unit="step",
               disable=not (cfg["progress"] and accelerator.is_main_process))
    wrapped.train()
    start, start_tokens, last = time.perf_counter(), state["tokens"], None
    running, micro_steps = torch.zeros((), device=device), 0  # loss summed over the logging interval
    for step in range(state["step"], steps):
        plan = step_plan(lengths, step, tcfg)
        state["tokens"] += sum(lengths[i] for mb in plan for i in mb)  # every rank's share: no sync needed
        micro_batches = plan[accelerator.process_index::accelerator.num_processes]  # dealt round-robin
        for idx in micro_batches:
            batch = collate([examples[i] for i in idx], pad_id)
            batch.update(ResponseLoss.response_index(batch["labels"]))  # on the host: no device sync for it
            with accelerator.accumulate(wrapped):
                with compute_autocast(cfg["model"]["dtype"], info, device, accelerator.mixed_precision):
                    loss = wrapped(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg["max_grad_norm"]:
                    accelerator.clip_grad_norm_(params, tcfg["max_grad_norm"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            micro_steps += 1
        scheduler.step()
        state["step"] = step + 1
        bar.update(1)
        if state["step"] % tcfg["log_every"] == 0 or state["step"] == steps:
            mean_loss = float(accelerator.reduce(running, "mean")) / micro_steps  # the one host sync
            elapsed = state["seconds"] + time.perf_counter() - start
            last = {"step": state["step"], "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                    "tokens": state["tokens"], "tokens_per_s": (state["tokens"] - start_tokens) /
                    max(time.perf_counter() - start, 1e-9), "elapsed_s": round(elapsed, 3)}
            if accelerator.is_main_process:
                _append_metrics(metrics, last)
            accelerator.log({k: v for k, v in last.items() if k != "step"}, step=state["step"])
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
            running.zero_()
            micro_steps = 0
        if tcfg["checkpoint_every"] and state["step"] % tcfg["checkpoint_every"] == 0 and state["step"] < steps:
            checkpoint.save(accelerator, out_dir / "checkpoints",
                            {**state, "seconds": state["seconds"] + time.perf_counter() - start})
    bar.close()
    seconds = state["seconds"] + time.perf_counter() - start
    _save_result(accelerator, wrapped, info, init_dir, out_dir, original_path(cfg), cfg["model"]["dtype"])
    accelerator.end_training()
    log = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
    return {"steps": steps, "trainable_params": trainable, "processes": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "first_loss": log[0]["loss"] if log else None, "last_loss": last["loss"] if last else None,
            "tokens": state["tokens"], "seconds": round(seconds, 3),
            "steps_per_s": round(steps / seconds, 4) if seconds else None,
            "tokens_per_s": round(state["tokens"] / seconds, 2) if seconds else None}


def _save_result(accelerator: Any, wrapped: Any, info: dict[str, Any], init_dir: Path, out_dir: Path,
                 original: str, dtype: str = "float32") -> None:
    """Rank 0 writes ``adapter/`` (plain PEFT LoRA, a method's hooks baked in) or ``model/`` (no adapter).
    Under ZeRO-3 the live parameters are shards: every rank joins the gather, rank 0 writes.

    One dtype whatever the launcher: the adapter in fp32 (DeepSpeed bf16 holds the module in bf16, a single
    process holds PEFT's fp32 LoRA weights), a full fine-tune in ``dtype`` (model.dtype; trained as fp32
    master weights)."""
    import contextlib

    from lnull.methods import bake

    accelerator.wait_for_everyone()
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3
    model = accelerator.unwrap_model(wrapped).model
    target = out_dir / ("adapter" if info["adapter"] else "model")
    if not info["adapter"]:
        state = accelerator.get_state_dict(wrapped) if zero3 else None  # 16-bit gather, layer by layer
        if accelerator.is_main_process:
            if state is None:
                model.to(DTYPES[dtype])  # trained as fp32 master weights; saved in model.dtype
            model.save_pretrained(target, state_dict={k.removeprefix("model."): _cast(v, DTYPES[dtype])
                                                      for k, v in state.items()} if state is not None else None)
            load_tokenizer(original).save_pretrained(target)
        return
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for n, p in model.named_parameters() if "lora_" in n],
                                                   modifier_rank=0)  # trained and frozen adapter parts
    with gather:
        if accelerator.is_main_process:
            bake(model, init_dir / "adapter")  # a method's hooks folded into plain LoRA weights
            # on the residual model of init/adapter, rebuilt from this original (lnull.residual)
            model.peft_config["default"].base_model_name_or_path = original
            model.save_pretrained(target, state_dict=_adapter_state_fp32(model))


def _cast(value: Any, dtype: torch.dtype) -> Any:
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _adapter_state_fp32(model: Any) -> dict[str, Any]:
    """The PEFT model's state dict with every adapter tensor (``lora_`` in its name: what PEFT saves) in fp32;
    the base weights stay the live tensors (never copied: PEFT drops them)."""
    return {k: _cast(v, torch.float32) if "lora_" in k else v for k, v in model.state_dict().items()}
