"""Rendering paper tables: Markdown, LaTeX (booktabs, escaped) and CSV, best bold, runner-up underlined.

A missing cell is never 0: it shows "—" with a footnote saying why (not run, not scored). A cited row (never run,
its cells the paper's numbers) is labelled "reported, not reproduced" with a † footnote saying where they come from.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Callable, Optional

from lnull.tables.rows import CITED, Cell, Row
from lnull.tables.reported import ReportedRow

LABELS = {"triviaqa": "TriviaQA", "nq_open": "NQ Open", "webqs": "WebQS", "gsm8k": "GSM8K", "math": "MATH",
          "humaneval": "HumanEval", "mbpp": "MBPP", "mt_bench": "MT-Bench", "avg1": "Avg1", "avg1_per": "Avg1(Per)",
          "avg2": "Avg2", "gm": "GM", "avg": "Avg"}
MISSING = "—"
CITED_MARK = "†"
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def label(column: str) -> str:
    return LABELS.get(column, column)


def params_text(n: Optional[int]) -> str:
    """Trainable parameters as the papers print them: 320M, 6,738M (small models: 12.3K)."""
    if n is None:
        return "-"
    return f"{round(n / 1e6):,}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


MARKS_NOTE = ("Best **bold**, runner-up <u>underlined</u>: only a row alone in its place and ahead of the next "
              "row by more than one standard error of their difference (paired over the same items where the records "
              "keep them); ties, closer differences and columns without a standard error (Kept %, GM, Avg1(Per)) are "
              "unmarked.")


def _apart(a: Cell, b: Cell) -> bool:
    """``a`` and ``b`` differ by more than one standard error of their difference: paired over the same items
    when both cells carry per-item values of one length (the same questions scored for every row), else
    sqrt(se_a² + se_b²). A cell without either has no known noise: never apart (Kept %, GM, Avg1(Per))."""
    if a.items is not None and b.items is not None and len(a.items) == len(b.items) > 1:
        diffs = [x - y for x, y in zip(a.items, b.items)]
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    elif a.stderr is None or b.stderr is None:
        return False
    else:
        se = math.hypot(a.stderr, b.stderr)
    return abs(a.value - b.value) > se


def ranks(rows: list[Row], column: str, lower_is_better: bool = False) -> dict[int, int]:
    """{row index: 1 (best) or 2 (runner-up)} among method rows (not the pre-trained one, not a cited one: its
    number is the paper's, at the paper's scale); higher is better unless ``lower_is_better``. A place is marked
    only when one row holds it alone and is ahead of the next row by more than one standard error of the
    difference (:func:`_apart`), the runner-up only below a marked best: a tie or a difference within the noise
    gets no mark."""
    ranked = sorted(((i, r.cells[column]) for i, r in enumerate(rows)
                     if not r.is_base and not r.is_cited and r.cells[column].value is not None),
                    key=lambda item: item[1].value, reverse=not lower_is_better)
    place = {}
    for rank in (1, 2):
        if len(ranked) <= rank or not _apart(ranked[rank - 1][1], ranked[rank][1]):
            break
        place[ranked[rank - 1][0]] = rank
    return place


def _number(cell: Cell, stderr: bool) -> str:
    if cell.value is None:
        return MISSING
    return f"{cell.value:.2f}" + (f" ± {cell.stderr:.2f}" if stderr and cell.stderr is not None else "")


def row_label(row: Row, mark: str = CITED_MARK) -> str:
    """The row's label; a cited row's says it is reported, not reproduced (``mark`` points at its footnote)."""
    return f"{row.label} ({CITED}){mark}" if row.is_cited else row.label


def footnotes(rows: list[Row], cols: Optional[list[str]] = None) -> list[str]:
    """The footnotes of the cells shown (``cols``; default every cell): why a cell is missing, where a cited
    row's numbers come from."""
    reasons = sorted({c.missing for r in rows for k, c in r.cells.items() if c.missing and (cols is None or k in cols)})
    text = {"not run": "not run yet (no record in the store: `lnull table ... table.run_missing=true`)",
            "not scored": "not scored (the scorer recorded no value, e.g. MT-Bench without a judge)",
            "not computable": "not computable (an input is missing, or a pre-trained score is 0)",
            "not reported": "not reported (a cited row: its paper prints no value there)"}
    cited = [f"{CITED_MARK} {r.label}: {CITED}. Never run by lnull; its numbers are cited from {r.cited}."
             for r in rows if r.is_cited]
    return cited + [f"{MISSING} {text.get(r, r)}" for r in reasons]


