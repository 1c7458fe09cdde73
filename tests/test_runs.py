"""Run folders over the store: the `tiny` pipeline end to end, kill-and-resume, invalidation, atomic publish."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, lnull
from lnull.io import atomic_write_dir, atomic_write_json
from lnull.layout import RunLayout
from lnull.pipeline import run_pipeline

EXPECTED_TREE = [
    "config.yaml", "provenance.json",
    "calibration/stats.safetensors", "calibration/meta.json", "calibration/complete.json",
    "init/adapter/adapter_config.json", "init/adapter/adapter_model.safetensors", "init/adapter/lnull_method.json",
    "init/report.json", "init/complete.json",
    "train/adapter/adapter_model.safetensors", "train/metrics.jsonl", "train/complete.json",
    "eval/results.json", "eval/complete.json", "eval/base/synthetic_facts.json", "eval/trained/synthetic_facts.json",
]


def test_tiny_end_to_end_killed_after_init_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "lnull", "run", "+experiment=tiny", f"run.dir={run_dir}", "progress=false",
            "train.max_steps=30", "method=lora_null_v1"]
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

    done = lnull(*args[3:], check=True)
    assert "[calibrate] cached" in done.stdout and "[init] cached" in done.stdout
    assert "[train] done" in done.stdout and "[evaluate] done" in done.stdout
    assert (run_dir / "calibration" / "stats.safetensors").stat().st_mtime_ns == calib_mtime
    for rel in EXPECTED_TREE:
        assert (run_dir / rel).is_file(), rel
    init_files = {p.relative_to(run_dir / "init").as_posix() for p in (run_dir / "init").rglob("*") if p.is_file()}
    assert init_files == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
                          "adapter/lnull_method.json", "lnull_method.json", "report.json", "complete.json"}, init_files
    for view in ("calibration", "init", "train"):  # views of the store, beside the run folder
        assert (run_dir / view).is_symlink() and (run_dir / view).resolve().parent.parent == tmp_path / "store"
    assert not list(run_dir.glob("*.partial")) and not list((tmp_path / "store").glob("*/*.partial"))

    metrics = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 30 and metrics[-1]["loss"] < metrics[0]["loss"]
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert {(r["model"], r["benchmark"]) for r in results} == {("base", "synthetic_facts"), ("trained", "synthetic_facts")}
    assert all(r["n"] == 64 and r["value"] == 0.0 and r["stderr"] == 0.0 for r in results)  # 30 steps teach no fact
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    assert cfg["run"]["dir"] == str(run_dir) and cfg["method"]["rank"] == 4
    by_model = {r["model"]: r for r in results}
    assert by_model["base"]["method"] is None and by_model["base"]["calibration"] is None
    trained = by_model["trained"]  # the whole identity, read from the store entries that made it
    assert trained["method"]["name"] == "lora_null_v1" and trained["method"]["rank"] == 4
    assert trained["calibration"]["samples"] == 16 and trained["train"]["steps"] == 30
    assert trained["method"]["trainable_params"] > 0 and trained["scorer"]["kind"] == "qa_exact_match"
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["versions"]["torch"] and "cuda" in prov["device"]

    again = lnull(*args[3:], check=True)
    assert all(f"[{s}] cached" in again.stdout for s in ("calibrate", "init", "train", "evaluate"))


def test_changed_config_invalidates_the_stage_and_everything_after(tiny_cfg):
    logs: list[str] = []
    run = run_pipeline(tiny_cfg("method=lora_null_v1"), log=logs.append)
    init_mtime = (run.dir / "init" / "report.json").stat().st_mtime_ns
    old_train = (run.dir / "train").resolve()
    logs.clear()
    run_pipeline(tiny_cfg("method=lora_null_v1", "train.lr=0.01"), log=logs.append)
    assert any("[calibrate] cached" in m for m in logs) and any("[init] cached" in m for m in logs)
    assert any("dropped train, eval" in m for m in logs) and any("[train] done" in m for m in logs)
    assert (run.dir / "init" / "report.json").stat().st_mtime_ns == init_mtime
    assert (run.dir / "train").resolve() != old_train and old_train.is_dir()  # the store keeps the old one
    logs.clear()
    run_pipeline(tiny_cfg("method=lora_null_v1", "train.lr=0.01", "calibration.samples=8"), log=logs.append)
    assert not any("] cached" in m for m in logs if not m.startswith("[evaluate] base"))
    assert json.loads((run.dir / "calibration" / "meta.json").read_text())["samples"] == 8


def test_stage_is_published_only_when_complete(tiny_cfg):
    cfg = tiny_cfg()
    layout = RunLayout.create(cfg)
    calls = []

    def produce(out):
        (out / "half-written").write_text("x")
        calls.append(out)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed mid-stage
        return {"n": 1}

    store, key = layout.store, layout.keys["calibrate"]
    with pytest.raises(KeyboardInterrupt):
        store.compute("calibration", key, produce, {})
    assert not store.entry("calibration", key).exists() and not layout.is_complete("calibrate")
    assert (store.partial("calibration", key) / "half-written").exists()  # kept: the next attempt resumes in it
    store.compute("calibration", key, produce, {})
    assert layout.is_complete("calibrate") and not store.partial("calibration", key).exists()
    other = RunLayout({**cfg, "calibration": {**cfg["calibration"], "seed": 1}})
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
    results = json.loads((run.dir / "eval" / "results.json").read_text())["results"]
    assert [(r["model"], r["n"]) for r in results] == [("base", 4)]
    assert results[0]["method"] is None and results[0]["train"] is None
    assert not (run.dir / "init").exists()


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    target = tmp_path / "y.json"
    atomic_write_json(target, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_dir_replaces_or_keeps_a_published_folder_with_ordinary_modes(tmp_path):
    def writer(text):
        def write(folder):
            (folder / "sub").mkdir()
            (folder / "sub" / "f.txt").write_text(text)
        return write

    dest = tmp_path / "model"
    atomic_write_dir(dest, writer("one"))
    atomic_write_dir(dest, writer("two"), keep_existing=True)  # another process published first: kept
    assert (dest / "sub" / "f.txt").read_text() == "one"
    atomic_write_dir(dest, writer("three"))  # a fresh conversion replaces it
    assert (dest / "sub" / "f.txt").read_text() == "three"
    with pytest.raises(RuntimeError):
        atomic_write_dir(dest, lambda folder: (_ for _ in ()).throw(RuntimeError("killed")))
    assert (dest / "sub" / "f.txt").read_text() == "three"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or old folder left
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (dest / "sub" / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask
