"""Synthetic data generated in code, for the `tiny` experiment and the offline demo's training stand-in.

Nothing here is drawn from an evaluation set: names are random syllable strings, numbers are random.
"""
from __future__ import annotations

import random

_SYLLABLES = ["ka", "lo", "mi", "ter", "zu", "vor", "an", "pel", "ri", "sto", "qua", "ne", "bel", "dor", "fi"]


def _word(rng: random.Random, n: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


def facts(n: int, seed: int = 0) -> list[dict]:
    """``n`` made-up facts as QA records ``{"question", "answer": [str]}`` (NQ-Open field names)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country, capital = _word(rng, 3), _word(rng, 2)
        rows.append({"question": f"what is the capital of {country}", "answer": [capital]})
    return rows


def arithmetic(n: int, seed: int = 0) -> list[dict]:
    """``n`` small word problems as ``{"query", "response"}`` with MetaMathQA's answer format
    ("The answer is: N"), the offline stand-in for math training data."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        name, item = _word(rng), rng.choice(["apples", "books", "coins", "pens", "stamps"])
        if rng.random() < 0.5:
            q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
            r = f"{name} starts with {a} {item} and adds {b}, so {a} + {b} = {a + b}.\nThe answer is: {a + b}"
        else:
            a, b = max(a, b), min(a, b)
            q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
            r = f"{name} starts with {a} {item} and removes {b}, so {a} - {b} = {a - b}.\nThe answer is: {a - b}"
        rows.append({"query": q, "response": r})
    return rows


def corpus(n: int, seed: int = 0) -> list[str]:
    """Plain sentences for calibration and tokenizer training."""
    return [f"Q: {r['question']}? A: {r['answer'][0]}." for r in facts(n, seed)] + \
           [f"{r['query']} {r['response']}" for r in arithmetic(n, seed)]


GENERATORS = {"facts": facts, "arithmetic": arithmetic}
