"""Stage `calibrate`: activation statistics of every targeted linear layer's input, in one pass.

Forward hooks accumulate, batch by batch and never materialising X (fp32 products, fp64 accumulators):

- ``covariance``: C = sum_t x_t x_t^T over every calibration token (the papers' X X^T; LoRA-Null);
- ``max_normalized_covariance``: PEFT's CorDA statistic, mean over samples of (x / |max(x)|)^T (x / |max(x)|),
  where max(x) is the signed maximum over the sample's tokens and features (``torch.max(x).abs()``).

Layers that read the same input tensor (q/k/v, gate/up) are accumulated once and recorded as aliases.

``calibration.official=true`` reproduces the official LoRA-Null code (``adapterlib/datautils.py::get_calib_data``
and ``act_aware_utils.py::calib_cov_distribution``): the questions joined by blank lines; ``samples`` windows
``text[i : i + 10 * seqlen]`` at ``i = random.randint(0, len(text) - seqlen - 1)`` after ``random.seed(seed)``
(so a window near the end may hold fewer than ``seqlen`` tokens), tokenised with BOS (when ``model.add_bos``)
and cut to ``seqlen`` tokens; one window per forward; ``covariance`` = sum of (x / |max(x)|)^T (...) / 256
(hard-coded 256, whatever ``samples`` is); the factors of calibrated methods are cast to fp16 at the end
(``lnull.initialize``). What differs: products are fp32 and sums fp64 here (fp16 in the original; the fp16
sum moves the r-smallest eigenspace far from the exact one), the model runs in ``calibration.dtype`` (the
original: fp16, as ``configs/calibration/official.yaml``), and the null space comes from an fp64 eigh of the
stored fp32 C (the original: fp32 SVD of the fp16 sum).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lnull.config import ConfigError
from lnull.data.sources import hub_reachable, load_records, require_fields
from lnull.modeling import load_model, load_tokenizer, pick_device, resolve_model, target_linears
from lnull.runs import atomic_write_json

OFFICIAL_DIVISOR = 256  # the official hook's `module.covariance_matrix += covariance / 256`
OFFICIAL_CHARS_PER_TOKEN = 10  # official windows: 10 x seqlen characters, cut to seqlen tokens

Windows = Union[torch.Tensor, list]  # [n, seqlen] token ids, or n 1-D tensors of varying length (official)


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
    """``samples`` random windows [samples, seqlen] (token ids) of the texts joined by blank lines, at random
    token offsets, each starting with BOS when ``add_bos``."""
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


def official_windows(tokenizer: Any, texts: list[str], samples: int, seqlen: int, seed: int,
                     add_bos: bool) -> list[torch.Tensor]:
    """The official code's windows (module docstring): ``samples`` 1-D token-id tensors of at most ``seqlen``
    tokens, cut from ``10 x seqlen`` characters at random character offsets (``random.Random(seed)``, the
    same stream as ``random.seed(seed)``)."""
    text = "\n\n".join(texts)
    if len(text) - seqlen - 1 < 0:
        raise ConfigError(f"calibration.seqlen={seqlen} exceeds the {len(text)} characters of the calibration text")
    rng = random.Random(seed)
    rows = []
    for _ in range(samples):
        start = rng.randint(0, len(text) - seqlen - 1)
        ids = tokenizer(text[start:start + seqlen * OFFICIAL_CHARS_PER_TOKEN], add_special_tokens=False)["input_ids"]
        rows.append(torch.tensor(([tokenizer.bos_token_id] if add_bos else []) + ids, dtype=torch.long)[:seqlen])
    return rows


class CovarianceCollector:
    """Forward hooks that add, per unique layer input x [batch, tokens, d_in], x^T x to ``cov`` and
    sum_b (x_b / |max x_b|)^T (x_b / |max x_b|) to ``max_normalized`` (fp32 products, fp64 accumulators),
    counting ``tokens`` and ``samples``."""

    def __init__(self, modules: dict[str, torch.nn.Linear]):
        self.modules = modules
        self.cov: dict[str, torch.Tensor] = {}
        self.max_normalized: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.samples: dict[str, int] = {}
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
            peak = x.amax(dim=(1, 2)).abs()  # per sample: |signed max|, as torch.max(x).abs() in PEFT/official
            if (peak == 0).any():
                raise ValueError(f"{name}: a calibration sample's max activation is 0; the per-sample "
                                 "normalisation (x / |max(x)|) is undefined")
            flat = x.reshape(-1, x.shape[-1])
            normed = (x / peak[:, None, None]).reshape(-1, x.shape[-1])
            self._add(self.cov, name, (flat.T @ flat).double())
            self._add(self.max_normalized, name, (normed.T @ normed).double())
            self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]
            self.samples[name] = self.samples.get(name, 0) + x.shape[0]
        return hook

    @staticmethod
    def _add(store: dict[str, torch.Tensor], name: str, prod: torch.Tensor) -> None:
        if name in store:
            store[name] += prod
        else:
            store[name] = prod

    def new_batch(self) -> None:
        self._prev = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def collect(model: torch.nn.Module, windows: Windows, target_modules: list[str], batch_size: int,
            progress: bool = True) -> CovarianceCollector:
    """Run ``windows`` through ``model`` (a [n, seqlen] tensor in batches of ``batch_size``, or a list of
    1-D windows one per forward); return the filled collector."""
    device = next(model.parameters()).device
    collector = CovarianceCollector(target_linears(model, target_modules))
    batches = ([w[None] for w in windows] if isinstance(windows, list)
               else [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)])
    try:
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            collector.new_batch()
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        collector.remove()
    return collector


def statistics(col: CovarianceCollector, official: bool) -> dict[str, torch.Tensor]:
    """``stats.safetensors`` tensors (fp32 on the CPU): ``<module>.covariance`` (sum x x^T, or under
    ``official`` the normalised sum / 256), ``<module>.max_normalized_covariance`` (normalised sum / samples),
    ``<module>.tokens`` and ``<module>.samples`` (int64 [1])."""
    tensors = {}
    for name, cov in col.cov.items():
        normed = col.max_normalized[name]
        tensors[f"{name}.covariance"] = (normed / OFFICIAL_DIVISOR if official else cov).float().cpu().contiguous()
        tensors[f"{name}.max_normalized_covariance"] = (normed / col.samples[name]).float().cpu().contiguous()
        tensors[f"{name}.tokens"] = torch.tensor([col.tokens[name]], dtype=torch.long)
        tensors[f"{name}.samples"] = torch.tensor([col.samples[name]], dtype=torch.long)
    return tensors


def run(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write ``stats.safetensors`` (:func:`statistics`; covariances fp32 [d_in, d_in]) and ``meta.json`` into
    ``out_dir``; return a summary."""
    cal, mcfg = cfg["calibration"], cfg["model"]
    source, records = resolve_source(cal["dataset"], cfg.get("cache_dir"))
    require_fields(records, [cal["field"]], source)
    path = resolve_model(mcfg["name_or_path"], cfg.get("cache_dir"))
    tokenizer = load_tokenizer(path)
    make_windows = official_windows if cal["official"] else calibration_windows
    windows = make_windows(tokenizer, [r[cal["field"]] for r in records], cal["samples"], cal["seqlen"],
                           cal["seed"], mcfg["add_bos"])
    model = load_model(path, cal["dtype"], pick_device(cfg["device"]))
    col = collect(model, windows, mcfg["target_modules"], cal["batch_size"], cfg["progress"])
    save_file(statistics(col, cal["official"]), str(out_dir / "stats.safetensors"))
    tokens = sum(len(w) for w in windows)
    meta = {"dataset": cal["dataset"], "source": source, "field": cal["field"], "records": len(records),
            "samples": cal["samples"], "seqlen": cal["seqlen"], "seed": cal["seed"], "add_bos": mcfg["add_bos"],
            "tokens": tokens, "dtype": cal["dtype"], "official": cal["official"],
            "windows": ("official: 10 x seqlen characters at random character offsets, cut to seqlen tokens"
                        if cal["official"] else "seqlen tokens at random token offsets"),
            "statistics": {
                "covariance": ("sum over samples of (x/|max x|)^T (x/|max x|) / 256 (official)" if cal["official"]
                               else "sum over tokens of x x^T"),
                "max_normalized_covariance": "mean over samples of (x/|max x|)^T (x/|max x|) (PEFT CorDA)"},
            "alias": col.alias, "unique_inputs": len(col.cov)}
    atomic_write_json(out_dir / "meta.json", meta)
    return {"unique_inputs": len(col.cov), "tokens": tokens}
