"""Resumable checkpoints through Accelerate's ``save_state``/``load_state``.

A checkpoint holds the trainable weights, optimizer, scheduler and every rank's RNG state (Accelerate;
DeepSpeed's own sharded format under ZeRO) plus ``trainer_state.json`` (step, tokens seen).  Frozen base
weights are left out: they are rebuilt from the original model and ``init/adapter``, and for a 7B model they
would be 13 GB per save.
Each checkpoint is written to ``checkpoints/tmp-<step>`` and renamed to ``step-<step>`` when every rank is
done, so a run killed mid-save resumes from the previous complete one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from accelerate.utils import DistributedType

STATE_FILE = "trainer_state.json"


def _trainable_names(model: Any) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def keep_trainable_only(accelerator: Any) -> None:
    """Register a save hook dropping frozen tensors from the (non-DeepSpeed) model state Accelerate writes."""
    def hook(models: list, weights: list, output_dir: str) -> None:
        for model, state in zip(models, weights):
            names = _trainable_names(model)
            for key in list(state):
                if key not in names:
                    del state[key]
    accelerator.register_save_state_pre_hook(hook)


def latest(root: Path) -> Optional[Path]:
    """The newest complete ``step-<n>`` checkpoint under ``root``, or None."""
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).exists()] if root.exists() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save(accelerator: Any, root: Path, state: dict[str, Any]) -> Path:
    """Write checkpoint ``step-<state['step']>`` (all ranks call this) and drop older ones."""
    step = state["step"]
    tmp, final = root / f"tmp-{step}", root / f"step-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    accelerator.save_state(str(tmp), **kwargs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        os.replace(tmp, final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator: Any, root: Path) -> Optional[dict[str, Any]]:
    """Load the newest complete checkpoint into the prepared objects; its trainer state, or None. Says so in one
    line (``[train] resumed from step N (<checkpoint>)``) on the main process."""
    path = latest(root)
    if path is None:
        return None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.load_state(str(path), load_module_strict=False)
    else:
        accelerator.load_state(str(path), strict=False)
    state = json.loads((path / STATE_FILE).read_text())
    if accelerator.is_main_process:
        print(f"[train] resumed from step {state['step']} ({path})", flush=True)
    return state
