"""CorDA-KPM side by side: lnull's calibrate + init against PEFT's ``preprocess_corda`` + ``get_peft_model``.

    python benchmarks/bench_corda_vs_peft.py [--rounds 2] [--out results/benchmarks/corda_vs_peft.json]
                                             [overrides ...]   (default: +experiment=demo method=corda_kpm)

Both sides get the same model (the experiment's ``model.name_or_path`` resolved as lnull does, fp32, CPU) and
the same calibration windows (``lnull.calibrate.calibration_windows`` of the experiment's calibration config;
the script checks that lnull's calibrate built exactly these):

- lnull: ``calibrate.collect_into`` (model load, forwards and both statistics, written to disk) then
  ``initialize.build`` with ``method=corda_kpm`` (model load, per-layer maths, writing ``base/`` + ``adapter/``);
- PEFT: model load, ``preprocess_corda`` with ``CordaConfig(corda_method="kpm")`` (its hooks want one window
  per forward, so one forward per window), then ``get_peft_model`` with ``init_lora_weights="corda"``
  (PEFT writes nothing to disk).

The runs alternate (lnull, PEFT, lnull, PEFT, ...) in one process, so machine load hits both alike; the ratio
is PEFT's median total over lnull's (> 1: lnull is faster). Breakdown per side: ``load`` (model loads),
``forward`` (forwards and statistics), ``decomposition`` (lnull: inside the method's per-layer function; PEFT:
``collect_eigens``, its damped inverse + SVD per module) and ``rest``.

Accuracy (last round; by default the modules of the first, middle and last layer): each side's adapter s B A
against an fp64 reference of the same maths on that side's own statistic (PEFT's algorithm, every step in
fp64: damping doubled until ||C_fix C_fix^-1 - I||_F < 0.05, full thin SVD of W0 C_fix, Vh C_fix^-1, the r
smallest), max over modules of ||s B A - ref||_F / ||ref||_F; and the two statistics against each other (one
definition: mean over windows of (x/|max x|)^T (x/|max x|), x one window's activations [tokens, d_in]).

Runs against whichever ``lnull`` is importable (the result records which).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

DEFAULT = ["+experiment=demo", "method=corda_kpm"]


class Clock:
    """Seconds spent inside wrapped callables, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
        return wrapped

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def reference_kpm(W0: torch.Tensor, C: torch.Tensor, rank: int) -> torch.Tensor:
    """PEFT's ``collect_eigens_for_layer`` + KPM crop with every step in fp64: U_r S_r (Vh_r C_fix^-1), i.e. the
    s B A of its ``corda_init`` [d_out, d_in]."""
    W, C = W0.double(), C.double()
    eye = torch.eye(C.shape[0], dtype=torch.float64)
    damp = 0.01
    while True:
        fixed = C + eye * torch.diagonal(C).mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    return U[:, -rank:] @ torch.diag(S[-rank:]) @ (Vh @ inv)[-rank:]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def run_lnull(cfg: dict, tmp: Path, clock: Clock, windows_seen: list) -> dict[str, Any]:
    from lnull import calibrate, initialize
    from lnull.methods import REGISTRY

    cal, out = Path(tempfile.mkdtemp(dir=tmp)), Path(tempfile.mkdtemp(dir=tmp))
    method = REGISTRY[cfg["method"]["name"]]
    originals = (calibrate.load_model, initialize.load_model, calibrate.calibration_windows, method.init)

    def record_windows(*args: Any, **kwargs: Any) -> Any:
        windows_seen.append(originals[2](*args, **kwargs))
        return windows_seen[-1]

    calibrate.load_model = clock.wrap("load", originals[0])
    initialize.load_model = clock.wrap("load", originals[1])
    calibrate.calibration_windows = record_windows
    method.init = clock.wrap("decomposition", originals[3])
    try:
        start = time.perf_counter()
        calibrate.collect_into(cfg, cal)
        mid = time.perf_counter()
        load_cal = clock.seconds.get("load", 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            initialize.build(cfg, out, cal)
        end = time.perf_counter()
    finally:
        calibrate.load_model, initialize.load_model, calibrate.calibration_windows, method.init = originals
    s = clock.take()
    times = {"total": end - start, "calibrate": mid - start, "init": end - mid, "load": s.get("load", 0.0),
             "forward": mid - start - load_cal, "decomposition": s.get("decomposition", 0.0)}
    times["rest"] = times["init"] - (times["load"] - load_cal) - times["decomposition"]
    return {"times": times, "calibration": cal, "init": out}


def run_peft(path: str, cfg: dict, windows: torch.Tensor, clock: Clock) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import corda
    from peft.tuners.lora.config import CordaConfig

    from lnull.modeling import load_model

    mcfg, meth = cfg["model"], cfg["method"]
    originals = (corda.calib_cov_distribution, corda.collect_eigens)
    corda.calib_cov_distribution = clock.wrap("forward", originals[0])
    corda.collect_eigens = clock.wrap("decomposition", originals[1])
    try:
        start = time.perf_counter()
        model = load_model(path, "float32", "cpu")
        loaded = time.perf_counter()
        config = LoraConfig(r=meth["rank"], lora_alpha=meth["alpha"] if meth["alpha"] is not None else meth["rank"],
                            target_modules=list(mcfg["target_modules"]), init_lora_weights="corda",
                            lora_dropout=meth["dropout"], task_type="CAUSAL_LM",
                            corda_config=CordaConfig(corda_method="kpm", prune_temporary_fields=False))
        with torch.no_grad():  # PEFT's hook wants one window per forward
            corda.preprocess_corda(model, config, run_model=lambda: [model(input_ids=w[None]) for w in windows])
        covariances = {n: m.covariance_matrix for n, m in model.named_modules() if hasattr(m, "covariance_matrix")}
        originals_w = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in covariances}
        peft_model = get_peft_model(model, config)
        end = time.perf_counter()
    finally:
        corda.calib_cov_distribution, corda.collect_eigens = originals
    s = clock.take()
    times = {"total": end - start, "load": loaded - start, "forward": s.get("forward", 0.0),
             "decomposition": s.get("decomposition", 0.0)}
    times["rest"] = times["total"] - times["load"] - times["forward"] - times["decomposition"]
    return {"times": times, "model": peft_model, "covariances": covariances, "weights": originals_w}


