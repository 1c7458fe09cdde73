"""Activation statistics of targeted linear layers: collected in one pass per module group, stored, read back.

Per unique layer input x [tokens, d_in] of each calibration sample (q/k/v and gate/up share one input and
are collected once, recorded as aliases), one fp32 product P = x^T x feeds both statistics:

- ``covariance`` sum: P;                 - ``max_normalized_covariance`` sum: P / max(x)^2
  (max(x) = the signed maximum of the sample, so P / max(x)^2 = (x / |max x|)^T (x / |max x|), PEFT's rule).

Memory (issue: the statistics of a 7-8B model do not fit one GPU beside it in fp64):

- on a CUDA device the sums are fp32 and flushed into fp64 host sums every :data:`FLUSH_EVERY` batches (an fp32
  partial sum of a few dozen products is well under the fp32 storage floor, eps * sqrt(d_in), of the result);
  on the CPU they are fp64 in place;
- modules are split into groups whose device sums fit ``calibration.device_budget_gb`` (default
  :data:`DEFAULT_CUDA_BUDGET_GB` on CUDA, no limit on the CPU); each group is one pass over the windows that
  stops after its last module, and is written to its own ``stats-<i>-of-<n>.safetensors`` before the next starts,
  so host memory holds one group's fp64 sums;
- no pass runs past the last targeted module (the last group's too, and the alias probe stops before the LM
  head): the final norm and the LM head never run, so no logits are made (LLaMA-3-8B, 8 x 1024 tokens:
  8 x 1024 x 128256 fp32 = 3.9 GiB per batch) and the budget needs no room for them.

Arithmetic for LLaMA-3-8B (32 layers; unique inputs per layer: qkv 4096, o 4096, gate/up 4096, down 14336):
sum d^2 = 3 x 4096^2 + 14336^2 = 2.56e8 per layer; two statistics -> 5.1e8 numbers per layer, i.e. 2.05 GB
fp32 (4.1 GB fp64), 65.5 GB fp32 for the model: 3 groups of at most 24 GiB on the device, beside ~32 GB of
fp32 weights (calibration.dtype) and < 2 GB of per-sample temporaries (no logits); host: one group's fp64 sums (<= 48 GiB).

On disk each statistic is a symmetric [d_in, d_in] fp32 matrix stored once, as its packed upper triangle
(``<module>.<statistic>.triu``: 1-D fp32, row i holding C[i, i:], d_in (d_in + 1) / 2 numbers; :func:`pack_triu`).
LLaMA-2-7B (32 layers; unique inputs qkv 4096, o 4096, gate/up 4096, down 11008): full matrices would be
(3 x 4096^2 + 11008^2) x 4 B = 0.64 GiB per layer and statistic, 20.4 GiB per statistic, 40.9 GiB for both;
packed, 3 x 4096 x 4097 / 2 + 11008 x 11009 / 2 = 8.57e7 numbers = 0.32 GiB per layer and statistic, 10.2 GiB
per statistic, 20.4 GiB for both. :class:`CalibrationStats` returns the full matrix (:func:`unpack_triu`: the upper
triangle mirrored, bit-equal to the matrix packed, since the sums are exactly symmetric: both halves are the same
products added in the same order), one module at a time, and still reads folders written with full matrices
(``<module>.<statistic>`` [d_in, d_in]; the calibrate key is unchanged: the values are the same).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lnull.errors import ConfigError
from lnull.io import atomic_write_json, read_json

STATS_FILE = "stats.safetensors"
STATS_INDEX = "stats.index.json"  # tensor key -> shard file, when the statistics are in several files
FLUSH_EVERY = 8  # batches between flushes of fp32 device sums into fp64 host sums (CUDA)
DEFAULT_CUDA_BUDGET_GB = 24.0
STATS = ("covariance", "max_normalized_covariance")
PACKED = ".triu"  # key suffix of a statistic stored as its packed upper triangle (pack_triu)
MIRROR_BLOCK = 128  # tile side when unpack_triu mirrors the upper triangle into the lower one

# [n, seqlen] token ids; or a list of n 1-D tensors of varying length (official windows, one per forward), or of
# 2-D [b, t] batches (lnull.api.collect_statistics)
Windows = Union[torch.Tensor, list]


class _StopForward(Exception):
    """Raised by the last hooked module of a group (and, in the probe, before the LM head): the rest of the
    forward is not needed."""


def _stop_before_head(model: torch.nn.Module, linears: dict[str, torch.nn.Linear]) -> Any:
    """A forward pre-hook raising :class:`_StopForward` on the model's output embeddings (the LM head), unless
    the head is itself targeted; its handle, or None. Nothing reads the logits (LLaMA-3-8B: 8 x 1024 x 128256
    fp32 = 3.9 GiB per batch)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or any(head is m for m in linears.values()):
        return None

    def stop(_module, _inputs):
        raise _StopForward
    return head.register_forward_pre_hook(stop)