def markdown(title: str, rows: list[Row], cols: list[str], lower: frozenset[str] | set[str] = frozenset(),
             labels: Optional[dict[str, str]] = None, number: Optional[Callable[[str, Cell], str]] = None,
             note: str = "") -> str:
    """The reproduced table: value ± standard error, best **bold**, runner-up <u>underlined</u> where
    :func:`ranks` marks them (``lower``: columns where lower is better); ``number(column, cell)`` formats a cell
    (default: 2 decimals); ``note`` and :data:`MARKS_NOTE` go between the table and the footnotes."""
    marks = {c: ranks(rows, c, lower_is_better=c in lower) for c in cols}
    names = labels or LABELS
    lines = [f"### {title}", "", "| Method | #Params | " + " | ".join(names.get(c, c) for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for i, row in enumerate(rows):
        cells = []
        for c in cols:
            text = number(c, row.cells[c]) if number else _number(row.cells[c], stderr=True)
            place = marks[c].get(i)
            cells.append(f"**{text}**" if place == 1 else f"<u>{text}</u>" if place == 2 else text)
        lines.append(f"| {row_label(row)} | {params_text(row.params)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + ([note] if note else []) + [MARKS_NOTE] + footnotes(rows, cols)) + "\n"


def comparison_markdown(rows: list[Row], cols: list[str], reported: list[Optional[ReportedRow]]) -> str:
    """Reproduced, reported and their difference side by side (``ours / paper (Δ)``)."""
    lines = ["### Reproduced vs reported (ours / paper (difference))", "",
             "| Method | " + " | ".join(label(c) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for row, rep in zip(rows, reported):
        cells = []
        for c in cols:
            ours = row.cells[c].value
            paper = rep.values.get(c) if rep else None
            if row.is_cited:  # nothing of ours: the cell is the paper's number
                cells.append(f"cited / {MISSING if ours is None else f'{ours:.2f}'}")
                continue
            cells.append(f"{'—' if ours is None else f'{ours:.2f}'} / {'n/a' if paper is None else f'{paper:.2f}'}"
                         + (f" ({ours - paper:+.2f})" if ours is not None and paper is not None else ""))
        lines.append(f"| {row_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "n/a: the paper prints no value there (or the row is not transcribed)."]) + "\n"


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex(title: str, rows: list[Row], cols: list[str], lower: frozenset[str] | set[str] = frozenset(),
          labels: Optional[dict[str, str]] = None) -> str:
    """A booktabs tabular (escaped): header, pre-trained row, a rule, the methods; \\textbf best, \\underline
    runner-up (``lower``: columns where lower is better); missing cells as --- with the footnotes as a comment."""
    marks = {c: ranks(rows, c, lower_is_better=c in lower) for c in cols}
    names = labels or LABELS
    out = [f"% {latex_escape(title)}", r"\begin{tabular}{l r " + "r" * len(cols) + "}", r"\toprule",
           " & ".join(["Method", r"\#Params"] + [latex_escape(names.get(c, c)) for c in cols]) + r" \\",
           r"\midrule"]
    for i, row in enumerate(rows):
        cells = []
        for c in cols:
            v = row.cells[c].value
            text = "---" if v is None else f"{v:.2f}"
            place = marks[c].get(i)
            cells.append(rf"\textbf{{{text}}}" if place == 1 else rf"\underline{{{text}}}" if place == 2 else text)
        name = latex_escape(row_label(row, mark="")) + (r"\textsuperscript{\dag}" if row.is_cited else "")
        out.append(" & ".join([name, latex_escape(params_text(row.params))] + cells) + r" \\")
        if row.is_base:
            out.append(r"\midrule")
    notes = [r"\dag{} " + latex_escape(n[len(CITED_MARK):].lstrip()) if n.startswith(CITED_MARK) else latex_escape(n)
             for n in footnotes(rows, cols)]
    out += [r"\bottomrule", r"\end{tabular}"] + [f"% {n}" for n in notes]
    return "\n".join(out) + "\n"


def csv_text(rows: list[Row], cols: list[str], reported: list[Optional[ReportedRow]]) -> str:
    """Long format: one line per (row, column) with value, stderr, status, reported and difference."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "method", "params", "sweep", "column", "value", "stderr", "status", "reported",
                     "difference"])
    for row, rep in zip(rows, reported):
        for c in cols:
            cell = row.cells[c]
            paper = rep.values.get(c) if rep else None
            writer.writerow([row.label, row.method, row.params or "", row.x if row.x is not None else "",
                             c, _fmt(cell.value), _fmt(cell.stderr), CITED if row.is_cited else cell.missing or "ok",
                             _fmt(cell.value if row.is_cited else paper),
                             _fmt(cell.value - paper if cell.value is not None and paper is not None
                                  and not row.is_cited else None)])
    return buf.getvalue()


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"
