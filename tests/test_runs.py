"""Run folders: the `tiny` pipeline end to end, kill-and-resume, invalidation, atomic stage publish."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, lnull
from lnull.pipeline import run_pipeline
from lnull.runs import RunFolder, atomic_write_json

EXPECTED_TREE = [
    "config.yaml", "provenance.json",
    "calibration/stats.safetensors", "calibration/meta.json", "calibration/complete.json",
    "init/base/config.json", "init/base/model.safetensors", "init/base/tokenizer.json",
    "init/adapter/adapter_config.json", "init/adapter/adapter_model.safetensors", "init/adapter/lnull_method.json",
    "init/report.json", "init/complete.json",
    "train/adapter/adapter_model.safetensors", "train/metrics.jsonl", "train/complete.json",
    "eval/results.json", "eval/complete.json",
]


def test_tiny_end_to_end_killed_after_init_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "lnull", "run", "+experiment=tiny", f"run.dir={run_dir}", "progress=false",
            "train.max_steps=30"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "init" / "complete.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "train").exists(), "killed mid-train must not leave a complete-looking stage"
    calib_mtime = (run_dir / "calibration" / "stats.safetensors").stat().st_mtime_ns

    done = lnull("run", "+experiment=tiny", f"run.dir={run_dir}", "progress=false", "train.max_steps=30", check=True)
    assert "[calibrate] cached" in done.stdout and "[init] cached" in done.stdout
    assert "[train] done" in done.stdout and "[evaluate] done" in done.stdout
    assert (run_dir / "calibration" / "stats.safetensors").stat().st_mtime_ns == calib_mtime
    for rel in EXPECTED_TREE:
        assert (run_dir / rel).is_file(), rel
    assert not list(run_dir.glob("*.partial"))

    metrics = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 30 and metrics[-1]["loss"] < metrics[0]["loss"]
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert {(r["model"], r["benchmark"]) for r in results} == {("base", "synthetic_facts"), ("trained", "synthetic_facts")}
    assert all(r["n"] == 64 and 0 <= r["value"] <= 100 for r in results)
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    assert cfg["run"]["dir"] == str(run_dir) and cfg["method"]["rank"] == 4
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["versions"]["torch"] and "cuda" in prov["device"]

    again = lnull("run", "+experiment=tiny", f"run.dir={run_dir}", "progress=false", "train.max_steps=30", check=True)
    assert all(f"[{s}] cached" in again.stdout for s in ("calibrate", "init", "train", "evaluate"))


def test_changed_config_invalidates_the_stage_and_everything_after(tiny_cfg):
    logs: list[str] = []
    run = run_pipeline(tiny_cfg(), log=logs.append)
    init_mtime = (run.path / "init" / "report.json").stat().st_mtime_ns
    logs.clear()
    run_pipeline(tiny_cfg("train.lr=0.01"), log=logs.append)
    assert any("[calibrate] cached" in m for m in logs) and any("[init] cached" in m for m in logs)
    assert any("[train] config changed: removed train, eval" in m for m in logs)
    assert (run.path / "init" / "report.json").stat().st_mtime_ns == init_mtime
    logs.clear()
    run_pipeline(tiny_cfg("train.lr=0.01", "calibration.samples=8"), log=logs.append)
    assert not any("cached" in m for m in logs)
    assert json.loads((run.path / "calibration" / "meta.json").read_text())["samples"] == 8


def test_stage_is_published_only_when_complete(tiny_cfg):
    cfg = tiny_cfg()
    run = RunFolder.for_config(cfg)
    partial = run.begin("calibrate")
    (partial / "half-written").write_text("x")
    assert not run.stage_dir("calibrate").exists() and not run.is_complete("calibrate")
    run.publish("calibrate", {"n": 1})
    assert run.is_complete("calibrate") and not partial.exists()
    other = RunFolder.for_config({**cfg, "calibration": {**cfg["calibration"], "seed": 1}})
    assert not other.is_complete("calibrate")


def test_stage_command_without_its_inputs_says_what_to_run(tiny_cfg, tmp_path):
    proc = lnull("train", "+experiment=tiny", f"run.dir={tmp_path / 'fresh'}")
    assert proc.returncode != 0 and "needs 'init' first" in proc.stderr


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        atomic_write_json(target, circular)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_evaluating_only_the_base_model_needs_no_earlier_stage(tiny_cfg):
    logs: list[str] = []
    run = run_pipeline(tiny_cfg("eval.models=[base]", "eval.limit=4"), stages=["evaluate"], log=logs.append)
    results = json.loads((run.path / "eval" / "results.json").read_text())["results"]
    assert [(r["model"], r["n"]) for r in results] == [("base", 4)]
    assert not (run.path / "init").exists()


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    target = tmp_path / "y.json"
    atomic_write_json(target, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
