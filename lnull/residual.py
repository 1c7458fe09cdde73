"""The residual model of an init, rebuilt whenever it is loaded (never stored).

``lnull init`` writes only the initial adapter (A0, B0) and the method's record (``init/adapter/``). The
model the adapter sits on is the original one with ``W_res = W0 - s B0 A0`` in every targeted module:
:func:`load_residual_model` loads the original weights in ``model.dtype`` and subtracts ``s B0 A0`` in fp32
on the given device, casting back to the weight's dtype. The maths is deterministic on one device, so every
load (a resumed run included) gives bit-equal weights. Modules whose B0 is zero (LoRA, LoRA-FA, OPLoRA) keep
W0 untouched, so those inits and full fine-tuning cost no store bytes beyond the adapter. An init whose record
(``lnull_method.json`` beside the adapter) says ``"base": "original"`` (PEFT's orthogonal init: W0 kept although
B0 A0 != 0) sits on W0 itself: :func:`initial_factors` gives no factors for it, so every loader, ``is_residual``,
``lora_on_original`` and export treat it as an init that moved no weight.

Why not a stored copy: a 7B residual is 13.5 GB per init, and a paper table holds five of them; the
subtraction costs one [d_out, r] x [r, d_in] product per module (about 2 TFLOP for a 7B model at r = 128,
seconds on any device).

:func:`lora_on_original` writes the same trained model as one PEFT LoRA on the original weights (rank 2r:
``s (B A - B0 A0) = s [B, -B0] [A; A0]``), for engines that load only a plain folder plus a LoRA (vLLM).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from lnull.io import atomic_write_dir

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def on_original_base(init_adapter: Path) -> bool:
    """True when the init's record says its adapter sits on the untouched W0 (``"base": "original"``); an adapter
    without a record, or a record without ``base`` (every init written before the key existed), sits on the
    residual W0 - s B0 A0."""
    from lnull.methods import METHOD_FILE

    record = Path(init_adapter) / METHOD_FILE
    return record.exists() and json.loads(record.read_text()).get("base", "residual") == "original"


def initial_factors(init_adapter: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """({module name: (A0 [r, d_in], B0 [d_out, r])} as saved, scale s = lora_alpha / r) of an init adapter
    folder; modules whose B0 or A0 is all zero are left out (their residual is W0), and so is every module of an
    init on the original base (:func:`on_original_base`)."""
    init_adapter = Path(init_adapter)
    config = json.loads((init_adapter / ADAPTER_CONFIG).read_text())
    scale = float(config["lora_alpha"]) / float(config["r"])
    if on_original_base(init_adapter):
        return {}, scale
    tensors = load_file(str(init_adapter / ADAPTER_WEIGHTS))
    factors = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        if bool(B.any()) and bool(A.any()):
            factors[key[len(_PREFIX):key.index(".lora_A.")]] = (A, B)
    return factors, scale


def is_residual(init_adapter: Path) -> tuple[bool, float]:
    """(the init moves weight: B0 A0 != 0 for some module, max over modules of ||B0 A0||_F, unscaled) from
    ``init/adapter``'s weights, never from the method's name.

    ||B A||_F^2 = tr((B^T B)(A A^T)) uses only r x r products, so this is cheap even for 7B models."""
    factors, _ = initial_factors(init_adapter)
    worst = 0.0
    for A, B in factors.values():
        A, B = A.double(), B.double()
        worst = max(worst, float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).sqrt()))
    return worst > 0.0, worst


@torch.no_grad()
def subtract_initial_update(model: torch.nn.Module, init_adapter: Path,
                            device: Optional[str | torch.device] = None) -> int:
    """Turn the original ``model`` into the init's residual model in place (:func:`subtract_factors` of the
    init adapter's factors). Returns the number of modules changed."""
    factors, scale = initial_factors(init_adapter)
    return subtract_factors(model, factors, scale, device)


