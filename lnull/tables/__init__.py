"""`lnull table`: a command, not a stage. It builds tables only from stored result records (run by other runs) and
writes them to ``table.out_dir``; it has no key and no run folder, and its library chatter goes to
``<run.root>/logs/table.log``.

Each ``table.kind`` is one :class:`lnull.tables.base.TableKind` registered by its own module:

- ``summary`` (``table=summary``, the default): every run's records pivoted (``summary.py``);
- ``results`` (a paper table, e.g. ``table=aaai_3a``): the pre-trained row, then one row per method of the
  table's experiment; raw, derived (``derived.py``) and #Params columns, best bold and runner-up underlined, each
  reproduced cell with its standard error, side by side with the papers' numbers (``reported.py``), and a figure
  for the sweep tables (``figures.py``) (``paper.py``);
- ``analysis``: AAAI Tables 1-2 from ``lnull analyze`` (``analysis_tables.py``);
- ``retention`` (``table=demo``, ``make demo``): knowledge kept vs task learned (``retention.py``).

``table.run_missing=true`` first runs whatever rows the store lacks (the kind's ``run_missing``);
``table.audit=true`` (``lnull table --audit``) recomputes every derived column of the reported tables instead.
Rows, cells and the store lookups every kind shares are in ``rows.py``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from lnull.tables.base import TableKind, kinds, table_kind
from lnull.tables.rows import write_files

__all__ = ["TableKind", "kinds", "table_kind", "build_table", "run_table", "build_tables", "log_file"]

Log = Callable[[str], None]


def log_file(cfg: dict[str, Any]) -> Path:
    """Where the library chatter of `lnull table` goes: ``<run.root>/logs/table.log``."""
    return Path(cfg["run"]["root"]) / "logs" / "table.log"


def audit_table(cfg: dict[str, Any], out: Path, log: Log = print) -> dict[str, Any]:
    """``lnull table --audit``: every printed derived value of the reported tables that their printed raw values
    do not give, into ``<out>/audit.{md,csv}``."""
    from lnull.tables.reported import audit, audit_texts, load

    found = audit(load(Path(cfg["table"]["reported_dir"])))
    for d in found:
        log(d.line())
    return {"disagreements": len(found), "paths": write_files(out, "audit", audit_texts(found))}


def build_table(cfg: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """The audit, or the table of ``table.kind`` (after running its missing rows when ``table.run_missing``),
    written into ``table.out_dir``: the kind's summary (``rows``, ``paths``, ...)."""
    tcfg = cfg["table"]
    out = Path(tcfg["out_dir"])
    if tcfg["audit"]:
        return audit_table(cfg, out, log)
    kind = table_kind(tcfg["kind"])
    if tcfg["run_missing"]:
        kind.run_missing(cfg, log)
    return kind.build(cfg, out, log)


def run_table(cfg: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """`lnull table`: :func:`build_table` with library chatter in :func:`log_file`; says where it wrote."""
    from lnull.console import stage_log

    start = time.perf_counter()
    with stage_log(log_file(cfg)):
        summary = build_table(cfg, log)
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    log(f"[table] done in {summary['wall_seconds']:.1f}s: {cfg['table']['out_dir']}")
    return summary


def build_tables(cfg: dict[str, Any]) -> list[Path]:
    """`lnull table` from Python, quietly: the paths of the written files."""
    return sorted(Path(p) for p in build_table(cfg, log=lambda m: None)["paths"])
