"""Peak memory of `lnull calibrate` beyond the weights, with and without a device budget, on a shaped model.

    python benchmarks/calibration_memory.py [--preset llama3-8b] [--layers 2] [--budgets none,2] [--out FILE]

Builds a random model with a real model's layer shapes (benchmarks/shaped_model.py), then runs the calibrate
stage once per budget, each in a fresh process: peak memory is the process's max RSS on the CPU, or
``torch.cuda.max_memory_allocated`` on a GPU, minus what it held once the model was loaded. It prints the
arithmetic of the statistics' sums (both statistics, per layer and for the full depth of the preset) next to
the measurement; the sums of L layers are L times one layer's, and grouping caps what is resident at once.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shaped_model import PRESETS, build  # noqa: E402

FULL_DEPTH = {"llama2-7b": 32, "llama3-8b": 32, "llama3.2-3b": 28, "smollm2-135m": 30}


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def child(model_dir: str, budget: str, samples: int, seqlen: int) -> None:
    """Run the calibrate stage in this process and print one JSON line of its memory."""
    from lnull import calibrate
    from lnull.cli import compose

    cfg = compose(["+experiment=tiny", f"model.name_or_path={model_dir}", "progress=false",
                   f"calibration.samples={samples}", f"calibration.seqlen={seqlen}", "calibration.batch_size=2",
                   f"calibration.device_budget_gb={'null' if budget == 'none' else budget}"])
    from lnull.modeling import load_model  # the same load the stage does, to learn the weights' footprint

    cuda = torch.cuda.is_available()
    model = load_model(model_dir, "float32", "cuda" if cuda else "cpu")
    weights = torch.cuda.memory_allocated() / 2**30 if cuda else rss_gb()
    del model
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = calibrate.collect_into(cfg, Path(out))
        seconds = time.perf_counter() - start
        stored = sum(p.stat().st_size for p in Path(out).glob("stats*")) / 2**30
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else rss_gb()
    print(json.dumps({"budget_gb": None if budget == "none" else float(budget), "groups": summary["groups"],
                      "after_load_gb": round(weights, 2), "peak_gb": round(peak, 2),
                      "beyond_weights_gb": round(peak - weights, 2), "seconds": round(seconds, 1),
                      "stored_gb": round(stored, 2), "memory": "cuda allocated" if cuda else "process max RSS"}))


def arithmetic(preset: str) -> dict[str, float]:
    """GiB of both statistics' sums per layer (unique inputs: qkv, o, gate/up share hidden; down reads inter)."""
    hidden, inter, *_ = PRESETS[preset]
    numbers = 2 * (3 * hidden ** 2 + inter ** 2)
    depth = FULL_DEPTH[preset]
    return {"per_layer_fp32_gb": numbers * 4 / 2**30, "per_layer_fp64_gb": numbers * 8 / 2**30,
            "full_depth_layers": depth, "full_depth_fp32_gb": depth * numbers * 4 / 2**30,
            "full_depth_fp64_gb": depth * numbers * 8 / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--budgets", default="none,2")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.samples, args.seqlen)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        params = build(args.preset, args.layers, "float32", Path(tmp))
        for budget in args.budgets.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", tmp, budget, "--samples", str(args.samples),
                                  "--seqlen", str(args.seqlen)], capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    result = {"preset": args.preset, "layers": args.layers, "params": params, "weights_fp32_gb": params * 4 / 2**30,
              "windows": f"{args.samples} x {args.seqlen}", "arithmetic": arithmetic(args.preset), "runs": rows,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
              "cuda": torch.cuda.is_available(), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
