"""Plain generative exact match over any records (``kind: qa_exact_match``), normalised as lm-eval's
nq_open/triviaqa tasks (case, punctuation, articles ignored).  The papers' knowledge numbers come from
the ``lm_eval`` kind; this one scores record sets lm-eval has no task for (e.g. synthetic facts)."""
from __future__ import annotations

import re
import string
from typing import Any

from lnull.evaluate.base import Scorer, register

_ARTICLES = re.compile(r"\b(?:the|an|a)\b", re.IGNORECASE)
DEFAULT_PROMPT = "Q: {question}?\nA:"
STOP = ("\n", ".", ",")


def normalize(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower())
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(text.split())


def answers_of(record: dict[str, Any], field: str) -> list[str]:
    """Gold answers whatever the hub layout: list, string, or TriviaQA's ``{"aliases": [...]}``."""
    value = record[field]
    if isinstance(value, dict):
        return list(value.get("aliases") or [value.get("value", "")])
    return [value] if isinstance(value, str) else list(value)


def exact_match(prediction: str, golds: list[str]) -> bool:
    pred = normalize(prediction)
    return any(pred == normalize(g) for g in golds)


def score(name: str, bench: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Greedy exact match (%) of ``bench['prompt']`` completions against ``bench['answer_field']``."""
    rows = ctx.records(bench, [bench["question_field"], bench["answer_field"]])
    template = bench["prompt"] or DEFAULT_PROMPT
    prompts = [template.format(question=r[bench["question_field"]]) for r in rows]
    preds = ctx.generate(prompts, bench["max_new_tokens"], STOP, desc=name)
    hits = [exact_match(p, answers_of(r, bench["answer_field"])) for p, r in zip(preds, rows)]
    return {"metric": "exact_match", "value": 100.0 * sum(hits) / len(hits), "n": len(hits),
            "settings": ctx.settings(greedy=True, max_new_tokens=bench["max_new_tokens"], prompt=template,
                                     stop=list(STOP)),
            "examples": [{"prompt": p, "prediction": x, "correct": h}
                         for p, x, h in list(zip(prompts, preds, hits))[:3]]}


register(Scorer(kind="qa_exact_match", score=score, proportion=True,
                description="greedy exact match (%) over any records, e.g. synthetic facts"))
