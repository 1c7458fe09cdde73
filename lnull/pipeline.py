"""Running stages over a run: cache by key, lock, compute, publish, link the run's view.

Every stage runs as ``run(cfg, ctx) -> summary`` with a :class:`lnull.stages.StageContext` (here:
:class:`LayoutContext`): ``ctx.out`` is the folder to write (the store's partial folder of the key, or the
run-local ``<folder>.partial``), ``ctx.input(stage)`` the completed output of an upstream stage, ``ctx.layout``
the run's paths and store, ``ctx.log`` where progress lines go.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from lnull.errors import ConfigError
from lnull.io import atomic_write_json, check_writable_dir, drop_stale_temps, read_json
from lnull.layout import RunLayout, store_root
from lnull.stages import BY_NAME, DEFAULT_CHAIN, STAGES, Stage
from lnull.store import MARKER

Log = Callable[[str], None]


@dataclass
class LayoutContext:
    """The :class:`lnull.stages.StageContext` of a stage run on a :class:`RunLayout`."""

    layout: RunLayout
    stage: Stage
    out: Path
    log: Log = print

    def input(self, stage: str) -> Path:
        return self.layout.input(stage)

    def maybe_input(self, stage: str) -> Optional[Path]:
        return self.layout.maybe_input(stage)


def chain(cfg: dict[str, Any]) -> list[str]:
    """The stages ``lnull run`` chains: ``run.stages`` or the default calibrate, init, train, evaluate."""
    return list(cfg["run"].get("stages") or DEFAULT_CHAIN)


def log_file(layout: RunLayout, name: str) -> Path:
    """Where the library chatter of stage ``name`` goes (``lnull.console``): ``<run>/logs/<stage>.log``."""
    return layout.dir / "logs" / f"{name}.log"


def run_stage(layout: RunLayout, name: str, log: Log = print) -> dict[str, Any]:
    """Run one stage for the layout's config unless its output for this key exists; link the run's view. Library
    chatter goes to :func:`log_file` when the console is quiet (``lnull.console.quiet_libraries``, the CLI)."""
    from lnull.console import stage_log

    with stage_log(log_file(layout, name)):
        return _run_stage(layout, name, log)


def _run_stage(layout: RunLayout, name: str, log: Log) -> dict[str, Any]:
    stage, cfg = BY_NAME[name], layout.cfg
    layout.store.register(layout.dir, *_uses(layout, name))  # before it starts: gc keeps what it reads and writes
    if layout.is_complete(name):
        if stage.stored:
            layout.link(name)
        log(f"[{name}] cached: {layout.view(name)}")
        return {"cached": True}
    missing = [s for s in stage.reads(cfg) if not layout.is_complete(s)]
    if missing:
        raise ConfigError(f"stage '{name}' needs '{missing[0]}' first: run `lnull {missing[0]}` or `lnull run`")
    start = time.perf_counter()
    made_by = {"provenance": provenance(), **layout.keys.record(name)}  # what complete.json records

    def produce(out: Path) -> dict[str, Any]:
        summary = stage.function()(cfg, LayoutContext(layout, stage, out, log))
        return {**summary, "wall_seconds": round(time.perf_counter() - start, 3)}

    if stage.stored:
        _, marker = layout.store.compute(stage.folder, layout.keys[name], produce, made_by, log)
        layout.link(name)
        if marker is None:
            log(f"[{name}] cached: {layout.view(name)} (computed by another process)")
            return {"cached": True}
        summary = marker["summary"]
    else:
        summary = _run_local(layout, stage, produce, made_by)
    log(f"[{name}] done in {summary['wall_seconds']:.1f}s: {layout.view(name)}")
    return summary


def _uses(layout: RunLayout, name: str) -> tuple[dict[str, str], list[str]]:
    """({folder: key}, [record keys]) stage ``name`` of this run reads and writes."""
    stage, cfg = BY_NAME[name], layout.cfg
    entries = {BY_NAME[s].folder: layout.keys[s] for s in stage.reads(cfg) if BY_NAME[s].stored}
    if stage.stored:
        entries[stage.folder] = layout.keys[name]
    return entries, stage.writes_records(layout)


def _run_local(layout: RunLayout, stage: Stage, produce: Callable[[Path], dict], made_by: dict) -> dict[str, Any]:
    """A run-local stage: work in ``<folder>.partial`` under the run's lock, publish by one rename (or return
    the summary another process published while this one waited for the lock)."""
    with layout.store.lock(stage.folder, f"run-{layout.dir.resolve().name}"):
        if layout.is_complete(stage.name):
            return {**read_json(layout.view(stage.name) / MARKER)["summary"], "cached": True}
        partial, final = layout.partial(stage.name), layout.view(stage.name)
        partial.mkdir(parents=True, exist_ok=True)
        drop_stale_temps(partial)
        summary = produce(partial)
        atomic_write_json(partial / MARKER, {**made_by, "summary": summary})
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    return summary


def check_inputs(layout: RunLayout, stages: list[str]) -> None:
    """Data and models the pending stages will read are here (before hours of calibration and training, not
    after, and before any model loads): which stages load the run's model (``Stage.loads_model``), each stage's
    ``Stage.check`` (``check_first`` ones first, then in table order), then the run's model once if one loads it."""
    from lnull.modeling import check_model_available

    pending = [stage for stage in STAGES if stage.name in stages]
    loads_model = [stage.name for stage in pending if stage.loads_model(layout)]
    for stage in sorted(pending, key=lambda s: not s.check_first):
        if stage.check is not None and stage.check(layout):
            loads_model.append(stage.name)
    if loads_model:
        check_model_available(layout.cfg["model"]["name_or_path"], layout.cfg.get("cache_dir"))


def run_pipeline(cfg: dict[str, Any], stages: Optional[list[str]] = None, log: Log = print,
                 from_file: bool = False) -> RunLayout:
    """Run ``stages`` (default: :func:`chain`) in order on the config's run folder. ``lnull run`` (no
    ``stages``) skips stages that do not apply (calibration for a method that reads no statistic).
    ``from_file``: ``cfg`` was read from the run's own ``config.yaml`` (``lnull run --from``)."""
    explicit = stages is not None
    names = list(stages) if explicit else chain(cfg)
    for name in names:
        if name not in BY_NAME:
            raise ConfigError(f"unknown stage '{name}'; known: {', '.join(BY_NAME)}")
    check_writable_dir(store_root(cfg), "store.root")
    layout = RunLayout.create(cfg, from_file)
    if not explicit:
        skipped = [n for n in names if not BY_NAME[n].applies(layout.cfg)]
        for name in skipped:
            log(f"[{name}] not needed: method '{layout.cfg['method']['name']}' reads no calibration statistic")
        names = [n for n in names if n not in skipped]
    check_inputs(layout, names)
    layout.drop_stale_views(log)
    atomic_write_json(layout.dir / "provenance.json", provenance())
    with layout.store.session():  # each stage records its keys when it starts (run_stage)
        for name in names:
            run_stage(layout, name, log)
        layout.store.register(layout.dir, **layout.used(), replace=True)  # a changed config's old keys released
    return layout


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """Package versions, git commit and device of this process."""
    from importlib import metadata

    import torch

    versions = {}
    for pkg in ("lnull", "torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "lm_eval",
                "deepspeed", "safetensors", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    device = {"cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        device["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"versions": versions, "git_commit": _git_commit(), "python": platform.python_version(),
            "device": device}
