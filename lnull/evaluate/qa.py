"""Open-domain QA exact match, normalised as lm-eval's nq_open/triviaqa tasks (case, punctuation,
articles ignored).  Issue-level lm-eval integration replaces this for the paper's numbers."""
from __future__ import annotations

import re
import string
from typing import Any

_ARTICLES = re.compile(r"\b(?:the|an|a)\b", re.IGNORECASE)


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
