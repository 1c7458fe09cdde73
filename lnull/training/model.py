"""The model being trained: loaded from ``init/`` with the method's freezing rule, wrapped for the loss."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lnull.errors import ConfigError
from lnull.data.prompts import IGNORE_INDEX
from lnull.methods import METHOD_FILE, attach
from lnull.residual import load_residual_model


def load_trainable(init_dir: Path, original: str, dtype: str, attn_implementation: str = "sdpa",
                   compute_device: Optional[torch.device] = None) -> tuple[Any, dict[str, Any]]:
    """Model from ``init/`` (on CPU) with the method's freezing rule applied; returns (model, method info).

    Adapter methods: the residual model (the ``original`` weights minus s B0 A0 of ``init/adapter``, computed
    on ``compute_device``, default the CPU: :mod:`lnull.residual`) + ``init/adapter`` through PEFT, base weights frozen, and the adapter parts
    named in ``lnull_method.json`` (``frozen``, e.g. ``["lora_A"]`` for LoRA-Null v2 and LoRA-FA) frozen too;
    a method's hooks (``lnull.methods.attach``: OPLoRA's projections) are closures, never parameters. Without
    an adapter (full fine-tuning) every weight trains, and is loaded in fp32 whatever ``dtype``: these are the
    optimizer's master weights (at lr 2e-5 most AdamW updates to bf16 weights are below half an ulp and round
    away); the loop computes in ``dtype`` under autocast (:func:`compute_autocast`) and saves in ``dtype``.
    Adapter methods keep the frozen base in ``dtype`` (PEFT holds the LoRA weights in fp32).
    """
    info = json.loads((init_dir / METHOD_FILE).read_text())
    adapter = init_dir / "adapter"
    model = load_residual_model(original, adapter if info["adapter"] else None,
                                dtype if info["adapter"] else "float32", "cpu", attn_implementation, compute_device)
    if not info["adapter"]:
        model.requires_grad_(True)
        return model, info
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    attach(model, adapter)
    # PEFT re-enables grads on every LoRA part in from_pretrained(is_trainable): freeze after it.
    for part in info["frozen"]:
        matched = [p for n, p in model.named_parameters() if f".{part}." in n]
        if not matched:
            raise ConfigError(f"freezing rule '{part}' of {adapter / METHOD_FILE} matches no parameter")
        for param in matched:
            param.requires_grad_(False)
    return model, info


def compute_autocast(dtype: str, info: dict[str, Any], device: torch.device, mixed_precision: str) -> Any:
    """The context a training forward runs in: autocast to ``dtype`` (model.dtype) when full fine-tuning holds
    fp32 master weights of a bf16/fp16 model and Accelerate does not autocast already (``mixed_precision``
    "no"; on CPU always, where train.precision must be "no"); otherwise a no-op context."""
    import contextlib

    from lnull.modeling import DTYPES

    if info["adapter"] or DTYPES[dtype] == torch.float32 or mixed_precision != "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def assert_frozen(model: torch.nn.Module, info: dict[str, Any]) -> int:
    """Raise ConfigError if a parameter the method keeps frozen would get gradients (PEFT and wrappers can
    re-enable them); return the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(f".{part}." in name for part in info["frozen"]) or (info["adapter"] and "lora_" not in name):
            raise ConfigError(f"frozen parameter {name} of method '{info['method']}' would get gradients")
        trainable += getattr(param, "ds_numel", param.numel())  # ZeRO-3 shards report numel() 0
    if trainable == 0:
        raise ConfigError(f"method '{info['method']}' leaves no trainable parameter")
    return trainable


class ResponseLoss(torch.nn.Module):
    """Causal-LM loss on response tokens only, applying the LM head only at those positions.

    The mean over the micro-batch's examples of each example's mean cross-entropy over its response tokens
    (positions whose next-token label is not IGNORE_INDEX). With one example this is ``model(**batch).loss``;
    with several it is *not* HF's pooled token mean, so that length-grouped micro-batches of any size give the
    paper recipe's micro-batch-1 loss and gradient per optimizer step (equal-sized micro-batches; Accelerate
    divides by the accumulation steps). The [b, t, vocab] logits of prompt and padding positions are never
    computed: with a 49k-152k vocabulary the head is a large share of a small model's step.  Accelerate wraps
    this module, so DDP/DeepSpeed see one forward.

    Which positions are response tokens is data-dependent: found on the device (boolean indexing, ``nonzero``)
    it would make the host wait for the GPU every micro-step, so the loop passes :meth:`response_index` computed
    on the host from the collated labels; without it (tests, other callers) it is computed here.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def response_index(labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """For ``labels`` int64 [b, t]: ``response_positions`` int64 [n] (flat indices i * t + j, ascending, of
        the positions j < t - 1 whose next-token label is not IGNORE_INDEX) and ``response_example`` int64 [n]
        (their example i)."""
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        where = keep.flatten().nonzero()[:, 0]
        return {"response_positions": where,
                "response_example": torch.div(where, labels.shape[1], rounding_mode="floor")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                response_positions: Optional[torch.Tensor] = None,
                response_example: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_ids``/``attention_mask``/``labels`` int64 [b, t] (+ :meth:`response_index` of ``labels``)
        -> scalar loss (fp32)."""
        if response_positions is None or response_example is None:
            index = self.response_index(labels)
            response_positions, response_example = index["response_positions"], index["response_example"]
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, response_positions)
        logits = lm.get_output_embeddings()(picked).float()  # [n_response_tokens, vocab]
        cap = getattr(lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        targets = labels.reshape(-1).index_select(0, response_positions + 1)  # the next token of each position
        tokens = F.cross_entropy(logits, targets, reduction="none")  # [n_response_tokens]
        zeros = torch.zeros(labels.shape[0], dtype=tokens.dtype, device=tokens.device)
        per_example = zeros.index_add(0, response_example, tokens)
        counts = zeros.index_add(0, response_example, torch.ones_like(tokens))
        return (per_example / counts).mean()
