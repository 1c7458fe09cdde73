"""One lnull run in PEFT method_comparison's result-JSON layout, so it sits beside PEFT's published boards.

The layout is what huggingface/peft ``method_comparison/MetaMathQA/utils.py::log_results`` writes (read at commit
5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40, checked against ``results/lora--llama-3.2-3B-rank32.json`` and the
reader ``method_comparison/processing.py``): three sections, ``run_info`` / ``train_info`` / ``meta_info``, with
the keys of :data:`PEFT_KEYS`, ``train_info.metrics`` a list whose last entry holds the test accuracy and the
forgetting.  Every key PEFT writes is present; a value lnull does not record is null, never a guess:

- ``run_info``: ``peft_branch``, ``peft_worktree_is_dirty`` (PEFT's own git checkout), ``train_config`` keys
  ``use_amp``, ``autocast_adapter_dtype``, ``generation_kwargs``, ``init_kv_cache_prefix``.
- ``train_info``: ``accelerator_memory_reserved_avg``, ``accelerator_memory_max``,
  ``accelerator_memory_reserved_99th`` (lnull measures no accelerator memory), ``num_total_params``; in each
  step entry ``valid accuracy``, ``eval time``, ``mem allocated avg``, ``mem reserved avg`` (lnull does not
  evaluate while training); in the last entry ``test accuracy`` / ``forgetting`` when the run has no such record.
- ``meta_info``: ``model_info.sha`` / ``created_at`` and each ``dataset_info`` entry's (hub commits; lnull
  fingerprints files instead), every ``*-commit-hash``, ``bitsandbytes-version`` (not in lnull's provenance),
  ``system_info`` fields other than ``system`` / ``machine`` / ``accelerator``, ``pytorch_info``.

What lnull fills, and where it differs from PEFT's meaning:

- ``run_info.created_at``: the earliest completion time among the run's stage entries (lnull records no start
  time; local time as lnull writes it, no zone); ``total_time``: the sum of the wall seconds those entries and
  the run's records report (s; what its artifacts took to compute, here or in a run that shared them), null if
  one is missing.
- ``experiment_name``: ``<experiment>/<run folder>`` (the folder names the method, rank and config hash: the
  ``peft_config`` of a LoRA-Null and a LoRA run are the same ``LORA`` adapter config).
- ``train_config``: ``max_steps`` = steps trained; ``eval_steps`` = ``train.log_every`` (the steps between
  metric entries); ``query_template`` = the task's prompt name (e.g. ``alpaca``); ``optimizer_type`` AdamW
  (lnull's only optimizer); ``batch_size`` = the effective batch.
- ``train_info.metrics``: one entry per logged step (``train loss`` = mean over the steps since the previous
  entry, as PEFT's; ``train time`` = seconds since the previous entry; ``tokens / sec`` = since training (re)started,
  PEFT's is over the window), then the final entry: ``test accuracy`` = the trained model's held-out task exact match as
  a fraction (PEFT prints fractions), ``forgetting`` = :func:`lnull.forgetting.peft_forgetting` of the run's
  ``text_nll`` records (nats/token, trained - base; other text than PEFT's FineWiki).
- ``file_size``: bytes of the saved adapter (fp32, as lnull saves it) or full model safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from lnull.errors import ConfigError
from lnull.forgetting import peft_forgetting
from lnull.io import atomic_write_json, read_json, try_read_json
from lnull.records import read_results

# The keys PEFT's log_results writes, section by section (utils.py, TrainConfig, MetaInfo, get_package_info,
# get_system_info).
PEFT_KEYS: dict[str, tuple[str, ...]] = {
    "run_info": ("created_at", "total_time", "experiment_name", "peft_branch", "peft_worktree_is_dirty",
                 "train_config", "peft_config", "error_msg"),
    "train_info": ("accelerator_memory_reserved_avg", "accelerator_memory_max", "accelerator_memory_reserved_99th",
                   "train_time", "file_size", "num_trainable_params", "num_total_params", "status", "metrics"),
    "meta_info": ("model_info", "dataset_info", "package_info", "system_info", "pytorch_info"),
}
TRAIN_CONFIG_KEYS = ("model_id", "dtype", "max_seq_length", "batch_size", "batch_size_eval", "max_steps",
                     "eval_steps", "compile", "use_gc", "query_template", "seed", "grad_norm_clip", "optimizer_type",
                     "optimizer_kwargs", "lr_scheduler", "use_amp", "autocast_adapter_dtype", "generation_kwargs",
                     "attn_implementation", "init_kv_cache_prefix")
PACKAGES = ("transformers", "peft", "datasets", "bitsandbytes", "torch")
SYSTEM_KEYS = ("system", "release", "version", "machine", "processor", "accelerator")
STEP_KEYS = ("step", "valid accuracy", "train loss", "train samples", "train time", "eval time", "tokens / sec",
             "mem allocated avg", "mem reserved avg", "elapsed time")
FINAL_KEYS = ("step", "test accuracy", "train loss", "train samples", "train total tokens", "forgetting")


def _marker(run: Path, stage: str) -> Optional[dict[str, Any]]:
    """A stage view's ``complete.json`` (None when the run has no such stage)."""
    return try_read_json(run / stage / "complete.json") if (run / stage).exists() else None


