"""Batched greedy generation with left padding, KV cache and stop strings."""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, stop: list[str],
             batch_size: int = 16, add_bos: bool = True, progress: bool = True) -> list[str]:
    """Greedy completions of ``prompts`` (text after the prompt, cut at the first stop string)."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    outs: list[str] = []
    bar = tqdm(total=len(prompts), desc="generate", unit="item", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        if add_bos and tokenizer.bos_token_id is not None:
            ids = [[tokenizer.bos_token_id] + x for x in ids]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, stop_strings=stop or None,
                             tokenizer=tokenizer)
        for row in gen[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            for s in stop:
                text = text.split(s)[0]
            outs.append(text)
        bar.update(len(chunk))
    bar.close()
    return outs