def batches_of(windows: Windows, batch_size: int) -> list[torch.Tensor]:
    """Forward batches: a [n, seqlen] tensor in chunks of ``batch_size``; a list one element a forward (a 1-D
    window as a batch of one)."""
    if isinstance(windows, list):
        return [w if w.dim() == 2 else w[None] for w in windows]
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


@torch.no_grad()
def probe_aliases(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], ids: torch.Tensor) -> dict[str, str]:
    """{module: module whose input it shares} (itself when none) from one short forward, in call order.

    Layers reading one tensor (q/k/v, gate/up) are called back to back with the same object; only the last
    input is kept alive, so no freed address can be mistaken for a shared input."""
    alias: dict[str, str] = {}
    prev: list[Any] = [None, None]

    def hook(name):
        def fn(_module, inputs, _output):
            x = inputs[0]
            alias[name] = prev[1] if x is prev[0] else name
            if x is not prev[0]:
                prev[0], prev[1] = x, name
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    guard = _stop_before_head(model, linears)
    try:
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles + ([guard] if guard is not None else []):
            h.remove()
    return alias


def plan_groups(sizes: dict[str, int], bytes_per_number: int, budget_gb: Optional[float]) -> list[list[str]]:
    """Consecutive groups (in forward order) of unique inputs whose two statistics' sums, sizes[m] = d_in^2
    numbers each, fit ``budget_gb``; one group when there is no budget. A single input over the budget gets
    a group of its own."""
    if budget_gb is None:
        return [list(sizes)]
    budget = budget_gb * 2**30
    groups: list[list[str]] = [[]]
    used = 0.0
    for name, size in sizes.items():
        need = len(STATS) * size * bytes_per_number
        if groups[-1] and used + need > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(name)
        used += need
    return groups


class Accumulators:
    """Sums of one module group: fp32 on a CUDA device, flushed into fp64 host sums (``flush``); fp64 in place
    on the CPU."""

    def __init__(self, device: torch.device):
        self.in_place = device.type == "cpu"
        self.device_sums: dict[tuple[str, str], torch.Tensor] = {}
        self.host_sums: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, key: tuple[str, str], prod: torch.Tensor) -> None:
        store = self.host_sums if self.in_place else self.device_sums
        if key in store:
            store[key] += prod
        else:
            store[key] = prod.to(torch.float64 if self.in_place else torch.float32).clone()

    def flush(self) -> None:
        for key, t in self.device_sums.items():
            host = t.to("cpu", torch.float64)
            if key in self.host_sums:
                self.host_sums[key] += host
            else:
                self.host_sums[key] = host
            t.zero_()


