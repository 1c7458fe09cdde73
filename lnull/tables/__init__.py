"""Stage `table`: tables built only from stored result records, written to ``table.out_dir``.

- ``table=summary`` (default): every run's records pivoted (``summary.py``);
- a paper table (``configs/table/<name>.yaml``, e.g. ``table=aaai_3a``): the pre-trained row, then one row per
  method of the table's experiment; raw, derived (``derived.py``) and #Params columns, best bold and runner-up
  underlined, each reproduced cell with its standard error, side by side with the papers' numbers
  (``reported.py``), and a figure for the sweep tables (``figures.py``). ``table.run_missing=true`` first runs
  whatever rows the store lacks. AAAI Tables 1-2 come from ``lnull analyze`` (``analysis_tables.py``);
- ``kind: retention`` (``table=demo``, ``make demo``): knowledge kept vs task learned (``retention.py``);
- ``table.audit=true`` (``lnull table --audit``): recompute every derived column of the reported tables.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lnull.io import atomic_write_text
from lnull.stages import StageContext

__all__ = ["build_tables", "run"]


def _write(out: Path, name: str, texts: dict[str, str]) -> list[str]:
    paths = []
    for ext, text in texts.items():
        path = Path(out) / f"{name}.{ext}"
        atomic_write_text(path, text)
        paths.append(str(path))
    return paths


def paper_table(cfg: dict[str, Any], out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (after running what the store lacks, when ``table.run_missing``) one paper table into ``out``."""
    from lnull.tables import analysis_tables, paper, render
    from lnull.tables.reported import find, load

    tcfg = cfg["table"]
    rows = paper.compose_rows(cfg)
    reported_dir = Path(tcfg["reported_dir"])
    if tcfg["kind"] == "analysis":
        if tcfg["run_missing"]:
            paper.run_missing(rows, ["calibrate", "init", "analyze"], log)
        md, tex, csv = analysis_tables.build(tcfg, rows[1:], reported_dir)
        log(md)
        return {"rows": len(rows) - 1, "paths": _write(out, tcfg["name"], {"md": md, "tex": tex, "csv": csv})}
    paper.check_benchmarks(rows, tcfg)
    if tcfg["run_missing"]:
        paper.run_missing(rows, None, log)
    paper.fill(rows, tcfg)
    cols = paper.columns(tcfg)
    printed = load(reported_dir).get(tcfg["reported"] or "", []) if tcfg["reported"] else []
    scale = cfg["scale"]
    reported = [find(printed, row.reported_as, row.paper_rank, row.paper_calib) if printed else None for row in rows]
    md = render.markdown(tcfg["title"] or tcfg["name"], rows, cols)
    if printed:
        md += "\n" + render.comparison_markdown(rows, cols, reported)
    if scale["name"] != "paper":
        md += f"\nScale: {scale['name']} (`+scale={scale['name']}`): not the papers' setting; see configs/scale/.\n"
    texts = {"md": md, "tex": render.latex(tcfg["title"] or tcfg["name"], rows, cols),
             "csv": render.csv_text(rows, cols, reported)}
    paths = _write(out, tcfg["name"], texts)
    if tcfg["sweep"]:
        from lnull.tables.figures import sweep_figure

        paths.append(str(sweep_figure(Path(out) / f"{tcfg['name']}.png", tcfg["title"], rows, reported,
                                      tcfg["sweep"])))
    log(md)
    done = sum(ok for _, ok in paper.status(rows))
    return {"rows": len(rows), "complete_rows": done, "paths": paths}


def audit_table(cfg: dict[str, Any], out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``lnull table --audit``: every printed derived value of the reported tables that their printed raw values
    do not give, into ``<out>/audit.{md,csv}``."""
    from lnull.tables.reported import audit, load

    found = audit(load(Path(cfg["table"]["reported_dir"])))
    lines = ["### Audit of the papers' derived columns (Avg1, Avg1(Per), Avg2, GM, Avg)", "",
             "| table | row | column | printed | recomputed |", "|---|---|---|---:|---:|"]
    lines += [f"| {d.table} | {d.row} | {d.column} | {d.printed:.2f} | {d.recomputed:.2f} |" for d in found]
    lines += ["", f"{len(found)} printed value(s) disagree with their raw columns beyond rounding."]
    csv_lines = ["table,row,column,printed,recomputed"] + [f"{d.table},{d.row},{d.column},{d.printed:.2f},"
                                                          f"{d.recomputed:.4f}" for d in found]
    for d in found:
        log(d.line())
    return {"disagreements": len(found), "paths": _write(out, "audit", {"md": "\n".join(lines) + "\n",
                                                                       "csv": "\n".join(csv_lines) + "\n"})}


def run(cfg: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Stage entry: the audit, the generic summary, or a paper table, written into ``ctx.out``."""
    tcfg = cfg["table"]
    if tcfg["audit"]:
        return audit_table(cfg, ctx.out, ctx.log)
    if not tcfg["rows"]:
        from lnull.tables.summary import summary_table

        return summary_table(cfg, ctx.out)
    if tcfg["kind"] == "retention":
        from lnull.tables.retention import build

        return build(cfg, Path(ctx.out), ctx.log)
    return paper_table(cfg, ctx.out, ctx.log)


def build_tables(cfg: dict[str, Any]) -> list[Path]:
    """`lnull table` from Python: the paths of the written files."""
    from lnull.pipeline import run_pipeline

    run_pipeline(cfg, stages=["table"], log=lambda m: None)
    out = Path(cfg["table"]["out_dir"])
    return sorted(p for p in out.glob(f"{cfg['table']['name']}.*"))
