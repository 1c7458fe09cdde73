"""Part (e): calibrate + init of LoRA-Null v1 and lnull's CorDA-KPM vs PEFT's CorDA-KPM on the same layers and
windows, in seconds per layer and extrapolated to 32 layers."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parts.shared import build_model, dims, peak_gib, release

if TYPE_CHECKING:
    from smoke import Recorder


def run(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
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


def summary_lines(r: dict) -> list[str]:
    """The numbers of part (e): lnull calibrate, each lnull init, PEFT and the ratio."""
    out = []
    g = r.get
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
    return out
