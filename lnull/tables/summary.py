"""Table kind ``summary``, the default table (``lnull table``, ``table=summary``): every run's validated result records (``eval/results.json``)
pivoted to rows (experiment, method, rank, calibration samples, model) x benchmarks."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

from lnull.errors import ConfigError
from lnull.io import read_json
from lnull.records import read_results
from lnull.tables.base import TableKind, register
from lnull.tables.rows import write_files


def run_folders(root: Path) -> list[Path]:
    """Run folders under ``root`` (those holding a ``config.yaml``; the store and anything else are skipped):
    ``<root>/<experiment>/<name>`` and the older ``<root>/<experiment>-<hash>``."""
    return sorted(p for pattern in ("*", "*/*") for p in Path(root).glob(pattern) if (p / "config.yaml").is_file())


def collect_results(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per (run, evaluated model, benchmark), what was scored read from the record itself."""
    rows = []
    for run in run_dirs:
        path = run / "eval" / "results.json"
        if not path.exists():
            continue
        experiment = read_json(path).get("experiment", run.name)
        for rec in read_results(path):
            method, cal = rec.method, rec.calibration
            rows.append({"run": run.name, "experiment": experiment,
                         "method": method.name if method else "pre-trained",
                         "rank": "" if method is None or method.rank is None else str(method.rank),
                         "calibration": str(cal.samples) if cal else "", "model": rec.model,
                         "benchmark": rec.benchmark, "value": rec.value, "stderr": rec.stderr, "n": rec.n})
    return rows


def fmt(value: float | None) -> str:
    """Two decimals; a benchmark recorded as skipped (value None) shows as 'n/a', never as 0."""
    return "n/a" if value is None else f"{value:.2f}"


ROW_KEYS = ["experiment", "method", "rank", "calibration", "model"]


def pivot(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows = (experiment, method, rank, calibration samples, model), columns = benchmarks, cells = value
    (2 decimals). Runs that differ only in calibration size stay distinct rows; the base model scored by
    several runs is one row per experiment."""
    benches = sorted({r["benchmark"] for r in rows})
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        table.setdefault(tuple(r[k] for k in ROW_KEYS), {})[r["benchmark"]] = r["value"]
    header = ROW_KEYS + benches
    body = [list(key) + [fmt(cells[b]) if b in cells else "" for b in benches] for key, cells in sorted(table.items())]
    return header, body


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def to_latex(header: list[str], body: list[list[str]]) -> str:
    from lnull.tables.render import latex_escape as esc

    lines = [r"\begin{tabular}{" + "l" * len(ROW_KEYS) + "r" * (len(header) - len(ROW_KEYS)) + "}", r"\toprule",
             " & ".join(map(esc, header)) + r" \\", r"\midrule"]
    lines += [" & ".join(map(esc, row)) + r" \\" for row in body]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def build(cfg: dict[str, Any], out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the table of ``table.runs`` (default: every run under ``run.root``) into ``out_dir``."""
    tcfg = cfg["table"]
    root = Path(cfg["run"]["root"])
    run_dirs = [Path(p) for p in tcfg["runs"]] or run_folders(root)
    rows = collect_results(run_dirs)
    if not rows:
        raise ConfigError(f"no eval results found in {', '.join(map(str, run_dirs)) or root}")
    header, body = pivot(rows)
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + body)
    paths = write_files(out_dir, tcfg["name"], {"md": to_markdown(header, body), "tex": to_latex(header, body),
                                                "csv": buf.getvalue()})
    return {"rows": len(body), "paths": paths}


SUMMARY = register(TableKind("summary", build))
