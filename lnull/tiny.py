"""A random tiny LLaMA and a BPE tokenizer trained offline in code (tests and the `tiny` experiment)."""
from __future__ import annotations

from pathlib import Path

from lnull.data.synthetic import corpus
from lnull.io import atomic_write_dir

TINY_ID = "lnull:tiny"
# The tiny LLaMA's shape (its config.json without the tokenizer's ids), known before it is built.
TINY_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on the synthetic corpus; has BOS/EOS/PAD like a LLaMA tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    from lnull.data.prompts import ALPACA

    tok.train_from_iterator(corpus(400, seed=1) + [ALPACA] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(tokenizer, seed: int = 0):
    """Randomly initialised LlamaForCausalLM of shape ``TINY_CONFIG`` (fp32, deterministic in ``seed``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {k: v for k, v in TINY_CONFIG.items() if k != "model_type"}
    config = LlamaConfig(vocab_size=len(tokenizer), **shape, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def materialize(folder: Path) -> Path:
    """Save the tiny model + tokenizer as a plain HF folder (once; reused afterwards)."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    # two processes may build it at once: the same deterministic model, the first one published is kept
    return atomic_write_dir(folder, write, keep_existing=True)
