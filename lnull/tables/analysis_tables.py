"""Table kind ``analysis``: AAAI Tables 1 and 2 measured by ``lnull analyze``, as Markdown, LaTeX and CSV; its rows
are composed as a paper table's (``paper.compose_rows``) and run as far as ``analyze``.

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
from typing import Any, Callable

from lnull.errors import ConfigError
from lnull.tables.base import TableKind, register
from lnull.tables.paper import compose_rows, run_rows
from lnull.tables.render import MISSING, latex_escape
from lnull.tables.rows import Row, write_files

PARTS = ("table1", "effective_rank")

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


def composed(cfg: dict[str, Any]) -> list[Row]:
    """The table's method rows (the pre-trained row is not analysed)."""
    part = cfg["table"]["analysis_part"]
    if part not in PARTS:
        raise ConfigError(f"table.analysis_part must be {' or '.join(PARTS)}, got '{part}'")
    return compose_rows(cfg)[1:]


def texts(tcfg: dict[str, Any], rows: list[Row], reported_dir: Path, title: str = "", note: str = "") -> dict[str, str]:
    """{md, tex, csv} of an analysis table (``title``: default the spec's; ``note`` under the table)."""
    if tcfg["analysis_part"] == "table1":
        header, body = table1(rows)
    else:
        header, body = effective_ranks(rows, reported_dir / (tcfg["reported"] or "aaai_table2_effective_rank.csv"))
    title = title or tcfg["title"]
    md = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in body] + [""] + ([note] if note else [])
    if any(MISSING in cell for r in body for cell in r):
        md += [f"{MISSING} not analysed yet (`lnull table table={tcfg['name']} table.run_missing=true`)"]
    tex = [f"% {latex_escape(title)}", r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
           " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    tex += [" & ".join(latex_escape(c).replace(MISSING, "---") for c in r) + r" \\" for r in body]
    tex += [r"\bottomrule", r"\end{tabular}"]
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + body)
    return {"md": "\n".join(md) + "\n", "tex": "\n".join(tex) + "\n", "csv": buf.getvalue()}


def build(cfg: dict[str, Any], out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``<name>.{md,tex,csv}`` into ``out`` from the rows' stored analyses."""
    from lnull.tables import provenance
    from lnull.tables.paper import paper_setting
    from lnull.tables.render import LABELS

    tcfg = cfg["table"]
    rows = composed(cfg)
    facts = provenance.ran(rows)
    title = provenance.title(tcfg, cfg["scale"]["name"], paper_setting(cfg), facts)
    written = texts(tcfg, rows, Path(tcfg["reported_dir"]), title, provenance.line(facts, LABELS))
    log(written["md"])
    return {"rows": len(rows), "complete_rows": sum(ok for _, ok in status_of(rows)),
            "paths": write_files(out, tcfg["name"], written)}


def status_of(rows: list[Row]) -> list[tuple[str, bool]]:
    """(row label, its run's analysis is stored) per method row."""
    from lnull.layout import RunLayout

    return [(row.label, RunLayout(row.cfg).is_complete("analyze")) for row in rows]


ANALYSIS = register(TableKind(
    "analysis", build, compose=composed, status=lambda cfg: status_of(composed(cfg)),
    run_missing=lambda cfg, log: run_rows(composed(cfg), ["calibrate", "init", "analyze"], log)))