def _train_config(cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    t = cfg["train"]
    return {"model_id": cfg["model"]["name_or_path"], "dtype": cfg["model"]["dtype"],
            "max_seq_length": t["max_length"], "batch_size": t["batch_size"],
            "batch_size_eval": cfg["eval"]["batch_size"], "max_steps": steps, "eval_steps": t["log_every"],
            "compile": False, "use_gc": t["gradient_checkpointing"], "query_template": cfg["task"]["prompt"],
            "seed": t["seed"], "grad_norm_clip": t["max_grad_norm"], "optimizer_type": "AdamW",
            "optimizer_kwargs": {"lr": t["lr"], "weight_decay": t["weight_decay"]}, "lr_scheduler": t["scheduler"],
            "use_amp": None, "autocast_adapter_dtype": None, "generation_kwargs": None,
            "attn_implementation": t["attn_implementation"], "init_kv_cache_prefix": None}


def _file_size(files: dict[str, int]) -> Optional[int]:
    """Bytes of the saved weights: the adapter's safetensors, else the full model's."""
    for folder in ("adapter/", "model/"):
        sizes = [size for name, size in files.items() if name.startswith(folder) and name.endswith(".safetensors")]
        if sizes:
            return sum(sizes)
    return None


def _step_metrics(run: Path, batch: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out, previous = [], 0.0
    for r in rows:
        entry = dict.fromkeys(STEP_KEYS)
        entry.update({"step": r["step"], "train loss": r["loss"], "train samples": r["step"] * batch,
                      "train time": round(r["elapsed_s"] - previous, 3), "tokens / sec": r["tokens_per_s"],
                      "elapsed time": r["elapsed_s"]})
        previous = r["elapsed_s"]
        out.append(entry)
    return out


def _system_info(device: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = dict.fromkeys(SYSTEM_KEYS)
    plat = device.get("platform") or ""
    # platform.platform() is "<system>-<release>-<machine>-with-<libc>"; only the unambiguous ends are read
    info["system"] = plat.split("-", 1)[0] or None
    for machine in ("x86_64", "aarch64", "arm64", "AMD64", "ppc64le", "s390x"):
        if f"-{machine}" in plat:
            info["machine"] = machine
    gpus = device.get("gpus") or []
    info["accelerator"] = gpus[0] if gpus else None
    return info


def peft_result_json(run_dir: Path | str, test_benchmark: Optional[str] = None,
                     text_benchmark: str = "wiki_text") -> dict[str, Any]:
    """The run in PEFT's result-JSON layout (module docstring: what is filled and what is null).

    ``test_benchmark``: the trained model's record giving ``test accuracy`` (default: the run's one
    ``task_heldout`` record); ``text_benchmark``: the ``text_nll`` benchmark whose base and trained records give
    ``forgetting``.  A run without a complete train stage is a ConfigError (PEFT writes no file for a failed run).
    """
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run} is not an lnull run folder (no config.yaml)")
    cfg = yaml.safe_load(cfg_path.read_text())
    train = _marker(run, "train")
    if train is None:
        raise ConfigError(f"{run} has no complete train stage: nothing to write in PEFT's layout")
    summary = train["summary"]
    provenance = try_read_json(run / "provenance.json") or train.get("provenance") or {}
    versions, device = provenance.get("versions", {}), provenance.get("device", {})
    markers = {s: _marker(run, s) for s in ("calibration", "init")}
    records = read_results(run / "eval" / "results.json") if (run / "eval" / "results.json").is_file() else []
    trained = [r for r in records if r.model == "trained"]

    adapter_config = run / "train" / "adapter" / "adapter_config.json"
    peft_config = read_json(adapter_config) if adapter_config.is_file() else None  # full fine-tuning: PEFT's null

    created = [m["created"] for m in (train, *markers.values()) if m and m.get("created")]
    seconds = [summary.get("wall_seconds"), *(((m or {}).get("summary") or {}).get("wall_seconds")
                                             for m in markers.values() if m is not None),
               *(r.seconds for r in records)]
    batch = cfg["train"]["batch_size"]
    steps = _step_metrics(run, batch)

    heldout = [r for r in trained if (r.benchmark == test_benchmark if test_benchmark else r.kind == "task_heldout")]
    test = heldout[0].value / 100.0 if len(heldout) == 1 and heldout[0].value is not None else None
    text = {r.model: r for r in records if r.benchmark == text_benchmark}
    forgetting = peft_forgetting(text.get("base"), text.get("trained")).value
    final = {"step": summary["steps"], "test accuracy": test,
             "train loss": steps[-1]["train loss"] if steps else None, "train samples": summary["steps"] * batch,
             "train total tokens": summary.get("tokens"), "forgetting": forgetting}

    datasets = [cfg["task"]["dataset"], *([heldout[0].details.get("data")] if len(heldout) == 1 else [])]
    package_info: dict[str, Any] = {}
    for pkg in PACKAGES:
        package_info[f"{pkg}-version"] = versions.get(pkg)
        package_info[f"{pkg}-commit-hash"] = None
    return {
        "run_info": {"created_at": min(created) if created else None,
                     "total_time": sum(seconds) if all(s is not None for s in seconds) else None,
                     "experiment_name": f"{cfg['experiment']}/{run.resolve().name}",
                     "peft_branch": None, "peft_worktree_is_dirty": None,
                     "train_config": _train_config(cfg, summary["steps"]), "peft_config": peft_config,
                     "error_msg": ""},
        "train_info": {"accelerator_memory_reserved_avg": None, "accelerator_memory_max": None,
                       "accelerator_memory_reserved_99th": None, "train_time": summary.get("seconds"),
                       "file_size": _file_size(train.get("files", {})),
                       "num_trainable_params": summary.get("trainable_params"), "num_total_params": None,
                       "status": "success", "metrics": [*steps, final]},
        "meta_info": {"model_info": {"sha": None, "created_at": None},
                      "dataset_info": {str(d): {"sha": None, "created_at": None} for d in datasets if d},
                      "package_info": package_info, "system_info": _system_info(device), "pytorch_info": None},
    }


def write_peft_result(run_dir: Path | str, path: Path | str, **kwargs: Any) -> Path:
    """Write :func:`peft_result_json` of ``run_dir`` to ``path`` (atomic; PEFT names its files
    ``<experiment_name with / as -->.json``); returns the path."""
    path = Path(path)
    atomic_write_json(path, peft_result_json(run_dir, **kwargs))
    return path
