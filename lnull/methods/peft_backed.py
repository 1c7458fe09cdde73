"""PEFT's own initialisations as lnull methods: the shared call behind ``Method.peft_init``.

lnull re-implements nothing here: :func:`peft_factors` builds PEFT's ``LoraConfig(init_lora_weights=<kind>, ...)``,
runs PEFT's preprocessing (LoRA-GA's ``preprocess_loraga``) and ``get_peft_model``, then PEFT's post-processing
(EVA's ``initialize_lora_eva_weights``), and reads every targeted module's (A, B) back. The method files
(``olora.py``, ``mica.py``, ``orthogonal.py``, ``eva.py``, ``lora_ga.py``) say which PEFT call and options.

Randomness (orthogonal's ``torch.randn``, LoRA-GA's ``svd_lowrank``) is PEFT's draw from torch's global generator,
seeded with the method's ``seed`` inside ``torch.random.fork_rng()``: the same options give bit-identical factors,
the caller's random state is left as it was, and PEFT's own call after ``torch.manual_seed(seed)`` gives the same.

Where the init's adapter sits: PEFT subtracts s B A from W0 for OLoRA and LoRA-GA (outputs unchanged at init), MiCA
(A = 0) and EVA (B = 0) have B A = 0, and PEFT's orthogonal init leaves W0 as it is while B A != 0 (the outputs
change at init; ``Method.base = "original"``). lnull never stores the weights PEFT changed: the loaders rebuild
W0 - s B0 A0 from the adapter (``lnull.residual``), and ``lnull.initialize`` checks per module that PEFT's weights
are what the method declares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from lnull.config import MethodConfig
from lnull.errors import ConfigError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, d_in], B [d_out, r]) fp32 CPU


@dataclass
class SeededConfig(MethodConfig):
    """Options of a PEFT-backed method: ``seed`` seeds torch's global generator for PEFT's call (module docstring)."""

    seed: int = 0


@dataclass
class TaskDataConfig(SeededConfig):
    """Options of a method that reads the fine-tuning data: the first ``data_examples`` tokenised, response-masked
    examples of the run's task (``lnull.training.data.build_examples``), in batches of ``data_batch_size`` (right
    padding, ``attention_mask``, labels -100 on the prompt and padding)."""

    data_examples: int = 32
    data_batch_size: int = 4


def check_data_options(options: Any) -> None:
    """ConfigError for a data-reading method's batch options."""
    if options.data_examples < 1 or options.data_batch_size < 1:
        raise ConfigError(f"method.data_examples and method.data_batch_size must be >= 1, got "
                          f"{options.data_examples} and {options.data_batch_size}")


def lora_config(targets: list[str], rank: int, alpha: float, dropout: float, init_lora_weights: str,
                **extra: Any) -> Any:
    """PEFT's LoraConfig for ``init_lora_weights`` (``extra``: lora_ga_config=..., eva_config=...)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      init_lora_weights=init_lora_weights, task_type="CAUSAL_LM", **extra)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def peft_factors(model: torch.nn.Module, config: Any, seed: int,
                 before: Optional[Callable[[torch.nn.Module, Any], None]] = None,
                 after: Optional[Callable[[Any], None]] = None) -> Factors:
    """PEFT's init of ``model`` (on whatever device it is) under ``config``, seeded with ``seed``: ``before(model,
    config)`` (PEFT's preprocessing), ``get_peft_model``, ``after(peft_model)`` (PEFT's post-processing); returns
    {module: (A [r, d_in], B [d_out, r])} fp32 CPU as PEFT left them. ``model`` is unloaded back to plain modules,
    its targeted weights as PEFT left them (OLoRA, LoRA-GA: W0 - s B A, computed and rounded by PEFT)."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        if before is not None:
            before(model, config)
        peft_model = get_peft_model(model, config)
        if after is not None:
            after(peft_model)
    factors: Factors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            factors[name] = (module.lora_A["default"].weight.detach().float().cpu().clone(),
                             module.lora_B["default"].weight.detach().float().cpu().clone())
    peft_model.unload()  # the LoRA layers give their base layers back (the same nn.Linear objects)
    return factors


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def require_batches(batches: Optional[list], method: str) -> list:
    if not batches:
        raise ValueError(f"method '{method}' reads task data batches and got none")
    return batches
