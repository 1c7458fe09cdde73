"""EVA (explained variance adaptation, Paischer et al.), PEFT's ``init_lora_weights="eva"`` +
``initialize_lora_eva_weights``: A [r, d_in] = the top-r right singular vectors of each module's inputs on the
fine-tuning data (PEFT's incremental PCA over the task batches, response tokens only: ``use_label_mask``), B = 0, so
W0 is untouched and the outputs are unchanged at init.

PEFT's rank redistribution (``rho`` > 1) gives each module its own rank (``rank_pattern``); lnull's adapters have one
rank per init, so ``rho`` must stay 1.0 (no redistribution; a ConfigError otherwise). PEFT cycles the batches until
every module's components converge (cosine similarity >= ``tau`` between passes); ``max_passes`` bounds that loop
(PEFT's own is unbounded), a RuntimeError naming the passes when it is hit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lnull.errors import ConfigError
from lnull.methods.base import Method, register
from lnull.methods.peft_backed import (Factors, TaskDataConfig, check_data_options, lora_config, peft_factors,
                                       require_batches)


@dataclass
class EvaConfig(TaskDataConfig):
    """PEFT's EvaConfig fields (PEFT's defaults except ``rho``), plus the bound on PEFT's convergence loop."""

    rho: float = 1.0  # must be 1.0: redistribution (> 1) would give per-module ranks
    tau: float = 0.99
    use_label_mask: bool = True
    whiten: bool = False
    max_passes: int = 100  # forwards over the batches before giving up (PEFT: unbounded)


def check_eva(options: Any) -> None:
    check_data_options(options)
    if options.rho != 1.0:
        raise ConfigError(f"method.rho={options.rho}: EVA's rank redistribution gives per-module ranks, which lnull's "
                          "one-rank adapters do not support; use method.rho=1.0")
    if not 0.0 <= options.tau <= 1.0 or options.max_passes < 1:
        raise ConfigError(f"method.tau must be in [0, 1] and method.max_passes >= 1, got {options.tau}, "
                          f"{options.max_passes}")


def eva_config(options: Any) -> Any:
    from peft import EvaConfig as PeftEvaConfig

    return PeftEvaConfig(rho=options.rho, tau=options.tau, use_label_mask=options.use_label_mask,
                         whiten=options.whiten)


def init_eva(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, options: Any,
             batches: Optional[list] = None) -> Factors:
    """{module: (A [r, d_in], B = 0 [d_out, r])} of PEFT's EVA on ``model`` over ``batches`` (dicts of input_ids,
    attention_mask, labels [b, t]; weights untouched)."""
    from peft import initialize_lora_eva_weights

    batches = require_batches(batches, "eva")
    limit = options.max_passes * len(batches)
    forwards = [0]

    def forward(model: Any, inputs: dict[str, torch.Tensor]) -> Any:  # PEFT's forward_fn_dict, counted
        forwards[0] += 1
        if forwards[0] > limit:
            raise RuntimeError(f"EVA did not converge in method.max_passes={options.max_passes} passes over "
                               f"{len(batches)} batches (tau={options.tau})")
        return model(**inputs)

    config = lora_config(targets, rank, alpha, dropout, "eva", eva_config=eva_config(options))
    return peft_factors(model, config, options.seed,
                        after=lambda peft_model: initialize_lora_eva_weights(peft_model, batches, forward_fn=forward,
                                                                             show_progress_bar=False))


def key_options(options: dict[str, Any]) -> dict[str, Any]:
    """Every option but ``max_passes`` (a bound on the loop, not a change of its result) enters the init key."""
    return {k: v for k, v in options.items() if k != "max_passes"}


EVA = register(Method("eva", None, options=EvaConfig, peft_init=init_eva, reads_task_data=True,
                      check_options=check_eva, key_options=key_options,
                      description="PEFT's EVA: A = top singular vectors of the task activations, B = 0"))
