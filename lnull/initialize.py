"""Stage `init`: apply an initialisation method to every targeted linear layer.

Writes ``init/base/`` (plain HF folder with the residual weights), ``init/adapter/`` (standard PEFT
LoRA adapter plus ``lnull_method.json`` with the freezing rule) and ``init/report.json``.
Loading ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)`` gives the
original model's outputs.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from lnull.config import ConfigError
from lnull.methods import REGISTRY, LayerInit
from lnull.methods.base import layer_generator
from lnull.methods.linalg import captured_energy
from lnull.modeling import load_model, load_tokenizer, pick_device, resolve_model, target_linears
from lnull.runs import atomic_write_json, read_json

METHOD_FILE = "lnull_method.json"


class CalibrationStats:
    """Per-module access to ``calibration/stats.safetensors`` (reads one tensor at a time, never the file).

    ``get(module, statistic)`` -> [d_in, d_in] as stored (fp32), following the alias of a shared input;
    ``official`` is True when calibration ran ``calibration.official`` (meta.json)."""

    def __init__(self, calibration_dir: Path):
        self.path = Path(calibration_dir) / "stats.safetensors"
        meta = read_json(Path(calibration_dir) / "meta.json")
        self.alias: dict[str, str] = meta["alias"]
        self.official = bool(meta.get("official", False))
        self._last: tuple[str, torch.Tensor] | None = None  # q/k/v (gate/up) ask for one tensor back to back

    def get(self, module: str, statistic: str) -> torch.Tensor:
        key = f"{self.alias[module]}.{statistic}"
        if self._last is None or self._last[0] != key:
            with safe_open(str(self.path), framework="pt") as fh:
                if key not in fh.keys():
                    raise ConfigError(f"{self.path} has no '{key}': calibration is older than this lnull; "
                                      "delete the calibration folder and run `lnull calibrate` again")
                self._last = (key, fh.get_tensor(key))
        return self._last[1]


def load_covariances(calibration_dir: Path, statistic: str = "covariance") -> dict[str, torch.Tensor]:
    """``{module: statistic [d_in, d_in]}`` from calibration, expanding aliases of shared inputs."""
    stats = CalibrationStats(calibration_dir)
    return {name: stats.get(name, statistic) for name in stats.alias}


def lora_scale(cfg_method: dict[str, Any]) -> float:
    """s = lora_alpha / r (alpha None -> r, i.e. s = 1 as the official code)."""
    alpha = cfg_method["alpha"] if cfg_method["alpha"] is not None else cfg_method["rank"]
    return float(alpha) / cfg_method["rank"]


def run(cfg: dict[str, Any], out_dir: Path, calibration_dir: Optional[Path]) -> dict[str, Any]:
    mcfg, meth_cfg = cfg["model"], cfg["method"]
    method = REGISTRY[meth_cfg["name"]]
    path = resolve_model(mcfg["name_or_path"], cfg.get("cache_dir"))
    model = load_model(path, mcfg["dtype"], "cpu")
    tokenizer = load_tokenizer(path)
    linears = target_linears(model, mcfg["target_modules"])
    rank = meth_cfg["rank"]
    for name, lin in linears.items():
        if method.init is not None and rank > min(lin.weight.shape):
            raise ConfigError(f"method.rank={rank} exceeds min(d_out, d_in)={min(lin.weight.shape)} of {name}")
        if method.check_shape is not None:
            method.check_shape(tuple(lin.weight.shape), _Opts(meth_cfg))
    has_stats = calibration_dir is not None and (calibration_dir / "stats.safetensors").exists()
    if method.needs_calibration and not has_stats:
        raise ConfigError(f"method '{method.name}' needs calibration stats; run `lnull calibrate` first")
    stats = CalibrationStats(calibration_dir) if has_stats else None
    # The official code casts every factor it builds from the calibration statistics to fp16 at the end.
    official_fp16 = bool(stats is not None and stats.official and method.needs_calibration)

    report: dict[str, Any] = {"method": method.name, "rank": rank, "modules": {}}
    start = time.perf_counter()
    if method.init is None:  # full fine-tuning: the base is the original model
        model.save_pretrained(out_dir / "base")
        tokenizer.save_pretrained(out_dir / "base")
        report["seconds"] = time.perf_counter() - start
        atomic_write_json(out_dir / "report.json", report)
        return {"modules": 0}

    from peft import LoraConfig, get_peft_model

    scale = lora_scale(meth_cfg)
    device = pick_device(cfg["device"])
    if method.write_extras is not None:  # computed from the original weights, before residuals replace them
        extras_dir = out_dir / "adapter"
        extras_dir.mkdir(parents=True, exist_ok=True)
        method.write_extras(linears, meth_cfg, extras_dir)
    inits = {}
    for name, lin in tqdm(linears.items(), desc=f"init {method.name}", unit="layer", disable=not cfg["progress"]):
        # The model stays on the CPU (it is saved from there); each layer's maths runs on `device`.
        W0 = lin.weight.detach().to(device, torch.float32)
        cov = stats.get(name, method.statistic).to(device) if method.needs_calibration else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = method.init(W0, cov, rank, scale, _Opts(meth_cfg), layer_generator(meth_cfg["seed"], name))
        to = (lambda t: t.half().float().cpu()) if official_fp16 else (lambda t: t.cpu())
        res = LayerInit(A=to(res.A), B=to(res.B), residual=to(res.residual), diagnostics=res.diagnostics)
        W0 = W0.cpu()
        for w in caught:  # re-issue with the module's name: the method function does not know it
            warnings.warn(f"{name}: {w.message}", w.category, stacklevel=2)
            report.setdefault("warnings", []).append(f"{name}: {w.message}")
        err = (res.residual + scale * res.B @ res.A - W0).norm() / W0.norm().clamp_min(1e-30)
        entry = {"shape": list(W0.shape), "reconstruction_rel_err": float(err), **res.diagnostics}
        if stats is not None:  # share of the calibration activations' energy in the row space of A
            entry["energy"] = captured_energy(res.A, stats.get(name, "covariance"))
        report["modules"][name] = entry
        lin.weight.data.copy_(res.residual.to(lin.weight.dtype))
        inits[name] = (res.A, res.B)  # the residual now lives in the model; keeping it would double memory
    model.save_pretrained(out_dir / "base")
    tokenizer.save_pretrained(out_dir / "base")

    lcfg = LoraConfig(r=rank, lora_alpha=meth_cfg["alpha"] if meth_cfg["alpha"] is not None else rank,
                      lora_dropout=meth_cfg["dropout"], target_modules=list(mcfg["target_modules"]),
                      init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    for name, (A, B) in inits.items():
        layer = peft_model.base_model.model.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(A)
        layer.lora_B["default"].weight.data.copy_(B)
    peft_model.save_pretrained(out_dir / "adapter")
    atomic_write_json(out_dir / "adapter" / METHOD_FILE, {"method": method.name, "frozen": method.frozen,
                                                          "rank": rank, "scale": scale, "options": meth_cfg,
                                                          "official_fp16": official_fp16})
    report["seconds"] = time.perf_counter() - start
    report["official_fp16"] = official_fp16
    modules = report["modules"].values()
    report["max_reconstruction_rel_err"] = max(m["reconstruction_rel_err"] for m in modules)
    for key, pick in (("energy", max), ("eigen_gap", min)):  # worst module: most energy kept, smallest gap
        values = [m[key] for m in modules if m.get(key) is not None]
        if values:
            report[f"{pick.__name__}_{key}"] = pick(values)
    atomic_write_json(out_dir / "report.json", report)
    return {"modules": len(inits), "max_reconstruction_rel_err": report["max_reconstruction_rel_err"]}


class _Opts:
    """Attribute access to the method config for method functions (``cfg.seed``, ``cfg.k``...)."""

    def __init__(self, d: dict[str, Any]):
        self.__dict__.update(d)
