"""Helpers of several parts of the GPU check: the random shaped model and its dims, peak GPU memory, freeing it."""
from __future__ import annotations

import json
from pathlib import Path

TINY = (64, 176, 4, 2, 512)  # hidden, intermediate, heads, kv heads, vocab: the dry run's "7B"


def dims(preset: str, dry: bool) -> tuple[int, int, int, int, int]:
    from shaped_model import PRESETS

    return TINY if dry else PRESETS[preset]


def build_model(out: Path, preset: str, layers: int, dtype: str, dry: bool, keep: list | None = None) -> Path:
    """A random ``preset``-shaped LLaMA (tiny when ``dry``) with the tiny offline tokenizer, saved once under
    ``out``: built on the GPU when there is one (a 7B random init on the CPU takes minutes). ``keep``: a list the
    built model is appended to (on its device) instead of being dropped."""
    if (out / "done").exists():
        return out
    import torch
    from shaped_model import shaped_config
    from transformers import LlamaForCausalLM

    from lnull.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = shaped_config(dims(preset, dry), layers, tokenizer)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device("cpu" if dry else "cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    if keep is not None:
        keep.append(model)
    del model
    (out / "done").write_text(json.dumps({"preset": preset, "layers": layers, "params": params}))
    return out


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_initialized() else None


def release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
