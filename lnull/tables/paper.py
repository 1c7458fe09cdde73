"""A paper table from its spec (``configs/table/<name>.yaml``): each row is the table's experiment with one
method, composed as ``lnull run`` would compose it; its cells are the stored records of that config (looked up by
key, so a row is done exactly when the store has its records) and the derived columns computed from them.

A cited row (``cited:`` in its spec, e.g. RoseLoRA in extended Table 4, whose code is not public) is never run:
its cells are the paper's numbers (the reported CSV's row, else the spec's ``values``), marked "reported, not
reproduced" wherever the table is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from lnull.errors import ConfigError
from lnull.io import warn
from lnull.tables.derived import derive


@dataclass
class Cell:
    """One number: ``value`` (None: missing), its standard error, and why it is missing when it is."""

    value: Optional[float]
    stderr: Optional[float] = None
    missing: Optional[str] = None  # "not run" (no record in the store) | "not scored" (e.g. no MT-Bench judge)


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

    @property
    def is_base(self) -> bool:
        return self.method == "base"

    @property
    def is_cited(self) -> bool:
        return self.cited is not None


CITED = "reported, not reproduced"


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


def compose_rows(table_cfg: dict[str, Any]) -> list[Row]:
    """The pre-trained row then one row per spec row, each with its composed config."""
    from lnull.compose import compose

    tcfg = table_cfg["table"]
    if not tcfg["rows"] or not tcfg["experiment"]:
        raise ConfigError(f"table '{tcfg['name']}' has no rows or no experiment: not a paper table")
    scale = table_cfg["scale"]
    if all(spec.get("cited") for spec in tcfg["rows"]):
        raise ConfigError(f"table '{tcfg['name']}' has only cited rows: nothing to run")
    rows = []
    for spec in tcfg["rows"]:
        if spec.get("cited"):
            rows.append(Row(spec.get("label") or spec["method"], spec["method"], {},
                            spec.get("reported") or spec["method"], paper_rank=spec.get("rank"),
                            paper_calib=spec.get("calibration_samples"), params=spec.get("params"),
                            cited=spec["cited"], cited_values=dict(spec.get("values") or {})))
            continue
        cfg = compose(row_overrides(table_cfg, spec))
        # the paper's values: the row's own, else the experiment's (exact: a scale's defaults are paper / divisor)
        rank = spec.get("rank") or cfg["method"]["rank"] * scale["rank_divisor"]
        calib = spec.get("calibration_samples") or cfg["calibration"]["samples"] * scale["calib_divisor"]
        x = {"method.rank": rank, "calibration.samples": calib}.get(tcfg.get("sweep") or "")
        rows.append(Row(spec.get("label") or spec["method"], spec["method"], cfg,
                        spec.get("reported") or spec["method"], paper_rank=rank, paper_calib=calib, x=x))
    # The paper's model name at paper scale; the model actually run otherwise (demo scale, smoke overrides).
    paper_setting = table_cfg["scale"]["name"] == "paper" and not tcfg["overrides"]
    first = next(r for r in rows if not r.is_cited)
    for row in rows:  # a cited row stands in the table's setting (never run: its cfg is read for nothing else)
        if row.is_cited:
            row.cfg = first.cfg
    base_label = (tcfg.get("base_label") if paper_setting else None) or first.cfg["model"]["name"]
    return [Row(f"{base_label} (pre-trained)", "base", first.cfg, "base")] + rows


def columns(tcfg: dict[str, Any]) -> list[str]:
    """Column order as the papers print it: knowledge, Avg1, Avg1(Per), downstream, Avg2, GM (AAAI); knowledge,
    downstream, Avg (extended)."""
    derived = list(tcfg["derived"])
    head = [c for c in ("avg1", "avg1_per") if c in derived]
    tail = [c for c in ("avg2", "gm", "avg") if c in derived]
    return list(tcfg["knowledge"]) + head + list(tcfg["downstream"]) + tail


def check_benchmarks(rows: list[Row], tcfg: dict[str, Any]) -> None:
    """Every raw column is a benchmark of every row's eval config (else a one-line ConfigError)."""
    for row in rows:
        if row.is_cited:
            continue
        have = row.cfg["eval"]["benchmarks"]
        for bench in list(tcfg["knowledge"]) + list(tcfg["downstream"]):
            if bench not in have:
                raise ConfigError(f"table '{tcfg['name']}': column '{bench}' is not a benchmark of experiment "
                                  f"'{tcfg['experiment']}' (it has {', '.join(have)})")


def fill(rows: list[Row], tcfg: dict[str, Any]) -> None:
    """Cells of every row from the store (raw columns; a cited row's from the paper), then the derived columns."""
    from lnull.evaluate import expected_records
    from lnull.layout import RunLayout

    raw = list(tcfg["knowledge"]) + list(tcfg["downstream"])
    for row in rows:
        if row.is_cited:
            fill_cited(row, raw, tcfg)
            continue
        layout = RunLayout(row.cfg)
        keys = expected_records(layout, "base" if row.is_base else "trained")
        for bench in raw:
            rec = layout.store.read_record(keys[bench], warn=warn)
            if rec is None:
                row.cells[bench] = Cell(None, missing="not run")
            elif rec["value"] is None:
                row.cells[bench] = Cell(None, missing="not scored")
            else:
                row.cells[bench] = Cell(rec["value"], rec.get("stderr"))
            if rec and rec.get("method") and rec["method"].get("trainable_params"):
                row.params = rec["method"]["trainable_params"]
    base = {k: rows[0].cells[k].value for k in tcfg["knowledge"]}
    for row in rows:
        values = {k: c.value for k, c in row.cells.items()}
        for column, value in derive(values, base, list(tcfg["knowledge"]), list(tcfg["downstream"]),
                                    list(tcfg["derived"])).items():
            why = next((c.missing for k, c in row.cells.items() if c.missing), None)
            row.cells[column] = Cell(value, missing=None if value is not None else why or "not computable")


def fill_cited(row: Row, raw: list[str], tcfg: dict[str, Any]) -> None:
    """A cited row's raw cells: the reported CSV's row (``table.reported``) when it has one, else the spec's
    ``values``; a column the paper does not print is missing as "not reported"."""
    from pathlib import Path

    from lnull.tables.reported import cited_values

    values = cited_values(row, Path(tcfg["reported_dir"]), tcfg.get("reported"))
    for bench in raw:
        value = values.get(bench)
        row.cells[bench] = Cell(value, missing=None if value is not None else "not reported")


def status(rows: list[Row]) -> list[tuple[str, bool]]:
    """(label, every raw cell present) per row; a cited row is never run, so it is never missing."""
    return [(f"{row.label} ({CITED})" if row.is_cited else row.label,
             row.is_cited or all(c.missing != "not run" for c in row.cells.values())) for row in rows]


def run_missing(rows: list[Row], stages: Optional[list[str]], log: Callable[[str], None]) -> None:
    """Run each row's config (``lnull run``, or ``stages``): stored stages and records are reused, so this
    computes only what the store lacks. The pre-trained row is scored by the first row's run."""
    from lnull.pipeline import run_pipeline

    for row in rows:
        if row.is_base:
            continue
        if row.is_cited:
            log(f"[table] {row.label}: {CITED} ({row.cited}); not run")
            continue
        log(f"[table] {row.label}: +experiment={row.cfg['experiment']} method={row.method}")
        run_pipeline(row.cfg, stages=stages, log=log)
