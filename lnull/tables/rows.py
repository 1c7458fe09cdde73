"""What every table kind shares: a row's cells, the Hydra overrides of a row's run, its stored records, running
the rows the store lacks, and writing the table's files.

A row of any table is the table's experiment with one method (and, for some kinds, one learning rate and seed),
composed as ``lnull run`` would compose it, so a row is done exactly when the store holds its records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from lnull.errors import ConfigError
from lnull.io import atomic_write_text, warn

CITED = "reported, not reproduced"


@dataclass
class Cell:
    """One number: ``value`` (None: missing), its standard error, and why it is missing when it is."""

    value: Optional[float]
    stderr: Optional[float] = None
    missing: Optional[str] = None  # "not run" (no record in the store) | "not scored" (e.g. no MT-Bench judge)
    items: Optional[list[float]] = None  # per-item values in the record's item order (paired comparisons)


@dataclass
class Row:
    label: str
    method: str  # registry name, or "base" for the pre-trained row
    cfg: dict[str, Any]
    reported_as: str
    paper_rank: Optional[int] = None  # the row's rank and calibration size in the paper's units (any scale)
    paper_calib: Optional[int] = None
    x: Optional[int] = None  # the paper's value of the table's swept key (rank or calibration samples)
    cells: dict[str, Cell] = field(default_factory=dict)
    params: Optional[int] = None  # trainable parameters, measured by training
    cited: Optional[str] = None  # a cited row: where its numbers come from (never run, never looked up)
    cited_values: dict[str, float] = field(default_factory=dict)
    records: dict[str, Optional[dict[str, Any]]] = field(default_factory=dict)  # benchmark -> stored record read

    @property
    def is_base(self) -> bool:
        return self.method == "base"

    @property
    def is_cited(self) -> bool:
        return self.cited is not None


def mean_stderr(cells: list[Cell]) -> Optional[float]:
    """Standard error of the mean of ``cells``' values (independent cells): sqrt(sum se²) / n; None when a cell has
    none."""
    if not cells or any(c.stderr is None for c in cells):
        return None
    return math.sqrt(sum(c.stderr ** 2 for c in cells)) / len(cells)


def row_overrides(table_cfg: dict[str, Any], row: dict[str, Any]) -> list[str]:
    """The Hydra overrides of one row: the table's experiment, the row's method, its paper rank and calibration
    size divided by the scale's divisors, the scale, and the caller's run/store/cache settings."""
    cfg, tcfg = table_cfg, table_cfg["table"]
    scale = cfg["scale"]
    out = [f"+experiment={tcfg['experiment']}", f"method={row['method']}"]
    if scale["name"] != "paper":
        out.append(f"+scale={scale['name']}")
    if row.get("rank") is not None:
        out.append(f"method.rank={max(1, round(row['rank'] / scale['rank_divisor']))}")
    if row.get("calibration_samples") is not None:
        out.append(f"calibration.samples={max(1, round(row['calibration_samples'] / scale['calib_divisor']))}")
    out += [f"run.root={cfg['run']['root']}", f"progress={str(cfg['progress']).lower()}", f"device={cfg['device']}"]
    if cfg.get("store", {}).get("root"):
        out.append(f"store.root={cfg['store']['root']}")
    if cfg.get("cache_dir"):
        out.append(f"cache_dir={cfg['cache_dir']}")
    return out + list(tcfg["overrides"])


def check_columns(cfg: dict[str, Any], columns: Iterable[str], table: str) -> None:
    """Every column is a benchmark of the row's eval config (else one ConfigError line naming it)."""
    have = list(cfg["eval"]["benchmarks"])
    for bench in columns:
        if bench not in have:
            raise ConfigError(f"table '{table}': column '{bench}' is not a benchmark of experiment "
                              f"'{cfg['experiment']}' (it has {', '.join(have)})")


def stored_records(cfg: dict[str, Any], which: str, benches: list[str]) -> dict[str, Optional[dict[str, Any]]]:
    """``{benchmark: its stored record, or None when the store lacks it}`` for the run of ``cfg`` and the model
    ``which`` (``base`` | ``init`` | ``trained``), looked up by record key (nothing is computed)."""
    from lnull.evaluate import expected_records
    from lnull.layout import RunLayout

    layout = RunLayout(cfg)
    keys = expected_records(layout, which)
    return {b: layout.store.read_record(keys[b], warn=warn) for b in benches}


def run_configs(jobs: list[tuple[str, dict[str, Any]]], stages: Optional[list[str]],
                log: Callable[[str], None]) -> None:
    """Run each ``(label, config)`` (``lnull run``, or only ``stages``): stored stages and records are reused, so
    this computes only what the store lacks."""
    from lnull.pipeline import run_pipeline

    for label, cfg in jobs:
        log(f"[table] {label}")
        run_pipeline(cfg, stages=stages, log=log)


def write_files(out: Path, name: str, texts: dict[str, str]) -> list[str]:
    """Write ``<out>/<name>.<ext>`` for each ``{ext: text}`` atomically; their paths."""
    paths = []
    for ext, text in texts.items():
        path = Path(out) / f"{name}.{ext}"
        atomic_write_text(path, text)
        paths.append(str(path))
    return paths
