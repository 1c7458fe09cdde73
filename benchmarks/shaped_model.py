"""Random LLaMA with a real model's layer shapes (few layers), for timing calibration/init at paper scale
without downloading weights.

    python benchmarks/shaped_model.py --preset llama2-7b --layers 2 --out /tmp/llama2-7b-2l

The folder gets the tiny offline tokenizer (ids < 512 are valid in any of these vocabularies), so
`model.name_or_path=<folder>` works with every stage. Timings depend on shapes, not on weight values.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lnull.tiny import build_tokenizer

PRESETS = {  # hidden, intermediate, heads, kv heads, vocab
    "llama2-7b": (4096, 11008, 32, 32, 32000),
    "llama3-8b": (4096, 14336, 32, 8, 128256),
    "llama3.2-3b": (3072, 8192, 24, 8, 128256),
    "smollm2-135m": (576, 1536, 9, 3, 49152),
}


def shaped_config(dims: tuple[int, int, int, int, int], layers: int, tokenizer) -> LlamaConfig:
    """LlamaConfig of ``dims`` (hidden, intermediate, heads, kv heads, vocab) with ``layers`` layers and the
    special tokens of ``tokenizer``."""
    hidden, inter, heads, kv, vocab = dims
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def build(preset: str, layers: int, dtype: str, out: Path) -> int:
    """Save a random ``preset``-shaped LLaMA with ``layers`` layers (and the tiny tokenizer) to ``out``;
    return its parameter count."""
    tokenizer = build_tokenizer()
    config = shaped_config(PRESETS[preset], layers, tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = build(args.preset, args.layers, args.dtype, args.out)
    print(f"{args.preset} x {args.layers} layers: {params / 1e6:.0f}M params -> {args.out}")


if __name__ == "__main__":
    main()
