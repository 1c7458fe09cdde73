"""Stage `init`: apply an initialisation method to every targeted linear layer.

Writes ``init/adapter/`` (standard PEFT LoRA adapter (A0, B0) on the original model plus ``lnull_method.json``
with the freezing rule), ``init/lnull_method.json`` and ``init/report.json``; full fine-tuning writes only the
two JSON files. The residual weights W0 - s B0 A0 are never stored: whoever loads the init rebuilds them from
the original model (:mod:`lnull.residual`), so ``PeftModel.from_pretrained(load_residual_model(original,
init/adapter, ...), init/adapter)`` gives the original model's outputs.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from lnull.activations import CalibrationStats, check_statistics, has_statistics
from lnull.errors import ConfigError
from lnull.io import atomic_write_json
from lnull.methods import METHOD_FILE, REGISTRY, LayerInit, layer_generator
from lnull.methods.linalg import captured_energy, release_shared, shared_decompositions
from lnull.modeling import load_model, pick_device, resolve_model, target_linears
from lnull.stages import StageContext


def lora_scale(cfg_method: dict[str, Any]) -> float:
    """s = lora_alpha / r (alpha None -> r, i.e. s = 1 as the official code)."""
    alpha = cfg_method["alpha"] if cfg_method["alpha"] is not None else cfg_method["rank"]
    return float(alpha) / cfg_method["rank"]


def check_inputs(layout: Any) -> None:
    """Pre-flight (``Stage.check``): the method's rank fits every targeted projection
    (:func:`lnull.modeling.check_shapes`)."""
    from lnull.modeling import check_shapes

    check_shapes(layout.cfg)


def run(cfg: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Stage entry: :func:`build` into ``ctx.out`` from the calibration the method reads (if any)."""
    method = REGISTRY[cfg["method"]["name"]]
    return build(cfg, ctx.out, ctx.input("calibrate") if method.needs_calibration else None)


def build(cfg: dict[str, Any], out_dir: Path, calibration_dir: Optional[Path]) -> dict[str, Any]:
    """Write ``adapter/`` (adapter methods), ``lnull_method.json`` and ``report.json`` into ``out_dir``; return
    the summary (method, rank, alpha, scale; rank and alpha None without an adapter)."""
    mcfg, meth_cfg = cfg["model"], cfg["method"]
    method = REGISTRY[meth_cfg["name"]]
    options = method.make_options(meth_cfg)
    path = resolve_model(mcfg["name_or_path"], cfg.get("cache_dir"))
    model = load_model(path, mcfg["dtype"], "cpu")
    linears = target_linears(model, mcfg["target_modules"])
    check_layers(method, linears, meth_cfg["rank"], options)
    if method.needs_calibration and not has_statistics(calibration_dir):
        raise ConfigError(f"method '{method.name}' needs calibration stats; run `lnull calibrate` first")
    stats = CalibrationStats(calibration_dir) if method.needs_calibration else None
    # The official code casts every factor it builds from the calibration statistics to fp16 at the end.
    info = method_record(method, meth_cfg, official_fp16=bool(stats is not None and stats.official))
    start = time.perf_counter()
    if not method.has_adapter:  # full fine-tuning trains the original model itself: nothing to write but the record
        report = {"method": method.name, "rank": None, "modules": {}, "seconds": time.perf_counter() - start}
        atomic_write_json(out_dir / "report.json", report)
        atomic_write_json(out_dir / METHOD_FILE, info)
        return {**info, "modules": 0}
    if method.write_extras is not None:  # computed from the original weights, before residuals replace them
        extras_dir = out_dir / "adapter"
        extras_dir.mkdir(parents=True, exist_ok=True)
        method.write_extras(linears, options, extras_dir)
    inits, report = layer_inits(method, linears, stats, info, options, pick_device(cfg["device"]), cfg["progress"])
    peft_model = adapter_model(model, inits, info, list(mcfg["target_modules"]))
    peft_model.save_pretrained(out_dir / "adapter")
    for folder in (out_dir, out_dir / "adapter"):  # the adapter folder describes itself when copied out
        atomic_write_json(folder / METHOD_FILE, info)
    report["seconds"] = time.perf_counter() - start
    atomic_write_json(out_dir / "report.json", report)
    return {**info, "modules": len(inits), "max_reconstruction_rel_err": report["max_reconstruction_rel_err"]}


def check_layers(method: Any, linears: dict[str, torch.nn.Linear], rank: int, options: Any) -> None:
    """Before any work: the rank fits every targeted layer, and the method's own shape check passes (ConfigError
    naming the first module that does not)."""
    for name, lin in linears.items():
        if method.has_adapter and rank > min(lin.weight.shape):
            raise ConfigError(f"method.rank={rank} exceeds min(d_out, d_in)={min(lin.weight.shape)} of {name}")
        if method.check_shape is not None:
            method.check_shape(tuple(lin.weight.shape), options)


def method_record(method: Any, meth_cfg: dict[str, Any], official_fp16: bool = False) -> dict[str, Any]:
    """What ``lnull_method.json`` says of an init: method, freezing rule, rank, alpha, scale s = alpha / r, the
    options, and whether the factors were cast to fp16 (the official recipe)."""
    rank = meth_cfg["rank"]
    return {"method": method.name, "frozen": method.frozen, "adapter": method.has_adapter, "options": meth_cfg,
            "rank": rank if method.has_adapter else None, "official_fp16": official_fp16,
            "alpha": (meth_cfg["alpha"] if meth_cfg["alpha"] is not None else rank) if method.has_adapter else None,
            "scale": lora_scale(meth_cfg) if method.has_adapter else None}


