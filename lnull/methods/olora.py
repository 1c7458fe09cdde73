"""OLoRA (Büyükakyüz), PEFT's ``init_lora_weights="olora"``: W0 [d_out, d_in] = Q R (fp32 QR), B [d_out, r] = Q_r,
A [r, d_in] = R_r; PEFT subtracts s B A from W0, so the outputs are unchanged at init (lnull rebuilds that
residual on load). Deterministic: no options beyond rank, alpha and dropout."""
from __future__ import annotations

from typing import Any, Optional

import torch

from lnull.methods.base import Method, register
from lnull.methods.peft_backed import Factors, lora_config, peft_factors


def init_olora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, options: Any,
               batches: Optional[list] = None) -> Factors:
    """{module: (A [r, d_in], B [d_out, r])} of PEFT's OLoRA on ``model`` (its targeted weights become PEFT's
    W0 - s B A)."""
    return peft_factors(model, lora_config(targets, rank, alpha, dropout, "olora"), seed=0)


OLORA = register(Method("olora", None, peft_init=init_olora,
                        description="PEFT's OLoRA: QR of W0, B = Q_r, A = R_r"))
