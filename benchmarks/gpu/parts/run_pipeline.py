"""Part (a): the whole ``lnull run`` on a 2-layer LLaMA-2-7B-shaped random model, checked as it goes (calibration
groups, eigh calls and their device, checkpoint saves, eval records)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parts.shared import build_model, dims, peak_gib

if TYPE_CHECKING:
    from smoke import Recorder


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


def run(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
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
    run_dir = next(p.parent for p in runs.rglob("config.yaml") if "store" not in p.relative_to(runs).parts)
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


def summary_lines(r: dict) -> list[str]:
    """The numbers of part (a), a line each (whatever it got to before failing)."""
    out = []
    g = r.get
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
    return out