def layer_of(name: str) -> int:
    """The decoder layer index in a module name (``model.layers.<i>.self_attn.q_proj``), -1 when none."""
    parts = name.split(".")
    return next((int(p) for p in parts if p.isdigit()), -1)


def accuracy(lnull_run: dict, peft_run: dict, cfg: dict, layers: set[int] | None) -> dict[str, Any]:
    from safetensors.torch import load_file

    from lnull.activations import CalibrationStats
    from lnull.initialize import lora_scale

    rank, scale = cfg["method"]["rank"], lora_scale(cfg["method"])
    ours = {}
    for f in sorted((lnull_run["init"] / "adapter").glob("*.safetensors")):
        ours.update(load_file(str(f)))
    stats = CalibrationStats(lnull_run["calibration"])
    peft_model, weights = peft_run["model"], peft_run["weights"]
    rows = {}
    for name, C_peft in peft_run["covariances"].items():
        if layers is not None and layer_of(name) not in layers:
            continue
        W0 = weights[name]
        key = f"base_model.model.{name}"
        A, B = ours[f"{key}.lora_A.weight"], ours[f"{key}.lora_B.weight"]
        C_ours = stats.get(name, "max_normalized_covariance")
        ref_ours = reference_kpm(W0, C_ours, rank)
        ref_peft = reference_kpm(W0, C_peft, rank)
        layer = peft_model.base_model.model.get_submodule(name)
        pB, pA = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
        s_peft = layer.scaling["default"]
        ba_ours = scale * B.double() @ A.double()
        ba_peft = s_peft * pB.double() @ pA.double()
        rows[name] = {"lnull_vs_fp64_ref": rel(ba_ours, ref_ours), "peft_vs_fp64_ref": rel(ba_peft, ref_peft),
                      "statistic_lnull_vs_peft": rel(C_ours, C_peft),
                      "fp64_ref_lnull_stat_vs_peft_stat": rel(ref_ours, ref_peft),
                      "lnull_vs_peft": rel(ba_ours, ba_peft)}
    summary = {k: max(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
    worst = {k: max(rows, key=lambda n: rows[n][k]) for k in summary}
    return {"max": summary, "worst_module": worst, "modules": len(rows),
            "layers": sorted(layers) if layers is not None else "all", "per_module": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternating lnull/PEFT rounds (median reported)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--accuracy-layers", default="first,middle,last",
                        help="decoder layers whose modules get the fp64 reference (comma-separated indices, "
                             "first/middle/last, or all); each reference is a full fp64 SVD per module and side")
    parser.add_argument("--note", default="", help="what else ran on the machine (stored with the result)")
    args, overrides = parser.parse_known_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lnull
    from lnull.calibrate import calibration_windows, resolve_source
    from lnull.cli import compose
    from lnull.modeling import load_tokenizer, resolve_model

    clock = Clock()
    rows: dict[str, list] = {"lnull": [], "peft": []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose((overrides or DEFAULT) + [f"run.dir={Path(tmp) / 'run'}", "progress=false"])
        cal, mcfg = cfg["calibration"], cfg["model"]
        if cal["official"]:
            raise SystemExit("this benchmark uses lnull's token windows (calibration.official=false)")
        path = resolve_model(mcfg["name_or_path"], cfg.get("cache_dir"))
        _, records = resolve_source(cal["dataset"], cfg.get("cache_dir"))
        windows = calibration_windows(load_tokenizer(path), [r[cal["field"]] for r in records], cal["samples"],
                                      cal["seqlen"], cal["seed"], mcfg["add_bos"])
        load_avg = [os.getloadavg()]
        for i in range(args.rounds):
            seen: list = []
            ours = run_lnull(cfg, Path(tmp), clock, seen)
            assert len(seen) == 1 and torch.equal(seen[0], windows), "lnull calibrated on other windows"
            rows["lnull"].append(ours["times"])
            print(f"round {i + 1} lnull {json.dumps({k: round(v, 2) for k, v in ours['times'].items()})}", flush=True)
            theirs = run_peft(path, cfg, windows, clock)
            rows["peft"].append(theirs["times"])
            print(f"round {i + 1} peft  {json.dumps({k: round(v, 2) for k, v in theirs['times'].items()})}",
                  flush=True)
            load_avg.append(os.getloadavg())
            if i + 1 < args.rounds:
                del theirs
        n_layers = 1 + max(layer_of(n) for n in theirs["covariances"])
        named = {"first": 0, "middle": n_layers // 2, "last": n_layers - 1}
        layers = None if args.accuracy_layers == "all" else {
            named[x] if x in named else int(x) for x in args.accuracy_layers.split(",")}
        acc = accuracy(ours, theirs, cfg, layers)
        print(json.dumps(acc["max"]), flush=True)

    median = {side: {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
              for side, runs in rows.items()}
    ratio = {"total": round(median["peft"]["total"] / median["lnull"]["total"], 3),
             "decomposition": round(median["peft"]["decomposition"] / median["lnull"]["decomposition"], 3)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    result = {"what": "CorDA-KPM calibrate + init, lnull vs PEFT preprocess_corda + get_peft_model (CPU)",
              "overrides": overrides or DEFAULT, "model": mcfg["name_or_path"], "rank": cfg["method"]["rank"],
              "windows": f"{cal['samples']} x {cal['seqlen']}", "lnull_batch_size": cal["batch_size"],
              "peft_batch_size": 1, "rounds": args.rounds,
              "speed_ratio_peft_over_lnull": ratio, "median_seconds": median, "runs": rows,
              "accuracy": {k: acc[k] for k in ("max", "worst_module", "modules", "layers")},
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": load_avg,
              "machine_note": args.note, "lnull": str(Path(lnull.__file__).parent), "commit": commit,
              "torch": torch.__version__, "peft": __import__("peft").__version__, "platform": platform.platform(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps({k: result[k] for k in ("speed_ratio_peft_over_lnull", "median_seconds", "load_average")}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
