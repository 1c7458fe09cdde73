"""AAAI Tables 1 and 2 measured by ``lnull analyze`` (``kind: analysis`` table specs), as Markdown, LaTeX and CSV.

- Table 1 (``analysis_part: table1``): per method, the means of ``analysis/table1.csv``: residual distance
  ||W_res - W0|| / ||W0||, and the share of A's energy in the principal eigen-space of the calibration
  activations (top m = their effective rank) and in their r smallest (the null space); the paper's verdicts
  (qualitative) beside them.
- Table 2 (``analysis_part: effective_rank``): effective rank of W0 and of X per (layer, module) of the first
  row's run, beside the paper's (``results/reported/aaai_table2_effective_rank.csv``) for the layers it prints.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

from lnull.errors import ConfigError
from lnull.tables.paper import Row
from lnull.tables.render import MISSING, latex_escape

TABLE1_COLUMNS = ("residual_rel_change", "A_energy_top_m", "A_energy_bottom_r")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _analysis_dir(row: Row) -> Path | None:
    from lnull.layout import RunLayout

    layout = RunLayout(row.cfg)
    return layout.view("analyze") if layout.is_complete("analyze") else None


def table1(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["Method", *TABLE1_COLUMNS, "paper"]
    body = []
    for row in rows:
        folder = _analysis_dir(row)
        means = {}
        if folder is not None and (folder / "table1.csv").exists():
            means = next((r for r in _read(folder / "table1.csv") if r["module"] == "mean"), {})
        spec = row.reported_as if row.reported_as != row.method else ""
        body.append([row.label] + [f"{float(means[c]):.4f}" if c in means else MISSING for c in TABLE1_COLUMNS]
                    + [spec])
    return header, body


def effective_ranks(rows: list[Row], reported_file: Path) -> tuple[list[str], list[list[str]]]:
    folder = _analysis_dir(rows[0])
    ours: dict[tuple[str, str, str], float] = {}
    if folder is not None and (folder / "effective_rank.csv").exists():
        for r in _read(folder / "effective_rank.csv"):
            m = re.search(r"layers\.(\d+)\..*?([^.]+)$", r["module"])
            if m:
                ours[(m.group(1), m.group(2), r["matrix"])] = float(r["effective_rank"])
    paper = {(r["layer"], r["module"], r["matrix"]): float(r["effective_rank"]) for r in _read(reported_file)} \
        if reported_file.exists() else {}
    keys = sorted(set(ours) | set(paper), key=lambda k: (int(k[0]), k[1], k[2]))
    header = ["layer", "module", "matrix", "eRank (ours)", "eRank (paper)"]
    body = [[k[0], k[1], k[2], f"{ours[k]:.2f}" if k in ours else MISSING,
             f"{paper[k]:.2f}" if k in paper else "n/a"] for k in keys]
    return header, body


def build(tcfg: dict[str, Any], rows: list[Row], reported_dir: Path) -> tuple[str, str, str]:
    """(markdown, latex, csv) of an analysis table."""
    part = tcfg["analysis_part"]
    if part == "table1":
        header, body = table1(rows)
    elif part == "effective_rank":
        header, body = effective_ranks(rows, reported_dir / (tcfg["reported"] or "aaai_table2_effective_rank.csv"))
    else:
        raise ConfigError(f"table.analysis_part must be table1 or effective_rank, got '{part}'")
    md = [f"### {tcfg['title']}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in body]
    md += ["", f"{MISSING} not analysed yet (`lnull table table={tcfg['name']} table.run_missing=true`)"]
    tex = [f"% {latex_escape(tcfg['title'])}", r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
           " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    tex += [" & ".join(latex_escape(c).replace(MISSING, "---") for c in r) + r" \\" for r in body]
    tex += [r"\bottomrule", r"\end{tabular}"]
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + body)
    return "\n".join(md) + "\n", "\n".join(tex) + "\n", buf.getvalue()
