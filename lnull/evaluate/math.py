"""GSM8K / MATH accuracy (``kind: math``) as MetaMath's official ``eval_gsm8k.py`` / ``eval_math.py``.

Protocol: greedy decoding of the Alpaca prompt followed by " Let's think step by step." (MetaMath puts it
right after "### Response:"), cut at MetaMath's stop strings; the answer is the text after the last
"The answer is: ".

* gsm8k: the first number of that text, commas removed, compared as an exact rational with the number
  after "#### " of the gold solution.
* math: that text up to the first ".\\n", one trailing "." dropped, compared with the last ``\\boxed{}``
  of the gold solution after Hendrycks' ``strip_string`` of both.

Only when that strict check fails, math-verify (``parse`` + ``verify``) compares the same extracted answer
with the gold answer symbolically; records count the items accepted this way (``fallback_accepted``) and
also give the strict accuracy (``value_strict``).

Deviations from the official scripts, each a fix of a case the scripts get wrong: gsm8k numbers may have
several thousands groups ("1,234,567"; the official regex stops at the first group) and are compared exactly
instead of rounded to an integer first ("17.5" is not 18); gold solutions written with ``\\boxed 5`` or
``\\fbox{}`` have a gold answer (the official ``remove_boxed`` gives None; no MATH test row has either, and
the gold of all 5000 rows equals the official one).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from fractions import Fraction
from importlib.metadata import version
from typing import Any, Optional

from lnull.errors import ConfigError
from lnull.evaluate.base import Scorer, benchmark_task, read_saved_rows, register
from lnull.data.prompts import ALPACA

TASKS = ("gsm8k", "math")
ANSWER_PHRASE = "The answer is: "
STEP = " Let's think step by step."
PROMPT = ALPACA + STEP  # "...### Response: Let's think step by step.", as MetaMath's eval scripts
STOP = ("Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT", "Instruction:", "Instruction",
        "Response:", "Response")  # MetaMath's stop list (vLLM ``stop``)
# A number with optional sign, "$", thousands groups, decimals, and an optional "/denominator".
_NUMBER = re.compile(r"(?P<sign>[-+]?)\s*(?:\\?\$\s*)?(?P<num>(?:\d{1,3}(?:,\d{3})+|\d*)(?:\.\d+)?"
                     r"(?:/\d+(?:\.\d+)?)?)")


# --- Hendrycks' MATH normalisation (``math_equivalence.py``, also MetaMath's util.py).  Written out here
# rather than imported from lm-eval's hendrycks_math utils: that copy only catches AssertionError (the
# original swallows every error of ``_fix_a_slash_b``, e.g. int("x")) and importing it pulls in lm-eval's
# task manager and ``datasets`` (~1 s).

def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub[0] == "{":  # IndexError on a trailing "\\frac", as the original (is_equiv catches it)
            out += sub
            continue
        if len(sub) < 2:
            return s
        a, b, rest = sub[0], sub[1], sub[2:]
        out += "{" + a + "}" + ("{" + b + "}" if b != "{" else b) + rest
    return out


def _fix_a_slash_b(s: str) -> str:
    if len(s.split("/")) != 2:
        return s
    a, b = s.split("/")
    try:
        if s == f"{int(a)}/{int(b)}":
            return "\\frac{" + str(int(a)) + "}{" + str(int(b)) + "}"
    except ValueError:
        pass
    return s


def _remove_right_units(s: str) -> str:
    if "\\text{ " in s:  # only ever a unit in the MATH data
        splits = s.split("\\text{ ")
        assert len(splits) == 2
        return splits[0]
    return s


def _fix_sqrt(s: str) -> str:
    parts = s.split("\\sqrt")
    return parts[0] + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in parts[1:])


def strip_string(s: str) -> str:
    """Hendrycks' canonical form of a MATH answer (spaces, \\left/\\right, \\dfrac, units, degrees, %...)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\").replace("tfrac", "frac")
    s = s.replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    s = _remove_right_units(s).replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "k = 3" -> "3"
        s = s.split("=")[1]
    s = _fix_fracs(_fix_sqrt(s).replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(a: Optional[str], b: Optional[str]) -> bool:
    """Hendrycks' equivalence: equal after ``strip_string`` (raw equality if normalising fails)."""
    if a is None or b is None:
        return False
    try:
        return strip_string(a) == strip_string(b)
    except Exception:  # noqa: BLE001 - the original falls back to raw strings on any error
        return a == b


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (nested braces balanced), ``\\boxed x`` or ``\\fbox{...}``."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    if text.startswith("\\boxed ", idx):
        return text[idx + len("\\boxed "):].split("$")[0].strip() or None
    start = text.find("{", idx)
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    return None


# --- answers

def gold_answer(task: str, gold: str) -> str:
    """The gold final answer: gsm8k "... #### 72" -> "72" (a bare number is kept); math: the last \\boxed{}
    of a solution (a bare answer without \\boxed is kept).  ValueError when there is none."""
    _check_task(task)
    gold = str(gold)
    ans = gold.split("####")[-1].strip() if task == "gsm8k" else (last_boxed(gold) if "\\boxed" in gold
                                                                  or "\\fbox" in gold else gold.strip())
    if not ans or (task == "gsm8k" and not (_NUMBER.fullmatch(ans) and to_number(ans) is not None)):
        raise ValueError(f"no gold answer in {gold[-80:]!r}")
    return ans


def extract_answer(completion: str) -> Optional[str]:
    """Text after the last "The answer is: ", up to the first ".\\n", one trailing "." dropped (MetaMath's
    eval_math.py); None when the phrase is absent."""
    parts = completion.split(ANSWER_PHRASE)
    if len(parts) < 2:
        return None
    ans = parts[-1].split(".\n")[0].strip()
    return ans[:-1].strip() if ans.endswith(".") else ans


def to_number(text: str) -> Optional[Fraction]:
    """First number of ``text`` ("$1,234.5", "-3/4", "18 dollars") as an exact Fraction; None if none."""
    for m in _NUMBER.finditer(text):
        if re.search(r"\d", m["num"]):
            try:
                value = Fraction(m["num"].replace(",", ""))
            except (ValueError, ZeroDivisionError):
                return None
            return -value if m["sign"] == "-" else value
    return None


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"math task '{task}' is not one of {', '.join(TASKS)}")


