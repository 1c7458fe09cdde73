"""`lnull export`: ship a trained run without lnull and without the residual base.

Writes ``<run>/export/``:

- ``merged/``: plain HF model + tokenizer, the residual model (rebuilt from the original and ``init/adapter``,
  ``lnull.residual``) + ``train/adapter`` merged (PEFT ``merge_and_unload``,
  in fp32, saved in ``model.dtype``); for full fine-tuning a copy of ``train/model``.
- ``lora_on_original/``: a plain PEFT LoRA adapter whose ``base_model_name_or_path`` is the ORIGINAL model
  (``model.name_or_path`` resolved), so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
  original), lora_on_original)`` is the trained model. Absent for full fine-tuning.
- ``report.json``: which base each artefact needs, and the max |logit difference| of each reloaded artefact
  against the trained model ``PeftModel(residual model, train/adapter)`` on a short probe text.

Residual methods are those whose init moves weight out of the base: W_res = W0 - s B0 A0 != W0, i.e. B0 A0 != 0.
:func:`lnull.residual.is_residual` decides from the init adapter's weights (PiSSA, MiLoRA, CorDA and LoRA-Null move weight;
LoRA, LoRA-FA and OPLoRA start from B0 = 0), never from the name, so a new method is classified by what it
does. For a residual method the trained update on the original base is s (B A - B0 A0) = s [B, -B0] [A; A0]: PEFT's PiSSA -> LoRA conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``), rank 2r with lora_alpha doubled so the
scale s stays the same. Non-residual methods ship the trained adapter itself (rank r). Methods with hooks
(OPLoRA's projections, ``lnull.methods.attach``): the trained adapter is saved with them baked (lnull.train);
baking again here is a no-op on a baked adapter and makes an unbaked one correct, so both are handled.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from lnull.io import atomic_write_json, read_json
from lnull.methods import METHOD_FILE, attach, bake, needs_hooks
from lnull.modeling import DTYPES, load_model, load_tokenizer, original_path, pick_device
from lnull.residual import is_residual, load_residual_model
from lnull.serving import vllm_report
from lnull.stages import StageContext

PROBE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\nWhat is 12 + 30?\n\n### Response: 12 + 30 = 42. The answer is: 42")
MAX_PROBE_TOKENS = 48


@torch.no_grad()
def probe_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, T, vocab] fp32 on the CPU for probe ids [1, T]."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def run(cfg: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Stage entry: :func:`export_into` ``ctx.out`` from the run's init and train."""
    return export_into(cfg, ctx.out, ctx.input("init"), ctx.input("train"))


def export_into(cfg: dict[str, Any], out_dir: Path, init_dir: Path, train_dir: Path) -> dict[str, Any]:
    """Export the trained model (``init_dir`` + ``train_dir``) into ``out_dir`` (merged/, lora_on_original/,
    report.json).

    Every model is loaded in fp32 on ``cfg.device`` one at a time (the reference, then each reloaded artefact),
    so peak memory is one fp32 model; the merged model is cast to ``model.dtype`` only when saved."""
    out_dir, init_dir, train_dir = Path(out_dir), Path(init_dir), Path(train_dir)
    original = original_path(cfg)
    save_dtype = cfg["model"]["dtype"]
    device = pick_device(cfg["device"])
    tokenizer = load_tokenizer(original)
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"][:, :MAX_PROBE_TOKENS]
    report: dict[str, Any] = {"original": original, "probe_tokens": int(ids.shape[1]), "saved_dtype": save_dtype,
                              "measured_in": "float32"}

    info = json.loads((init_dir / METHOD_FILE).read_text())
    if not info["adapter"]:  # full fine-tuning: the trained model is already a plain HF folder
        shutil.copytree(train_dir / "model", out_dir / "merged", dirs_exist_ok=True)
        ref = probe_logits(load_model(str(train_dir / "model"), "float32", device), ids)
        got = probe_logits(load_model(str(out_dir / "merged"), "float32", device), ids)
        report.update(method=info["method"], residual=False, reference="train/model",
                      merged={"base": None, "max_abs_logit_diff": _diff(got, ref)},
                      lora_on_original={"skipped": "no adapter (full fine-tuning)"})
        return _finish(out_dir, report, ref)

    from peft import PeftModel

    residual, init_norm = is_residual(init_dir / "adapter")
    model = PeftModel.from_pretrained(load_residual_model(original, init_dir / "adapter", "float32", device),
                                      str(train_dir / "adapter"))
    projected = needs_hooks(init_dir / "adapter")
    attach(model, init_dir / "adapter")  # idempotent on a baked adapter; makes an unbaked one compute its update
    ref = probe_logits(model, ids)
    bake(model, init_dir / "adapter")  # merging reads lora weights and bypasses the hooks

    config = model.peft_config["default"]
    config.base_model_name_or_path = original
    lora_dir = out_dir / "lora_on_original"
    if residual:
        # PEFT's conversion writes a config into the folder it reads the initial adapter from (and names the
        # temporary adapter after the folder), so give it a copy: init/ is a completed stage, never touched.
        initial = out_dir / "initial_adapter"
        shutil.rmtree(initial, ignore_errors=True)
        initial.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(init_dir / "adapter" / name, initial / name)
        model.save_pretrained(str(lora_dir), path_initial_model_for_weight_conversion=str(initial))
        shutil.rmtree(initial)
    else:  # B0 = 0: W_res = W0 and the trained adapter already is the whole update
        model.save_pretrained(str(lora_dir))
    saved = read_json(lora_dir / "adapter_config.json")

    merged = model.merge_and_unload()
    merged.to(DTYPES[save_dtype]).save_pretrained(out_dir / "merged")
    tokenizer.save_pretrained(out_dir / "merged")
    del model, merged

    got_merged = probe_logits(load_model(str(out_dir / "merged"), "float32", device), ids)
    on_original = PeftModel.from_pretrained(load_model(original, "float32", device), str(lora_dir))
    got_lora = probe_logits(on_original, ids)
    report.update(
        method=info["method"], residual=residual, init_update_norm=init_norm,
        reference="PeftModel(residual model, train/adapter)" + (" with the method's hooks" if projected else ""),
        merged={"base": None, "max_abs_logit_diff": _diff(got_merged, ref)},
        lora_on_original={"base": original, "rank": saved["r"], "lora_alpha": saved["lora_alpha"],
                          "trained_rank": info["rank"], "converted_from_residual": residual,
                          "max_abs_logit_diff": _diff(got_lora, ref),
                          "vllm": vllm_report(lora_dir)})  # max_lora_rank to serve it with, format problems
    return _finish(out_dir, report, ref)


def _finish(out_dir: Path, report: dict[str, Any], ref: torch.Tensor) -> dict[str, Any]:
    """Write report.json; warn when an fp32 artefact is off by more than float noise."""
    report["reference_max_abs_logit"] = float(ref.abs().max())
    tol = 1e-3 * (1.0 + report["reference_max_abs_logit"])
    for name in ("merged", "lora_on_original"):
        diff = report[name].get("max_abs_logit_diff")
        exact = name == "lora_on_original" or report["saved_dtype"] == "float32"
        if diff is not None and exact and diff > tol:
            warnings.warn(f"export/{name} differs from the trained model by {diff:.3g} in logits", stacklevel=2)
    atomic_write_json(out_dir / "report.json", report)
    return {k: report[k]["max_abs_logit_diff"] for k in ("merged", "lora_on_original")
            if "max_abs_logit_diff" in report[k]}
