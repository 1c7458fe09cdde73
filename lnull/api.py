"""LoRA-Null (and every other lnull initialisation) in your own training code, the way PEFT's data-driven inits
are called (``preprocess_corda``, ``initialize_lora_eva_weights``)::

    from peft import LoraConfig
    from lnull.api import collect_statistics, preprocess, save_adapter, to_original

    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"])
    stats = collect_statistics(model, batches, config.target_modules)   # token-id batches [b, t], no padding
    peft_model = preprocess(model, config, method="lora_null_v2", statistics=stats)
    ...  # train peft_model with any trainer: lora_A stays frozen for v2 / LoRA-FA
    save_adapter(peft_model, "out/adapter")         # a plain PEFT adapter on the residual model
    to_original(peft_model, "out/lora_on_original")  # PEFT's rank-2r LoRA on the untouched base model

These are the functions ``lnull calibrate`` and ``lnull init`` run (``lnull.calibrate.collect_statistics``,
``lnull.initialize.layer_inits`` / ``adapter_model``, ``lnull.residual``): the same statistics, bit for bit, and
the same adapters for the same statistics.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch

from lnull.activations import STATS, CalibrationStats, StatisticsInMemory, collect_from_runs, default_budget_gb
from lnull.errors import ConfigError
from lnull.methods import METHOD_FILE, REGISTRY, attach

__all__ = ["collect_statistics", "preprocess", "save_adapter", "to_original", "INIT_ATTR", "INFO_ATTR"]

INFO_ATTR = "lnull_method"  # on a PeftModel from :func:`preprocess`: what lnull_method.json says of its init
INIT_ATTR = "lnull_initial_state"  # its initial adapter state dict (A0, B0; PEFT key names), for to_original
_EXTRAS_ATTR = "lnull_extras_dir"  # a method's extra files (OPLoRA's projections), alive with the model

Statistics = Union[StatisticsInMemory, CalibrationStats]


def _input_ids(batch: Any) -> torch.Tensor:
    """A batch's token ids [b, t]; a dict (a tokenizer's or a collator's output) must not be padded: padded
    positions would enter the statistics."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        mask = batch.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise ConfigError("a calibration batch is padded (attention_mask has zeros): pass unpadded windows, "
                              "e.g. equal-length token windows [b, t]")
        batch = batch["input_ids"]
    ids = torch.as_tensor(batch)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"a calibration batch must be token ids [b, t], got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def collect_statistics(model: torch.nn.Module, batches: Optional[Iterable[Any]] = None,
                       target_modules: Optional[list[str]] = None, *,
                       run_model: Optional[Callable[[], None]] = None, official: bool = False,
                       device_budget_gb: Optional[float] = None, progress: bool = True,
                       out_dir: Optional[Union[str, Path]] = None) -> Statistics:
    """The per-module input statistics lnull stores (``covariance``: sum of x xᵀ over tokens, LoRA-Null's;
    ``max_normalized_covariance``: PEFT CorDA's), each [d_in, d_in] fp32, collected on whatever device ``model``
    is on with a progress bar.

    ``batches``: token-id batches [b, t] (tensors, lists, or dicts with ``input_ids`` and no padding), run
    through the model once per module group (groups fit ``device_budget_gb``; on CUDA by default 24 GiB capped
    at 60 % of free memory, one group on the CPU); or ``run_model``: a callable making the forwards itself, as
    PEFT's ``preprocess_corda`` (one group). ``target_modules``: module-name suffixes, as LoraConfig's.
    ``official``: the official LoRA-Null code's normalised ``covariance`` (sum of (x/|max x|)ᵀ(x/|max x|) / 256).
    ``out_dir``: write a calibration folder there (what ``lnull calibrate`` writes, read with
    :class:`lnull.activations.CalibrationStats`) instead of keeping the packed triangles in memory.

    Returns an object with ``get(module, statistic)`` -> [d_in, d_in] fp32, ``alias`` and ``official``, as
    :func:`preprocess` takes it."""
    from lnull.activations import StatisticsWriter, probe_aliases
    from lnull.calibrate import collect_statistics as collect_into_sink
    from lnull.calibrate import statistics
    from lnull.io import atomic_write_json
    from lnull.modeling import target_linears

    if (batches is None) == (run_model is None):
        raise ConfigError("collect_statistics needs exactly one of batches= and run_model=")
    if not target_modules:
        raise ConfigError("collect_statistics needs target_modules (e.g. LoraConfig.target_modules)")
    linears = target_linears(model, list(target_modules))
    device = next(model.parameters()).device
    sink: Any = StatisticsWriter(Path(out_dir)) if out_dir is not None else StatisticsInMemory({}, official)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        if run_model is not None:
            alias = probe_aliases(model, linears, torch.zeros(1, 4, dtype=torch.long))
            sums, tokens, samples = collect_from_runs(model, linears, alias, run_model)
            sink.write(statistics(sums, tokens, samples, official), 1)
            sink.close()
        else:
            windows = [_input_ids(b) for b in batches]
            if not windows:
                raise ConfigError("collect_statistics got no batches")
            alias = collect_into_sink(model, linears, windows, 1, official,
                                      default_budget_gb(device, device_budget_gb), progress, sink)
    finally:
        model.train(was_training)
    if out_dir is None:
        sink.alias = alias
        return sink
    atomic_write_json(Path(out_dir) / "meta.json", {"alias": alias, "official": official, "groups": sink.written,
                                                    "source": "lnull.api.collect_statistics",
                                                    "statistics": list(STATS)})
    return CalibrationStats(Path(out_dir))


