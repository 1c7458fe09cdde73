"""LoRA (Hu et al.): A random, B = 0, residual = W0.

``method.init_a`` picks A's distribution, as PEFT's ``init_lora_weights``:

- ``gaussian``: A ~ N(0, (1/r)^2) (``nn.init.normal_(A, std=1/r)``), what the LoRA-Null papers' official
  code trains its LoRA / LoRA-FA baselines with (``init_lora_weights="gaussian"``);
- ``kaiming_uniform``: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (``kaiming_uniform_(A, a=sqrt(5))``), PEFT's default.

Each layer draws from its own generator (``lnull.methods.base.layer_generator``), so no two layers share A.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lnull.config import MethodConfig
from lnull.errors import ConfigError
from lnull.methods.base import LayerInit, Method, register

A_INITS = ("gaussian", "kaiming_uniform")


@dataclass
class LoRAConfig(MethodConfig):
    """Options of the random-A methods (LoRA, LoRA-FA, OPLoRA)."""

    init_a: str = "gaussian"  # gaussian (std 1/r, the papers' official code) | kaiming_uniform (PEFT's default)
    seed: int = 0  # each layer draws A from a generator seeded by (seed, module name)


def check_init_a(options: Any) -> None:
    if options.init_a not in A_INITS:
        raise ConfigError(f"method.init_a must be one of {', '.join(A_INITS)}, got '{options.init_a}'")


def random_a(rank: int, d_in: int, init_a: str, generator: torch.Generator) -> torch.Tensor:
    """A [rank, d_in] fp32 drawn from ``generator`` with PEFT's ``init_a`` rule (module docstring)."""
    if init_a == "gaussian":
        return torch.randn(rank, d_in, generator=generator, dtype=torch.float32) / rank
    if init_a == "kaiming_uniform":
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform with a=sqrt(5) on fan_in=d_in
        return (torch.rand(rank, d_in, generator=generator, dtype=torch.float32) * 2 - 1) * bound
    raise ValueError(f"method.init_a must be one of {', '.join(A_INITS)}, got '{init_a}'")


def init_lora(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any,
              generator: Optional[torch.Generator] = None) -> LayerInit:
    """A [r, d_in] random (``cfg.init_a``) from ``generator`` (default: one seeded with ``cfg.seed``);
    B [d_out, r] = 0; residual = W0 [d_out, d_in]."""
    d_out, d_in = W0.shape
    gen = generator if generator is not None else torch.Generator().manual_seed(int(cfg.seed))
    A = random_a(rank, d_in, cfg.init_a, gen)
    B = torch.zeros(d_out, rank, dtype=torch.float32)
    return LayerInit(A=A, B=B, residual=W0.clone())


LORA = register(Method("lora", init_lora, options=LoRAConfig, check_options=check_init_a,
                       description="random A, zero B"))
