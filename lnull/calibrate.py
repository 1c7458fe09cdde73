"""Stage `calibrate`: activation statistics of every targeted linear layer's input (``lnull.activations``).

Forward hooks accumulate, batch by batch and never materialising X (fp32 products, fp64 sums):

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
from typing import Any

import torch

from lnull.activations import (PACKED, StatisticsWriter, Windows, collect_groups, default_budget_gb, pack_triu,
                               probe_aliases)
from lnull.data.sources import hub_reachable, load_records, require_fields
from lnull.errors import ConfigError
from lnull.io import atomic_write_json
from lnull.modeling import load_model, load_tokenizer, pick_device, resolve_model, target_linears
from lnull.stages import StageContext

OFFICIAL_DIVISOR = 256  # the official hook's `module.covariance_matrix += covariance / 256`
OFFICIAL_CHARS_PER_TOKEN = 10  # official windows: 10 x seqlen characters, cut to seqlen tokens


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


def statistics(sums: dict[str, torch.Tensor], tokens: dict[str, int], samples: dict[str, int],
               official: bool) -> dict[str, torch.Tensor]:
    """One group's ``stats`` tensors (fp32 on the CPU) from its fp64 sums (``lnull.activations``), each symmetric
    statistic as its packed upper triangle (``activations.pack_triu``, key suffix ``.triu``):
    ``<module>.covariance.triu`` (sum x x^T, or under ``official`` the normalised sum / 256),
    ``<module>.max_normalized_covariance.triu`` (normalised sum / samples), ``<module>.tokens``,
    ``<module>.samples``. The numbers are those of the full fp32 matrices (the same fp64 operations and one
    rounding to fp32, element by element)."""
    tensors = {}
    for name in tokens:
        normed = pack_triu(sums[f"{name}.max_normalized_covariance"])  # fp64, half the matrix
        cov = normed / OFFICIAL_DIVISOR if official else pack_triu(sums[f"{name}.covariance"], torch.float32)
        tensors[f"{name}.covariance{PACKED}"] = cov.float()
        tensors[f"{name}.max_normalized_covariance{PACKED}"] = (normed / samples[name]).float()
        del normed, cov
        tensors[f"{name}.tokens"] = torch.tensor([tokens[name]], dtype=torch.long)
        tensors[f"{name}.samples"] = torch.tensor([samples[name]], dtype=torch.long)
    return tensors


def collect_statistics(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], windows: Windows,
                       batch_size: int, official: bool, budget_gb: float | None, progress: bool, sink: Any
                       ) -> dict[str, str]:
    """Collect both statistics of every targeted module on ``windows`` (``lnull.activations.Windows``) into
    ``sink`` (a :class:`lnull.activations.StatisticsWriter` or ``StatisticsInMemory``: ``write(tensors, groups)``
    per module group, then ``close()``), in groups fitting ``budget_gb`` on the model's device; returns the
    alias map {module: module whose input it shares}. The one implementation behind ``lnull calibrate`` and
    ``lnull.api.collect_statistics``."""
    first = windows[0] if isinstance(windows, list) else windows[:1]
    alias = probe_aliases(model, linears, (first if first.dim() == 2 else first[None])[:1, :16])
    for groups, sums, tokens, samples in collect_groups(model, linears, windows, batch_size, alias, budget_gb,
                                                         progress):
        sink.write(statistics(sums, tokens, samples, official), groups)
        del sums  # the next group's sums replace this one's on the host
    sink.close()
    return alias


def run(cfg: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Stage entry: :func:`collect_into` ``ctx.out``."""
    return collect_into(cfg, ctx.out)


def collect_into(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write the statistics (``lnull.activations``; symmetric fp32 [d_in, d_in] matrices stored as packed upper
    triangles) and ``meta.json`` into ``out_dir``; return a summary."""
    cal, mcfg = cfg["calibration"], cfg["model"]
    source, records = resolve_source(cal["dataset"], cfg.get("cache_dir"))
    require_fields(records, [cal["field"]], source)
    path = resolve_model(mcfg["name_or_path"], cfg.get("cache_dir"))
    tokenizer = load_tokenizer(path)
    make_windows = official_windows if cal["official"] else calibration_windows
    windows = make_windows(tokenizer, [r[cal["field"]] for r in records], cal["samples"], cal["seqlen"],
                           cal["seed"], mcfg["add_bos"])
    device = pick_device(cfg["device"])
    model = load_model(path, cal["dtype"], device)
    linears = target_linears(model, mcfg["target_modules"])
    budget = default_budget_gb(device, cal["device_budget_gb"])
    writer = StatisticsWriter(out_dir)
    alias = collect_statistics(model, linears, windows, cal["batch_size"], cal["official"], budget, cfg["progress"],
                               writer)
    tokens = sum(len(w) for w in windows)
    unique = sum(1 for n, a in alias.items() if n == a)
    meta = {"dataset": cal["dataset"], "source": source, "field": cal["field"], "records": len(records),
            "samples": cal["samples"], "seqlen": cal["seqlen"], "seed": cal["seed"], "add_bos": mcfg["add_bos"],
            "tokens": tokens, "dtype": cal["dtype"], "official": cal["official"], "groups": writer.written,
            "device_budget_gb": budget,
            "windows": ("official: 10 x seqlen characters at random character offsets, cut to seqlen tokens"
                        if cal["official"] else "seqlen tokens at random token offsets"),
            "statistics": {
                "covariance": ("sum over samples of (x/|max x|)^T (x/|max x|) / 256 (official)" if cal["official"]
                               else "sum over tokens of x x^T"),
                "max_normalized_covariance": "mean over samples of (x/|max x|)^T (x/|max x|) (PEFT CorDA)"},
            "alias": alias, "unique_inputs": unique}
    atomic_write_json(out_dir / "meta.json", meta)
    return {"unique_inputs": unique, "tokens": tokens, "groups": writer.written, "source": source}