def _method_section(method: Any, lora_config: Any, options: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The method's config section (as ``configs/method/<name>.yaml`` resolves it) from the LoraConfig and
    ``options``: rank r, alpha lora_alpha, dropout lora_dropout, the method's own options at their defaults."""
    section = {f.name: f.default for f in dataclasses.fields(method.options)
               if f.default is not dataclasses.MISSING}
    unknown = sorted(set(options or {}) - set(section))
    if unknown:
        raise ConfigError(f"method '{method.name}' has no option '{unknown[0]}'; options: "
                          f"{', '.join(k for k in section if k not in ('name', 'rank', 'alpha', 'dropout'))}")
    section.update(options or {})
    section.update(name=method.name, rank=int(lora_config.r), alpha=float(lora_config.lora_alpha),
                   dropout=float(lora_config.lora_dropout))
    return section


def _check_config(lora_config: Any) -> list[str]:
    """The LoraConfig's target modules; one ConfigError line for what lnull's inits cannot honour."""
    for field in ("rank_pattern", "alpha_pattern"):
        if getattr(lora_config, field, None):
            raise ConfigError(f"LoraConfig.{field} is set: lnull's inits use one rank and alpha for every module")
    for field in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if getattr(lora_config, field, False):
            raise ConfigError(f"LoraConfig.{field}=True is not supported by lnull's inits (plain LoRA, s = alpha / r)")
    targets = lora_config.target_modules
    if not targets or isinstance(targets, str):
        raise ConfigError("LoraConfig.target_modules must list module-name suffixes (a regex string or "
                          "'all-linear' cannot be matched the way lnull targets modules)")
    return sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)


class FrozenParameter(torch.nn.Parameter):
    """A parameter that stays frozen (v2's / LoRA-FA's ``lora_A``): PEFT's own calls (``set_adapter``,
    ``enable_adapter_layers``, ...) set ``requires_grad_(True)`` on every LoRA part of the active adapter; on this
    parameter that call leaves it False. ``.to()`` and deepcopy keep the class (PyTorch swaps ``.data`` in place)."""

    def requires_grad_(self, requires_grad: bool = True) -> "FrozenParameter":
        return super().requires_grad_(False)


def _freeze(peft_model: Any, parts: list[str]) -> None:
    """Every parameter under a module named one of ``parts`` (``lora_A``) becomes a :class:`FrozenParameter`."""
    for part in parts:
        holders = [m for n, m in peft_model.named_modules() if n.rsplit(".", 1)[-1] == part]
        if not holders:
            raise ConfigError(f"freezing rule '{part}' matches no module of the PEFT model")
        for holder in holders:
            for module in holder.modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    setattr(module, name, FrozenParameter(param.data, requires_grad=False))


