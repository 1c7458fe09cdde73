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
import math
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
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/: shaped_model
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ORDER = ["c", "a", "b", "e", "d"]
TITLES = {"a": "lnull run, 2-layer LLaMA-2-7B shape, bf16", "b": "fp64 eigh / SVD, bf16 / fp32 GEMM",
          "c": "calibration memory plan, LLaMA-3-8B full depth", "d": "training tokens/s, lnull vs HF Trainer + PEFT",
          "e": "calibrate + init, LoRA-Null vs PEFT CorDA-KPM"}
TINY = (64, 176, 4, 2, 512)  # hidden, intermediate, heads, kv heads, vocab: the dry run's "7B"

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
        PARTS[part](spec, Path(work), dry, rec)
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


def dims(preset: str, dry: bool) -> tuple[int, int, int, int, int]:
    from shaped_model import PRESETS

    return TINY if dry else PRESETS[preset]


def build_model(out: Path, preset: str, layers: int, dtype: str, dry: bool, keep: list | None = None) -> Path:
    """A random ``preset``-shaped LLaMA (tiny when ``dry``) with the tiny offline tokenizer, saved once under
    ``out``: built on the GPU when there is one (a 7B random init on the CPU takes minutes). ``keep``: a list the
    built model is appended to (on its device) instead of being dropped."""
    if (out / "done").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lnull.tiny import build_tokenizer

    hidden, inter, heads, kv, vocab = dims(preset, dry)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device("cpu" if dry else "cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    if keep is not None:
        keep.append(model)
    del model
    (out / "done").write_text(json.dumps({"preset": preset, "layers": layers, "params": params}))
    return out


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_initialized() else None


def count_eigh(counter: dict) -> None:
    """Count torch.linalg.eigh calls, their seconds and devices (lnull.methods.linalg calls it by attribute)."""
    import torch

    original = torch.linalg.eigh

    def eigh(A, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(A, *args, **kwargs)
        finally:
            counter["calls"] += 1
            counter["seconds"] += time.perf_counter() - start
            counter["devices"].add(str(A.device))
            counter["sizes"].add(A.shape[-1])
    torch.linalg.eigh = eigh


# (a) ------------------------------------------------------------------------------------------------------

def part_a(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
    rec.doing("building the 2-layer model")
    t0 = time.perf_counter()
    model = build_model(work / "llama2-7b-2l", "llama2-7b", spec["layers"], "bfloat16", dry)
    rec.set(model={**json.loads((model / "done").read_text()), "dtype": "bfloat16",
                   "dims": dims("llama2-7b", dry), "build_s": round(time.perf_counter() - t0, 1)})
    runs = work / "runs-a"
    overrides = ["+experiment=tiny", f"model.name_or_path={model}", "model.name=llama2-7b-shaped-2l",
                 "model.dtype=bfloat16", "method=lora_null_v1", f"method.rank={spec['rank']}", "method.alpha=null",
                 f"calibration.samples={spec['samples']}", f"calibration.seqlen={spec['seqlen']}",
                 f"calibration.batch_size={spec['cal_batch']}", f"calibration.device_budget_gb={spec['budget_gb']}",
                 f"device={'cpu' if dry else 'cuda'}", f"train.max_steps={spec['steps']}",
                 f"train.batch_size={spec['batch']}", f"train.micro_batch_size={spec['micro']}",
                 f"train.checkpoint_every={spec['checkpoint_every']}", "train.log_every=1", "train.lr=1e-4",
                 "eval=synthetic", "eval.models=[base,trained]", f"eval.limit={spec['eval_limit']}",
                 f"run.root={runs}", "progress=false"]
    rec.set(command="lnull run " + " ".join(overrides))
    eigh = {"calls": 0, "seconds": 0.0, "devices": set(), "sizes": set()}
    count_eigh(eigh)
    from lnull.training import checkpoint

    saves: list[float] = []
    save = checkpoint.save

    def counting_save(*args, **kwargs):
        t = time.perf_counter()
        try:
            return save(*args, **kwargs)
        finally:
            saves.append(round(time.perf_counter() - t, 2))
    checkpoint.save = counting_save
    from lnull import cli

    rec.doing("lnull run")
    t0 = time.perf_counter()
    try:
        cli.main(["run", *overrides])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"lnull run exited with {exc.code}") from None
    seconds = time.perf_counter() - t0
    run_dir = next(p for p in runs.iterdir() if p.name != "store" and p.is_dir())
    out: dict[str, Any] = {"run_s": round(seconds, 1), "peak_gpu_gib": peak_gib(),
                           "checkpoint_saves": len(saves), "checkpoint_save_s": saves,
                           "eigh": {"calls": eigh["calls"], "seconds": round(eigh["seconds"], 2),
                                    "devices": sorted(eigh["devices"]), "sizes": sorted(eigh["sizes"])}}
    meta = json.loads((run_dir / "calibration" / "meta.json").read_text())
    out["calibration"] = {k: meta.get(k) for k in ("groups", "device_budget_gb", "tokens", "dtype")}
    out["calibration"]["files"] = sorted(p.name for p in (run_dir / "calibration").glob("stats*"))
    init = json.loads((run_dir / "init" / "report.json").read_text())
    out["init"] = {"seconds": round(init["seconds"], 2), "modules": len(init["modules"]),
                   "max_reconstruction_rel_err": init.get("max_reconstruction_rel_err"),
                   "min_eigen_gap": init.get("min_eigen_gap")}
    summary = json.loads((run_dir / "train" / "complete.json").read_text()).get("summary", {})
    out["train"] = {k: summary.get(k) for k in ("steps", "first_loss", "last_loss", "tokens", "seconds",
                                                "tokens_per_s", "trainable_params")}
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    out["eval"] = [{"model": r["model"], "benchmark": r["benchmark"], "metric": r.get("metric"),
                    "value": r.get("value"), "n": r.get("n")} for r in results]
    rec.set(**out)
    device = "cpu" if dry else "cuda:0"
    missed = [what for what, ok in (
        ("calibration in more than one group", (out["calibration"]["groups"] or 0) > 1),
        (f"every eigh on {device}", out["eigh"]["calls"] > 0 and out["eigh"]["devices"] == [device]),
        ("a checkpoint saved", out["checkpoint_saves"] >= 1),
        ("2 eval records", len(out["eval"]) == 2)) if not ok]
    if missed:
        rec.set(status="failed: ran, but without " + ", ".join(missed))


# (b) ------------------------------------------------------------------------------------------------------

def part_b(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
    import torch

    dev = torch.device("cpu" if dry else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMM means fp32
    sync = (lambda: None) if dry else torch.cuda.synchronize

    def timed(fn: Callable[..., Any], reps: int, *args: Any, **kwargs: Any) -> float:
        """Best of ``reps`` calls of ``fn(*args, **kwargs)`` after a warm-up call; ``reps`` 0: the one call, timed
        (the largest sizes' decompositions, after a smaller size warmed the library up)."""
        if reps == 0:
            sync()
            t = time.perf_counter()
            fn(*args, **kwargs)
            sync()
            return time.perf_counter() - t
        fn(*args, **kwargs)  # warm-up (cuBLAS / cuSOLVER handles, workspaces)
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn(*args, **kwargs)
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    rows: list[dict] = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for n in spec["sizes"]:
        row: dict[str, Any] = {"n": n}
        rows.append(row)
        for dtype, name in ((torch.bfloat16, "gemm_bf16"), (torch.float32, "gemm_fp32")):
            rec.doing(f"{name} n={n}")
            a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
            b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
            s = timed(torch.matmul, spec["reps"], a, b)
            row[name] = {"s": round(s, 5), "tflops": round(2 * n**3 / s / 1e12, 2)}
            del a, b
            rec.set(rows=rows)
        rec.doing(f"eigh fp64 n={n}")
        x = torch.randn(n, n, device=dev, dtype=torch.float64, generator=gen)
        spd = x @ x.T / n + torch.eye(n, device=dev, dtype=torch.float64)
        del x
        once = 1 if n == spec["sizes"][0] else 0  # the smallest size warms up, the others are timed once
        s = timed(torch.linalg.eigh, once, spd)
        row["eigh_fp64"] = {"s": round(s, 3)}
        del spd
        rec.set(rows=rows)
        m = spec["svd_rows"]
        rec.doing(f"svd fp64 {m}x{n}")
        w = torch.randn(m, n, device=dev, dtype=torch.float64, generator=gen)
        s = timed(torch.linalg.svd, once, w, full_matrices=False)
        row["svd_fp64"] = {"shape": [m, n], "s": round(s, 3)}
        del w
        rec.set(rows=rows)
    rec.set(notes="GEMM: best of reps after a warm-up, 2n^3 flops, TF32 off; eigh: torch.linalg.eigh (values and "
                  "vectors) of an SPD matrix; SVD: torch.linalg.svd, thin, of a "
                  f"{spec['svd_rows']} x n matrix; both timed once (the smallest size after a warm-up call)",
            peak_gpu_gib=peak_gib())


# (c) ------------------------------------------------------------------------------------------------------

def part_c(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
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


# (e) ------------------------------------------------------------------------------------------------------

def part_e(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
    import torch

    from lnull import calibrate, initialize
    from lnull.calibrate import calibration_windows, resolve_source
    from lnull.cli import compose
    from lnull.modeling import load_model, load_tokenizer

    layers = spec["layers"]
    rec.doing("building the 2-layer model")
    model_dir = build_model(work / "llama2-7b-2l", "llama2-7b", layers, "bfloat16", dry)
    device = "cpu" if dry else "cuda"
    sync = (lambda: None) if dry else torch.cuda.synchronize
    base = ["+experiment=tiny", f"model.name_or_path={model_dir}", "model.name=llama2-7b-shaped-2l",
            f"calibration.samples={spec['samples']}", f"calibration.seqlen={spec['seqlen']}",
            f"calibration.batch_size={spec['cal_batch']}", f"device={device}", "progress=false",
            f"method.rank={spec['rank']}", "method.alpha=null"]
    cfg = compose(base + ["method=lora_null_v1"])
    rec.set(windows=f"{spec['samples']} x {spec['seqlen']}", layers=layers, rank=spec["rank"],
            model_dims=dims("llama2-7b", dry))
    loads: list[float] = []
    load = calibrate.load_model

    def timed_load(*args, **kwargs):  # the stage's own model load, timed (it is no per-layer cost)
        t = time.perf_counter()
        try:
            return load(*args, **kwargs)
        finally:
            sync()
            loads.append(time.perf_counter() - t)
    calibrate.load_model = timed_load
    rec.doing("lnull calibrate")
    cal = work / "e-calibration"
    shutil.rmtree(cal, ignore_errors=True)
    cal.mkdir()
    t = time.perf_counter()
    calibrate.collect_into(cfg, cal)
    sync()
    cal_s = time.perf_counter() - t
    load_s = sum(loads)
    lnull: dict[str, Any] = {"model_load_fp32_s": round(load_s, 2), "calibrate_s": round(cal_s, 2),
                             "calibrate_per_layer_s": round(max(cal_s - load_s, 0) / layers, 3)}
    rec.set(lnull=lnull)
    for method in ("lora_null_v1", "corda_kpm"):
        rec.doing(f"lnull init {method}")
        out = work / f"e-init-{method}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        t = time.perf_counter()
        initialize.build(compose(base + [f"method={method}"]), out, cal)
        stage = time.perf_counter() - t
        report = json.loads((out / "report.json").read_text())
        lnull[method] = {"init_stage_s": round(stage, 2), "init_layers_s": round(report["seconds"], 2),
                         "init_per_layer_s": round(report["seconds"] / layers, 3)}
        lnull[method]["calibrate_plus_init_per_layer_s"] = round(lnull["calibrate_per_layer_s"]
                                                                 + lnull[method]["init_per_layer_s"], 3)
        lnull[method]["extrapolated_32_layers_s"] = round(32 * lnull[method]["calibrate_plus_init_per_layer_s"], 1)
        rec.set(lnull=lnull)
    release()

    rec.doing("PEFT preprocess_corda (kpm)")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    cal_cfg = cfg["calibration"]
    _, records = resolve_source(cal_cfg["dataset"], cfg.get("cache_dir"))
    windows = calibration_windows(load_tokenizer(str(model_dir)), [r[cal_cfg["field"]] for r in records],
                                  cal_cfg["samples"], cal_cfg["seqlen"], cal_cfg["seed"], cfg["model"]["add_bos"])
    t = time.perf_counter()
    model = load_model(str(model_dir), "float32", device)
    sync()
    peft_load = time.perf_counter() - t
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], target_modules=list(cfg["model"]["target_modules"]),
                        init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))
    t = time.perf_counter()
    with torch.no_grad():  # PEFT's hook normalises per forward: one window per forward, as PEFT expects
        preprocess_corda(model, config, run_model=lambda: [model(input_ids=w[None].to(device)) for w in windows])
    sync()
    pre = time.perf_counter() - t
    rec.set(peft={"model_load_fp32_s": round(peft_load, 2), "preprocess_corda_s": round(pre, 2)})
    rec.doing("PEFT get_peft_model (corda init)")
    t = time.perf_counter()
    get_peft_model(model, config)
    sync()
    build = time.perf_counter() - t
    per_layer = (pre + build) / layers
    rec.set(peft={"model_load_fp32_s": round(peft_load, 2), "preprocess_corda_s": round(pre, 2),
                  "get_peft_model_s": round(build, 2), "per_layer_s": round(per_layer, 3),
                  "extrapolated_32_layers_s": round(32 * per_layer, 1), "dtype": "float32 (PEFT's own)"},
            ratio_lnull_corda_over_peft=round(lnull["corda_kpm"]["calibrate_plus_init_per_layer_s"] / per_layer, 3)
            if per_layer else None,
            peak_gpu_gib=peak_gib(),
            notes="lnull: calibrate (both statistics, batches of cal_batch windows, fp32 products, fp64 sums) + "
                  "init (fp64 decompositions on `device`, one per unique input); per layer = (stage - model load) "
                  "/ layers. PEFT: preprocess_corda (one window per forward, its covariance + decompositions in "
                  "fp32) + get_peft_model; per layer = their sum / layers. Ratio < 1: lnull faster.")


# (d) ------------------------------------------------------------------------------------------------------

def part_d(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
    from lnull import initialize
    from lnull.cli import compose
    from lnull.modeling import load_tokenizer
    from lnull.training.data import build_examples, step_plan

    rec.doing(f"building the {spec['layers']}-layer model")
    t = time.perf_counter()
    built: list = []  # the random model, kept on its device for HF's side (saves loading it back)
    model_dir = build_model(work / f"llama2-7b-{spec['layers']}l-{spec['dtype']}", "llama2-7b", spec["layers"],
                            spec["dtype"], dry, keep=built)
    rec.set(model={**json.loads((model_dir / "done").read_text()), "dims": dims("llama2-7b", dry),
                   "build_s": round(time.perf_counter() - t, 1)}, rank=spec["rank"], batch=spec["batch"])
    base = ["+experiment=tiny", f"model.name_or_path={model_dir}", "model.name=llama2-7b-shaped",
            f"model.dtype={spec['dtype']}", "method=lora", f"method.rank={spec['rank']}",
            f"method.alpha={2 * spec['rank']}",
            f"device={'cpu' if dry else 'cuda'}", "progress=false", f"train.batch_size={spec['batch']}",
            f"train.max_steps={spec['steps']}", "train.log_every=1", "train.checkpoint_every=0", "train.lr=1e-4",
            "train.warmup_ratio=0.0", "train.scheduler=constant"]
    cfg = compose(base)
    tokenizer = load_tokenizer(str(model_dir))
    examples = build_examples(cfg, tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    tcfg = cfg["train"]
    order = [i for s in range(spec["steps"]) for mb in step_plan(lengths, s, {**tcfg, "micro_batch_size": 1})
             for i in mb]  # lnull's examples, in lnull's order (the same for every micro-batch size)
    step_tokens = [sum(lengths[i] for i in order[s * spec["batch"]:(s + 1) * spec["batch"]])
                   for s in range(spec["steps"])]
    rec.set(tokens_per_step=step_tokens, timed="steps 2..N (step 1 is a warm-up)",
            precision=f"{spec['dtype']} base, fp32 LoRA, " + ("no autocast (CPU)" if dry else "bf16 autocast (both)"))
    results: dict[str, dict] = {"lnull": {}, "hf_trainer_peft": {}}

    rec.doing("lnull init (lora)")
    init_dir = work / "d-init"
    shutil.rmtree(init_dir, ignore_errors=True)
    init_dir.mkdir()
    t = time.perf_counter()
    initialize.build(cfg, init_dir, None)
    rec.set(lnull_init_s=round(time.perf_counter() - t, 1))
    rec.doing("PEFT LoRA on the model for HF Trainer")
    hf_model = hf_setup(built.pop() if built else None, model_dir, cfg, spec, dry)  # stays on the device
    rec.set(attention={"lnull": cfg["train"]["attn_implementation"],
                       "hf": getattr(hf_model.config, "_attn_implementation", None)})
    from lnull.train import train_into

    for micro in spec["micro"]:  # lnull then HF at each size: a part cut short keeps whole pairs
        key = f"mb{micro}"
        rec.doing(f"lnull train, micro-batch {micro}")
        out = work / f"d-train-{key}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        reset_accelerate()
        t = time.perf_counter()
        summary = train_into(compose(base + [f"train.micro_batch_size={micro}"]), out, init_dir)
        wall = time.perf_counter() - t
        log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        timed_s = log[-1]["elapsed_s"] - log[0]["elapsed_s"]
        timed_tokens = log[-1]["tokens"] - log[0]["tokens"]
        results["lnull"][key] = {
            "tokens_per_s": round(timed_tokens / timed_s, 1) if timed_s > 0 else None,
            "s_per_step": round(timed_s / (len(log) - 1), 3) if len(log) > 1 else None,
            "tokens_timed": timed_tokens, "stage_wall_s": round(wall, 1), "first_loss": summary.get("first_loss")}
        rec.set(results=results)
        shutil.rmtree(out, ignore_errors=True)
        rec.doing(f"HF Trainer, micro-batch {micro}")
        reset_accelerate()
        results["hf_trainer_peft"][key] = hf_train(hf_model, examples, order, step_tokens, tokenizer, spec, micro,
                                                   work, dry)
        rec.set(results=results, peak_gpu_gib=peak_gib())
    ratios = {k: round(results["lnull"][k]["tokens_per_s"] / results["hf_trainer_peft"][k]["tokens_per_s"], 3)
              for k in results["lnull"] if k in results["hf_trainer_peft"]
              and results["lnull"][k]["tokens_per_s"] and results["hf_trainer_peft"][k]["tokens_per_s"]}
    rec.set(ratio_lnull_over_hf=ratios)


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons (mixed precision, accumulation): each run starts clean, as
    lnull's own train stage does after a run (lnull.train._train_here)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def hf_setup(model: Any, model_dir: Path, cfg: dict, spec: dict, dry: bool) -> Any:
    """PEFT LoRA (r, alpha 2r, lnull's target modules) on ``model`` (or the folder's, loaded) on the device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, spec["dtype"]))
    model.to("cpu" if dry else "cuda")
    lcfg = LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
                      target_modules=list(cfg["model"]["target_modules"]), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def hf_train(model: Any, examples: list, order: list[int], step_tokens: list[int], tokenizer: Any, spec: dict,
             micro: int, work: Path, dry: bool) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lnull.training.data import collate

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if not dry:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    class InOrder(Trainer):  # lnull's order: step s takes the s-th batch of lnull's plan
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    data = [{"input_ids": examples[i]["input_ids"], "labels": examples[i]["labels"]} for i in order]
    args = TrainingArguments(output_dir=str(work / f"hf-mb{micro}"), per_device_train_batch_size=micro,
                             gradient_accumulation_steps=spec["batch"] // micro, max_steps=spec["steps"],
                             learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, bf16=not dry,
                             logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0, use_cpu=dry, seed=42,
                             max_grad_norm=1.0)
    timer = Timer()
    trainer = InOrder(model=model, args=args, train_dataset=data, callbacks=[timer],
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    t = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t
    timed_s = timer.ends[-1] - timer.ends[0]
    tokens = sum(step_tokens[1:])
    loss = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
    del trainer
    release()
    return {"tokens_per_s": round(tokens / timed_s, 1) if timed_s > 0 else None,
            "s_per_step": round(timed_s / (len(timer.ends) - 1), 3), "tokens_timed": tokens,
            "train_wall_s": round(wall, 1), "first_loss": loss, "global_step": out.global_step}


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}


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
        for line in summary_lines(part, r):  # bullets, then any table rows ("| ...") after a blank line
            if line.startswith("|") and not table:
                if lines[-1]:
                    lines.append("")
                table = True
            lines.append(line if line.startswith("|") else f"- {line}")
        if r.get("log_tail"):
            lines += ["", "```", *r["log_tail"][-6:], "```"]
        lines.append("")
    return "\n".join(lines)


def summary_lines(part: str, r: dict) -> list[str]:
    """The numbers of one part, a line each (whatever it got to before failing)."""
    out = []
    g = r.get
    if part == "a":
        if g("calibration"):
            c = r["calibration"]
            out.append(f"calibration: {c['groups']} groups under {c['device_budget_gb']} GiB, {c['tokens']} tokens, "
                       f"files {', '.join(c['files'])}")
        if g("eigh"):
            out.append(f"eigh: {r['eigh']['calls']} calls on {', '.join(r['eigh']['devices'])} "
                       f"(n = {r['eigh']['sizes']}), {r['eigh']['seconds']} s")
        if g("init"):
            out.append(f"init: {r['init']['modules']} modules in {r['init']['seconds']} s, reconstruction rel err "
                       f"{r['init']['max_reconstruction_rel_err']:.2e}")
        if g("train"):
            t = r["train"]
            out.append(f"train: {t['steps']} steps, loss {t['first_loss']:.4f} -> {t['last_loss']:.4f}, "
                       f"{t['tokens_per_s']} tokens/s, checkpoints saved: {g('checkpoint_saves')} "
                       f"({g('checkpoint_save_s')} s)")
        for e in g("eval") or []:
            out.append(f"eval {e['model']}/{e['benchmark']}: {e['metric']} {e['value']} (n={e['n']})")
        if g("run_s") is not None:
            peak = f", peak GPU memory {g('peak_gpu_gib')} GiB" if g("peak_gpu_gib") is not None else ""
            out.append(f"lnull run: {r['run_s']} s{peak}")
    elif part == "b":
        if g("rows"):
            out.append("| n | GEMM bf16 TFLOP/s | GEMM fp32 TFLOP/s | eigh fp64 s | SVD fp64 s (shape) |")
            out.append("|---|---|---|---|---|")
            for row in r["rows"]:
                def cell(key, field):
                    return row[key][field] if key in row else "—"
                svd = f"{row['svd_fp64']['s']} ({row['svd_fp64']['shape'][0]}x{row['svd_fp64']['shape'][1]})" \
                    if "svd_fp64" in row else "—"
                out.append(f"| {row['n']} | {cell('gemm_bf16', 'tflops')} | {cell('gemm_fp32', 'tflops')} | "
                           f"{cell('eigh_fp64', 's')} | {svd} |")
    elif part == "c":
        if g("plans"):
            out.append(f"{g('layers')} layers, {g('unique_inputs')} unique inputs ({g('alias_source')}); fp32 weights "
                       f"{g('weights_fp32_gib')} GiB; card {g('card_total_gib')} GiB; stored (packed, both "
                       f"statistics) {g('stored_packed_both_statistics_gib')} GiB; lnull's budget: {g('budget_source')}")
            for p in r["plans"]:
                out.append(f"budget {p['budget_gib']} GiB{' (lnull’s choice here)' if p['chosen_by_lnull'] else ''}: "
                           f"{p['groups']} groups, largest {p['max_group_device_fp32_gib']} GiB on the device / "
                           f"{p['max_group_host_fp64_gib']} GiB fp64 on the host, predicted device peak "
                           f"{p['predicted_device_peak_gib']} GiB ({'fits' if p['fits_card'] else 'does NOT fit'})")
    elif part == "e":
        l, p = g("lnull") or {}, g("peft") or {}
        if l:
            out.append(f"lnull calibrate: {l.get('calibrate_s')} s ({l.get('calibrate_per_layer_s')} s/layer after "
                       f"a {l.get('model_load_fp32_s')} s load), windows {g('windows')}")
        for m in ("lora_null_v1", "corda_kpm"):
            if m in l:
                out.append(f"lnull {m}: init {l[m]['init_layers_s']} s; calibrate + init "
                           f"{l[m]['calibrate_plus_init_per_layer_s']} s/layer, x32 = {l[m]['extrapolated_32_layers_s']} s")
        if p.get("per_layer_s") is not None:
            out.append(f"PEFT CorDA-KPM: preprocess_corda {p['preprocess_corda_s']} s + get_peft_model "
                       f"{p['get_peft_model_s']} s = {p['per_layer_s']} s/layer, x32 = {p['extrapolated_32_layers_s']} s")
            out.append(f"lnull CorDA-KPM / PEFT per layer: {g('ratio_lnull_corda_over_peft')} (< 1: lnull faster)")
        elif p:
            out.append(f"PEFT preprocess_corda: {p.get('preprocess_corda_s')} s")
    elif part == "d":
        res = g("results") or {}
        if res:
            out.append(f"model {g('model', {}).get('layers')} layers, LoRA r={g('rank')}, batch {g('batch')}, "
                       f"tokens per step {g('tokens_per_step')}; {g('precision')}")
            rows = ["| micro-batch | lnull tokens/s | HF Trainer + PEFT tokens/s | lnull / HF |", "|---|---|---|---|"]
            for k in sorted(set(res.get("lnull", {})) | set(res.get("hf_trainer_peft", {})), key=lambda s: int(s[2:])):
                a, b = res.get("lnull", {}).get(k, {}), res.get("hf_trainer_peft", {}).get(k, {})
                rows.append(f"| {k[2:]} | {a.get('tokens_per_s', '—')} | {b.get('tokens_per_s', '—')} | "
                            f"{(g('ratio_lnull_over_hf') or {}).get(k, '—')} |")
            out += rows
    return out


if __name__ == "__main__":
    sys.exit(main())
