"""Serving an adapter with vLLM: the ``max_lora_rank`` to start the engine with, and the adapter format rules vLLM
enforces when it loads a LoRA (checked here without vLLM, without a GPU and without loading a model).

Rules, from vLLM's own source (vllm-project/vllm):

- ``max_lora_rank`` must be one of a fixed list (``LoRAConfig``): ``(8, 16, 32, 64, 128, 256, 320, 512)`` in
  v0.8 to v0.11.0 (``possible_max_ranks`` in ``LoRAConfig.__post_init__``, ``vllm/config.py``, later
  ``vllm/config/lora.py``); after v0.11.0 ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``
  (``vllm/config/lora.py``, v0.14). :data:`VLLM_MAX_LORA_RANKS` is the list every one of those releases accepts;
  an adapter above 512 cannot be served by vLLM at all.
- The adapter folder is ``adapter_config.json`` + ``adapter_model.safetensors`` (``.bin`` / ``.pt`` as
  fallbacks), ``LoRAModel.from_local_checkpoint`` (``vllm/lora/models.py``, v0.8-v0.11). The config is read by
  ``PEFTHelper`` (``vllm/lora/peft_helper.py``): ``r``, ``lora_alpha``, ``target_modules`` are required, unknown
  fields are dropped; ``validate_legal`` rejects ``modules_to_save`` (any, for a causal LM), ``use_dora``,
  ``bias != "none"`` (v0.10: only with ``enable_lora_bias``; removed in vllm PR #25807: "Adapter bias is not
  supported") and a rank above the server's ``max_lora_rank``. ``use_rslora`` is honoured (scale
  ``lora_alpha / sqrt(r)``). Newer vLLM (main, 2026) also rejects ``lora_bias``, a string ``init_lora_weights``
  that changes the base weights (pissa, olora, corda, loftq, ...), ``layer_replication``, aLoRA
  (``alora_invocation_tokens``) and QALoRA; up to v0.11 those were silently ignored, i.e. the wrong model.
  ``fan_in_fan_out`` is never read (weights are taken as ``[r, in]`` / ``[out, r]``), so it must be false.
- Up to v0.11 every module is scaled by ``lora_alpha / r`` (``LoRALayerWeights.from_config``): ``rank_pattern`` /
  ``alpha_pattern`` are ignored (honoured only by ``PEFTHelper.get_rank_and_scaling`` on recent main), so a module
  whose PEFT scale differs from ``lora_alpha / r`` is served wrong.
- Weight keys are parsed by ``parse_fine_tuned_lora_name`` (``vllm/lora/utils.py``):
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (``lora_embedding_A`` / ``_B`` for embeddings);
  anything else (``lora_B.bias``, ``modules_to_save`` copies, ``trainable_tokens``) is "unsupported LoRA weight".
  ``check_unexpected_modules`` then requires the module's last name to be an expected LoRA module: the model's
  supported modules with packed ones unpacked (``WorkerLoRAManager._load_adapter``, ``vllm/lora/worker_manager.py``;
  ``packed_modules_mapping`` of ``LlamaForCausalLM`` and the Qwen2 / Mistral / Gemma classes: ``qkv_proj`` <-
  q/k/v_proj, ``gate_up_proj`` <- gate/up_proj), i.e. :data:`VLLM_LORA_MODULES`. vLLM packs q/k/v and gate/up
  itself, so an adapter may target any subset of them. ``new_embeddings.safetensors`` (extra vocabulary) was
  deprecated in v0.11 and removed in v0.12. Tensors are cast to the server's ``lora_dtype`` (auto: the model
  dtype), so any float dtype loads.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from lnull.errors import ConfigError

# max_lora_rank values every vLLM from v0.8 to today accepts (1 is accepted only after v0.11.0; see above).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Last names of the modules vLLM loads a LoRA into for LLaMA / Qwen2 / Mistral / Gemma decoders (packed ones unpacked).
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                               "embed_tokens", "lm_head"})
# Non-default init_lora_weights strings that only set the initial adapter (vLLM main's PEFTHelper._init_is_supported).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_PREFIX = "base_model.model."
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``rank`` (vLLM validates the
    value against a fixed list, ``LoRAConfig`` in ``vllm/config/lora.py``, v0.11: :data:`VLLM_MAX_LORA_RANKS`),
    e.g. 1 -> 8, 116 -> 128, 300 -> 320. ConfigError above 512: vLLM cannot serve such an adapter."""
    if int(rank) != rank or rank < 1:
        raise ConfigError(f"LoRA rank {rank!r} is not a positive integer")
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}: vLLM cannot "
                      "serve this adapter (serve the merged model instead)")


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape", ...}} from a safetensors file's JSON header (no tensor is read)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _pattern_value(pattern: dict[str, Any], module: str) -> Any:
    """PEFT's ``get_pattern_key`` rule (as vLLM main's ``PEFTHelper._match_pattern``): a key matches a suffix of the
    module name at a "." boundary; the first match wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _parse_key(key: str) -> tuple[str, str] | None:
    """(module name, "A" | "B") of a LoRA weight key as ``parse_fine_tuned_lora_name`` (vllm/lora/utils.py) reads
    it, or None for a key vLLM rejects."""
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2]), parts[-2][-1]
    if len(parts) >= 2 and parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1]), parts[-1][-1]
    return None


def check_vllm_adapter(adapter_dir: Path) -> list[str]:
    """Why vLLM would not load ``adapter_dir`` (a PEFT LoRA folder) as the same model PEFT loads, one line per
    problem naming the field or module; empty when it loads. Reads only ``adapter_config.json`` and the
    safetensors header; the rules and the vLLM source they follow are in this module's docstring."""
    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        return [f"{CONFIG}: cannot be read ({exc.__class__.__name__}: {exc})"]
    problems = []
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        problems.append(f"{CONFIG}: missing required field(s) {', '.join(missing)} (vLLM's PEFTHelper needs them)")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type: {config['peft_type']!r} is not a LoRA; vLLM loads only LoRA adapters")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if "r" in config and not (isinstance(r, int) and r > 0):
        problems.append(f"r: {r!r} is not a positive integer")
        r = None
    if config.get("bias", "none") != "none":
        problems.append(f"bias: {config['bias']!r}; vLLM supports only 'none'")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save: {config['modules_to_save']!r}; vLLM supports only none for a causal LM")
    if config.get("use_dora"):
        problems.append("use_dora: true; vLLM does not support DoRA")
    if config.get("lora_bias"):
        problems.append("lora_bias: true; vLLM does not support LoRA bias")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out: true; vLLM ignores it and reads the weights as [r, in] / [out, r]")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        problems.append(f"init_lora_weights: {init!r} changes the base weights when PEFT loads the adapter; vLLM "
                        "rejects it (convert with path_initial_model_for_weight_conversion, or set it to true)")
    for field, what in (("layer_replication", "layer_replication"), ("alora_invocation_tokens", "Activated LoRA"),
                        ("use_qalora", "QALoRA"), ("trainable_token_indices", "trainable tokens")):
        if config.get(field):
            problems.append(f"{field}: set; vLLM does not support {what}")
    for extra in ("new_embeddings.safetensors", "new_embeddings.bin"):
        if (adapter_dir / extra).exists():
            problems.append(f"{extra}: extra vocabulary is deprecated in vLLM 0.11 and removed in 0.12")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    top = max([r or 0, *[v for v in rank_pattern.values() if isinstance(v, int)]])
    if top > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"r: rank {top} is above vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}; vLLM cannot "
                        "serve this adapter")

    weights = adapter_dir / WEIGHTS
    if not weights.exists():
        return problems + [f"{WEIGHTS}: missing (this check reads only safetensors)"]
    try:
        header = safetensors_header(weights)
    except (OSError, ValueError, struct.error) as exc:
        return problems + [f"{WEIGHTS}: unreadable header ({exc.__class__.__name__}: {exc})"]
    modules: dict[str, dict[str, Any]] = {}
    for key, info in sorted(header.items()):
        parsed = _parse_key(key)
        if parsed is None:
            problems.append(f"{WEIGHTS}: tensor {key} is not a LoRA weight vLLM parses "
                            "(base_model.model.<module>.lora_A.weight / lora_B.weight)")
            continue
        module, side = parsed
        if info.get("dtype") not in _FLOAT_DTYPES:
            problems.append(f"{module}: lora_{side} has dtype {info.get('dtype')}; vLLM needs a float tensor")
        modules.setdefault(module, {})[side] = info.get("shape")
    if not modules:
        problems.append(f"{WEIGHTS}: holds no LoRA weights")
    scale_of = (lambda rank, a: a / math.sqrt(rank)) if config.get("use_rslora") else (lambda rank, a: a / rank)
    for module, sides in modules.items():
        if module.split(".")[-1] not in VLLM_LORA_MODULES:
            problems.append(f"{module}: vLLM loads no LoRA into '{module.split('.')[-1]}' "
                            f"(expected one of {', '.join(sorted(VLLM_LORA_MODULES))})")
            continue
        if set(sides) != {"A", "B"}:
            problems.append(f"{module}: has lora_{''.join(sides)} without its lora_{'B' if 'A' in sides else 'A'}")
            continue
        a, b = sides["A"], sides["B"]  # PEFT: [r, in] / [out, r]; embeddings [r, vocab] / [dim, r]
        rank = a[0] if a else 0
        if len(a) != 2 or len(b) != 2 or b[1] != rank:
            problems.append(f"{module}: lora_A {a} and lora_B {b} are not [r, in] and [out, r] of one rank")
            continue
        if rank > VLLM_MAX_LORA_RANKS[-1]:
            problems.append(f"{module}: rank {rank} is above vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}")
        if r is None or not isinstance(alpha, (int, float)):
            continue
        peft_rank = _pattern_value(rank_pattern, module) or r
        peft_alpha = _pattern_value(alpha_pattern, module)
        peft_alpha = alpha if peft_alpha is None else peft_alpha
        if rank != peft_rank:
            problems.append(f"{module}: tensors have rank {rank}, the config says {peft_rank}")
        elif not math.isclose(scale_of(peft_rank, peft_alpha), scale_of(r, alpha), rel_tol=1e-9):
            problems.append(f"{module}: PEFT scales it by {scale_of(peft_rank, peft_alpha):g} (rank_pattern / "
                            f"alpha_pattern) but vLLM <= 0.11 by lora_alpha / r = {scale_of(r, alpha):g}")
    return problems


def adapter_rank(adapter_dir: Path) -> int:
    """The largest rank in ``adapter_dir``: ``r``, ``rank_pattern``'s values and the lora_A tensors' rows."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / CONFIG).read_text())
    ranks = [int(config.get("r", 8)), *[int(v) for v in (config.get("rank_pattern") or {}).values()]]
    if (adapter_dir / WEIGHTS).exists():
        for key, info in safetensors_header(adapter_dir / WEIGHTS).items():
            parsed = _parse_key(key)
            if parsed is not None and parsed[1] == "A" and info.get("shape"):
                ranks.append(int(info["shape"][0]))
    return max(ranks)


def vllm_report(adapter_dir: Path) -> dict[str, Any]:
    """``{"max_lora_rank": the value to start vLLM with (None: cannot be served), "problems": [...]}`` of an
    adapter folder (``export/report.json``)."""
    problems = check_vllm_adapter(adapter_dir)
    try:
        max_lora_rank = vllm_max_lora_rank(adapter_rank(adapter_dir))
    except (ConfigError, OSError, ValueError, TypeError):
        max_lora_rank = None
    return {"max_lora_rank": max_lora_rank, "problems": problems}