class GroupCollector:
    """Forward hooks on one group's unique inputs: per sample, P = x^T x (fp32) into both statistics."""

    def __init__(self, modules: dict[str, torch.nn.Linear], acc: Accumulators, stop_after: Optional[str]):
        self.acc = acc
        self.tokens: dict[str, int] = {}
        self.samples: dict[str, int] = {}
        self.stop_after = stop_after
        self._zero_peak: dict[str, torch.Tensor] = {}  # device flags, read once per group (no sync per batch)
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().float()
            peak = x.amax(dim=(1, 2))  # per sample: the signed max, as torch.max(x) in PEFT / the official code
            zero = (peak == 0).any()
            self._zero_peak[name] = zero if name not in self._zero_peak else self._zero_peak[name] | zero
            for b in range(x.shape[0]):
                prod = x[b].T @ x[b]
                self.acc.add((name, "covariance"), prod)
                self.acc.add((name, "max_normalized_covariance"), prod / peak[b].square())
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0] * x.shape[1]
            self.samples[name] = self.samples.get(name, 0) + x.shape[0]
            if name == self.stop_after:
                raise _StopForward
        return hook

    def check(self) -> None:
        """ConfigError naming the first module one of whose samples had max activation 0 (checked once per
        group, before its statistics are written: a check per batch would make the host wait for the GPU)."""
        for name, zero in self._zero_peak.items():
            if bool(zero):
                raise ConfigError(f"{name}: a calibration sample's max activation is 0; the per-sample "
                                  "normalisation (x / |max(x)|) is undefined")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def collect_groups(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], windows: Windows,
                   batch_size: int, alias: dict[str, str], budget_gb: Optional[float], progress: bool = True
                   ) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, int], dict[str, int]]]:
    """Yield per module group ``(number of groups, sums {"<module>.<statistic>": fp64 host [d_in, d_in]}, tokens,
    samples)``, keyed by the unique inputs of ``alias`` (:func:`probe_aliases`). One pass over ``windows`` per
    group; write each group out before asking for the next, so the host holds one group's sums."""
    device = next(model.parameters()).device
    batches = batches_of(windows, batch_size)
    unique = [n for n, a in alias.items() if n == a]
    sizes = {n: linears[n].in_features ** 2 for n in unique}
    groups = plan_groups(sizes, 8 if device.type == "cpu" else 4, budget_gb)
    for index, group in enumerate(groups):
        acc = Accumulators(device)
        # Every pass, the last group's included, stops after its last unique input: the layers after it and
        # the LM head never run (aliases are called after the input they share, so they need no hook).
        collector = GroupCollector({n: linears[n] for n in group}, acc, group[-1])
        desc = "calibrate" if len(groups) == 1 else f"calibrate {index + 1}/{len(groups)}"
        try:
            for step, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress), 1):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
                if step % FLUSH_EVERY == 0:
                    acc.flush()
        finally:
            collector.remove()
        collector.check()
        acc.flush()
        sums = {f"{n}.{s}": t for (n, s), t in acc.host_sums.items()}
        del acc
        yield len(groups), sums, collector.tokens, collector.samples
        del sums  # before the next group's pass: the host holds one group's sums at a time


@torch.no_grad()
def collect_from_runs(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], alias: dict[str, str],
                      run_model: Any) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, int]]:
    """(sums, tokens, samples) as one group of :func:`collect_groups` yields, from the forwards ``run_model()``
    makes itself (PEFT's ``preprocess_corda(run_model=...)`` protocol): every unique input hooked at once (no
    device budget), no early stop. Each unpadded batch row is one sample. On CUDA the fp32 device sums are flushed
    into fp64 host sums every :data:`FLUSH_EVERY` model forwards, as in :func:`collect_groups`."""
    device = next(model.parameters()).device
    acc = Accumulators(device)
    collector = GroupCollector({n: linears[n] for n, a in alias.items() if n == a}, acc, None)
    forwards = [0]

    def count(_module, _args):
        forwards[0] += 1
        if forwards[0] % FLUSH_EVERY == 0:
            acc.flush()

    counter = model.register_forward_pre_hook(count)
    try:
        run_model()
    finally:
        counter.remove()
        collector.remove()
    if not collector.tokens:
        raise ConfigError("run_model() ran no forward through the targeted modules: no statistics collected")
    collector.check()
    acc.flush()
    return {f"{n}.{s}": t for (n, s), t in acc.host_sums.items()}, collector.tokens, collector.samples


def packed_size(n: int) -> int:
    """Numbers in the packed upper triangle of an [n, n] matrix."""
    return n * (n + 1) // 2


def triu_side(numbers: int) -> int:
    """n of a packed upper triangle of ``numbers`` numbers (ValueError when no n fits)."""
    n = (math.isqrt(8 * numbers + 1) - 1) // 2
    if packed_size(n) != numbers:
        raise ValueError(f"{numbers} numbers are not the upper triangle of a square matrix")
    return n