def preprocess(model: torch.nn.Module, lora_config: Any, method: str,
               statistics: Optional[Union[Statistics, str, Path]] = None,
               run_model: Optional[Callable[[], None]] = None, batches: Optional[Iterable[Any]] = None, *,
               options: Optional[dict[str, Any]] = None, device: Optional[Union[str, torch.device]] = None,
               progress: bool = True) -> Any:
    """Initialise ``model``'s LoRA adapters with ``method`` (a key of ``lnull.methods.REGISTRY``: lora_null_v1,
    lora_null_v2, corda_kpm, corda_ipm, pissa, milora, lora, lora_fa, oplora) and return the PeftModel.

    Like PEFT's ``preprocess_corda`` then ``get_peft_model``: ``model``'s targeted weights become the residual
    W0 − s B0 A0 in place (s = lora_alpha / r, computed in fp32, cast back to the weight's dtype), the adapters
    hold (A0, B0), so the model's outputs are unchanged at init. Methods that read statistics take them from
    ``statistics`` (from :func:`collect_statistics`, or a calibration folder ``lnull calibrate`` wrote), or
    collect them first from ``run_model`` / ``batches``. ``options``: the method's own options (e.g.
    ``{"init_a": "kaiming_uniform"}``); ``device``: where each layer's maths runs (default: the model's).
    Adapter parts the method freezes (``lora_A`` for lora_null_v2 and lora_fa) stay frozen through PEFT's later
    calls. ConfigError, one line, before any heavy work: unknown method, unsupported LoraConfig, a target module
    the model lacks, statistics of another model."""
    from lnull.initialize import adapter_model, check_layers, layer_inits, method_record
    from lnull.modeling import target_linears
    from lnull.residual import subtract_factors

    if method not in REGISTRY:
        raise ConfigError(f"unknown method '{method}'; known: {', '.join(sorted(REGISTRY))}")
    init = REGISTRY[method]
    if not init.has_adapter:
        raise ConfigError(f"method '{method}' trains the whole model: it has no adapter to initialise")
    if init.peft_init is not None:
        raise ConfigError(f"method '{method}' is PEFT's own initialisation: call PEFT directly (LoraConfig("
                          f"init_lora_weights=...)); lnull runs it only in the init stage")
    targets = _check_config(lora_config)
    section = _method_section(init, lora_config, options)
    opts = init.make_options(section)
    if init.check_options is not None:
        init.check_options(opts)
    linears = target_linears(model, targets)
    check_layers(init, linears, section["rank"], opts)
    stats = None
    if init.needs_calibration:
        if isinstance(statistics, (str, Path)):
            stats = CalibrationStats(Path(statistics))
        elif statistics is not None:
            stats = statistics
        elif run_model is not None or batches is not None:
            stats = collect_statistics(model, batches, targets, run_model=run_model, progress=progress)
        else:
            raise ConfigError(f"method '{method}' reads the '{init.statistic}' statistic: pass statistics= (from "
                              "collect_statistics), run_model= or batches=")
    info = method_record(init, section, official_fp16=bool(stats is not None and stats.official))
    at = torch.device(device) if device is not None else next(model.parameters()).device
    extras = None
    if init.write_extras is not None:  # from the original weights, before the residual replaces them
        extras = tempfile.TemporaryDirectory(prefix=f"lnull-{method}-")
        init.write_extras(linears, opts, Path(extras.name))
    inits, report = layer_inits(init, linears, stats, info, opts, at, progress)
    moved = {name: (A, B) for name, (A, B) in inits.items() if bool(B.any())}
    subtract_factors(model, moved, info["scale"], at)
    peft_model = adapter_model(model, inits, info, targets, lora_config=lora_config)
    if extras is not None:
        attach(peft_model, Path(extras.name))
        object.__setattr__(peft_model, _EXTRAS_ATTR, extras)
    _freeze(peft_model, list(init.frozen))
    from peft import get_peft_model_state_dict

    object.__setattr__(peft_model, INFO_ATTR, {**info, "report": report})
    object.__setattr__(peft_model, INIT_ATTR, {k: v.detach().clone().cpu()
                                               for k, v in get_peft_model_state_dict(peft_model).items()})
    return peft_model


