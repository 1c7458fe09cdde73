"""Forgetting in the literature's units, derived from stored result records (pure: no model, no store).

**PEFT's forgetting** (huggingface/peft ``method_comparison/MetaMathQA``, read at commit
5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40: ``run.py`` ``calculate_mean_per_token_loss`` and ``train``,
``data.py`` ``get_wiki_small``, ``processing.py``; the fix that made it so is PEFT PR #3419, d787f51):

- text: the first 100 rows of ``HuggingFaceFW/finewiki`` (streamed), each truncated to 768 tokens;
- cross-entropy: next-token, ``cross_entropy(logit[:-1], target[1:], reduction="none")`` per text over its
  non-padding tokens, every token's loss appended to one list: the value is ``torch.tensor(losses).mean()``,
  a **per-token mean pooled over all texts** (a long text weighs more), in nats/token;
- before = the base model (adapter disabled), after = the trained model, and
  ``forgetting = wiki_loss_after - wiki_loss_before`` (**trained minus base**: positive = forgot, lower is
  better; ``processing.py``'s legend calls it "the reduction in CE loss", but the code is the increase).

lnull's ``text_nll`` records (``lnull.evaluate.likelihood``) hold the same unit on other text (BoolQ's
Wikipedia passages by default): per text its NLL per token with the first token conditioned on BOS
(``details.items``) and its token count (``details.item_tokens``), so :func:`peft_forgetting` recovers the
pooled mean of each model exactly and their difference in PEFT's sign.  Records scored before
``item_tokens`` existed give None with the reason (never an unpooled stand-in).

**Biderman et al. (2024), "LoRA Learns Less and Forgets Less"** (TMLR; Sec. 3.3 and Figs. 2-4): forgetting
is "the average of HellaSwag, ARC-Challenge and WinoGrande", computed with the MosaicML Gauntlet
(llm-foundry ``scripts/eval``) and printed as a fraction (e.g. 0.545).  The Gauntlet's multiple-choice
accuracy picks the choice with the lowest mean per-token cross-entropy of the continuation (composer's
``InContextLearningMultipleChoiceAccuracy``): length-normalised.  lm-eval's nearest metric is therefore
``acc_norm`` for HellaSwag and ARC-Challenge (normalised by the continuation's length in characters, not
tokens) and ``acc`` for WinoGrande (its options share one continuation, so normalising changes nothing; lm-eval
defines only ``acc`` there).  The paper names no shot count (Gauntlet v0.3 runs HellaSwag 0/10, ARC-C 3/25,
WinoGrande 5 shots); lnull's configs say theirs.  Values here are in % (lnull's unit), not fractions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

# benchmark (lm-eval task) -> the lm-eval metric nearest Biderman et al.'s Gauntlet accuracy (docstring)
BIDERMAN_METRIC: dict[str, str] = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "winogrande": "acc"}
BIDERMAN_TASKS: tuple[str, ...] = tuple(BIDERMAN_METRIC)


@dataclass(frozen=True)
class Estimate:
    """A number with its standard error and unit; ``value`` None when it cannot be computed (``why`` says
    why), never 0."""

    value: Optional[float]
    stderr: Optional[float]
    n: int
    unit: str
    why: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "stderr": self.stderr, "n": self.n, "unit": self.unit, "why": self.why}


def _missing(unit: str, why: str) -> Estimate:
    return Estimate(None, None, 0, unit, why)


def _as_dict(record: Any) -> Optional[dict[str, Any]]:
    """A record as a plain dict (a ``ResultRecord`` or its ``to_dict()``); None stays None."""
    if record is None:
        return None
    return record.to_dict() if hasattr(record, "to_dict") else dict(record)


NATS = "nats/token"
PCT = "%"


def pooled_nll(record: Any) -> Estimate:
    """One ``text_nll`` record's NLL pooled over all its tokens (nats/token; PEFT's
    ``calculate_mean_per_token_loss``): sum over texts of items x item_tokens, over all tokens."""
    rec = _as_dict(record)
    if rec is None:
        return _missing(NATS, "no record")
    items, tokens = rec["details"].get("items"), rec["details"].get("item_tokens")
    if not items or tokens is None or len(tokens) != len(items):
        return _missing(NATS, f"{rec['benchmark']} ({rec['model']}) keeps no per-text token counts "
                              "(scored before details.item_tokens): rescore it")
    total = sum(tokens)
    return Estimate(sum(x * t for x, t in zip(items, tokens)) / total, None, len(items), NATS)


def peft_forgetting(base: Any, trained: Any) -> Estimate:
    """PEFT's forgetting from the base and trained models' ``text_nll`` records of the same texts: pooled NLL
    per token of trained minus base (nats/token; positive = forgot).

    Standard error: the difference is a ratio sum(d_i) / sum(t_i) over texts i (d_i = t_i (a_i - b_i), the
    change in text i's total NLL; t_i its tokens), so texts are the sampling unit and the paired, delta-method
    SE is sqrt(n / (n - 1) * sum((d_i - R t_i)^2)) / sum(t_i) with R the estimate (None for one text).
    """
    b, t = _as_dict(base), _as_dict(trained)
    for rec, which in ((b, "base"), (t, "trained")):
        if rec is None:
            return _missing(NATS, f"no {which} record")
        if rec["kind"] != "text_nll":
            return _missing(NATS, f"{rec['benchmark']} ({which}) is {rec['kind']}, not text_nll")
    if b["details"].get("data") != t["details"].get("data") or b["benchmark"] != t["benchmark"]:
        return _missing(NATS, f"base and trained scored different texts ({b['benchmark']}: {b['details'].get('data')}"
                              f" vs {t['benchmark']}: {t['details'].get('data')})")
    pb, pt = pooled_nll(b), pooled_nll(t)
    if pb.value is None or pt.value is None:
        return _missing(NATS, pb.why or pt.why or "")
    tb, tt = b["details"]["item_tokens"], t["details"]["item_tokens"]
    if tb != tt:
        return _missing(NATS, "base and trained records count different tokens per text (not the same texts "
                              "or tokenizer)")
    n, total = len(tb), sum(tb)
    d = [tok * (a - z) for tok, a, z in zip(tb, t["details"]["items"], b["details"]["items"])]
    value = sum(d) / total
    se = math.sqrt(n / (n - 1) * sum((di - value * tok) ** 2 for di, tok in zip(d, tb))) / total if n > 1 else None
    return Estimate(value, se, n, NATS)


def _task(rec: Mapping[str, Any]) -> Optional[str]:
    return (rec.get("scorer") or {}).get("task")


def biderman_accuracy(record: Any) -> Estimate:
    """One lm_eval record's accuracy in Biderman et al.'s metric (:data:`BIDERMAN_METRIC`; %), with lm-eval's
    stderr of that metric when the record's own metric is it (else None)."""
    rec = _as_dict(record)
    if rec is None:
        return _missing(PCT, "no record")
    task = _task(rec)
    metric = BIDERMAN_METRIC.get(task or "")
    if metric is None:
        return _missing(PCT, f"{rec['benchmark']} is not one of {', '.join(BIDERMAN_TASKS)} (task {task})")
    if rec["metric"] == metric:
        return Estimate(rec["value"], rec["stderr"], rec["n"], PCT) if rec["value"] is not None else \
            _missing(PCT, f"{rec['benchmark']} was not scored")
    value = (rec["details"].get("metrics") or {}).get(metric)
    if value is None:
        return _missing(PCT, f"{rec['benchmark']} ({rec['model']}) has no {metric}")
    return Estimate(float(value), None, rec["n"], PCT)


def _by_task(records: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """The lm_eval records of Biderman's three tasks, keyed by task (a task seen twice: the first)."""
    found: dict[str, dict[str, Any]] = {}
    for r in records:
        rec = _as_dict(r)
        if rec and rec["kind"] == "lm_eval" and _task(rec) in BIDERMAN_METRIC:
            found.setdefault(_task(rec), rec)
    return found


def biderman_average(records: Iterable[Any]) -> Estimate:
    """Biderman et al.'s forgetting metric of one model: the unweighted mean of its HellaSwag (acc_norm),
    ARC-Challenge (acc_norm) and WinoGrande (acc) accuracies (%); None unless all three are there.
    SE: sqrt(sum se_i^2) / 3 (independent test sets); None if any stderr is missing."""
    found = _by_task(records)
    parts = [biderman_accuracy(found.get(task)) for task in BIDERMAN_TASKS]
    missing = [task for task, p in zip(BIDERMAN_TASKS, parts) if p.value is None]
    if missing:
        return _missing(PCT, f"missing {', '.join(missing)}")
    value = sum(p.value for p in parts) / 3  # type: ignore[misc]
    ses = [p.stderr for p in parts]
    se = math.sqrt(sum(s * s for s in ses)) / 3 if all(s is not None for s in ses) else None  # type: ignore
    return Estimate(value, se, sum(p.n for p in parts), PCT)


def biderman_change(base_records: Iterable[Any], trained_records: Iterable[Any]) -> Estimate:
    """Trained minus base Biderman average (percentage points; negative = forgot).  lm_eval records keep no
    per-question outcomes, so the SE is unpaired, sqrt(se_base^2 + se_trained^2): conservative."""
    base, trained = biderman_average(base_records), biderman_average(trained_records)
    if base.value is None or trained.value is None:
        return _missing("pp", f"base: {base.why}" if base.value is None else f"trained: {trained.why}")
    se = math.sqrt(base.stderr ** 2 + trained.stderr ** 2) if base.stderr is not None and \
        trained.stderr is not None else None
    return Estimate(trained.value - base.value, se, trained.n, "pp")


# The papers' exact match (NQ-Open / TriviaQA / WebQS, %) is shown only where it can move: at demo scale a
# 135M model scores ~0-2 % before and after training, and a change of 0 then says nothing.
EXACT_MATCH_FLOOR = 2.0


def informative_exact_match(base: Any, trained: Any, floor: float = EXACT_MATCH_FLOOR) -> Estimate:
    """Trained minus base exact match (pp), or None (with why) when both are below ``floor`` % (~0)."""
    b, t = _as_dict(base), _as_dict(trained)
    if b is None or t is None:
        return _missing("pp", f"no {'base' if b is None else 'trained'} record")
    if b["metric"] != "exact_match" or t["metric"] != "exact_match":
        return _missing("pp", f"{b['benchmark']} is not scored by exact match")
    if b["value"] is None or t["value"] is None:
        return _missing("pp", f"{b['benchmark']} was not scored")
    if max(b["value"], t["value"]) < floor:
        return _missing("pp", f"{b['benchmark']} exact match is ~0 (base {b['value']:.1f} %, trained "
                              f"{t['value']:.1f} %, both < {floor:g} %)")
    se = math.sqrt(b["stderr"] ** 2 + t["stderr"] ** 2) if b["stderr"] is not None and t["stderr"] is not None \
        else None
    return Estimate(t["value"] - b["value"], se, t["n"], "pp")


def accuracy_change(base: Any, trained: Any) -> Estimate:
    """Trained minus base of one benchmark's value (pp; e.g. MMLU acc), unpaired SE; None with why if either is
    missing."""
    b, t = _as_dict(base), _as_dict(trained)
    if b is None or t is None or b["value"] is None or t["value"] is None:
        return _missing("pp", f"no {'base' if b is None or b['value'] is None else 'trained'} score")
    se = math.sqrt(b["stderr"] ** 2 + t["stderr"] ** 2) if b["stderr"] is not None and t["stderr"] is not None \
        else None
    return Estimate(t["value"] - b["value"], se, t["n"], "pp")


def literature_forgetting(records: Iterable[Any], text_benchmark: str = "wiki_text",
                          exact_match: Iterable[str] = ("nq_open", "triviaqa", "webqs")) -> dict[str, Any]:
    """A run's records (``eval/results.json``, base and trained) in the literature's units:
    ``peft_forgetting`` (nats/token, trained - base), ``biderman`` (each model's average, %, and the change, pp),
    ``mmlu`` (0-shot acc change, pp; configs/eval/mmlu.yaml) and ``exact_match`` (per lm-eval task of
    ``exact_match``, its change in pp or None with why)."""
    recs = [_as_dict(r) for r in records]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by_model.setdefault(r["model"], []).append(r)
    base, trained = by_model.get("base", []), by_model.get("trained", [])

    def find(rs: list[dict[str, Any]], **match: Any) -> Optional[dict[str, Any]]:
        return next((r for r in rs if all((_task(r) if k == "task" else r.get(k)) == v for k, v in match.items())),
                    None)

    em = {task: informative_exact_match(find(base, task=task, kind="lm_eval"),
                                        find(trained, task=task, kind="lm_eval")).to_dict() for task in exact_match}
    return {"peft_forgetting": peft_forgetting(find(base, benchmark=text_benchmark),
                                               find(trained, benchmark=text_benchmark)).to_dict(),
            "biderman": {"base": biderman_average(base).to_dict(), "trained": biderman_average(trained).to_dict(),
                         "change": biderman_change(base, trained).to_dict()},
            "mmlu": accuracy_change(find(base, task="mmlu", kind="lm_eval"),
                                    find(trained, task="mmlu", kind="lm_eval")).to_dict(),
            "exact_match": em}
