"""Run folders: config hash, atomic writes, the per-stage cache and provenance.

Layout of a run folder (DESIGN.md, stage contracts)::

    <run>/config.yaml          fully resolved config of the last invocation
    <run>/provenance.json      package versions, git commit, device
    <run>/<folder>/            one folder per stage (calibration, init, train, eval), present only
                               once the stage completed
    <run>/<folder>/complete.json  the stage fingerprint it was computed for
    <run>/<folder>.partial/    work in progress (kept when killed, so a stage can resume inside it)

A stage works inside ``<stage>.partial/`` and is published by one ``os.replace`` to ``<stage>/``: a
folder named after a stage is always complete.  Each stage has a fingerprint: a hash of the config
sections it reads plus the fingerprint of the stage before it, so a change that affects a stage
invalidates it and everything after it, and nothing before.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

from lnull.config import STAGES, ConfigError

# Config sections each stage reads (besides the previous stage's output).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "calibrate": ("model", "calibration"),
    "init": ("model", "method"),
    "train": ("task", "train", "accelerate"),
    "evaluate": ("eval",),
}
# Sections that name a run: the default run dir hashes these.  `eval` is left out on purpose, so that
# re-scoring with other benchmarks reuses the trained model of the same folder.
# Folder of each stage inside a run (DESIGN.md stage contracts).
STAGE_FOLDERS = {"calibrate": "calibration", "init": "init", "train": "train", "evaluate": "eval"}
IDENTITY_SECTIONS = ("experiment", "model", "method", "calibration", "task", "train", "accelerate")


def stable_hash(obj: Any, length: int = 10) -> str:
    """Hex digest of a JSON-serialisable object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def default_run_dir(cfg: dict[str, Any]) -> Path:
    """``<run.root>/<experiment>-<hash of the identity sections>``; never a timestamp, so every
    process of a multi-process launch computes the same folder."""
    ident = {k: cfg.get(k) for k in IDENTITY_SECTIONS}
    return Path(cfg["run"]["root"]) / f"{cfg['experiment']}-{stable_hash(ident)}"


def stage_fingerprints(cfg: dict[str, Any]) -> dict[str, str]:
    """Chained fingerprint per stage: hash(its config sections, previous stage's fingerprint)."""
    fps: dict[str, str] = {}
    prev = ""
    for stage in STAGES:
        prev = stable_hash({"prev": prev, **{k: cfg.get(k) for k in STAGE_INPUTS[stage]}}, 16)
        fps[stage] = prev
    return fps


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared like any written file
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class RunFolder:
    """One run's folder and its stage cache."""

    def __init__(self, path: Path, cfg: dict[str, Any]):
        self.path = Path(path)
        self.cfg = cfg
        self.fingerprints = stage_fingerprints(cfg)

    @classmethod
    def for_config(cls, cfg: dict[str, Any]) -> "RunFolder":
        """Resolve ``run.dir`` (or its default), check it is writable, write config.yaml."""
        path = Path(cfg["run"]["dir"]) if cfg["run"].get("dir") else default_run_dir(cfg)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"run.dir '{path}' is not writable: {exc.strerror or exc}") from None
        cfg = {**cfg, "run": {**cfg["run"], "dir": str(path)}}
        run = cls(path, cfg)
        atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        return run

    def stage_dir(self, stage: str) -> Path:
        return self.path / STAGE_FOLDERS[stage]

    def partial_dir(self, stage: str) -> Path:
        return self.path / f"{STAGE_FOLDERS[stage]}.partial"

    def is_complete(self, stage: str) -> bool:
        """True when ``<stage>/`` exists and was computed for the current fingerprint."""
        marker = self.stage_dir(stage) / "complete.json"
        if not marker.exists():
            return False
        return read_json(marker).get("fingerprint") == self.fingerprints[stage]

    def invalidate_from(self, stage: str) -> list[str]:
        """Delete ``stage`` and every later stage's outputs (and partial work); return what was removed."""
        removed = []
        for later in STAGES[STAGES.index(stage):]:
            for folder in (self.stage_dir(later), self.partial_dir(later)):
                if folder.exists():
                    shutil.rmtree(folder)
                    removed.append(folder.name)
        return removed

    def begin(self, stage: str) -> Path:
        """Partial folder to work in.  Partial work of a different fingerprint is discarded."""
        partial = self.partial_dir(stage)
        owner = partial / "fingerprint"
        if partial.exists() and (not owner.exists() or owner.read_text() != self.fingerprints[stage]):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write_text(owner, self.fingerprints[stage])
        return partial

    def publish(self, stage: str, summary: dict[str, Any] | None = None) -> Path:
        """Mark the partial folder complete and move it into place in one rename."""
        partial = self.partial_dir(stage)
        (partial / "fingerprint").unlink(missing_ok=True)
        atomic_write_json(partial / "complete.json", {"stage": stage, "fingerprint": self.fingerprints[stage],
                                                       **(summary or {})})
        final = self.stage_dir(stage)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        return final

    def first_incomplete(self, stages: Iterable[str]) -> str | None:
        for stage in stages:
            if not self.is_complete(stage):
                return stage
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """Package versions, git commit and device of this process."""
    from importlib import metadata

    versions = {}
    for pkg in ("lnull", "torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "lm_eval",
                "deepspeed", "safetensors", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    import torch

    device = {"cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        device["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"versions": versions, "git_commit": _git_commit(), "python": platform.python_version(),
            "device": device}
