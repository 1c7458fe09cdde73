"""Stage `table`: paper-style tables built only from runs' ``eval/results.json``."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lnull.config import ConfigError
from lnull.runs import atomic_write_text


def collect_results(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per (run, evaluated model, benchmark)."""
    rows = []
    for run in run_dirs:
        path = run / "eval" / "results.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for rec in data["results"]:
            rows.append({"run": run.name, "experiment": data["experiment"], "method": data["method"],
                         "rank": data["rank"], "model": rec["model"], "benchmark": rec["benchmark"],
                         "value": rec["value"], "n": rec["n"]})
    return rows


def fmt(value: float | None) -> str:
    """Two decimals; a benchmark recorded as skipped (value None) shows as 'n/a', never as 0."""
    return "n/a" if value is None else f"{value:.2f}"


def pivot(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows = (experiment, method, rank, model), columns = benchmarks, cells = value (2 decimals)."""
    benches = sorted({r["benchmark"] for r in rows})
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["experiment"], r["method"], str(r["rank"]), r["model"]), {})[r["benchmark"]] = r["value"]
    header = ["experiment", "method", "rank", "model"] + benches
    body = [list(key) + [fmt(cells[b]) if b in cells else "" for b in benches] for key, cells in sorted(table.items())]
    return header, body


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def to_latex(header: list[str], body: list[list[str]]) -> str:
    esc = lambda s: s.replace("_", r"\_")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * 4 + "r" * (len(header) - 4) + "}", r"\toprule",
             " & ".join(map(esc, header)) + r" \\", r"\midrule"]
    lines += [" & ".join(map(esc, row)) + r" \\" for row in body]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def build_tables(cfg: dict[str, Any]) -> list[Path]:
    """Write ``<out_dir>/<name>.{md,tex,csv}``; return the paths."""
    tcfg = cfg["table"]
    root = Path(cfg["run"]["root"])
    run_dirs = [Path(p) for p in tcfg["runs"]] or sorted(p for p in root.glob("*") if p.is_dir())
    rows = collect_results(run_dirs)
    if not rows:
        raise ConfigError(f"no eval results found in {', '.join(map(str, run_dirs)) or root}")
    header, body = pivot(rows)
    out = Path(tcfg["out_dir"])
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + body)
    paths = []
    for ext, text in (("md", to_markdown(header, body)), ("tex", to_latex(header, body)), ("csv", buf.getvalue())):
        path = out / f"{tcfg['name']}.{ext}"
        atomic_write_text(path, text)
        paths.append(path)
    return paths
