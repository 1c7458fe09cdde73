"""Training throughput (steps/s, tokens/s) of the train loop's building blocks on one model.

    python benchmarks/bench_train.py +experiment=demo [--steps 4] [--out FILE]

Initialises the experiment's method once (its calibration config), then times optimizer steps of
``train.batch_size`` examples of the experiment's task for each variant: the full-logits HF loss vs
lnull's ``ResponseLoss`` (LM head only at response positions), each with and without length-grouped
micro-batches and gradient checkpointing. The first step of each variant is a warm-up and not timed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lnull import calibrate, initialize
from lnull.cli import compose
from lnull.modeling import load_tokenizer, original_path
from lnull.training.data import build_examples, collate, step_plan
from lnull.training.model import ResponseLoss, load_trainable

VARIANTS = {  # name: (response-only head, group_by_length, gradient checkpointing)
    "hf_full_logits": (False, False, False),
    "response_head": (True, False, False),
    "response_head+grouped": (True, True, False),
    "response_head+grad_ckpt": (True, False, True),
}


def time_variant(cfg: dict, init_dir: Path, examples: list, pad_id: int, steps: int,
                 response_head: bool, grouped: bool, checkpointing: bool) -> dict:
    tcfg = {**cfg["train"], "group_by_length": grouped}
    model, _ = load_trainable(init_dir, original_path(cfg), cfg["model"]["dtype"])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_fn = ResponseLoss(model) if response_head else (lambda **b: model(**b).loss)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg["lr"])
    lengths = [len(e["input_ids"]) for e in examples]
    seconds, tokens = 0.0, 0
    for step in range(steps + 1):
        start = time.perf_counter()
        plan = step_plan(lengths, step, tcfg)
        for idx in plan:
            batch = collate([examples[i] for i in idx], pad_id)
            (loss_fn(**batch) / len(plan)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # step 0 is warm-up
            seconds += time.perf_counter() - start
            tokens += sum(lengths[i] for mb in plan for i in mb)
    return {"steps_per_s": round(steps / seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
            "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    args, overrides = parser.parse_known_args()
    cfg = compose(overrides + ["progress=false"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib, init_dir = root / "calibration", root / "init"
        calib.mkdir()
        init_dir.mkdir()
        if initialize.REGISTRY[cfg["method"]["name"]].needs_calibration:
            calibrate.collect_into(cfg, calib)
        initialize.build(cfg, init_dir, calib)
        tokenizer = load_tokenizer(original_path(cfg))
        examples = build_examples(cfg, tokenizer)
        results = {name: time_variant(cfg, init_dir, examples, tokenizer.pad_token_id, args.steps, *VARIANTS[name])
                   for name in args.variants.split(",")}
    report = {"model": cfg["model"]["name_or_path"], "method": cfg["method"]["name"], "rank": cfg["method"]["rank"],
              "batch_size": cfg["train"]["batch_size"], "micro_batch_size": cfg["train"]["micro_batch_size"],
              "max_length": cfg["train"]["max_length"], "threads": torch.get_num_threads(),
              "device": "cpu", "platform": platform.platform(), "torch": torch.__version__, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
