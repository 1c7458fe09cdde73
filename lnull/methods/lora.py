"""LoRA (Hu et al.): A random (kaiming-uniform, as PEFT), B = 0, residual = W0."""
from __future__ import annotations

import math

import torch

from lnull.methods.base import LayerInit, Method, register


def init_lora(W0: torch.Tensor, cov, rank: int, scale: float, cfg) -> LayerInit:
    """A [r, d_in] ~ kaiming_uniform(a=sqrt(5)) as PEFT's default; B [d_out, r] = 0."""
    gen = torch.Generator().manual_seed(int(cfg.seed))
    d_out, d_in = W0.shape
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform with a=sqrt(5) on fan_in=d_in
    A = (torch.rand(rank, d_in, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    B = torch.zeros(d_out, rank, dtype=torch.float32)
    return LayerInit(A=A, B=B, residual=W0.clone())


LORA = register(Method("lora", init_lora, description="random A, zero B"))
