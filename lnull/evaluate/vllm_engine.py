"""Optional vLLM generation engine (``eval.engine=vllm``; vLLM is not a dependency of lnull).

vLLM loads a plain model folder (or hub name).  Which folder and which LoRA adapter, per ``ctx``:

- ``base``, a model folder, ``trained`` with a full fine-tune (``train/model``): that folder, no LoRA.
- ``init`` / ``trained`` of a run (``<run>/init/adapter``, ``<run>/train/adapter``): the residual model is
  never on disk (``lnull.residual``), so vLLM gets the original model plus the same model as one LoRA on it
  (``lora_on_original``: rank 2r, written once per adapter into a temporary folder that :func:`release_engine`
  removes: 2.4 GiB at 7B, r = 128, which the store should not keep per record) when the init moved weight
  (B0 != 0), else the adapter itself; ``init`` of a residual method is the original model, no LoRA.
- any other PEFT adapter folder: its ``base_model_name_or_path`` plus the adapter as a ``LoRARequest``.

Prompts go in as token ids (tokenised with ``ctx.tokenizer`` without special tokens, BOS prepended when
``model.add_bos``), so BOS handling is explicit and identical to the HF engine.  Each prompt gets its own
``SamplingParams`` (seed = ``seed + index``: reproducible whatever vLLM's scheduling; ``max_tokens``
capped by ``max_length`` minus the prompt length when given).  One ``vllm.LLM`` is kept (GPU memory):
a request for another base replaces it; it takes ``eval.vllm.gpu_memory_utilization`` of the GPU, and the
evaluate stage never holds an HF copy of the weights while it is built (:func:`release_engine` drops it).
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from lnull.errors import ConfigError
from lnull.evaluate.generate import cut_at_stop
from lnull.modeling import release_accelerator_memory
from lnull.serving import vllm_max_lora_rank

_ENGINE: dict[str, Any] = {}  # {"key": (base, dtype, max_lora_rank), "llm": vllm.LLM}
_LORA_IDS: dict[str, int] = {}  # adapter path -> vLLM's globally unique lora_int_id (1, 2, ...)
_CONVERTED: dict[tuple[str, str], str] = {}  # (adapter, init adapter) -> its lora_on_original temp folder
_MOVES_WEIGHT: dict[str, bool] = {}  # init adapter -> B0 != 0 somewhere (read once: GBs of factors at 7B)


def model_and_adapter(ctx: Any) -> tuple[str, Optional[str], int]:
    """(plain model folder or hub name for vLLM, PEFT adapter folder or None, adapter rank or 0)."""
    from lnull.methods import needs_hooks
    from lnull.residual import is_residual, lora_on_original

    base, adapter = ctx.base_path, ctx.adapter_path
    if adapter is not None and needs_hooks(Path(adapter)):
        raise ConfigError(f"eval.engine=vllm cannot apply the hooks the adapter {adapter} needs (an unbaked "
                          "OPLoRA adapter); use eval.engine=hf")
    init = ctx.init_adapter_path
    if init is not None and str(init) not in _MOVES_WEIGHT:
        _MOVES_WEIGHT[str(init)] = is_residual(Path(init))[0]
    if adapter is not None and init is not None and _MOVES_WEIGHT[str(init)]:
        if Path(adapter).resolve() == Path(ctx.init_adapter_path).resolve():
            return base, None, 0  # W_res + s B0 A0 = W0: the initial model is the original
        pair = (str(adapter), str(ctx.init_adapter_path))
        if pair not in _CONVERTED:
            folder = Path(tempfile.mkdtemp(prefix="lnull-lora-on-original-")) / "adapter"
            _CONVERTED[pair] = str(lora_on_original(Path(adapter), Path(ctx.init_adapter_path), folder, base))
        adapter = _CONVERTED[pair]
    if adapter is None:
        return base, None, 0
    conf = json.loads((Path(adapter) / "adapter_config.json").read_text())
    ranks = [conf.get("r", 8), *(conf.get("rank_pattern") or {}).values()]
    return base, adapter, max(ranks)


def _llm(ctx: Any, base: str, lora_rank: int) -> Any:
    import vllm

    max_lora_rank = vllm_max_lora_rank(lora_rank) if lora_rank else 0  # the next value vLLM accepts
    key = (base, ctx.cfg["model"]["dtype"], max_lora_rank)
    if _ENGINE.get("key") != key:
        _ENGINE.clear()  # drop the previous engine before allocating the next one's KV cache
        kwargs: dict[str, Any] = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1} \
            if max_lora_rank else {}
        release_accelerator_memory()  # the previous engine's memory, before the next one sizes its KV cache
        _ENGINE["llm"] = vllm.LLM(model=base, tokenizer=base, dtype=ctx.cfg["model"]["dtype"],
                                  seed=ctx.eval_cfg["seed"],
                                  gpu_memory_utilization=ctx.eval_cfg["vllm"]["gpu_memory_utilization"], **kwargs)
        _ENGINE["key"] = key
    return _ENGINE["llm"]


def release_engine() -> None:
    """Drop the kept engine (before an HF copy of the weights loads, and when the evaluate stage ends)."""
    if _ENGINE:
        _ENGINE.clear()
        release_accelerator_memory()
    for folder in _CONVERTED.values():
        shutil.rmtree(Path(folder).parent, ignore_errors=True)
    _CONVERTED.clear()


atexit.register(release_engine)  # a converted adapter never outlives the process


def generate_vllm(ctx: Any, prompts: list[str], max_new_tokens: int, stop: Sequence[str] = (),
                  temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
                  max_length: Optional[int] = None) -> list[str]:
    """Completions of ``prompts`` (text after the prompt, cut at the first stop string), in prompt order.

    Greedy when ``temperature`` is 0; ``max_length`` caps prompt + completion tokens.
    """
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    base, adapter, rank = model_and_adapter(ctx)
    llm = _llm(ctx, base, rank)
    tok = ctx.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if ctx.add_bos and tok.bos_token_id is not None:
        ids = [[tok.bos_token_id] + x for x in ids]
    params = [SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=max_new_tokens if max_length is None
                             else max(1, min(max_new_tokens, max_length - len(x))),
                             stop=list(stop) or None, seed=None if seed is None else seed + i)
              for i, x in enumerate(ids)]
    lora = None
    if adapter is not None:
        lora_id = _LORA_IDS.setdefault(adapter, len(_LORA_IDS) + 1)
        lora = LoRARequest(adapter, lora_id, adapter)  # (lora_name, lora_int_id, lora_path)
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=bool(ctx.cfg["progress"]),
                        lora_request=lora)
    return [cut_at_stop(o.outputs[0].text, stop) for o in outs]
