"""Part (d): training tokens/s, lnull's train stage vs HF Trainer + PEFT LoRA on the same examples in the same
order, at each micro-batch size; and the HF Trainer helpers it uses."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parts.shared import build_model, dims, peak_gib, release

if TYPE_CHECKING:
    from smoke import Recorder


def run(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
    from lnull import initialize
    from lnull.cli import compose
    from lnull.modeling import load_tokenizer
    from lnull.training.data import build_examples, step_plan

    rec.doing(f"building the {spec['layers']}-layer model")
    t = time.perf_counter()
    built: list = []  # the random model, kept on its device for HF's side (saves loading it back)
    model_dir = build_model(work / f"llama2-7b-{spec['layers']}l-{spec['dtype']}", "llama2-7b", spec["layers"],
                            spec["dtype"], dry, keep=built)
    rec.set(model={**json.loads((model_dir / "done").read_text()), "dims": dims("llama2-7b", dry),
                   "build_s": round(time.perf_counter() - t, 1)}, rank=spec["rank"], batch=spec["batch"])
    base = ["+experiment=tiny", f"model.name_or_path={model_dir}", "model.name=llama2-7b-shaped",
            f"model.dtype={spec['dtype']}", "method=lora", f"method.rank={spec['rank']}",
            f"method.alpha={2 * spec['rank']}",
            f"device={'cpu' if dry else 'cuda'}", "progress=false", f"train.batch_size={spec['batch']}",
            f"train.max_steps={spec['steps']}", "train.log_every=1", "train.checkpoint_every=0", "train.lr=1e-4",
            "train.warmup_ratio=0.0", "train.scheduler=constant"]
    cfg = compose(base)
    tokenizer = load_tokenizer(str(model_dir))
    examples = build_examples(cfg, tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    tcfg = cfg["train"]
    order = [i for s in range(spec["steps"]) for mb in step_plan(lengths, s, {**tcfg, "micro_batch_size": 1})
             for i in mb]  # lnull's examples, in lnull's order (the same for every micro-batch size)
    step_tokens = [sum(lengths[i] for i in order[s * spec["batch"]:(s + 1) * spec["batch"]])
                   for s in range(spec["steps"])]
    rec.set(tokens_per_step=step_tokens, timed="steps 2..N (step 1 is a warm-up)",
            precision=f"{spec['dtype']} base, fp32 LoRA, " + ("no autocast (CPU)" if dry else "bf16 autocast (both)"))
    results: dict[str, dict] = {"lnull": {}, "hf_trainer_peft": {}}

    rec.doing("lnull init (lora)")
    init_dir = work / "d-init"
    shutil.rmtree(init_dir, ignore_errors=True)
    init_dir.mkdir()
    t = time.perf_counter()
    initialize.build(cfg, init_dir, None)
    rec.set(lnull_init_s=round(time.perf_counter() - t, 1))
    rec.doing("PEFT LoRA on the model for HF Trainer")
    hf_model = hf_setup(built.pop() if built else None, model_dir, cfg, spec, dry)  # stays on the device
    rec.set(attention={"lnull": cfg["train"]["attn_implementation"],
                       "hf": getattr(hf_model.config, "_attn_implementation", None)})
    from lnull.train import train_into

    for micro in spec["micro"]:  # lnull then HF at each size: a part cut short keeps whole pairs
        key = f"mb{micro}"
        rec.doing(f"lnull train, micro-batch {micro}")
        out = work / f"d-train-{key}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        reset_accelerate()
        t = time.perf_counter()
        summary = train_into(compose(base + [f"train.micro_batch_size={micro}"]), out, init_dir)
        wall = time.perf_counter() - t
        log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        timed_s = log[-1]["elapsed_s"] - log[0]["elapsed_s"]
        timed_tokens = log[-1]["tokens"] - log[0]["tokens"]
        results["lnull"][key] = {
            "tokens_per_s": round(timed_tokens / timed_s, 1) if timed_s > 0 else None,
            "s_per_step": round(timed_s / (len(log) - 1), 3) if len(log) > 1 else None,
            "tokens_timed": timed_tokens, "stage_wall_s": round(wall, 1), "first_loss": summary.get("first_loss")}
        rec.set(results=results)
        shutil.rmtree(out, ignore_errors=True)
        rec.doing(f"HF Trainer, micro-batch {micro}")
        reset_accelerate()
        results["hf_trainer_peft"][key] = hf_train(hf_model, examples, order, step_tokens, tokenizer, spec, micro,
                                                   work, dry)
        rec.set(results=results, peak_gpu_gib=peak_gib())
    ratios = {k: round(results["lnull"][k]["tokens_per_s"] / results["hf_trainer_peft"][k]["tokens_per_s"], 3)
              for k in results["lnull"] if k in results["hf_trainer_peft"]
              and results["lnull"][k]["tokens_per_s"] and results["hf_trainer_peft"][k]["tokens_per_s"]}
    rec.set(ratio_lnull_over_hf=ratios)


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons (mixed precision, accumulation): each run starts clean, as
    lnull's own train stage does after a run (lnull.train._train_here)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def hf_setup(model: Any, model_dir: Path, cfg: dict, spec: dict, dry: bool) -> Any:
    """PEFT LoRA (r, alpha 2r, lnull's target modules) on ``model`` (or the folder's, loaded) on the device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, spec["dtype"]))
    model.to("cpu" if dry else "cuda")
    lcfg = LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
                      target_modules=list(cfg["model"]["target_modules"]), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def hf_train(model: Any, examples: list, order: list[int], step_tokens: list[int], tokenizer: Any, spec: dict,
             micro: int, work: Path, dry: bool) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lnull.training.data import collate

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if not dry:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    class InOrder(Trainer):  # lnull's order: step s takes the s-th batch of lnull's plan
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    data = [{"input_ids": examples[i]["input_ids"], "labels": examples[i]["labels"]} for i in order]
    args = TrainingArguments(output_dir=str(work / f"hf-mb{micro}"), per_device_train_batch_size=micro,
                             gradient_accumulation_steps=spec["batch"] // micro, max_steps=spec["steps"],
                             learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, bf16=not dry,
                             logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0, use_cpu=dry, seed=42,
                             max_grad_norm=1.0)
    timer = Timer()
    trainer = InOrder(model=model, args=args, train_dataset=data, callbacks=[timer],
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    t = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t
    timed_s = timer.ends[-1] - timer.ends[0]
    tokens = sum(step_tokens[1:])
    loss = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
    del trainer
    release()
    return {"tokens_per_s": round(tokens / timed_s, 1) if timed_s > 0 else None,
            "s_per_step": round(timed_s / (len(timer.ends) - 1), 3), "tokens_timed": tokens,
            "train_wall_s": round(wall, 1), "first_loss": loss, "global_step": out.global_step}


def summary_lines(r: dict) -> list[str]:
    """The numbers of part (d): the setup, then a table, a row per micro-batch size."""
    out = []
    g = r.get
    res = g("results") or {}
    if res:
        out.append(f"model {g('model', {}).get('layers')} layers, LoRA r={g('rank')}, batch {g('batch')}, "
                   f"tokens per step {g('tokens_per_step')}; {g('precision')}")
        rows = ["| micro-batch | lnull tokens/s | HF Trainer + PEFT tokens/s | lnull / HF |", "|---|---|---|---|"]
        for k in sorted(set(res.get("lnull", {})) | set(res.get("hf_trainer_peft", {})), key=lambda s: int(s[2:])):
            a, b = res.get("lnull", {}).get(k, {}), res.get("hf_trainer_peft", {}).get(k, {})
            rows.append(f"| {k[2:]} | {a.get('tokens_per_s', '—')} | {b.get('tokens_per_s', '—')} | "
                        f"{(g('ratio_lnull_over_hf') or {}).get(k, '—')} |")
        out += rows
    return out
