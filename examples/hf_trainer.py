"""LoRA-Null v2 in your own training code: SmolLM2-135M-Instruct fine-tuned with transformers' ``Trainer``.

    python examples/hf_trainer.py --out /tmp/lnull-example            # offline: `lnull assets` first
    python examples/hf_trainer.py --model HuggingFaceTB/SmolLM2-135M-Instruct --out ...   # from the hub

Calibration text: NQ-Open questions (the papers' choice; the offline dev split), 16 windows of 256 tokens.
Training data: lnull's synthetic arithmetic word problems in the Alpaca template (any dataset works). Writes
``<out>/statistics/`` (what ``lnull calibrate`` writes), ``<out>/init_adapter/`` (the adapter ``lnull init``
builds from those statistics), ``<out>/adapter/`` (trained, on the residual model) and
``<out>/lora_on_original/`` (the same model as a rank-2r LoRA on the untouched base, for plain PEFT / vLLM).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from lnull.api import collect_statistics, preprocess, save_adapter, to_original
from lnull.calibrate import calibration_windows
from lnull.data.prompts import ALPACA
from lnull.data.sources import load_records
from lnull.data.synthetic import arithmetic
from lnull.modeling import resolve_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="asset:smollm2-135m-instruct", help="hub name, folder or lnull asset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--windows", type=int, default=16, help="calibration windows of --seqlen tokens")
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    # 1. Statistics of the pre-trained knowledge: each targeted layer's input covariance on calibration text.
    questions = [r["question"] for r in load_records("asset:nq_open/dev")]
    windows = calibration_windows(tokenizer, questions, args.windows, args.seqlen, seed=233, add_bos=False)
    stats = collect_statistics(model, [windows[i:i + 8] for i in range(0, len(windows), 8)], TARGETS,
                               out_dir=args.out / "statistics")

    # 2. LoRA-Null v2: A spans the null space of those inputs (frozen), B A = W0 U_null U_nullᵀ, residual frozen.
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = preprocess(model, config, method="lora_null_v2", statistics=stats)
    save_adapter(peft_model, args.out / "init_adapter")
    peft_model.print_trainable_parameters()

    # 3. Any trainer: here transformers' Trainer on Alpaca-formatted word problems (loss on every token).
    rows = [ALPACA.format(query=r["query"]) + r["response"] + tokenizer.eos_token for r in arithmetic(64)]
    encoded = [tokenizer(text, truncation=True, max_length=256) for text in rows]
    train = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in encoded]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch])
        labels = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}

    trainer = Trainer(model=peft_model, train_dataset=train, data_collator=collate,
                      args=TrainingArguments(output_dir=str(args.out / "trainer"), max_steps=args.steps,
                                             per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=2,
                                             report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available()))
    trainer.train()

    # 4. Ship it: the adapter on the residual model, and PEFT's conversion to a LoRA on the original model.
    print("adapter:", save_adapter(peft_model, args.out / "adapter"))
    base = path if args.model.startswith("asset:") else args.model  # what plain PEFT will load
    print("on the original model:", to_original(peft_model, args.out / "lora_on_original", base))


if __name__ == "__main__":
    main()
