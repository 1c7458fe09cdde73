"""MiCA (minor component adaptation), PEFT's ``init_lora_weights="mica"``: B [d_out, r] = the r left singular
vectors of W0 with the smallest singular values, A [r, d_in] = 0, so B A = 0 and W0 is untouched. PEFT's MiCA
variant trains A only: ``frozen=["lora_B"]`` (its forward and merge are plain LoRA's, so the saved adapter is a plain
PEFT LoRA). Deterministic: no options beyond rank, alpha and dropout."""
from __future__ import annotations

from typing import Any, Optional

import torch

from lnull.methods.base import Method, register
from lnull.methods.peft_backed import Factors, lora_config, peft_factors


def init_mica(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, options: Any,
              batches: Optional[list] = None) -> Factors:
    """{module: (A = 0 [r, d_in], B [d_out, r])} of PEFT's MiCA on ``model`` (weights untouched)."""
    return peft_factors(model, lora_config(targets, rank, alpha, dropout, "mica"), seed=0)


MICA = register(Method("mica", None, peft_init=init_mica, frozen=["lora_B"],
                       description="PEFT's MiCA: B = minor left singular vectors of W0 (frozen), A = 0"))
