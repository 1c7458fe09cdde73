"""Scorer ``kind: task_heldout``: how well a model learned the run's fine-tuning task, on examples never trained on.

The benchmark's ``dataset`` (``eval=heldout``: ``task.heldout``) holds examples of the task, e.g.
``synthetic:arithmetic:256:1`` (another seed of the demo's generator), or the task's own source past the
``task.max_examples`` trained on; any whose query is among the task's training records is dropped, so none was
trained on, and the first ``limit`` (the benchmark's, else ``eval.limit``) of the rest are scored.  Each is
encoded exactly as training encodes it (``task.prompt``, ``train.max_length``, BOS, response + EOS) and
scored teacher-forced in one forward pass: per example, whether every response token is the model's greedy
next token given the reference prefix, which is exactly "greedy decoding reproduces the reference response, EOS
included" (exact match, %, without generating), the share of response tokens that are (token accuracy, %) and
their NLL per token (nats).
Sampled answers of a 135M model are mostly wrong before and after fine-tuning, and generation is slow on a CPU;
this pass is cheap and sees small models.

Record: ``value`` = exact match (%, higher is better), ``stderr`` over examples; ``details.metrics`` (exact_match,
token_accuracy, nll_per_token; ``nll_stderr``); per example ``details.items`` (exact match), ``items_token_accuracy``
and ``items_nll``; ``details.excluded`` = examples dropped as seen in training.
"""
from __future__ import annotations

from typing import Any

from lnull.errors import ConfigError
from lnull.evaluate.base import Scorer, loads_always, logits_batch, register
from lnull.evaluate.likelihood import mean_and_stderr

N_EXAMPLES = 3


def heldout_pairs(name: str, bench: dict[str, Any], ctx: Any) -> tuple[list[tuple[str, str]], int]:
    """((query, response) of the first ``ctx.limit(bench)`` examples of the benchmark's data that are not among the
    task's training records, number of examples dropped as seen in training)."""
    from lnull.data.sources import load_records
    from lnull.training.data import query_response_pairs

    task, cache = ctx.cfg["task"], ctx.cfg.get("cache_dir")
    if not bench.get("dataset"):
        raise ConfigError(f"eval.benchmarks.{name}.dataset is not set: set task.heldout (held-out examples of "
                          f"task '{task['name']}') or the benchmark's dataset")
    pairs = query_response_pairs(load_records(bench["dataset"], cache), task, bench["dataset"])
    seen = {q for q, _ in query_response_pairs(load_records(task["dataset"], cache, task["max_examples"]), task,
                                               task["dataset"])}
    kept = [p for p in pairs if p[0] not in seen]
    if not kept:
        raise ConfigError(f"eval.benchmarks.{name}: every example of {bench['dataset']} is in the training data "
                          f"{task['dataset']}; point it at held-out examples")
    limit = ctx.limit(bench)
    return kept[:limit] if limit else kept, len(pairs) - len(kept)


def score(name: str, bench: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Exact match (%) of greedy decoding with the reference response, token accuracy (%) and NLL per token on
    the held-out examples, all from one teacher-forced pass; n = examples."""
    import torch

    from lnull.data.prompts import IGNORE_INDEX, encode_example
    from lnull.training.data import collate

    pairs, excluded = heldout_pairs(name, bench, ctx)
    tok, cfg = ctx.tokenizer, ctx.cfg
    encoded = [encode_example(tok, q, r, cfg["train"]["max_length"], cfg["task"]["prompt"], ctx.add_bos)
               for q, r in pairs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    exact, accuracy, nll = [], [], []
    device = next(ctx.model.parameters()).device
    size = logits_batch(ctx.eval_cfg["batch_size"], ctx.model)  # a large vocabulary's logits capped
    with torch.no_grad():
        for start in range(0, len(encoded), size):
            batch = {k: v.to(device) for k, v in collate(encoded[start:start + size], pad).items()}
            logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].float()
            target = batch["labels"][:, 1:]
            scored = target != IGNORE_INDEX
            logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            hit = (logits.argmax(-1) == target) & scored
            count = scored.sum(1).clamp(min=1)
            exact += (100.0 * (hit.sum(1) == scored.sum(1))).tolist()
            accuracy += (100.0 * hit.sum(1) / count).tolist()
            nll += (-(logp * scored).sum(1) / count).tolist()
    value, stderr = mean_and_stderr(exact)
    token_accuracy, _ = mean_and_stderr(accuracy)
    nll_mean, nll_stderr = mean_and_stderr(nll)
    return {"metric": "exact_match", "value": value, "stderr": stderr, "n": len(exact),
            "metrics": {"exact_match": value, "token_accuracy": token_accuracy, "nll_per_token": nll_mean},
            "nll_stderr": nll_stderr, "items": exact, "items_token_accuracy": [round(x, 4) for x in accuracy],
            "items_nll": [round(x, 6) for x in nll],
            "excluded": excluded, "data": bench["dataset"], "task": cfg["task"]["name"],
            "examples": [{"query": q, "response": r, "exact_match": e == 100.0, "token_accuracy": round(a, 2),
                          "nll_per_token": round(x, 4)}
                         for (q, r), e, a, x in list(zip(pairs, exact, accuracy, nll))[:N_EXAMPLES]],
            "settings": ctx.settings(prompt=cfg["task"]["prompt"], max_length=cfg["train"]["max_length"],
                                     train_dataset=cfg["task"]["dataset"])}


def task_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Record-key settings: the run's task as training encodes it (its records are the ones excluded)."""
    return {"task": {**cfg["task"], "max_length": cfg["train"]["max_length"]}}


register(Scorer(kind="task_heldout", score=score, needs_weights=loads_always, key_settings=task_settings,
                description="exact match / token accuracy / NLL on held-out examples of the run's task"))
