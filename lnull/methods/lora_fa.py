"""LoRA-FA (Zhang et al.): LoRA's init (random A, zero B) with A frozen in training."""
from __future__ import annotations

from lnull.methods.base import Method, register
from lnull.methods.lora import LoRAConfig, check_init_a, init_lora

LORA_FA = register(Method("lora_fa", init_lora, options=LoRAConfig, check_options=check_init_a,
                          frozen=["lora_A"], description="random A (frozen), zero B"))