@torch.no_grad()
def subtract_factors(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                     device: Optional[str | torch.device] = None) -> int:
    """Each module ``name`` of ``factors`` ({name: (A [r, d_in], B [d_out, r])}) gets the weight
    ``(W0.float() - scale B.float() @ A.float()).to(W0.dtype)``, computed on ``device`` (default: the weight's).
    Returns the number of modules changed."""
    for name, (A, B) in factors.items():
        weight = model.get_submodule(name).weight
        at = torch.device(device) if device is not None else weight.device
        update = B.to(at, torch.float32) @ A.to(at, torch.float32)
        residual = weight.detach().to(at, torch.float32) - scale * update
        weight.data.copy_(residual.to(weight.dtype).to(weight.device))
    return len(factors)


def load_residual_model(original: str, init_adapter: Optional[Path], dtype: str, device: str | torch.device = "cpu",
                        attn_implementation: Optional[str] = None,
                        compute_device: Optional[str | torch.device] = None) -> Any:
    """The original model (folder or hub name ``original``) in ``dtype`` on ``device``, with the residual of
    ``init_adapter`` (a run's ``init/adapter``; None or absent: full fine-tuning, nothing to subtract) computed
    on ``compute_device`` (default ``device``; training loads on the CPU and subtracts on its accelerator)."""
    from lnull.modeling import load_model

    model = load_model(original, dtype, device, attn_implementation)
    if init_adapter is not None and (Path(init_adapter) / ADAPTER_WEIGHTS).exists():
        subtract_initial_update(model, Path(init_adapter), compute_device)
    return model


def lora_on_original(adapter: Path, init_adapter: Path, out_dir: Path, original: str) -> Path:
    """Write into ``out_dir`` a PEFT LoRA that gives PeftModel(residual model, ``adapter``) on the original
    weights: rank 2r with ``A' = [A; A0]``, ``B' = [B, -B0]`` and lora_alpha doubled (s unchanged), as PEFT's
    ``path_initial_model_for_weight_conversion``. Modules with B0 = 0 get A0 = 0 too (their update is s B A).
    Returns ``out_dir``."""
    adapter, out_dir = Path(adapter), Path(out_dir)
    init = load_file(str(Path(init_adapter) / ADAPTER_WEIGHTS))
    if on_original_base(Path(init_adapter)):  # nothing was subtracted: the conversion adds nothing either
        init = {k: torch.zeros_like(v) for k, v in init.items()}
    converted = on_original_tensors(load_file(str(adapter / ADAPTER_WEIGHTS)), init)
    config = on_original_config(json.loads((adapter / ADAPTER_CONFIG).read_text()), original)

    def write(folder: Path) -> None:
        save_file(converted, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))

    return atomic_write_dir(out_dir, write)


def on_original_tensors(trained: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rank-2r tensors of :func:`lora_on_original` from a trained adapter's and its init's state dicts (PEFT
    key names, ``...lora_A.weight`` [r, d_in], ``...lora_B.weight`` [d_out, r]): ``A' = [A; A0]`` [2r, d_in],
    ``B' = [B, -B0]`` [d_out, 2r]."""
    converted = {}
    for key, A in trained.items():
        if ".lora_A." not in key:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        A0, B0 = init[key].to(A.dtype), init[b_key].to(A.dtype)
        converted[key] = torch.cat([A, A0], 0).contiguous()
        converted[b_key] = torch.cat([trained[b_key], -B0.to(trained[b_key].dtype)], 1).contiguous()
    return converted


def on_original_config(config: dict[str, Any], original: str) -> dict[str, Any]:
    """The adapter_config.json of :func:`lora_on_original`: rank and alpha doubled (s unchanged), the base the
    original model."""
    return {**config, "r": 2 * config["r"], "lora_alpha": 2 * config["lora_alpha"],
            "base_model_name_or_path": original, "init_lora_weights": True,
            "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
            "alpha_pattern": {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}}