def _strict(task: str, answer: str, gold: str) -> bool:
    if task == "math":
        return is_equiv(answer, gold)
    pred, ref = to_number(answer), to_number(gold)
    return pred is not None and pred == ref


def _as_latex(answer: str) -> str:
    """A bare answer ("\\frac34", "$[-2, 7]$") as one inline-math span, which math-verify reads as LaTeX."""
    return "$" + answer.strip().strip("$").strip() + "$"


def _math_verify(answer: str, gold: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm, which only works in the main thread: elsewhere run without.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    pred = parse(_as_latex(answer), parsing_timeout=limit)
    ref = parse(_as_latex(gold), parsing_timeout=limit)
    return bool(pred and ref and verify(ref, pred, timeout_seconds=limit))


def judge(task: str, completion: str, gold: str, fallback: bool = True) -> Optional[str]:
    """How a completion is accepted: "strict", "fallback" (math-verify only) or None (wrong / no answer).

    ``gold`` is a full solution or the bare answer (see ``gold_answer``)."""
    ref = gold_answer(task, gold)
    answer = extract_answer(completion)
    if not answer:
        return None
    if _strict(task, answer, ref):
        return "strict"
    return "fallback" if fallback and _math_verify(answer, ref) else None


def grade(task: str, completion: str, gold: str, fallback: bool = True) -> bool:
    """True when ``completion`` answers ``gold`` for ``task`` ("gsm8k" | "math"): official strict check,
    then math-verify equivalence when ``fallback``."""
    return judge(task, completion, gold, fallback) is not None


# --- scorer

def _generate_cached(ctx: Any, prompts: list[str], max_new_tokens: int, desc: str) -> list[str]:
    """Greedy completions, saved chunk by chunk to ``ctx.work_dir`` so that a killed run resumes."""
    path = ctx.work_dir / "completions.jsonl"
    keys = [hashlib.sha1(f"{max_new_tokens}|{p}".encode()).hexdigest()[:16] for p in prompts]
    done = {row["key"]: row["completion"] for row in read_saved_rows(path)}
    todo = [i for i, k in enumerate(keys) if k not in done]
    chunk = max(64, 4 * ctx.eval_cfg["batch_size"])
    with open(path, "a") as fh:
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            outs = ctx.generate([prompts[i] for i in idx], max_new_tokens, STOP, desc=desc)
            for i, out in zip(idx, outs):
                done[keys[i]] = out
                fh.write(json.dumps({"key": keys[i], "completion": out}) + "\n")
            fh.flush()
    return [done[k] for k in keys]


def check_config(name: str, bench: Any, ev: Any) -> None:
    """Compose time: the task (default the benchmark's name) is gsm8k or math."""
    benchmark_task(name, bench, TASKS)


def score(name: str, bench: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Accuracy (%) of greedy chain-of-thought answers on GSM8K or MATH (``bench['task']``, default the
    benchmark's name); questions in ``bench['question_field']``, gold solutions in ``bench['answer_field']``;
    ``bench['prompt']`` (with ``{query}``) replaces MetaMath's prompt when set."""
    task = benchmark_task(name, bench, TASKS)
    qf, af = bench["question_field"], bench["answer_field"]
    rows = ctx.records(bench, [qf, af])
    golds = []
    for i, row in enumerate(rows):
        try:
            golds.append(gold_answer(task, row[af]))
        except ValueError as err:
            raise ConfigError(f"dataset '{bench['dataset']}' row {i}: field '{af}' has no {task} gold answer "
                              f"({err})") from None
    template = bench.get("prompt") or PROMPT
    prompts = [template.format(query=row[qf]) for row in rows]
    completions = _generate_cached(ctx, prompts, bench["max_new_tokens"], name)
    how = [judge(task, c, g) for c, g in zip(completions, golds)]
    n = len(how)
    return {"metric": "accuracy", "value": 100.0 * sum(h is not None for h in how) / n, "n": n,
            "value_strict": 100.0 * how.count("strict") / n, "fallback_accepted": how.count("fallback"),
            "no_answer": sum(extract_answer(c) is None for c in completions),
            "settings": ctx.settings(task=task, greedy=True, max_new_tokens=bench["max_new_tokens"], prompt=template,
                                     stop=list(STOP), answer_phrase=ANSWER_PHRASE,
                                     math_verify=version("math-verify")),
            "examples": [{"prompt": p, "completion": c, "extracted": extract_answer(c), "gold": g, "accepted": h}
                         for p, c, g, h in list(zip(prompts, completions, golds, how))[:3]]}


register(Scorer(kind="math", score=score, check=check_config, proportion=True,
                description="GSM8K / MATH accuracy (%) of greedy chain-of-thought answers (MetaMath protocol)"))
