"""The papers' reported numbers (``results/reported/lora_null_results.csv``, copied from ``../shared/reported``)
and the audit of their derived columns.

Long format: source (aaai | extended), table, model, task, method, rank, calib_samples, params, benchmark,
value. The method names are the papers' (``corda``; ``lora_null`` is v1 in the AAAI paper); ``base`` is the
pre-trained model.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lnull.errors import ConfigError
from lnull.tables.derived import DERIVED, PRINTED_STEP, derive, rounding_interval

RESULTS_FILE = "lora_null_results.csv"
KNOWLEDGE = ("triviaqa", "nq_open", "webqs")
BENCHMARK_NAMES = {"mtbench": "mt_bench"}  # reported name -> lnull benchmark name (eval configs)


@dataclass
class ReportedRow:
    """One printed row: the paper's method name, rank, calibration samples, #Params text and values."""

    method: str
    rank: Optional[int]
    calib_samples: Optional[int]
    params: str
    values: dict[str, float] = field(default_factory=dict)

    @property
    def is_base(self) -> bool:
        return self.method == "base"


def _int(text: str) -> Optional[int]:
    return int(text) if text.strip().isdigit() else None


def load(folder: Path) -> dict[str, list[ReportedRow]]:
    """``{"<source>:<table>": [rows in printed order]}`` from ``folder/lora_null_results.csv``."""
    path = Path(folder) / RESULTS_FILE
    if not path.exists():
        raise ConfigError(f"{path} not found: the papers' numbers ship in results/reported/")
    tables: dict[str, dict[tuple, ReportedRow]] = {}
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            rows = tables.setdefault(f"{rec['source']}:{rec['table']}", {})
            ident = (rec["method"], rec["rank"], rec["calib_samples"])
            row = rows.setdefault(ident, ReportedRow(rec["method"], _int(rec["rank"]), _int(rec["calib_samples"]),
                                                     rec["params"]))
            row.values[BENCHMARK_NAMES.get(rec["benchmark"], rec["benchmark"])] = float(rec["value"])
    return {name: list(rows.values()) for name, rows in tables.items()}


def find(rows: list[ReportedRow], method: str, rank: Optional[int], calib_samples: Optional[int]
         ) -> Optional[ReportedRow]:
    """The printed row of ``method`` (the only one of that name, else the one at this rank and calibration
    size, both in the paper's units)."""
    named = [row for row in rows if row.method == method]
    if len(named) == 1:
        return named[0]
    return next((row for row in named if row.rank == rank and row.calib_samples == calib_samples), None)


def columns_of(rows: list[ReportedRow]) -> tuple[list[str], list[str], list[str]]:
    """(knowledge, downstream, derived) columns a reported table prints, in the papers' order."""
    seen: list[str] = []
    for row in rows:
        seen += [k for k in row.values if k not in seen]
    knowledge = [k for k in KNOWLEDGE if k in seen]
    derived = [k for k in DERIVED if k in seen]
    downstream = [k for k in seen if k not in knowledge and k not in derived]
    return knowledge, downstream, derived


@dataclass
class Disagreement:
    table: str
    row: str
    column: str
    printed: float
    recomputed: float

    def line(self) -> str:
        return (f"{self.table} {self.row}: {self.column} printed {self.printed:.2f}, recomputed "
                f"{self.recomputed:.2f} from the printed raw columns")


def audit(tables: dict[str, list[ReportedRow]]) -> list[Disagreement]:
    """Every printed derived value that no rounding of the printed raw values explains: the derived value of
    raw values anywhere within half a printed step of what is printed must come within half a step of it."""
    found = []
    for name, rows in tables.items():
        knowledge, downstream, derived = columns_of(rows)
        base_row = next((r for r in rows if r.is_base), None)
        base = {k: base_row.values.get(k) for k in knowledge} if base_row else {}
        for row in rows:
            raw = {k: row.values[k] for k in knowledge + downstream if k in row.values}
            row_down = [k for k in downstream if k in raw]
            for column in derived:
                if column not in row.values or (column in ("avg2", "gm") and not row_down) \
                        or (column == "avg" and not row_down):
                    continue
                printed = row.values[column]

                def fn(s, b, column=column):
                    return derive(s, b, knowledge, row_down, [column])[column]
                bounds = rounding_interval(fn, raw, base if column == "avg1_per" else {})
                if bounds is None:
                    continue
                lo, hi = bounds
                if printed + PRINTED_STEP / 2 < lo - 1e-9 or printed - PRINTED_STEP / 2 > hi + 1e-9:
                    label = row.method if row.is_base else f"{row.method} r={row.rank} n={row.calib_samples}"
                    found.append(Disagreement(name, label, column, printed, fn(raw, base)))
    return found


def cited_values(row, folder: Path, table: Optional[str]) -> dict[str, float]:
    """The numbers of a cited row (``lnull.tables.paper.Row`` with ``cited``): the reported CSV's row of
    ``table`` (``<source>:<table>``) under the row's reported name when the CSV has it, else the row's own
    ``values`` from its spec (transcribed in the table config)."""
    if table:
        try:
            printed = load(folder).get(table, [])
        except ConfigError:
            printed = []
        found = find(printed, row.reported_as, row.paper_rank, row.paper_calib) if printed else None
        if found is not None:
            return dict(found.values)
    return dict(row.cited_values)


def audit_texts(found: list[Disagreement]) -> dict[str, str]:
    """{md, csv} of the audit: every printed derived value its printed raw values do not give."""
    lines = ["### Audit of the papers' derived columns (Avg1, Avg1(Per), Avg2, GM, Avg)", "",
             "| table | row | column | printed | recomputed |", "|---|---|---|---:|---:|"]
    lines += [f"| {d.table} | {d.row} | {d.column} | {d.printed:.2f} | {d.recomputed:.2f} |" for d in found]
    lines += ["", f"{len(found)} printed value(s) disagree with their raw columns beyond rounding."]
    csv_lines = ["table,row,column,printed,recomputed"] + [f"{d.table},{d.row},{d.column},{d.printed:.2f},"
                                                          f"{d.recomputed:.4f}" for d in found]
    return {"md": "\n".join(lines) + "\n", "csv": "\n".join(csv_lines) + "\n"}
