"""Batched generation with left padding, KV cache and stop strings (HF ``generate``)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    for s in stop:
        text = text.split(s)[0]
    return text


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, stop: Sequence[str] = (),
             batch_size: int = 16, add_bos: bool = True, progress: bool = True, temperature: float = 0.0,
             top_p: float = 1.0, seed: Optional[int] = None, desc: str = "generate",
             max_length: Optional[int] = None) -> list[str]:
    """Completions of ``prompts`` (text after the prompt, cut at the first stop string).

    Greedy when ``temperature`` is 0, otherwise nucleus sampling seeded per batch with ``seed + batch
    index`` (reproducible whatever the batch order).  ``max_length`` caps prompt + completion tokens
    (bigcode's ``max_length_generation``); otherwise ``max_new_tokens`` is the cap.
    """
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    outs: list[str] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress)
    sampling = temperature > 0
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        if add_bos and tokenizer.bos_token_id is not None:
            ids = [[tokenizer.bos_token_id] + x for x in ids]
        width = max(len(x) for x in ids)
        new_tokens = max_new_tokens if max_length is None else max(1, min(max_new_tokens, max_length - width))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        options: dict[str, Any] = {"do_sample": False}
        if sampling:
            torch.manual_seed((seed or 0) + batch_index)
            options = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id, stop_strings=list(stop) or None,
                             tokenizer=tokenizer, **options)
        outs.extend(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop) for row in gen[:, width:])
        bar.update(len(chunk))
    bar.close()
    return outs
