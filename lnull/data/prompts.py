"""Prompt templates and response-only label masking."""
from __future__ import annotations

from typing import Any

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{query}\n\n### Response:")
TEMPLATES = {"alpaca": ALPACA, "plain": "{query}\n"}
IGNORE_INDEX = -100


def encode_example(tokenizer: Any, query: str, response: str, max_length: int, template: str = "alpaca",
                   add_bos: bool = True) -> dict[str, list[int]]:
    """Tokenise prompt + response + EOS; labels are IGNORE_INDEX on the prompt (loss on the response only).

    Returns ``input_ids`` and ``labels`` (same length, at most ``max_length``), the prompt tokenised
    on its own so the boundary does not depend on how the tokenizer merges across it.
    """
    prompt = TEMPLATES[template].format(query=query)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}
