"""Stage `train`: fine-tune the model from ``init/`` on the task data (response-only loss) and write
``train/adapter/`` (plain PEFT LoRA on the init's residual model, ``lnull.residual``; ``train/model/`` for full
fine-tuning) and
``train/metrics.jsonl``.

The parent tokenises once (``examples.safetensors``), then trains in this process, or, with
``accelerate=<name>``, through ``accelerate launch`` workers that run :func:`main` on the resolved config.
Checkpoints every ``train.checkpoint_every`` steps go to ``train.partial/checkpoints``; a killed run resumes
at the newest one and ends with the same adapter as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from lnull.errors import ConfigError
from lnull.stages import StageContext
from lnull.training.data import EXAMPLES_FILE, build_examples, save_examples


def check_inputs(layout: Any) -> None:
    """Pre-flight (``Stage.check``): the task data is there, every row it trains on has its fields."""
    from lnull.data.sources import check_available, task_fields

    cfg = layout.cfg
    check_available(cfg["task"]["dataset"], cfg.get("cache_dir"), "task.dataset", fields=task_fields(cfg["task"]),
                    limit=cfg["task"]["max_examples"])


def prepare_examples(cfg: dict[str, Any], out_dir: Path) -> Path:
    """Tokenise the task (the original model's tokenizer) into ``out_dir/examples.safetensors`` unless a
    previous attempt already did."""
    from lnull.modeling import load_tokenizer, original_path

    path = out_dir / EXAMPLES_FILE
    if not path.exists():
        save_examples(path, build_examples(cfg, load_tokenizer(original_path(cfg))))
    return path


def run(cfg: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Stage entry: :func:`train_into` ``ctx.out`` from the run's init."""
    return train_into(cfg, ctx.out, ctx.input("init"))


def train_into(cfg: dict[str, Any], out_dir: Path, init_dir: Path) -> dict[str, Any]:
    """Train ``init_dir`` into ``out_dir`` (the stage's partial folder); returns the summary for complete.json
    (steps, losses, trainable parameters, tokens, seconds, steps/s, tokens/s, processes, distributed type)."""
    if cfg["train"]["wandb"] == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()):
        raise ConfigError("train.wandb=online but no wandb key (set WANDB_API_KEY or `wandb login`); "
                          "use train.wandb=offline to log locally")
    prepare_examples(cfg, out_dir)
    if cfg["accelerate"]:
        from lnull.training.launch import launch

        summary = launch(cfg, out_dir, init_dir)
    else:
        summary = _train_here(cfg, out_dir, init_dir)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # the adapter is the result now
    (out_dir / EXAMPLES_FILE).unlink(missing_ok=True)
    return summary


def _train_here(cfg: dict[str, Any], out_dir: Path, init_dir: Path) -> dict[str, Any]:
    from accelerate.state import AcceleratorState, GradientState

    from lnull.training.loop import train_loop

    from lnull.modeling import release_accelerator_memory

    try:
        return train_loop(cfg, out_dir, init_dir)
    finally:  # Accelerate keeps process-wide singletons; the next run in this process starts clean
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        release_accelerator_memory()  # the loop's model and optimizer are unreferenced now


def _wandb_logged_in() -> bool:
    try:
        import wandb

        return bool(wandb.api.api_key)
    except Exception:  # wandb absent or unconfigured: treated as no key
        return False


def main(argv: list[str]) -> None:
    """Worker entry of ``accelerate launch``: ``python -m lnull.train <config.yaml> <out_dir> <init_dir>``."""
    import yaml

    from lnull.console import quiet_libraries, stage_log
    from lnull.io import atomic_write_json, atomic_write_text
    from lnull.training.launch import ERROR_FILE, STAGE_LOG_ENV, SUMMARY_FILE
    from lnull.training.loop import train_loop

    config_path, out_dir, init_dir = (Path(a) for a in argv)
    cfg = yaml.safe_load(config_path.read_text())
    rank0 = os.environ.get("RANK", "0") == "0"
    log = os.environ.get(STAGE_LOG_ENV)
    if log:  # the parent's console is quiet: so is this worker's (lnull.console)
        quiet_libraries()
    try:
        with stage_log(Path(log)) if log else contextlib.nullcontext():
            summary = train_loop(cfg, out_dir, init_dir)
    except ConfigError as exc:
        if rank0:
            atomic_write_text(config_path.parent / ERROR_FILE, str(exc))
        print(f"lnull: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    if rank0:
        atomic_write_json(config_path.parent / SUMMARY_FILE, summary)
    import torch.distributed as dist

    if dist.is_initialized():  # leave together: a rank exiting while others still talk aborts in C++ teardown
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
