"""PEFT's ``init_lora_weights="orthogonal"``: with Q [r, r] from the QR of a Gaussian matrix, A [r, d_in] =
(G_A [d_in, r/2] Q_odd)^T / 10 and B [d_out, r] = G_B^T [d_out, r/2] Q_even / 10 (G_A, G_B Gaussian, Q_odd / Q_even
the even- / odd-indexed rows of Q). Q's rows are orthonormal, so B A = G_B^T Q_even Q_odd^T G_A^T / 100 = 0 in exact
arithmetic, and PEFT leaves W0 untouched; in floating point B A is rounding noise (about 1e-8 relative), so the
outputs change at init by that much, as in PEFT. ``base="original"`` records that the adapter sits on W0 itself:
lnull's loaders then subtract nothing and give PEFT's model bit for bit (subtracting the noise would give another
model, and make ``lnull.residual.is_residual`` call it a residual init).

The rank must be even (PEFT's rule). ``seed`` seeds the global generator PEFT draws G_A, G_B and the QR input from.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from lnull.errors import ConfigError
from lnull.methods.base import Method, register
from lnull.methods.peft_backed import Factors, SeededConfig, lora_config, peft_factors


def check_even_rank(options: Any) -> None:
    if options.rank % 2:
        raise ConfigError(f"method=orthogonal needs an even method.rank (PEFT's rule), got {options.rank}")


def init_orthogonal(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float,
                    options: Any, batches: Optional[list] = None) -> Factors:
    """{module: (A [r, d_in], B [d_out, r])} of PEFT's orthogonal init on ``model`` (weights untouched)."""
    return peft_factors(model, lora_config(targets, rank, alpha, dropout, "orthogonal"), options.seed)


ORTHOGONAL = register(Method("orthogonal", None, options=SeededConfig, peft_init=init_orthogonal,
                             check_options=check_even_rank, base="original",
                             description="PEFT's orthogonal init: A, B from one random orthogonal matrix, W0 kept"))
