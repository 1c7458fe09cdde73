"""Stage `calibrate`: input covariance C = sum_t x_t x_t^T of every targeted linear layer.

Forward hooks accumulate C batch by batch (never materialising X); layers that read the same input
tensor (q/k/v, gate/up) are accumulated once and recorded as aliases.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lnull.config import ConfigError
from lnull.data.sources import hub_reachable, load_records, require_fields
from lnull.modeling import load_model, load_tokenizer, pick_device, resolve_model, target_linears
from lnull.runs import atomic_write_json


def resolve_source(spec: str, cache_dir: str | None) -> tuple[str, list[dict[str, Any]]]:
    """Records for ``calibration.dataset``. ``nq_open`` means the hub's NQ-Open train split (as the
    official code) when a hub is reachable, else the offline dev split (never the test split, which is
    evaluated). Returns (the source actually used, records)."""
    if spec != "nq_open":
        return spec, load_records(spec, cache_dir)
    if hub_reachable():
        try:
            return "hub:nq_open:train", load_records("hub:nq_open:train", cache_dir)
        except Exception as exc:  # no hub: fall back to the offline copy, and say so in meta.json
            print(f"[calibrate] hub nq_open unavailable ({type(exc).__name__}); using asset:nq_open/dev")
    return "asset:nq_open/dev", load_records("asset:nq_open/dev", cache_dir)


def calibration_windows(tokenizer: Any, texts: list[str], samples: int, seqlen: int, seed: int,
                        add_bos: bool) -> torch.Tensor:
    """``samples`` random windows [samples, seqlen] (token ids) of the texts joined by blank lines,
    each starting with BOS when ``add_bos`` (as the official code)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    body = seqlen - 1 if add_bos else seqlen
    if len(ids) < body:
        raise ConfigError(f"calibration.seqlen={seqlen} exceeds the {len(ids)} tokens of the calibration text")
    rng = random.Random(seed)
    rows = []
    for _ in range(samples):
        start = rng.randint(0, len(ids) - body)
        window = ids[start:start + body]
        rows.append(([tokenizer.bos_token_id] if add_bos else []) + window)
    return torch.tensor(rows, dtype=torch.long)


class CovarianceCollector:
    """Forward hooks that add x^T x (fp32 products, fp64 accumulator) per unique layer input."""

    def __init__(self, modules: dict[str, torch.nn.Linear], official: bool = False):
        self.modules = modules
        self.official = official
        self.cov: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._prev: tuple[torch.Tensor, str] | None = None
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            x = inputs[0]
            # Layers reading one tensor (q/k/v, gate/up) are called back to back with the same object;
            # only the last input is kept alive, so no freed address can be mistaken for a shared input.
            if self._prev is not None and x is self._prev[0]:
                self.alias[name] = self._prev[1]
                return
            self._prev = (x, name)
            self.alias[name] = name
            x = x.detach().float()
            if self.official:  # per-sample divide by the max |activation| (official LoRA-Null code)
                x = x / x.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
            flat = x.reshape(-1, x.shape[-1])
            prod = (flat.T @ flat).double()
            if name in self.cov:
                self.cov[name] += prod
            else:
                self.cov[name] = prod
            self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]
        return hook

    def new_batch(self) -> None:
        self._prev = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def collect(model: torch.nn.Module, windows: torch.Tensor, target_modules: list[str], batch_size: int,
            official: bool = False, progress: bool = True) -> CovarianceCollector:
    """Run ``windows`` [n, seqlen] through ``model`` in batches; return the filled collector."""
    device = next(model.parameters()).device
    collector = CovarianceCollector(target_linears(model, target_modules), official)
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrate", unit="batch", disable=not progress):
            collector.new_batch()
            model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        collector.remove()
    return collector


def run(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write ``stats.safetensors`` (``<module>.covariance`` fp32 [d_in, d_in], ``<module>.tokens``) and
    ``meta.json`` into ``out_dir``; return a summary."""
    cal, mcfg = cfg["calibration"], cfg["model"]
    source, records = resolve_source(cal["dataset"], cfg.get("cache_dir"))
    require_fields(records, [cal["field"]], source)
    path = resolve_model(mcfg["name_or_path"], cfg.get("cache_dir"))
    tokenizer = load_tokenizer(path)
    windows = calibration_windows(tokenizer, [r[cal["field"]] for r in records], cal["samples"], cal["seqlen"],
                                  cal["seed"], mcfg["add_bos"])
    model = load_model(path, mcfg["dtype"], pick_device(cfg["device"]))
    col = collect(model, windows, mcfg["target_modules"], cal["batch_size"], cal["official"], cfg["progress"])
    tensors = {}
    for name, cov in col.cov.items():
        if cal["official"]:
            cov = cov / cal["samples"]
        tensors[f"{name}.covariance"] = cov.float().cpu().contiguous()
        tensors[f"{name}.tokens"] = torch.tensor([col.tokens[name]], dtype=torch.long)
    save_file(tensors, str(out_dir / "stats.safetensors"))
    meta = {"dataset": cal["dataset"], "source": source, "field": cal["field"], "records": len(records), "samples": cal["samples"],
            "seqlen": cal["seqlen"], "seed": cal["seed"], "add_bos": mcfg["add_bos"],
            "normalisation": "per-sample max, divided by samples (official)" if cal["official"] else "none (sum x x^T)",
            "alias": col.alias, "unique_inputs": len(col.cov)}
    atomic_write_json(out_dir / "meta.json", meta)
    return {"unique_inputs": len(col.cov), "tokens": int(windows.numel())}
