"""Before/after numbers of the reference-fidelity fixes on one real model (default: the demo's SmolLM2-135M).

    python benchmarks/calibration_fidelity.py +experiment=demo [--questions 200] [--out FILE]

One calibration pass (the experiment's windows, one window per forward) collects per unique layer input the
plain sum x x^T (fp32 and bf16 activations), PEFT's per-sample max-normalised mean, and the old official
rule's max|x|-normalised sum. Then, per module:

1. official rule: windows where max(x).abs() != max|x|, and ||C_signed - C_abs|| / ||C_signed||;
2. CorDA-KPM: BA from the plain sum (before) and from PEFT's statistic (after) vs PEFT's own
   ``preprocess_corda`` (fp32) on the same windows, ||BA - BA_peft|| / ||BA_peft||;
3-4. random A of LoRA-FA: distinct A among the layers, A's std (old: one kaiming draw reseeded per layer);
5. LoRA-Null numerical floor: eigenvalues counted as zero by the old 1e-10 x lambda_max and by the fp32
   noise floor; eigen-gap lambda_{r+1}/lambda_r and captured energy per module type;
6. calibration dtype: energy (under fp32 activations) of the LoRA-Null subspace computed from bf16 vs fp32
   activations, and a knowledge probe: the mean |change| of NQ-Open test answer NLL (lm-eval's nq_open prompt
   "Answer these questions:\\n\\nQ: {question}?\\nA:" + " {answer}") when every targeted weight moves by
   G Q^T with Q the subspace's orthonormal basis and G a fixed random [d_out, r] of norm 5% of ||W0|| -- the
   only kind of update LoRA-Null v2 can make (A frozen). A random subspace (LoRA) is the reference.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics as stats
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from lnull.calibrate import calibration_windows, resolve_source
from lnull.cli import compose
from lnull.data.sources import load_records
from lnull.methods.base import layer_generator
from lnull.methods.corda import init_corda_kpm
from lnull.methods.linalg import captured_energy
from lnull.methods.lora import random_a
from lnull.testing import peft_in_fp64
from lnull.methods.lora_null import null_space
from lnull.modeling import load_model, load_tokenizer, resolve_model, target_linears


class Collector:
    """Per unique input (q/k/v and gate/up aliased): plain, PEFT (signed max) and old (max|x|) statistics."""

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.plain, self.signed, self.abs = {}, {}, {}
        self.windows_differ: dict[str, int] = defaultdict(int)
        self.alias: dict[str, str] = {}
        self.samples = 0
        self._prev = None
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name):
        def hook(_m, inputs, _o):
            x = inputs[0]
            if self._prev is not None and x is self._prev[0]:
                self.alias[name] = self._prev[1]
                return
            self._prev, self.alias[name] = (x, name), name
            x = x.detach().double()[0]  # one window per forward
            signed, absmax = x.max().abs(), x.abs().max()
            self.windows_differ[name] += bool(signed != absmax)
            for store, t in ((self.plain, x), (self.signed, x / signed), (self.abs, x / absmax)):
                store[name] = store.get(name, 0) + t.T @ t
        return hook

    def new_window(self):
        self._prev = None
        self.samples += 1


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]


@contextlib.contextmanager
def perturbed(linears: dict[str, torch.nn.Linear], bases: dict[str, torch.Tensor], size: float):
    """Every linear's weight += G Q^T (G random, fixed per module, ||G Q^T|| = size ||W0||) inside the block."""
    saved = {}
    for name, lin in linears.items():
        Q = bases[name]
        G = torch.randn(lin.weight.shape[0], Q.shape[1], generator=layer_generator(7, name), dtype=torch.float64)
        delta = G @ Q.T
        delta *= size * float(lin.weight.double().norm()) / float(delta.norm())
        saved[name] = lin.weight.data.clone()
        lin.weight.data += delta.to(lin.weight.dtype)
    try:
        yield
    finally:
        for name, lin in linears.items():
            lin.weight.data.copy_(saved[name])


@torch.no_grad()
def answer_nll(model, tokenizer, rows: list[dict], add_bos: bool) -> torch.Tensor:
    """NLL per answer token [n] of each row's first gold answer after lm-eval's nq_open 0-shot context."""
    out = []
    for row in rows:
        context = f"Answer these questions:\n\nQ: {row['question']}?\nA:"
        ctx = ([tokenizer.bos_token_id] if add_bos else []) + tokenizer.encode(context, add_special_tokens=False)
        ans = tokenizer.encode(" " + row["answer"][0], add_special_tokens=False)
        ids = torch.tensor([ctx + ans])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(ctx) - 1:-1].double(), -1)
        out.append(-logp.gather(1, torch.tensor(ans)[:, None]).mean())
    return torch.stack(out)


