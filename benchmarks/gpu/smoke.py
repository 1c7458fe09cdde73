"""The one-call GPU check (issue 24 part 4): five parts, each under its own time limit, into gpu_check.{json,md}.

    python benchmarks/gpu/smoke.py --out DIR              # on one GPU (benchmarks/gpu/smoke.sh: <= 8 minutes on an H100)
    python benchmarks/gpu/smoke.py --out DIR --dry-run    # the same parts on the CPU at tiny sizes (tests/test_gpu_check.py)

Parts (run in this order; a part that fails, times out or cannot run records ``failed: <one line>`` or
``skipped: <why>`` with whatever numbers it had, and the next part runs):

(c) calibration's memory plan at full LLaMA-3-8B depth: lnull's own grouping (``activations.plan_groups``) of a
    32-layer model built on the meta device, under the budget lnull would pick here, against the card's memory.
(a) the whole ``lnull run`` on a 2-layer LLaMA-2-7B-shaped random model in bf16: LoRA-Null v1 (r=128), calibration
    split in groups (``calibration.device_budget_gb``), eigendecompositions on ``device``, training with a
    checkpoint (``train.checkpoint_every``), evaluation on synthetic facts (``eval=synthetic``: no network, no
    lm-eval). Counts checkpoint saves, eigh calls and their device, the calibration groups, peak GPU memory.
(b) fp64 ``eigh`` of an n x n SPD matrix, fp64 thin SVD of a 4096 x n matrix (a weight's shape: PiSSA/MiLoRA),
    bf16 / fp32 n x n x n GEMM (TF32 off), n = 4096, 11008, 14336.
(e) calibrate + init of LoRA-Null (and lnull's CorDA-KPM) vs PEFT's CorDA-KPM (``preprocess_corda`` +
    ``get_peft_model``) on the same 2 LLaMA-2-7B-shaped layers and windows; per-layer seconds, x 32 extrapolated.
(d) training tokens/s, lnull's train stage (``lnull.train.train_into``) vs HF Trainer + PEFT LoRA r=128 on a
    full-depth (32-layer) LLaMA-2-7B-shaped bf16 model, same examples in the same order, batch 8 at micro-batch
    1 / 4 / 8, lnull then HF at each size (HF's PEFT model stays on the device); the first optimizer step of each
    is a warm-up and not timed.

Each part runs in a child process (a fresh interpreter on the GPU; forked from this pre-imported one in a dry run,
where imports cost more than the parts) killed with its process group at its limit; the whole run keeps to
``--budget-s`` (parts that would start with less than their minimum left are skipped). Models are random with
real layer shapes (benchmarks/shaped_model.py's presets and tokenizer): timings depend on shapes, not weights.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/: shaped_model
sys.path.insert(0, str(HERE))  # benchmarks/gpu/: the parts (a child gets this sys.path: forked, or spawn's copy)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from parts import calibrate_init, memory_plan, rates, run_pipeline, train_speed  # noqa: E402

# The parts, a module each: ``run(spec, work, dry, rec)`` in the child, ``summary_lines(result)`` for the report.
PARTS = {"a": run_pipeline, "b": rates, "c": memory_plan, "d": train_speed, "e": calibrate_init}
ORDER = ["c", "a", "b", "e", "d"]
TITLES = {"a": "lnull run, 2-layer LLaMA-2-7B shape, bf16", "b": "fp64 eigh / SVD, bf16 / fp32 GEMM",
          "c": "calibration memory plan, LLaMA-3-8B full depth", "d": "training tokens/s, lnull vs HF Trainer + PEFT",
          "e": "calibrate + init, LoRA-Null vs PEFT CorDA-KPM"}

# Sizes and limits (seconds): the GPU run, and the dry run on a CPU.
REAL = {
    "a": {"limit": 150, "min": 60, "layers": 2, "rank": 128, "samples": 32, "seqlen": 512, "cal_batch": 8,
          "budget_gb": 1.0, "steps": 4, "batch": 8, "micro": 4, "checkpoint_every": 2, "eval_limit": 16},
    "b": {"limit": 100, "min": 20, "sizes": [4096, 11008, 14336], "svd_rows": 4096, "reps": 5},
    "c": {"limit": 40, "min": 10},
    "d": {"limit": 240, "min": 90, "layers": 32, "rank": 128, "batch": 8, "micro": [1, 4, 8], "steps": 3,
          "dtype": "bfloat16"},
    "e": {"limit": 100, "min": 40, "layers": 2, "rank": 128, "samples": 64, "seqlen": 1024, "cal_batch": 8},
}
DRY = {
    "a": {"limit": 45, "min": 5, "layers": 2, "rank": 4, "samples": 8, "seqlen": 32, "cal_batch": 4,
          "budget_gb": 0.0003, "steps": 2, "batch": 4, "micro": 2, "checkpoint_every": 1, "eval_limit": 2},
    "b": {"limit": 20, "min": 2, "sizes": [64, 128, 176], "svd_rows": 64, "reps": 2},
    "c": {"limit": 20, "min": 2},
    # fp32 here: bf16 matmuls on a CPU are slow paths (HF's bf16 step took 13x its fp32 step on 2 cores)
    "d": {"limit": 45, "min": 5, "layers": 2, "rank": 4, "batch": 8, "micro": [1, 4, 8], "steps": 2,
          "dtype": "float32"},
    "e": {"limit": 30, "min": 3, "layers": 2, "rank": 4, "samples": 8, "seqlen": 32, "cal_batch": 4},
}


# ------------------------------------------------------------------------------------------------ the parent

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="gpu_check.json / gpu_check.md go here")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, short limits")
    parser.add_argument("--budget-s", type=float, default=None, help="whole run (default 450 on a GPU, 100 dry)")
    parser.add_argument("--parts", default=",".join(ORDER), help="comma-separated subset of a,b,c,d,e")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--setup", type=Path, default=None, help="smoke.sh's install report, included as is")
    args = parser.parse_args()
    dry = args.dry_run
    sizes = DRY if dry else REAL
    budget = args.budget_s or (100.0 if dry else 450.0)
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if dry:  # forked children share these imports (no CUDA is touched here: fork is safe)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # a shared CPU: spinning thread pools cost more than they give
        import importlib

        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        for module in ("transformers", "peft", "lnull.calibrate", "lnull.cli", "lnull.initialize", "lnull.train"):
            importlib.import_module(module)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"mode": "dry-run (CPU, tiny sizes)" if dry else "gpu", "started": time.strftime(
        "%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget, "host": platform.node(), "python": platform.python_version(),
        "setup": json.loads(args.setup.read_text()) if args.setup and args.setup.exists() else None, "parts": {}}
    wanted = [p for p in ORDER if p in args.parts.split(",")]
    for part in ORDER:
        if part not in wanted:
            report["parts"][part] = {"status": "skipped: not asked for (--parts)"}
    try:
        for part in wanted:
            left = budget - (time.monotonic() - start)
            spec = sizes[part]
            if left < spec["min"]:
                report["parts"][part] = {"status": f"skipped: {left:.0f} s of the {budget:.0f} s budget left, "
                                                   f"the part needs at least {spec['min']} s"}
            else:
                limit = min(spec["limit"], left)
                print(f"[gpu-check] part {part} ({TITLES[part]}), limit {limit:.0f} s", flush=True)
                report["parts"][part] = run_part(part, spec, limit, work, dry)
                print(f"[gpu-check] part {part}: {report['parts'][part]['status']} "
                      f"({report['parts'][part]['seconds']} s)", flush=True)
            write(report, args.out, time.monotonic() - start)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write(report, args.out, time.monotonic() - start)
    print((args.out / "gpu_check.md").read_text())
    return 0


def run_part(part: str, spec: dict, limit: float, work: Path, dry: bool) -> dict:
    """One part in a child process under ``limit`` seconds: its result file, with ``status`` and ``seconds``."""
    result_file, log_file = work / f"part-{part}.json", work / f"part-{part}.log"
    result_file.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("fork" if dry else "spawn")
    proc = ctx.Process(target=child, args=(part, spec, str(work), dry, str(result_file), str(log_file)))
    start = time.monotonic()
    proc.start()
    proc.join(limit)
    timed_out = proc.is_alive()
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: its subprocesses go too
        except ProcessLookupError:
            pass
        proc.join(10)
    seconds = round(time.monotonic() - start, 1)
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    status = result.get("status")
    if timed_out:
        status = f"failed: timed out after {limit:.0f} s" + (f" (during {result['doing']})" if result.get("doing")
                                                              else "")
    elif proc.exitcode != 0 and not (status or "").startswith(("failed", "skipped")):
        status = f"failed: exit code {proc.exitcode} ({last_line(log_file)})"
    elif not status or status == "running":
        status = "failed: the part wrote no result"
    result.update(status=status, seconds=seconds, limit_s=round(limit))
    result.pop("doing", None)
    if status.startswith("failed"):
        result["log_tail"] = tail(log_file, 15)
    return result


def last_line(path: Path) -> str:
    lines = tail(path, 1)
    return lines[0] if lines else "no output"


def tail(path: Path, n: int) -> list[str]:
    if not path.exists():
        return []
    lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    return [l[:300] for l in lines[-n:]]


# ------------------------------------------------------------------------------------------------ the child

class Recorder:
    """A part's result, rewritten to its file at every ``set`` so a killed part keeps what it measured."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.data: dict[str, Any] = {"status": "running"}

    def set(self, **values: Any) -> None:
        self.data.update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def doing(self, what: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)
        self.set(doing=what)


