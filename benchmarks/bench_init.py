"""Init time per method on one model (CPU or GPU), from one shared calibration.

    python benchmarks/bench_init.py +experiment=demo method.rank=8 [--methods lora,pissa] [--out FILE]

Calibrates once (the experiment's calibration config), then times `lnull.initialize.run` for each
method: the per-layer maths (`init_seconds`, from init/report.json) and the whole stage including model
load and saving base + adapter (`stage_seconds`).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lnull import calibrate, initialize
from lnull.cli import compose
from lnull.methods import REGISTRY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(m for m in REGISTRY if m != "full"))
    parser.add_argument("--out", type=Path)
    args, overrides = parser.parse_known_args()
    base = compose(overrides + ["progress=false"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cal = Path(tmp, "calibration")
        cal.mkdir()
        start = time.perf_counter()
        calibrate.collect_into(base, cal)
        print(f"calibration: {time.perf_counter() - start:.1f}s", file=sys.stderr)
        for name in args.methods.split(","):
            cfg = compose(overrides + ["progress=false", f"method={name}"])
            out = Path(tmp, name)
            out.mkdir()
            start = time.perf_counter()
            initialize.build(cfg, out, cal)
            stage = time.perf_counter() - start
            report = json.loads((out / "report.json").read_text())
            rows.append({"method": name, "init_seconds": round(report["seconds"], 3),
                         "stage_seconds": round(stage, 3),
                         "max_reconstruction_rel_err": report.get("max_reconstruction_rel_err")})
            print(f"{name:<14} init {rows[-1]['init_seconds']:>8.2f}s  stage {stage:>8.2f}s  "
                  f"max rel err {rows[-1]['max_reconstruction_rel_err']}", flush=True)
    result = {"model": base["model"]["name"], "rank": base["method"]["rank"], "threads": torch.get_num_threads(),
              "cuda": torch.cuda.is_available(), "platform": platform.platform(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