def peft_corda(path: str, cfg: dict, windows: torch.Tensor, rank: int, fp64: bool):
    """The model after PEFT's ``preprocess_corda`` (KPM) on ``windows``, one per forward; covariances kept."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = load_model(path, "float32")
    model = model.double() if fp64 else model
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=cfg["model"]["target_modules"], init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method="kpm", prune_temporary_fields=False))
    with (peft_in_fp64() if fp64 else contextlib.nullcontext()), torch.no_grad():
        preprocess_corda(model, config, run_model=lambda: [model(input_ids=w[None]) for w in windows])
    return model


def orthonormal_rows(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(A.T.double()).Q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args, overrides = parser.parse_known_args()
    cfg = compose(overrides + ["progress=false"])
    cal, rank = cfg["calibration"], cfg["method"]["rank"]
    path = resolve_model(cfg["model"]["name_or_path"], cfg.get("cache_dir"))
    tok = load_tokenizer(path)
    source, records = resolve_source(cal["dataset"], cfg.get("cache_dir"))
    windows = calibration_windows(tok, [r[cal["field"]] for r in records], cal["samples"], cal["seqlen"], cal["seed"],
                                  cfg["model"]["add_bos"])
    start = time.perf_counter()
    cols = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(path, dtype)
        col = Collector(target_linears(model, cfg["model"]["target_modules"]))
        with torch.no_grad():
            for w in windows:
                col.new_window()
                model(input_ids=w[None], use_cache=False)
        cols[dtype] = col
    col, col16 = cols["float32"], cols["bfloat16"]
    model = load_model(path, "float32")
    linears = target_linears(model, cfg["model"]["target_modules"])
    print(f"calibration: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    unique = [n for n, c in col.alias.items() if n == c]
    n_windows = len(windows)
    out = {"model": cfg["model"]["name"], "calibration": {"source": source, "windows": n_windows,
                                                           "seqlen": cal["seqlen"]}, "rank": rank}

    # 1. official rule
    change = {n: rel(col.abs[n], col.signed[n]) for n in unique}
    out["official_rule"] = {
        "windows_differing_max": max(col.windows_differ[n] for n in unique), "windows": n_windows,
        "modules_with_a_differing_window": sum(col.windows_differ[n] > 0 for n in unique), "unique_inputs": len(unique),
        "C_rel_change_max": max(change.values()),
        "C_rel_change_top": sorted(((round(v, 4), n) for n, v in change.items()), reverse=True)[:5]}

    # 2. CorDA-KPM vs PEFT's own preprocess_corda on the same windows, in fp32 (as PEFT runs) and in fp64
    opts = type("O", (), {"damping": 0.01})
    corda = {}
    for precision in ("fp32", "fp64"):
        peft_model, start = peft_corda(path, cfg, windows, rank, fp64=precision == "fp64"), time.perf_counter()
        before, after, rule = {}, {}, {}
        for name, module in target_linears(peft_model, cfg["model"]["target_modules"]).items():
            e = module.eigens
            reference = e.U_WC.double() @ torch.diag(e.S_WC.double()) @ e.V_WC.double().T
            W0, canon = linears[name].weight.detach(), col.alias[name]
            for store, C in ((before, col.plain[canon].float()), (after, (col.signed[canon] / n_windows).float()),
                             (rule, module.covariance_matrix)):
                res = init_corda_kpm(W0, C, rank, 1.0, opts)
                store[name] = rel(res.B.double() @ res.A.double(), reference)
        corda[f"peft_{precision}"] = {
            "before_plain_sum_max": max(before.values()), "before_plain_sum_median": stats.median(before.values()),
            "after_max": max(after.values()), "after_median": stats.median(after.values()),
            "rule_on_pefts_covariance_max": max(rule.values())}
    out["corda_kpm_vs_peft"] = corda

    # 3-4. LoRA-FA's A
    shapes = {n: tuple(lin.weight.shape) for n, lin in linears.items()}
    old = {n: random_a(rank, s[1], "kaiming_uniform", torch.Generator().manual_seed(0)) for n, s in shapes.items()}
    new = {n: random_a(rank, s[1], "gaussian", layer_generator(0, n)) for n, s in shapes.items()}

    def distinct(As):
        return len({tuple(A.flatten()[:16].tolist()) for A in As.values()})
    d576 = [n for n, s in shapes.items() if s[1] == 576]
    out["lora_fa_A"] = {"layers": len(shapes), "layers_d_in_576": len(d576),
                        "distinct_before": distinct(old), "distinct_after": distinct(new),
                        "distinct_d_in_576_before": distinct({n: old[n] for n in d576}),
                        "std_before_kaiming": float(torch.cat([a.flatten() for a in old.values()]).std()),
                        "std_after_gaussian": float(torch.cat([a.flatten() for a in new.values()]).std()),
                        "gaussian_std_expected_1_over_r": 1 / rank}

    # 5-6. LoRA-Null: floor, gap, energy; fp32 vs bf16 activations
    per_kind = defaultdict(lambda: defaultdict(list))
    bases32, bases16, bases_rand = {}, {}, {}
    old_zero = new_zero = degenerate_old = degenerate_new = 0
    for name in linears:
        canon = col.alias[name]
        C32, C16 = col.plain[canon].float(), cols["bfloat16"].plain[cols["bfloat16"].alias[name]].float()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degeneracy is counted below
            U32, diag = null_space(C32, rank)
            U16, _ = null_space(C16, rank)
        vals = torch.linalg.eigvalsh(C32.double())
        n_old = int((vals <= 1e-10 * vals.abs().max()).sum())
        old_zero, new_zero = old_zero + n_old, new_zero + diag["near_zero"]
        degenerate_old += n_old > rank
        degenerate_new += diag["near_zero"] > rank
        e32, e16 = captured_energy(U32.T, C32), captured_energy(U16.T, C32)
        cosines = torch.linalg.svdvals(U32.T @ U16).clamp(max=1)
        k = per_kind[kind(name)]
        if diag["eigen_gap"] is not None:  # None: lambda_r <= 0 (C has r eigenvalues in its rounding noise)
            k["eigen_gap"].append(diag["eigen_gap"])
        k["energy_fp32"].append(e32)
        k["energy_bf16_over_fp32"].append(e16 / e32 if e32 > 0 else float("nan"))
        k["max_angle_deg_bf16_vs_fp32"].append(math.degrees(math.acos(float(cosines.min()))))
        bases32[name], bases16[name] = U32, U16
        bases_rand[name] = orthonormal_rows(torch.randn(rank, shapes[name][1], generator=layer_generator(3, name),
                                                        dtype=torch.float64))
    out["null_space_floor"] = {"modules": len(linears), "near_zero_total_old_1e-10": old_zero,
                               "near_zero_total_fp32_floor": new_zero, "degenerate_modules_old": degenerate_old,
                               "degenerate_modules_new": degenerate_new}
    out["per_module_type"] = {
        t: {"eigen_gap_min": min(v["eigen_gap"], default=None),
            "eigen_gap_median": stats.median(v["eigen_gap"]) if v["eigen_gap"] else None,
            "energy_fp32_max": max(v["energy_fp32"]),
            "energy_bf16_over_fp32_max": max(v["energy_bf16_over_fp32"]),
            "energy_bf16_over_fp32_median": stats.median(v["energy_bf16_over_fp32"]),
            "max_angle_deg_bf16_vs_fp32": max(v["max_angle_deg_bf16_vs_fp32"])} for t, v in per_kind.items()}

    rows = [r for r in load_records("asset:nq_open/test", cfg.get("cache_dir")) if r["answer"]][:args.questions]
    add_bos = cfg["model"]["add_bos"]
    base = answer_nll(model, tok, rows, add_bos)
    probe = {"questions": len(rows), "base_nll_per_token": float(base.mean()), "perturbation": "5% of ||W0|| per module"}
    deltas = {}
    for label, bases in (("random_subspace", bases_rand), ("null_fp32", bases32), ("null_bf16", bases16)):
        with perturbed(linears, bases, 0.05):
            deltas[label] = d = (answer_nll(model, tok, rows, add_bos) - base).abs()
        probe[label] = {"mean_abs_delta_nll": float(d.mean()), "stderr": float(d.std() / math.sqrt(len(d)))}
    paired = deltas["null_bf16"] - deltas["null_fp32"]
    probe["bf16_minus_fp32_paired"] = {"mean": float(paired.mean()), "stderr": float(paired.std() / math.sqrt(len(paired)))}
    out["knowledge_probe"] = probe
    out["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
                  "cuda": torch.cuda.is_available(), "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(out, indent=2, default=float)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