def layer_inits(method: Any, linears: dict[str, torch.nn.Linear], stats: Any, info: dict[str, Any], options: Any,
                device: torch.device, progress: bool = True
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """({module: (A [r, d_in], B [d_out, r])} on the CPU, the init's report) of every targeted layer, W0 read
    from ``linears`` (left untouched) and the statistic from ``stats`` (``.alias``, ``.get(module, statistic)``:
    :class:`lnull.activations.CalibrationStats` or an in-memory equivalent; None for a method that reads none).
    One decomposition per unique input (q/k/v, gate/up share one): the modules sharing an input get its statistic
    as one device tensor, whose eigh / damped inverse ``shared_decompositions`` computes once."""
    if stats is not None:  # statistics of another model fail here, before any decomposition
        check_statistics(stats, linears, method.statistic)
    report: dict[str, Any] = {"method": method.name, "rank": info["rank"], "modules": {}}
    inits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    shared: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)
    with shared_decompositions():
        for name, lin in tqdm(linears.items(), desc=f"init {method.name}", unit="layer", disable=not progress):
            if stats is not None and shared[0] != stats.alias[name]:
                shared = (None, None)  # free the previous input's statistic and decompositions first
                release_shared()
                shared = (stats.alias[name], stats.get(name, method.statistic).to(device))
            _init_layer(method, name, lin, shared[1], stats, info["rank"], info["scale"], options, device,
                        info["official_fp16"], report, inits)
    del shared
    if report.get("warnings"):  # one warning for the init: the first module's, and how many more
        first, category = report["warnings"][0]
        more = len(report["warnings"]) - 1
        warnings.warn(first + (f" (and {more} more; see init/report.json)" if more else ""), category, stacklevel=2)
        report["warnings"] = [message for message, _ in report["warnings"]]
    report["official_fp16"] = info["official_fp16"]
    modules = report["modules"].values()
    report["max_reconstruction_rel_err"] = max(m["reconstruction_rel_err"] for m in modules)
    for key, pick in (("energy", max), ("eigen_gap", min)):  # worst module: most energy kept, smallest gap
        values = [m[key] for m in modules if m.get(key) is not None]
        if values:
            report[f"{pick.__name__}_{key}"] = pick(values)
    return inits, report


def adapter_model(model: torch.nn.Module, inits: dict[str, tuple[torch.Tensor, torch.Tensor]], info: dict[str, Any],
                  target_modules: list[str], dropout: Optional[float] = None, lora_config: Any = None) -> Any:
    """``get_peft_model`` of ``model`` (its weights as they are) with each module's LoRA set to its (A, B):
    from ``lora_config`` (``init_lora_weights`` turned off) or a LoraConfig of ``info``'s rank and alpha."""
    import copy

    from peft import LoraConfig, get_peft_model

    if lora_config is None:
        lora_config = LoraConfig(r=info["rank"], lora_alpha=info["alpha"],
                                 lora_dropout=info["options"]["dropout"] if dropout is None else dropout,
                                 target_modules=target_modules, task_type="CAUSAL_LM")
    lora_config = copy.deepcopy(lora_config)
    lora_config.init_lora_weights = False
    peft_model = get_peft_model(model, lora_config)
    for name, (A, B) in inits.items():
        layer = peft_model.base_model.model.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(A)
        layer.lora_B["default"].weight.data.copy_(B)
    return peft_model


def _init_layer(method: Any, name: str, lin: torch.nn.Linear, cov: Optional[torch.Tensor], stats: Any, rank: int,
                scale: float, options: Any, device: torch.device, official_fp16: bool, report: dict[str, Any],
                inits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Initialise one layer: (A, B) into ``inits``, its entry into ``report``. ``lin`` keeps W0: the residual
    W0 - s B A is rebuilt by whoever loads the init (:mod:`lnull.residual`); the method's own residual only
    measures its reconstruction error here."""
    # The model stays on the CPU; each layer's maths runs on `device`.
    W0 = lin.weight.detach().to(device, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = method.init(W0, cov, rank, scale, options, layer_generator(getattr(options, "seed", 0), name))
    to = (lambda t: t.half().float().cpu()) if official_fp16 else (lambda t: t.cpu())
    res = LayerInit(A=to(res.A), B=to(res.B), residual=to(res.residual), diagnostics=res.diagnostics)
    W0 = W0.cpu()
    for w in caught:  # recorded with the module's name (the method function does not know it)
        report.setdefault("warnings", []).append((f"{name}: {w.message}", w.category))
    err = (res.residual + scale * res.B @ res.A - W0).norm() / W0.norm().clamp_min(1e-30)
    entry = {"shape": list(W0.shape), "reconstruction_rel_err": float(err), **res.diagnostics}
    if stats is not None:  # share of the calibration activations' energy in the row space of A
        entry["energy"] = captured_energy(res.A, stats.get(name, "covariance"))
    report["modules"][name] = entry
    inits[name] = (res.A, res.B)
