"""Part (c): calibration's memory plan at full LLaMA-3-8B depth (lnull's own grouping, on the meta device)
against the card's memory."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smoke import Recorder


def run(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from calibration_memory import arithmetic
    from lnull import activations
    from lnull.modeling import target_linears
    from shaped_model import PRESETS

    hidden, inter, heads, kv, vocab = PRESETS["llama3-8b"]
    layers = 32
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv)
    rec.doing("LLaMA-3-8B on the meta device")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linears = target_linears(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    params = sum(p.numel() for p in model.parameters())
    try:  # lnull's own probe, on meta tensors; else the rule it finds on LLaMA (q/k/v and gate/up share inputs)
        alias = activations.probe_aliases(model, linears, torch.zeros(1, 8, dtype=torch.long, device="meta"))
        alias_source = "probe_aliases on the meta device"
    except Exception as exc:
        shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
        alias = {n: n.rsplit(".", 1)[0] + "." + shared[n.rsplit(".", 1)[1]] if n.rsplit(".", 1)[1] in shared else n
                 for n in linears}
        alias_source = f"name rule (probe_aliases on meta: {type(exc).__name__}: {str(exc)[:80]})"
    unique = [n for n, a in alias.items() if n == a]
    sizes = {n: linears[n].in_features ** 2 for n in unique}
    weights_gib = params * 4 / 2**30  # calibration.dtype float32
    if dry:
        free, total = None, 80 * 2**30
        where = "an 80 GiB card (dry run: assumed)"
    else:
        free, total = torch.cuda.mem_get_info(0)
        where = "this GPU's free memory"
    # lnull's rule (activations.default_budget_gb), asked once the fp32 weights are loaded, as collect_into does
    left = (free if free is not None else total) / 2**30 - weights_gib
    budget = min(activations.DEFAULT_CUDA_BUDGET_GB, math.floor(0.6 * left * 10) / 10)
    budget_source = (f"default_budget_gb's rule on {where} less the fp32 weights: min(24 GiB, 60% of "
                     f"{left:.1f} GiB)")
    plans = []
    for b in sorted({budget, 24.0, 16.0, 8.0}, reverse=True):
        groups = activations.plan_groups(sizes, 4, b)
        device_gib = [sum(2 * sizes[n] * 4 for n in g) / 2**30 for g in groups]
        biggest = max(sizes.values())
        temporaries_gib = 2 * biggest * 4 / 2**30  # one sample's x^T x and its max-normalised copy, fp32
        peak = weights_gib + max(device_gib) + temporaries_gib
        plans.append({"budget_gib": b, "groups": len(groups), "modules_per_group": [len(g) for g in groups],
                      "max_group_device_fp32_gib": round(max(device_gib), 2),
                      "max_group_host_fp64_gib": round(2 * max(device_gib), 2),
                      "predicted_device_peak_gib": round(peak, 1), "fits_card": peak < total / 2**30,
                      "chosen_by_lnull": b == budget})
        rec.set(plans=plans)
    stored = sum(2 * activations.packed_size(linears[n].in_features) * 4 for n in unique) / 2**30
    rec.set(model="llama3-8b", layers=layers, params=params, alias_source=alias_source, unique_inputs=len(unique),
            weights_fp32_gib=round(weights_gib, 1), budget_source=budget_source,
            card_total_gib=round(total / 2**30, 1), card_free_gib=round(free / 2**30, 1) if free else None,
            stored_packed_both_statistics_gib=round(stored, 1),
            arithmetic={k: round(v, 2) if isinstance(v, float) else v for k, v in arithmetic("llama3-8b").items()},
            notes="predicted peak = fp32 weights (calibration.dtype) + the largest group's fp32 sums + one sample's "
                  "two fp32 products of the widest input; activations of a batch (no logits: the forward stops "
                  "before the LM head) come on top")


def summary_lines(r: dict) -> list[str]:
    """The numbers of part (c): the model, then a line per budget."""
    out = []
    g = r.get
    if g("plans"):
        out.append(f"{g('layers')} layers, {g('unique_inputs')} unique inputs ({g('alias_source')}); fp32 weights "
                   f"{g('weights_fp32_gib')} GiB; card {g('card_total_gib')} GiB; stored (packed, both "
                   f"statistics) {g('stored_packed_both_statistics_gib')} GiB; lnull's budget: {g('budget_source')}")
        for p in r["plans"]:
            out.append(f"budget {p['budget_gib']} GiB{' (lnull’s choice here)' if p['chosen_by_lnull'] else ''}: "
                       f"{p['groups']} groups, largest {p['max_group_device_fp32_gib']} GiB on the device / "
                       f"{p['max_group_host_fp64_gib']} GiB fp64 on the host, predicted device peak "
                       f"{p['predicted_device_peak_gib']} GiB ({'fits' if p['fits_card'] else 'does NOT fit'})")
    return out