def pack_triu(matrix: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The upper triangle of a square ``matrix`` (diagonal included), row by row: 1-D, row i's part C[i, i:] at
    offset i n - i (i - 1) / 2, cast to ``dtype`` (default: the matrix's) on the way. Copied row by row, so no
    index tensor (``torch.triu_indices`` at n = 11008 is 0.97 GB of int64) and no full-size temporary."""
    n = matrix.shape[0]
    if matrix.dim() != 2 or matrix.shape[1] != n:
        raise ValueError(f"pack_triu needs a square matrix, got {tuple(matrix.shape)}")
    out = torch.empty(packed_size(n), dtype=dtype or matrix.dtype, device=matrix.device)
    offset = 0
    for i in range(n):
        out[offset:offset + n - i].copy_(matrix[i, i:])
        offset += n - i
    return out


def unpack_triu(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric [n, n] matrix whose upper triangle :func:`pack_triu` packed: the upper triangle copied row
    by row, then mirrored into the lower one in :data:`MIRROR_BLOCK`-square tiles (element copies, no
    arithmetic: the result is bit-equal, signed zeros included). Memory: the result plus ``packed``, 1.5 n^2 x 4
    bytes for fp32; n = 11008 on 2 busy CPU cores: 0.7-0.9 s (packing: 0.25 s)."""
    n = triu_side(packed.numel())
    out = torch.empty(n, n, dtype=packed.dtype, device=packed.device)
    offset = 0
    for i in range(n):
        out[i, i:].copy_(packed[offset:offset + n - i])
        offset += n - i
    upper = torch.ones(MIRROR_BLOCK, MIRROR_BLOCK, dtype=torch.bool, device=out.device).triu()
    for start in range(0, n, MIRROR_BLOCK):
        stop = min(start + MIRROR_BLOCK, n)
        for col in range(0, start, MIRROR_BLOCK):  # tile by tile (cache-sized; a whole panel is 3x slower)
            out[start:stop, col:col + MIRROR_BLOCK].copy_(out[col:col + MIRROR_BLOCK, start:stop].T)
        block = out[start:stop, start:stop]
        block.copy_(torch.where(upper[:stop - start, :stop - start], block, block.T))
    return out


class StatisticsWriter:
    """Writes groups of statistics as they come: ``stats.safetensors`` for a single group, else
    ``stats-<i>-of-<n>.safetensors`` per group and ``stats.index.json`` (tensor key -> file) at the end."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.index: dict[str, str] = {}
        self.written = 0

    def write(self, tensors: dict[str, torch.Tensor], groups: int) -> None:
        self.written += 1
        name = STATS_FILE if groups == 1 else f"stats-{self.written:05d}-of-{groups:05d}.safetensors"
        save_file(tensors, str(self.out_dir / name))
        self.index.update({key: name for key in tensors})

    def close(self) -> None:
        if self.written > 1:
            atomic_write_json(self.out_dir / STATS_INDEX, self.index)


class CalibrationStats:
    """Per-module access to a calibration folder's statistics (one tensor read at a time, never the files).

    ``get(module, statistic)`` -> the full symmetric [d_in, d_in] fp32 matrix, following the alias of a shared
    input, unpacked from ``<input>.<statistic>.triu`` (:func:`unpack_triu`) or, in a folder written before
    packing, read as stored from ``<input>.<statistic>``; modules sharing an input get the same tensor object
    when asked back to back (``linalg.memoised`` reuses its decomposition). ``official`` is True when
    calibration ran ``calibration.official`` (meta.json)."""

    def __init__(self, calibration_dir: Path):
        self.dir = Path(calibration_dir)
        meta = read_json(self.dir / "meta.json")
        self.alias: dict[str, str] = meta["alias"]
        self.official = bool(meta.get("official", False))
        self.index = read_json(self.dir / STATS_INDEX) if (self.dir / STATS_INDEX).exists() else None
        self._last: tuple[str, torch.Tensor] | None = None  # q/k/v (gate/up) ask for one tensor back to back

    def _file(self, key: str) -> Path:
        return self.dir / ((self.index.get(key + PACKED) or self.index.get(key, STATS_FILE)) if self.index
                           else STATS_FILE)

    def get(self, module: str, statistic: str) -> torch.Tensor:
        key = f"{self.alias[module]}.{statistic}"
        if self._last is None or self._last[0] != key:
            self._last = None  # the previous input's matrix is dropped before the next one is read
            path = self._file(key)
            with safe_open(str(path), framework="pt") as fh:
                keys = set(fh.keys())
                if key + PACKED in keys:
                    tensor = unpack_triu(fh.get_tensor(key + PACKED))
                elif key in keys:  # written before the statistics were packed: the full matrix
                    tensor = fh.get_tensor(key)
                else:
                    raise ConfigError(f"{path} has no '{key}{PACKED}' (nor '{key}'): calibration is older than "
                                      "this lnull; delete the calibration folder and run `lnull calibrate` again")
            self._last = (key, tensor)
        return self._last[1]

    def side(self, module: str, statistic: str) -> int:
        """d_in of the module's ``statistic``, read from the file header (no tensor is loaded)."""
        key = f"{self.alias[module]}.{statistic}"
        path = self._file(key)
        with safe_open(str(path), framework="pt") as fh:
            if key + PACKED in fh.keys():
                return triu_side(fh.get_slice(key + PACKED).get_shape()[0])
            if key in fh.keys():
                return fh.get_slice(key).get_shape()[0]
        raise ConfigError(f"{path} has no '{key}{PACKED}' (nor '{key}'): delete the calibration folder and run "
                          "`lnull calibrate` again")


class StatisticsInMemory:
    """What :class:`StatisticsWriter` writes, kept in memory (``write`` / ``close``), read back as
    :class:`CalibrationStats` reads a folder (``alias``, ``official``, ``get``, ``side``): the statistics of
    ``lnull.api.collect_statistics``. Memory: the packed fp32 triangles, n (n + 1) / 2 x 4 bytes per unique input
    and statistic (LLaMA-2-7B: 20.4 GiB for both)."""

    def __init__(self, alias: dict[str, str], official: bool = False):
        self.alias, self.official = alias, official
        self.tensors: dict[str, torch.Tensor] = {}
        self.written = 0
        self._last: tuple[str, torch.Tensor] | None = None

    def write(self, tensors: dict[str, torch.Tensor], groups: int) -> None:
        self.written += 1
        self.tensors.update(tensors)

    def close(self) -> None:
        pass

    def get(self, module: str, statistic: str) -> torch.Tensor:
        key = f"{self.alias[module]}.{statistic}"
        if self._last is None or self._last[0] != key:
            self._last = None
            self._last = (key, unpack_triu(self.tensors[key + PACKED]))
        return self._last[1]

    def side(self, module: str, statistic: str) -> int:
        return triu_side(self.tensors[f"{self.alias[module]}.{statistic}{PACKED}"].numel())


def check_statistics(stats: Any, linears: dict[str, torch.nn.Linear], statistic: str) -> None:
    """Before any decomposition: every targeted module has ``statistic`` in ``stats`` and it is [d_in, d_in] of the
    module's input (one ConfigError line naming the first module that does not: statistics of another model, or
    of other target modules). Reads shapes only."""
    for name, lin in linears.items():
        if name not in stats.alias:
            raise ConfigError(f"the statistics have no entry for module {name}: collected on another model or "
                              "other target modules")
        side = stats.side(name, statistic)
        if side != lin.in_features:
            raise ConfigError(f"the statistics of module {name} are {side} x {side} but its input has "
                              f"{lin.in_features} features: statistics of another model")


def has_statistics(calibration_dir: Optional[Path]) -> bool:
    return calibration_dir is not None and any((Path(calibration_dir) / f).exists() for f in (STATS_FILE, STATS_INDEX))


def load_statistic(calibration_dir: Path, statistic: str = "covariance") -> dict[str, torch.Tensor]:
    """``{module: statistic [d_in, d_in]}`` from calibration, expanding aliases of shared inputs."""
    stats = CalibrationStats(calibration_dir)
    return {name: stats.get(name, statistic) for name in stats.alias}


def default_budget_gb(device: torch.device, budget_gb: Optional[float]) -> Optional[float]:
    """``calibration.device_budget_gb``, else :data:`DEFAULT_CUDA_BUDGET_GB` capped at 60% of the free device
    memory on CUDA, and no limit on the CPU."""
    if budget_gb is not None or device.type != "cuda":
        return budget_gb
    free, _ = torch.cuda.mem_get_info(device)
    return min(DEFAULT_CUDA_BUDGET_GB, math.floor(0.6 * free / 2**30 * 10) / 10)
