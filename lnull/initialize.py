"""Stage `init`: apply an initialisation method to every targeted linear layer.

Writes ``init/adapter/`` (standard PEFT LoRA adapter (A0, B0) on the original model plus ``lnull_method.json``
with the freezing rule), ``init/lnull_method.json`` and ``init/report.json``; full fine-tuning writes only the
two JSON files. The residual weights W0 - s B0 A0 are never stored: whoever loads the init rebuilds them from
the original model (:mod:`lnull.residual`), so ``PeftModel.from_pretrained(load_residual_model(original,
init/adapter, ...), init/adapter)`` gives the original model's outputs.

A method PEFT implements (``Method.peft_init``: OLoRA, MiCA, orthogonal, EVA, LoRA-GA) is PEFT's own call on the
whole model (:func:`peft_inits`), on the fine-tuning data for the methods that read it (:func:`task_batches`); its
adapter is saved like every other. PEFT's orthogonal init keeps W0 under a B0 A0 that is not 0 (rounding noise):
its record says ``"base": "original"`` and the loaders subtract nothing (:mod:`lnull.residual`).
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
    (:func:`lnull.modeling.check_shapes`); a method reading the task data finds it (as the train stage's check)."""
    from lnull.modeling import check_shapes

    cfg = layout.cfg
    check_shapes(cfg)
    if REGISTRY[cfg["method"]["name"]].reads_task_data:
        from lnull.data.sources import check_available, task_fields

        check_available(cfg["task"]["dataset"], cfg.get("cache_dir"), "task.dataset", fields=task_fields(cfg["task"]),
                        limit=cfg["task"]["max_examples"])


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
    if method.peft_init is not None:
        batches = None
        if method.reads_task_data:
            batches, info["data"] = task_batches(cfg, path, options)
        # PEFT changes the targeted weights in place (OLoRA, LoRA-GA); the adapter saved below holds only A, B and a
        # config, which do not depend on the base weights, so the same (unloaded) model carries it: no second load
        # of the original (13.5 GB bf16 at 7B).
        inits, report = peft_inits(method, model, linears, list(mcfg["target_modules"]), info, options, batches,
                                   pick_device(cfg["device"]))
    else:
        inits, report = layer_inits(method, linears, stats, info, options, pick_device(cfg["device"]),
                                    cfg["progress"])
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
    options, and whether the factors were cast to fp16 (the official recipe); ``"base": "original"`` when the adapter
    sits on the untouched W0 (``Method.base``; absent: on W0 - s B0 A0, every init written before); ``build`` adds
    ``data`` (what was read) for a method that reads the task data."""
    rank = meth_cfg["rank"]
    record = {"method": method.name, "frozen": method.frozen, "adapter": method.has_adapter, "options": meth_cfg,
              "rank": rank if method.has_adapter else None, "official_fp16": official_fp16,
              "alpha": (meth_cfg["alpha"] if meth_cfg["alpha"] is not None else rank) if method.has_adapter else None,
              "scale": lora_scale(meth_cfg) if method.has_adapter else None}
    if method.base != "residual":
        record["base"] = method.base
    return record


def task_batches(cfg: dict[str, Any], model_path: str, options: Any
                 ) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """(batches, what was read) for a method reading the task data: the first ``options.data_examples`` examples
    of ``lnull.training.data.build_examples`` (the train stage's tokenisation: ``task``, ``train.max_length``,
    ``model.add_bos``), ``options.data_batch_size`` per batch, each {input_ids, labels, attention_mask} int64
    [b, t] right-padded (labels -100 on prompt and padding)."""
    from lnull.data.prompts import IGNORE_INDEX
    from lnull.data.sources import data_fingerprint
    from lnull.modeling import load_tokenizer
    from lnull.training.data import build_examples, collate

    tokenizer = load_tokenizer(model_path)
    n, limit = options.data_examples, cfg["task"]["max_examples"]
    examples = []
    if limit is None or limit > n:  # tokenise only the first n records when none of them is dropped (the usual case)
        try:
            examples = build_examples({**cfg, "task": {**cfg["task"], "max_examples": n}}, tokenizer)
        except ConfigError:  # all n cut away by train.max_length: later records may not be
            examples = []
    if len(examples) < n:
        examples = build_examples(cfg, tokenizer)[:n]
    size = options.data_batch_size
    batches = [collate(examples[i:i + size], tokenizer.pad_token_id) for i in range(0, len(examples), size)]
    dataset = cfg["task"]["dataset"]
    record = {"task": dataset, "fingerprint": data_fingerprint(dataset, cfg.get("cache_dir")),
              "examples": len(examples), "batch_size": size, "batches": len(batches),
              "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
              "response_tokens": sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
              "max_length": cfg["train"]["max_length"], "add_bos": cfg["model"]["add_bos"]}
    return batches, record


PROBES = 4  # random vectors per module that check what PEFT did to its weight
RELATION_TOLERANCE = 1e-2  # relative: bf16 rounding of W0 - s B A is ~4e-3 at worst; a wrong relation is O(1)


def peft_inits(method: Any, model: torch.nn.Module, linears: dict[str, torch.nn.Linear], targets: list[str],
               info: dict[str, Any], options: Any, batches: Optional[list], device: torch.device
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """({module: (A [r, d_in], B [d_out, r])} fp32 CPU, the init's report) of ``method.peft_init`` on ``model``
    for the modules ``linears`` (``target_linears(model, targets)``).

    The whole model moves to ``device`` for PEFT's call (EVA's forwards, LoRA-GA's backwards; at 7B: 13.5 GB bf16
    weights, plus as much again for LoRA-GA's gradients of the targeted weights). PEFT may change the targeted
    weights in place; each module's weight W after the call is checked against what the method declares,
    W = W0 - s B A (``base`` "residual") or W = W0 ("original"), on ``PROBES`` random vectors p taken before the
    call: the report's ``reconstruction_rel_err`` is ||W p + s B A p - W0 p|| / ||W0 p|| (resp. ||W p - W0 p|| /
    ||W0 p||), beside ``base_change_rel`` (||W p - W0 p|| / ||W0 p||) and ``update_rel`` (||s B A p|| / ||W0 p||);
    RuntimeError above RELATION_TOLERANCE."""
    import peft

    model.to(device)
    generator = torch.Generator().manual_seed(0)
    probes = {}
    for name, lin in linears.items():
        p = torch.randn(lin.in_features, PROBES, generator=generator).to(device)
        probes[name] = (p, lin.weight.detach().float() @ p)
    scale = info["scale"]
    inits = method.peft_init(model, list(targets), info["rank"], info["alpha"], info["options"]["dropout"], options,
                             batches)
    if set(inits) != set(linears):
        missing = sorted(set(linears) ^ set(inits))
        raise RuntimeError(f"PEFT's {method.name} init gave adapters for other modules than the targeted ones: "
                           f"{missing[:3]}")
    report: dict[str, Any] = {"method": method.name, "rank": info["rank"], "peft": peft.__version__,
                              "base": method.base, "modules": {}}
    if "data" in info:
        report["data"] = info["data"]
    for name, lin in linears.items():
        A, B = inits[name]
        p, before = probes[name]
        after = lin.weight.detach().float() @ p
        update = scale * (B.to(device) @ (A.to(device) @ p))
        norm = before.norm().clamp_min(1e-30)
        kept, subtracted = (after - before).norm() / norm, (after + update - before).norm() / norm
        err = float(kept if method.base == "original" else subtracted)
        if not err <= RELATION_TOLERANCE:
            raise RuntimeError(f"{name}: PEFT's {method.name} init left a weight W with ||W - W0|| / ||W0|| ~ "
                               f"{float(kept):.2e} and ||W + s B A - W0|| / ||W0|| ~ {float(subtracted):.2e}; "
                               f"the method declares base '{method.base}'")
        report["modules"][name] = {"shape": list(lin.weight.shape), "reconstruction_rel_err": err,
                                   "base_change_rel": float(kept), "update_rel": float(update.norm() / norm)}
    report["max_reconstruction_rel_err"] = max(m["reconstruction_rel_err"] for m in report["modules"].values())
    return inits, report


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
