"""Random tiny causal LMs of the architecture families beyond LLaMA (tests: ``tests/test_architectures.py``).

Each family is built in code, like the tiny LLaMA (:mod:`lnull.tiny`): hidden 64, 2 layers, 4 attention heads
(2 key/value heads where the family has grouped-query attention), MLP width 128, fp32, untrained, deterministic
in ``seed``, with the vocabulary of the given tokenizer (:func:`lnull.tiny.build_tokenizer`).

:data:`TARGETS` is what each family's adapters target (its names for the projections of a decoder layer):
Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (each one ``nn.Linear``: the
initialisations treat it as one layer); GPT-2's ``c_attn`` / ``c_fc`` / ``c_proj`` are ``Conv1D`` layers (weight
stored ``[d_in, d_out]``), which lnull rejects (:func:`lnull.modeling.target_linears`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS: dict[str, list[str]] = {
    "qwen2": LLAMA_TARGETS,
    "gemma3": LLAMA_TARGETS,
    "mistral": LLAMA_TARGETS,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
FAMILIES = tuple(TARGETS)
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def _config(family: str, tokenizer: Any) -> Any:
    import transformers as tf

    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    decoder = {"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
               "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 1024,
               **ids}
    if family == "qwen2":
        return tf.Qwen2Config(**decoder, tie_word_embeddings=False)
    if family == "gemma3":  # text-only Gemma3ForCausalLM; head_dim is explicit in Gemma (default 256)
        return tf.Gemma3TextConfig(**decoder, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
                                   sliding_window=32)
    if family == "mistral":
        return tf.MistralConfig(**decoder, tie_word_embeddings=False)
    if family == "phi3":
        return tf.Phi3Config(**decoder, tie_word_embeddings=False)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=1024,
                             **ids)
    raise ValueError(f"unknown family '{family}'; known: {', '.join(FAMILIES)}")


def build_family_model(family: str, tokenizer: Any, seed: int = 0) -> Any:
    """A randomly initialised causal LM of ``family`` (one of :data:`FAMILIES`), tiny shapes (module docstring),
    fp32, eval mode, deterministic in ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(family, tokenizer)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def materialize_family(family: str, folder: Path, tokenizer: Any = None, seed: int = 0) -> Path:
    """Save the tiny ``family`` model and its tokenizer (default :func:`lnull.tiny.build_tokenizer`) as a plain
    HF folder that ``model.name_or_path`` can name (written once; reused afterwards)."""
    from lnull.io import atomic_write_dir
    from lnull.tiny import build_tokenizer

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    model = build_family_model(family, tokenizer, seed)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_write_dir(folder, write, keep_existing=True)
