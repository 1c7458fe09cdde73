"""The likelihood columns a paper table carries beside the papers' ones at a scale other than the paper's
(issue 27), as the demo table measures them (``retention.py``): per knowledge set the gold-answer NLL per token
(``<set>_nll``, nats, lower is better), their average, Kept % (the per-token answer probability kept, as % of
the pre-trained model's) and the task's held-out exact match (``task_heldout``), then the paired change of
every NLL from the pre-trained model (same questions, ± standard error).

Also: the papers' columns that are exactly 0 for every row are folded into one footnote, and at demo scale the
"ours / paper" comparison is replaced by its direction: does the paper's Avg1 order of the methods hold for
our Kept %?
"""
from __future__ import annotations

import statistics
from typing import Any, Optional

from lnull.tables.rows import Cell, Row, mean_stderr, stored_records

NLL_OF = {"triviaqa": "triviaqa_nll", "nq_open": "nq_open_nll", "webqs": "webqs_nll"}
LEARNING = "task_heldout"
LABELS = {"triviaqa_nll": "TriviaQA NLL", "nq_open_nll": "NQ Open NLL", "webqs_nll": "WebQS NLL",
          "avg_nll": "Avg NLL", "kept": "Kept %", "task_heldout": "Task EM %"}


def columns(tcfg: dict[str, Any], rows: list[Row]) -> tuple[list[str], Optional[str]]:
    """(the NLL columns of the table's knowledge sets, the learning column) that every run row scores."""
    runs = [r for r in rows if not r.is_cited]
    have = set.intersection(*(set(r.cfg["eval"]["benchmarks"]) for r in runs)) if runs else set()
    nll = [NLL_OF[k] for k in tcfg["knowledge"] if NLL_OF.get(k) in have]
    return nll, LEARNING if LEARNING in have else None


def fill(rows: list[Row], nll: list[str], learning: Optional[str]) -> None:
    """Each run row's likelihood cells from the store (per-item values kept for paired marks), then ``avg_nll``
    and ``kept`` against the pre-trained row."""
    from lnull.tables.retention import kept_percent

    benches = nll + ([learning] if learning else [])
    for row in rows:
        if row.is_cited:
            for c in benches + ["avg_nll", "kept"]:
                row.cells[c] = Cell(None, missing="not reported")
            continue
        for bench, rec in stored_records(row.cfg, "base" if row.is_base else "trained", benches).items():
            row.records[bench] = rec
            row.cells[bench] = Cell(None, missing="not run") if rec is None else \
                Cell(rec["value"], rec.get("stderr"), items=(rec.get("details") or {}).get("items"))
    base = rows[0]
    for row in rows:  # not retention._derived: its "gm" would overwrite the paper's GM column
        if row.is_cited:
            continue
        values = {c: row.cells[c].value for c in nll}
        if not nll or any(v is None for v in values.values()) or any(base.cells[c].value is None for c in nll):
            row.cells["avg_nll"] = row.cells["kept"] = Cell(None, missing="not run")
            continue
        row.cells["avg_nll"] = Cell(statistics.fmean(values.values()), mean_stderr([row.cells[c] for c in nll]))
        row.cells["kept"] = Cell(kept_percent(values, {c: base.cells[c].value for c in nll}))


def changes(rows: list[Row], nll: list[str]) -> list[tuple[str, dict[str, Cell]]]:
    """Per method row: the paired change of each NLL column from the pre-trained row (± standard error) and their
    average (its standard error from theirs)."""
    from lnull.tables.retention import paired_change, with_average

    base, out = rows[0], []
    for row in rows[1:]:
        if row.is_cited:
            continue
        cells = {}
        for c in nll:
            a, b = row.cells[c].items, base.cells[c].items
            cells[c] = Cell(*paired_change(a, b)) if a and b else Cell(None, missing="not run")
        out.append((row.label, cells))
    if not nll:  # nothing to average
        return [(label, {"avg_nll": Cell(None, missing="not run")}) for label, _ in out]
    return with_average(out, nll)


def folded(rows: list[Row], cols: list[str]) -> list[str]:
    """The columns where every run row is exactly 0 or not computable (a derived column over a pre-trained 0):
    shown as one footnote instead of a column of zeros."""
    out = []
    for c in cols:
        cells = [r.cells[c] for r in rows if not r.is_cited and c in r.cells]
        if cells and all(x.value == 0 or x.missing == "not computable" for x in cells):
            out.append(c)
    return out


def number(column: str, cell: Cell) -> str:
    """NLLs to 3 decimals, percentages to 1, ± the standard error."""
    if cell.value is None:
        return "—"
    digits = 3 if column.endswith("_nll") else 1
    return f"{cell.value:.{digits}f}" + (f" ± {cell.stderr:.{digits}f}" if cell.stderr is not None else "")


def direction(rows: list[Row], reported: list[Any]) -> Optional[str]:
    """Whether the paper's Avg1 order of this table's methods holds for our Kept %: the method pairs the paper
    orders (printed Avg1 differs) that our Kept % orders the same way, and those it reverses."""
    pairs = [(r.label, rep.values.get("avg1"), r.cells.get("kept", Cell(None)).value)
             for r, rep in zip(rows, reported) if not r.is_base and not r.is_cited and rep is not None]
    pairs = [p for p in pairs if p[1] is not None and p[2] is not None]
    if len(pairs) < 2:
        return None
    held, reversed_ = 0, []
    for i in range(len(pairs)):
        for j in range(i + 1, len(pairs)):
            (a, pa, ka), (b, pb, kb) = pairs[i], pairs[j]
            if pa == pb or ka == kb:
                continue
            if (pa > pb) == (ka > kb):
                held += 1
            else:
                reversed_.append(f"{a if pa > pb else b} > {b if pa > pb else a}")
    total = held + len(reversed_)
    paper = " > ".join(p[0] for p in sorted(pairs, key=lambda p: -p[1]))
    ours = " > ".join(p[0] for p in sorted(pairs, key=lambda p: -p[2]))
    text = (f"Direction (not the paper's setting, so no number is compared with the paper's): the paper's Avg1 order "
            f"{paper}; our Kept % order {ours}; {held} of {total} method pairs keep the paper's order")
    return text + (f"; reversed: {', '.join(reversed_)}." if reversed_ else ".")
