"""The one-call GPU check (benchmarks/gpu/) cannot rot: its dry run (the same driver on the CPU at tiny sizes)
writes all five parts, each with numbers or a reason, and part (a), the whole `lnull run`, completes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUMBERS = {"a": ["calibration", "eigh", "init", "train", "eval", "run_s"], "b": ["rows"], "c": ["plans"],
           "d": ["results", "ratio_lnull_over_hf"], "e": ["lnull", "peft", "ratio_lnull_corda_over_peft"]}


def test_gpu_check_dry_run_writes_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run([str(REPO / "benchmarks/gpu/smoke.sh"), "--dry-run", "--work", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert report["mode"].startswith("dry-run")
    assert set(report["parts"]) == set("abcde")
    for part, keys in NUMBERS.items():
        result = report["parts"][part]
        status = result["status"]
        assert f"## ({part})" in markdown and status in markdown
        if status.startswith("skipped: "):
            assert len(status) > len("skipped: "), f"part {part} skipped without a reason"
            continue
        assert status == "ok", f"part {part}: {status}\n" + "\n".join(result.get("log_tail", []))
        assert all(result.get(k) is not None for k in keys), f"part {part} lacks some of {keys}: {sorted(result)}"

    a = report["parts"]["a"]
    assert a["status"] == "ok"  # the whole lnull run, checked by the part itself: groups, eigh device, checkpoint
    assert a["calibration"]["groups"] > 1 and len(a["calibration"]["files"]) == a["calibration"]["groups"] + 1
    assert a["eigh"]["devices"] == ["cpu"] and a["eigh"]["calls"] == 4 * 2  # 4 unique inputs x 2 layers
    assert a["checkpoint_saves"] >= 1 and a["train"]["steps"] == 2
    assert {e["model"] for e in a["eval"]} == {"base", "trained"}
    b = report["parts"]["b"]["rows"]
    assert [r["n"] for r in b] == [64, 128, 176] and all(r["eigh_fp64"]["s"] >= 0 for r in b)
    d = report["parts"]["d"]["results"]
    assert set(d["lnull"]) == set(d["hf_trainer_peft"]) == {"mb1", "mb4", "mb8"}
    assert all(v["tokens_per_s"] > 0 for side in d.values() for v in side.values())
    assert report["parts"]["c"]["plans"][0]["groups"] >= 1