def child(part: str, spec: dict, work: str, dry: bool, result_file: str, log_file: str) -> None:
    os.setsid()
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    rec = Recorder(result_file)
    try:
        import torch

        if not dry and not torch.cuda.is_available():
            rec.set(device=device_info(True), status="skipped: no CUDA device (use --dry-run on a CPU)")
            return
        rec.set(device=device_info(dry))
        PARTS[part].run(spec, Path(work), dry, rec)
        if rec.data["status"] == "running":
            rec.set(status="ok")
    except BaseException as exc:  # one line in the report, the traceback in the log
        traceback.print_exc()
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        rec.set(status=f"failed: {line}")
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # fork children: no atexit handlers of the parent


def device_info(dry: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if not dry:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, multiprocessors=props.multi_processor_count)
    else:
        info.update(gpu=None, cpu_count=os.cpu_count())
    return info


# ------------------------------------------------------------------------------------------------ the report

def write(report: dict, out: Path, elapsed: float) -> None:
    report["elapsed_s"] = round(elapsed, 1)
    envs = [p.get("device") for p in report["parts"].values() if isinstance(p, dict) and p.get("device")]
    report["device"] = envs[0] if envs else None
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    dev = report.get("device") or {}
    lines = [f"# GPU check ({report['mode']})", "",
             f"{report['started']} · {dev.get('gpu') or 'CPU'} · torch {dev.get('torch')} · Python "
             f"{report['python']} · {report['elapsed_s']} s of a {report['budget_s']:.0f} s budget", ""]
    setup = report.get("setup")
    if setup:
        lines += [f"Setup: resolver {setup.get('resolver')}, install {setup.get('install')} "
                  f"({len(setup.get('installed', []))} wheels from .whl/)", ""]
    for part in ORDER:
        r = report["parts"].get(part)
        if r is None:
            continue
        lines += [f"## ({part}) {TITLES[part]}", "", f"**{r['status']}**" + (f" — {r['seconds']} s of {r['limit_s']} s"
                                                                          if "seconds" in r else ""), ""]
        table = False
        for line in PARTS[part].summary_lines(r):  # bullets, then any table rows ("| ...") after a blank line
            if line.startswith("|") and not table:
                if lines[-1]:
                    lines.append("")
                table = True
            lines.append(line if line.startswith("|") else f"- {line}")
        if r.get("log_tail"):
            lines += ["", "```", *r["log_tail"][-6:], "```"]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
