"""Calibrate and init wall time, LM head calls and decompositions per layer (CPU-runnable).

    python benchmarks/bench_calibrate_init.py [--models tiny,smollm2,llama3-8b-shaped] [--methods lora_null_v1,corda_kpm]
                                              [--repeat 3] [--out FILE]

Models: ``tiny`` (the offline tiny LLaMA, default), ``smollm2`` (the ``lnull assets`` SmolLM2-135M-Instruct; used by
default when its asset is in the cache, skipped otherwise), ``<preset>-shaped`` (a random model with a real model's
layer shapes and vocabulary, ``--layers`` layers, benchmarks/shaped_model.py; weights do not change timings).
Calibration runs ``--repeat`` times (median reported) with the model's experiment windows (tiny: 16 x 64; others
``--samples`` x ``--seqlen``), counting forward calls of the LM head; init runs each method once on the last
calibration, counting ``torch.linalg.eigh``, ``inv`` and ``lu_factor`` calls (CorDA's damped inverse may call inv
more than once when it doubles the damping). Runs against whichever ``lnull`` is importable, so
``PYTHONPATH=<checkout of another commit>`` measures that commit with this script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shaped_model import PRESETS, build  # noqa: E402


# LoRA-Null's eigh; CorDA's damped factorisation: an LU, or PEFT's explicit inverse where bounds cannot certify it
COUNTED = ("eigh", "inv", "lu_factor")


def count_calls(counts: dict[str, float]) -> None:
    """Count the :data:`COUNTED` ``torch.linalg`` calls and their seconds into ``counts`` (patched for the rest of the
    process)."""
    for name in COUNTED:
        original = getattr(torch.linalg, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                counts[f"{_name}_s"] += time.perf_counter() - start
        setattr(torch.linalg, name, wrapped)


def model_overrides(name: str, tmp: Path, layers: int, samples: int, seqlen: int) -> list[str] | None:
    """Hydra overrides for one benchmark model, or None when it is not available here."""
    from lnull.assets import asset_path

    if name == "tiny":
        return []
    windows = [f"calibration.samples={samples}", f"calibration.seqlen={seqlen}"]
    if name == "smollm2":
        try:
            asset_path("smollm2-135m-instruct")
        except Exception:
            return None
        return ["model=smollm2_135m", *windows]
    preset = name.removesuffix("-shaped")
    if preset not in PRESETS or not name.endswith("-shaped"):
        raise SystemExit(f"unknown model '{name}' (tiny, smollm2, <preset>-shaped with preset in {sorted(PRESETS)})")
    folder = tmp / name
    build(preset, layers, "float32", folder)
    return [f"model.name_or_path={folder}", f"model.name={name}", *windows]


def bench(name: str, overrides: list[str], methods: list[str], repeat: int, tmp: Path, counts: dict[str, float]
          ) -> dict:
    from lnull import calibrate, initialize
    from lnull.cli import compose
    from lnull.testing import counting_head_calls

    base = ["+experiment=tiny", f"run.dir={tmp / 'run'}", "progress=false", *overrides]
    cfg = compose(base)
    head_calls = [0]
    load = calibrate.load_model
    calibrate.load_model = counting_head_calls(load, head_calls)
    seconds = []
    try:
        for i in range(repeat):
            cal = tmp / f"{name}-cal-{i}"
            cal.mkdir()
            start = time.perf_counter()
            calibrate.collect_into(cfg, cal)
            seconds.append(time.perf_counter() - start)
    finally:
        calibrate.load_model = load
    meta = json.loads((cal / "meta.json").read_text())
    layers = len({k.split(".self_attn")[0].split(".mlp")[0] for k in meta["alias"]})
    row = {"model": name, "windows": f"{cfg['calibration']['samples']} x {cfg['calibration']['seqlen']}",
           "layers": layers, "calibrate_seconds": [round(s, 3) for s in seconds],
           "calibrate_median_s": round(statistics.median(seconds), 3), "lm_head_calls": head_calls[0],
           "lm_head_calls_per_calibration": head_calls[0] / repeat, "init": []}
    print(f"{name:<18} calibrate median {row['calibrate_median_s']:.3f}s of {row['calibrate_seconds']}  "
          f"LM head calls per calibration {row['lm_head_calls_per_calibration']:g}", flush=True)
    for method in methods:
        out = tmp / f"{name}-{method}"
        out.mkdir()
        counts.update({**{n: 0 for n in COUNTED}, **{f"{n}_s": 0.0 for n in COUNTED}})
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            initialize.build(compose(base + [f"method={method}"]), out, cal)
        stage = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
        entry = {"method": method, "init_seconds": round(report["seconds"], 3), "stage_seconds": round(stage, 3),
                 **{f"{n}_calls": counts[n] for n in COUNTED},
                 "decomposition_seconds": round(sum(counts[f"{n}_s"] for n in COUNTED), 3),
                 **{f"{n}_per_layer": counts[n] / layers for n in COUNTED}}
        row["init"].append(entry)
        print(f"{'':<18} init {method:<13} {entry['init_seconds']:>8.3f}s (stage {stage:.3f}s)  "
              + "  ".join(f"{n}/layer {entry[f'{n}_per_layer']:g}" for n in COUNTED)
              + f"  in these {entry['decomposition_seconds']:.3f}s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated; default tiny (+ smollm2 if its asset exists)")
    parser.add_argument("--methods", default="lora_null_v1,corda_kpm", help="comma-separated; '' for none")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2, help="layers of a <preset>-shaped model")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows (not tiny)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per window (not tiny)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    counts = {**{n: 0 for n in COUNTED}, **{f"{n}_s": 0.0 for n in COUNTED}}
    count_calls(counts)
    import lnull

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in (args.models or "tiny,smollm2").split(","):
            overrides = model_overrides(name, Path(tmp), args.layers, args.samples, args.seqlen)
            if overrides is None:
                print(f"{name:<18} skipped: asset not in the cache (lnull assets)", flush=True)
                continue
            rows.append(bench(name, overrides, [m for m in args.methods.split(",") if m], args.repeat, Path(tmp),
                              counts))
    result = {"lnull": str(Path(lnull.__file__).parent), "rows": rows, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), "cuda": torch.cuda.is_available(), "platform": platform.platform(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps({k: result[k] for k in ("lnull", "threads", "load_average")}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