def _info(peft_model: Any) -> dict[str, Any]:
    info = getattr(peft_model, INFO_ATTR, None)
    if info is None:
        raise ConfigError("this PeftModel was not made by lnull.api.preprocess (no lnull_method record on it)")
    return info


def _plain_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter's state dict as a plain LoRA computes it: a method's hooks folded into A and B
    (``Method.effective_factors``, on copies: the live model keeps training with its hooks)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    extras = getattr(peft_model, _EXTRAS_ATTR, None)
    method = REGISTRY[_info(peft_model)["method"]]
    if extras is None or method.effective_factors is None:
        return state
    names = {k[len("base_model.model."):k.index(".lora_A.")]: k for k in state if ".lora_A." in k}
    A = {n: state[k] for n, k in names.items()}
    B = {n: state[k.replace(".lora_A.", ".lora_B.")] for n, k in names.items()}
    A_eff, B_eff = method.effective_factors(A, B, Path(extras.name))
    for n, k in names.items():
        state[k] = A_eff[n].to(A[n].dtype)
        state[k.replace(".lora_A.", ".lora_B.")] = B_eff[n].to(B[n].dtype)
    return state


def _write_adapter(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                   info: Optional[dict[str, Any]]) -> Path:
    from safetensors.torch import save_file

    from lnull.io import atomic_write_dir
    from lnull.residual import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=list))
        if info is not None:
            (folder / METHOD_FILE).write_text(json.dumps(info, indent=2))
    return atomic_write_dir(Path(out_dir), write)


def _config_dict(peft_model: Any) -> dict[str, Any]:
    config = peft_model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_adapter(peft_model: Any, out_dir: Union[str, Path]) -> Path:
    """Write the adapter of a :func:`preprocess` model as a plain PEFT LoRA folder (adapter_config.json,
    adapter_model.safetensors; a method's hooks folded in) plus ``lnull_method.json``. It applies to the residual
    model (W0 − s B0 A0): ship :func:`to_original` to users of the untouched base model."""
    info = {k: v for k, v in _info(peft_model).items() if k != "report"}
    return _write_adapter(Path(out_dir), _plain_state(peft_model), _config_dict(peft_model), info)


def to_original(peft_model: Any, out_dir: Union[str, Path], base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapter as a PEFT LoRA on the ORIGINAL (untouched) base model: for an init that moved weight
    (B0 A0 ≠ 0: LoRA-Null, PiSSA, MiLoRA, CorDA) PEFT's rank-2r conversion, ``A' = [A; A0]``, ``B' = [B, −B0]``,
    lora_alpha doubled (``lnull export``'s ``lora_on_original``, PEFT's ``path_initial_model_for_weight_conversion``);
    otherwise the adapter itself. ``PeftModel.from_pretrained(original model, out_dir)`` then computes what
    ``peft_model`` computes. ``base_model_name_or_path``: written into adapter_config.json (default: the model's
    ``name_or_path``)."""
    from lnull.residual import on_original_config, on_original_tensors

    _info(peft_model)
    init_state = getattr(peft_model, INIT_ATTR)
    config = _config_dict(peft_model)
    base = base_model_name_or_path or getattr(peft_model.base_model.model, "name_or_path", None) or \
        config.get("base_model_name_or_path")
    state = _plain_state(peft_model)
    if not any(bool(t.any()) for k, t in init_state.items() if ".lora_B." in k):
        return _write_adapter(Path(out_dir), state, {**config, "base_model_name_or_path": base}, None)
    return _write_adapter(Path(out_dir), on_original_tensors(state, init_state), on_original_config(config, base),
                          None)
