"""LoRA-FA (Zhang et al.): LoRA's init (random A, zero B) with A frozen in training."""
from __future__ import annotations

from lnull.methods.base import Method, register
from lnull.methods.lora import init_lora

LORA_FA = register(Method("lora_fa", init_lora, frozen=["lora_A"], description="random A (frozen), zero B"))
