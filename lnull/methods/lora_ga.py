"""LoRA-GA (Wang et al.), PEFT's ``init_lora_weights="lora_ga"`` after ``preprocess_loraga``: the gradient of the
loss on the fine-tuning data w.r.t. each targeted W0 [d_out, d_in] (mean over the task batches, one forward with
labels and one backward per batch) is approximated by ``torch.svd_lowrank`` (random: seeded by ``seed``), and A, B
take its singular vectors by PEFT's ``direction`` and ``scale`` (LoraGAConfig's fields and defaults). PEFT
subtracts s B A from W0, so the outputs are unchanged at init (lnull rebuilds that residual on load).

The loss is the model's own (HF's token mean over each batch's response tokens: labels are -100 on prompt and
padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lnull.errors import ConfigError
from lnull.methods.base import Method, register
from lnull.methods.peft_backed import (Factors, TaskDataConfig, check_data_options, lora_config, model_device,
                                       peft_factors, require_batches, to_device)

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGAConfig(TaskDataConfig):
    """PEFT's LoraGAConfig fields, PEFT's defaults."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16


def check_lora_ga(options: Any) -> None:
    check_data_options(options)
    if options.direction not in DIRECTIONS:
        raise ConfigError(f"method.direction must be one of {', '.join(DIRECTIONS)}, got '{options.direction}'")
    if options.scale not in SCALES:
        raise ConfigError(f"method.scale must be one of {', '.join(SCALES)}, got '{options.scale}'")


def train_step(model: torch.nn.Module, batches: list) -> None:
    """LoRA-GA's ``train_step``: forward with labels and backward on each batch (PEFT averages the gradients)."""
    device = model_device(model)
    for batch in batches:
        model(**to_device(batch, device)).loss.backward()


def init_lora_ga(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, options: Any,
                 batches: Optional[list] = None) -> Factors:
    """{module: (A [r, d_in], B [d_out, r])} of PEFT's LoRA-GA on ``model`` over ``batches`` (dicts of input_ids,
    attention_mask, labels [b, t]; the targeted weights become PEFT's W0 - s B A)."""
    from peft import LoraGAConfig as PeftLoraGAConfig
    from peft.tuners.lora import preprocess_loraga

    batches = require_batches(batches, "lora_ga")
    config = lora_config(targets, rank, alpha, dropout, "lora_ga",
                         lora_ga_config=PeftLoraGAConfig(direction=options.direction, scale=options.scale,
                                                         stable_gamma=options.stable_gamma))
    return peft_factors(model, config, options.seed,
                        before=lambda m, c: preprocess_loraga(m, c, lambda: train_step(m, batches)))


LORA_GA = register(Method("lora_ga", None, options=LoraGAConfig, peft_init=init_lora_ga, reads_task_data=True,
                          check_options=check_lora_ga,
                          description="PEFT's LoRA-GA: A, B from the SVD of the task loss gradient"))
