"""Training data: tokenised response-masked examples, cached in the run folder, and the batch plan.

The parent process tokenises once and writes ``examples.safetensors``; every worker of a multi-process
launch reads that file, so ranks agree on the data and a resumed run does not tokenise again.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lnull.errors import ConfigError
from lnull.data.prompts import IGNORE_INDEX, encode_example
from lnull.data.sources import field_text, load_records, task_fields

EXAMPLES_FILE = "examples.safetensors"


def query_response_pairs(rows: list[dict[str, Any]], task: dict[str, Any], source: str) -> list[tuple[str, str]]:
    """(query, response) of each record by ``task.query_field`` / ``task.response_field``; ConfigError naming
    the first record without text in one of them."""
    return [tuple(field_text(row, path, f"dataset '{source}' record {index}", key)  # type: ignore[misc]
                  for key, path in task_fields(task).items())
            for index, row in enumerate(rows)]


def build_examples(cfg: dict[str, Any], tokenizer: Any) -> list[dict[str, list[int]]]:
    """Tokenised, response-masked examples of ``cfg['task']``; ConfigError on a record without the query or
    response field (naming the record) or when every response is cut away by ``train.max_length``."""
    task, tcfg = cfg["task"], cfg["train"]
    rows = load_records(task["dataset"], cfg.get("cache_dir"), task["max_examples"], task_fields(task))
    if not rows:
        raise ConfigError(f"task dataset '{task['dataset']}' is empty")
    examples = [encode_example(tokenizer, query, response, tcfg["max_length"], task["prompt"], cfg["model"]["add_bos"])
                for query, response in query_response_pairs(rows, task, task["dataset"])]
    kept = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"])]
    if not kept:
        raise ConfigError(f"every example of '{task['dataset']}' is longer than train.max_length="
                          f"{tcfg['max_length']} before its response starts")
    return kept


def save_examples(path: Path, examples: list[dict[str, list[int]]]) -> None:
    """Flat int32 ``input_ids``/``labels`` [total tokens] and int64 ``offsets`` [n + 1], written atomically."""
    from lnull.io import atomic_write_bytes
    from safetensors.torch import save

    lengths = torch.tensor([0] + [len(e["input_ids"]) for e in examples], dtype=torch.int64)
    tensors = {"input_ids": torch.tensor([t for e in examples for t in e["input_ids"]], dtype=torch.int32),
               "labels": torch.tensor([t for e in examples for t in e["labels"]], dtype=torch.int32),
               "offsets": torch.cumsum(lengths, 0)}
    atomic_write_bytes(path, save(tensors))


def load_examples(path: Path) -> list[dict[str, torch.Tensor]]:
    """Examples written by :func:`save_examples`, each ``input_ids``/``labels`` int64 [length]."""
    t = load_file(str(path))
    bounds = t["offsets"].tolist()
    return [{"input_ids": t["input_ids"][a:b].long(), "labels": t["labels"][a:b].long()}
            for a, b in zip(bounds[:-1], bounds[1:])]


def total_steps(n_examples: int, tcfg: dict[str, Any]) -> int:
    """Optimizer steps: ``train.max_steps``, else ``epochs`` passes over the examples (at least 1)."""
    return tcfg["max_steps"] or max(1, math.floor(n_examples * tcfg["epochs"] / tcfg["batch_size"]))


def step_plan(lengths: list[int], step: int, tcfg: dict[str, Any]) -> list[list[int]]:
    """Example indices of the micro-batches of optimizer ``step`` (0-based), all processes together;
    process ``r`` of ``w`` takes ``plan[r::w]``.

    Step ``s`` takes examples ``[s*B, (s+1)*B)`` of a seeded permutation (a fresh one every epoch), so the
    plan is a pure function of the step and a resumed run sees exactly the batches it would have seen.
    ``group_by_length`` sorts the step's examples by length before cutting micro-batches (less padding,
    same examples per step). Micro-batches all hold ``micro_batch_size`` examples, so with training's
    ``ResponseLoss`` (the mean of each example's response-token mean) the step's loss and gradient are
    micro-batch 1's whatever ``micro_batch_size`` (a loss pooling the micro-batch's tokens would weigh long
    examples more: tests/test_compute_scaling.py).
    """
    n, batch, micro = len(lengths), tcfg["batch_size"], tcfg["micro_batch_size"]
    picked = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n)
        picked.append(_epoch_order(n, tcfg["seed"] + epoch)[offset])
    if tcfg["group_by_length"]:
        picked.sort(key=lambda i: -lengths[i])
    return [picked[i:i + micro] for i in range(0, batch, micro)]


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into ``input_ids``/``labels``/``attention_mask`` int64 [b, longest]."""
    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"])
        labels[i, :n] = torch.as_tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
