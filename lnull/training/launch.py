"""Multi-process training through ``accelerate launch``.

Hydra composes once, in the parent: the resolved config is written to ``<out>/launch/config.yaml`` and every
worker reads that file (``python -m lnull.train <config> <out> <init>``), so all ranks agree on one run folder
and one config; the Accelerate config of ``accelerate.launch`` goes to ``<out>/launch/accelerate.yaml``. When the
parent's console is quiet (the CLI), the workers' library chatter goes to the parent's stage log
(``$LNULL_STAGE_LOG``, ``<run>/logs/train.log``), not to the terminal.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from lnull.errors import ConfigError
from lnull.config import accumulation_steps

ERROR_FILE = "error.txt"
SUMMARY_FILE = "summary.json"
STAGE_LOG_ENV = "LNULL_STAGE_LOG"


def accelerate_yaml(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``accelerate launch`` config: ``accelerate.launch`` plus what DeepSpeed must be told itself
    (accumulation steps and clipping, which Accelerate cannot apply on a DeepSpeed engine)."""
    launch = dict(cfg["accelerate"]["launch"])
    if launch.get("num_machines", 1) == 1:  # a free port, so concurrent runs (sweeps, tests) do not collide
        launch.setdefault("main_process_port", _free_port())
    tcfg = cfg["train"]
    if launch.get("distributed_type") == "DEEPSPEED":
        ds = dict(launch.get("deepspeed_config") or {})
        ds.setdefault("gradient_accumulation_steps", accumulation_steps(cfg))
        ds.setdefault("gradient_clipping", float(tcfg["max_grad_norm"] or 0.0))
        launch["deepspeed_config"] = ds
    return launch


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cfg: dict[str, Any], out_dir: Path, init_dir: Path) -> dict[str, Any]:
    """Run the training workers and return rank 0's summary; ConfigError with a worker's message if they fail."""
    from lnull.console import open_stage_log
    from lnull.io import atomic_write_text, read_json

    folder = out_dir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ERROR_FILE).unlink(missing_ok=True)
    (folder / SUMMARY_FILE).unlink(missing_ok=True)
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    atomic_write_text(folder / "accelerate.yaml", yaml.safe_dump(accelerate_yaml(cfg), sort_keys=False))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(folder / "accelerate.yaml"),
           "-m", "lnull.train", str(folder / "config.yaml"), str(out_dir), str(init_dir)]
    env = dict(os.environ)
    log = open_stage_log()
    if log is not None:  # the workers send their library chatter where this process sends its own
        env[STAGE_LOG_ENV] = str(log)
    code = subprocess.run(cmd, env=env).returncode
    if (folder / ERROR_FILE).exists():
        raise ConfigError((folder / ERROR_FILE).read_text().strip())
    if code != 0 or not (folder / SUMMARY_FILE).exists():
        raise RuntimeError(f"training workers failed (exit {code}); their output is above; "
                           f"command: {' '.join(cmd)}")
    return read_json(folder / SUMMARY_FILE)
