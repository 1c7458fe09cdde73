"""Chaining stages over a run folder: skip completed stages, resume the first incomplete one."""
from __future__ import annotations

import time
from typing import Any, Callable

from lnull.config import STAGES, ConfigError
from lnull.runs import RunFolder, atomic_write_json, provenance


def _calibrate(cfg, run: RunFolder, out):
    from lnull import calibrate

    return calibrate.run(cfg, out)


def _init(cfg, run: RunFolder, out):
    from lnull import initialize

    return initialize.run(cfg, out, run.stage_dir("calibrate") if run.is_complete("calibrate") else None)


def _train(cfg, run: RunFolder, out):
    from lnull import train

    return train.run(cfg, out, run.stage_dir("init"))


def _evaluate(cfg, run: RunFolder, out):
    from lnull import evaluate

    return evaluate.run(cfg, out, run.path)


STAGE_FUNCS: dict[str, Callable[[dict, RunFolder, Any], dict]] = {
    "calibrate": _calibrate, "init": _init, "train": _train, "evaluate": _evaluate}
# Stages whose outputs a stage reads; they must be complete first.
NEEDS = {"calibrate": (), "init": ("calibrate",), "train": ("init",)}
# evaluate reads the stage that produced each model it scores (base needs none).
EVAL_NEEDS = {"base": (), "init": ("init",), "trained": ("init", "train")}


def needed_stages(stage: str, cfg: dict[str, Any]) -> list[str]:
    if stage != "evaluate":
        return list(NEEDS[stage])
    # a model path or hub name needs nothing from the run
    return sorted({s for which in cfg["eval"]["models"] for s in EVAL_NEEDS.get(which, ())}, key=STAGES.index)


def run_stage(run: RunFolder, stage: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one stage unless complete for the current config; stale outputs and later stages are dropped."""
    if run.is_complete(stage):
        log(f"[{stage}] cached: {run.stage_dir(stage)}")
        return {"cached": True}
    missing = [s for s in needed_stages(stage, run.cfg) if not run.is_complete(s)]
    if missing:
        raise ConfigError(f"stage '{stage}' needs '{missing[0]}' first: run `lnull {missing[0]}` or `lnull run`")
    dropped = run.invalidate_from(stage) if run.stage_dir(stage).exists() else []
    if dropped:
        log(f"[{stage}] config changed: removed {', '.join(dropped)}")
    start = time.perf_counter()
    summary = STAGE_FUNCS[stage](run.cfg, run, run.begin(stage))
    summary = {**summary, "wall_seconds": round(time.perf_counter() - start, 3)}
    run.publish(stage, summary)
    log(f"[{stage}] done in {summary['wall_seconds']:.1f}s: {run.stage_dir(stage)}")
    return summary


def _check_inputs(cfg: dict[str, Any], run: RunFolder, stages: list[str]) -> None:
    """Data the pending stages will read is here (before hours of calibration and training, not after)."""
    from lnull.data.sources import check_available

    if "train" in stages and not run.is_complete("train"):
        check_available(cfg["task"]["dataset"], cfg.get("cache_dir"), "task.dataset")
    if "evaluate" in stages and not run.is_complete("evaluate"):
        from lnull.evaluate.registry import check_benchmark_inputs

        for name, bench in cfg["eval"]["benchmarks"].items():
            check_benchmark_inputs(name, bench, cfg.get("cache_dir"))


def run_pipeline(cfg: dict[str, Any], stages: list[str] | None = None,
                 log: Callable[[str], None] = print) -> RunFolder:
    """Run ``stages`` (default ``run.stages``) in order on the config's run folder."""
    stages = stages or [s for s in STAGES if s in cfg["run"]["stages"]]
    run = RunFolder.for_config(cfg)
    _check_inputs(cfg, run, stages)
    atomic_write_json(run.path / "provenance.json", provenance())
    for stage in stages:
        run_stage(run, stage, log)
    return run
