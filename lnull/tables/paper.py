"""Table kind ``results``: a paper table from its spec (``configs/table/<name>.yaml``, e.g. ``table=aaai_3a``).
Each row is the table's experiment with one method, composed as ``lnull run`` would compose it; its cells are the stored records of that config (looked up by
key, so a row is done exactly when the store has its records) and the derived columns computed from them.

A cited row (``cited:`` in its spec, e.g. RoseLoRA in extended Table 4, whose code is not public) is never run:
its cells are the paper's numbers (the reported CSV's row, else the spec's ``values``), marked "reported, not
reproduced" wherever the table is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from lnull.errors import ConfigError
from lnull.tables import likelihood, provenance
from lnull.tables.base import TableKind, register
from lnull.tables.derived import derive
from lnull.tables.retention import changes_markdown
from lnull.tables.rows import (CITED, Cell, Row, check_columns, mean_stderr, row_overrides, run_configs,
                               stored_records, write_files)

__all__ = ["CITED", "Cell", "Row", "row_overrides", "compose_rows", "columns", "check_benchmarks", "fill", "status",
           "run_rows", "build", "RESULTS"]


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
    first = next(r for r in rows if not r.is_cited)
    for row in rows:  # a cited row stands in the table's setting (never run: its cfg is read for nothing else)
        if row.is_cited:
            row.cfg = first.cfg
    base_label = (tcfg.get("base_label") if paper_setting(table_cfg) else None) or first.cfg["model"]["name"]
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
        if not row.is_cited:
            check_columns(row.cfg, list(tcfg["knowledge"]) + list(tcfg["downstream"]), tcfg["name"])


def fill(rows: list[Row], tcfg: dict[str, Any]) -> None:
    """Cells of every row from the store (raw columns; a cited row's from the paper), then the derived columns."""
    raw = list(tcfg["knowledge"]) + list(tcfg["downstream"])
    for row in rows:
        if row.is_cited:
            fill_cited(row, raw, tcfg)
            continue
        for bench, rec in stored_records(row.cfg, "base" if row.is_base else "trained", raw).items():
            row.records[bench] = rec
            if rec is None:
                row.cells[bench] = Cell(None, missing="not run")
            elif rec["value"] is None:
                row.cells[bench] = Cell(None, missing="not scored")
            else:
                row.cells[bench] = Cell(rec["value"], rec.get("stderr"), items=(rec.get("details") or {}).get("items"))
            if rec and rec.get("method") and rec["method"].get("trainable_params"):
                row.params = rec["method"]["trainable_params"]
    base = {k: rows[0].cells[k].value for k in tcfg["knowledge"]}
    for row in rows:
        values = {k: c.value for k, c in row.cells.items()}
        for column, value in derive(values, base, list(tcfg["knowledge"]), list(tcfg["downstream"]),
                                    list(tcfg["derived"])).items():
            why = next((c.missing for k, c in row.cells.items() if c.missing), None)
            means = MEAN_OF.get(column, lambda t: [])(tcfg)  # a plain mean carries its inputs' standard error
            stderr = mean_stderr([row.cells[k] for k in means]) if value is not None and means else None
            row.cells[column] = Cell(value, stderr, missing=None if value is not None else why or "not computable")


# the derived columns that are plain means of raw columns (the others, Avg1(Per) and GM, are not: no standard error)
MEAN_OF = {"avg1": lambda t: list(t["knowledge"]), "avg2": lambda t: list(t["downstream"]),
           "avg": lambda t: list(t["knowledge"]) + list(t["downstream"])}


def fill_cited(row: Row, raw: list[str], tcfg: dict[str, Any]) -> None:
    """A cited row's raw cells: the reported CSV's row (``table.reported``) when it has one, else the spec's
    ``values``; a column the paper does not print is missing as "not reported"."""
    from lnull.tables.reported import cited_values

    values = cited_values(row, Path(tcfg["reported_dir"]), tcfg.get("reported"))
    for bench in raw:
        value = values.get(bench)
        row.cells[bench] = Cell(value, missing=None if value is not None else "not reported")


def status(rows: list[Row]) -> list[tuple[str, bool]]:
    """(label, every raw cell present) per row; a cited row is never run, so it is never missing."""
    return [(f"{row.label} ({CITED})" if row.is_cited else row.label,
             row.is_cited or all(c.missing != "not run" for c in row.cells.values())) for row in rows]


def run_rows(rows: list[Row], stages: Optional[list[str]], log: Callable[[str], None]) -> None:
    """Run each row's config (``lnull run``, or ``stages``); the pre-trained row is scored by the first row's run,
    a cited row is never run."""
    for row in rows:
        if row.is_cited:
            log(f"[table] {row.label}: {CITED} ({row.cited}); not run")
    run_configs([(f"{row.label}: +experiment={row.cfg['experiment']} method={row.method}", row.cfg)
                 for row in rows if not (row.is_base or row.is_cited)], stages, log)


def composed(cfg: dict[str, Any]) -> list[Row]:
    """The table's rows, their raw columns checked against every row's benchmarks."""
    rows = compose_rows(cfg)
    check_benchmarks(rows, cfg["table"])
    return rows


def paper_setting(cfg: dict[str, Any]) -> bool:
    """The table runs the papers' own setting: the paper scale and no ``table.overrides``."""
    return cfg["scale"]["name"] == "paper" and not cfg["table"]["overrides"]


def likelihood_columns(cfg: dict[str, Any], rows: list[Row]) -> tuple[list[str], Optional[str], list[str]]:
    """(NLL columns, learning column, every likelihood column shown) a table carries beside the papers' ones:
    none at the papers' setting (``lnull.tables.likelihood``)."""
    nll, learning = ([], None) if paper_setting(cfg) else likelihood.columns(cfg["table"], rows)
    return nll, learning, nll + (["avg_nll", "kept"] if nll else []) + ([learning] if learning else [])


def filled(cfg: dict[str, Any]) -> list[Row]:
    """The table's rows with their cells read from the store (the likelihood columns too, where it has them)."""
    rows = composed(cfg)
    fill(rows, cfg["table"])
    nll, learning, extra = likelihood_columns(cfg, rows)
    if extra:
        likelihood.fill(rows, nll, learning)
    return rows


def build(cfg: dict[str, Any], out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``<name>.{md,tex,csv}`` (and the sweep figure) into ``out`` from the store; the Markdown is logged."""
    from lnull.tables import render
    from lnull.tables.reported import find, load

    tcfg = cfg["table"]
    rows = filled(cfg)
    cols = columns(tcfg)
    printed = load(Path(tcfg["reported_dir"])).get(tcfg["reported"], []) if tcfg["reported"] else []
    reported = [find(printed, row.reported_as, row.paper_rank, row.paper_calib) if printed else None for row in rows]
    scale, at_paper = cfg["scale"]["name"], paper_setting(cfg)
    nll, learning, extra = likelihood_columns(cfg, rows)
    facts = provenance.ran(rows)
    title = provenance.title(tcfg, scale, at_paper, facts)
    zero = likelihood.folded(rows, cols)
    shown = [c for c in cols if c not in zero]
    notes = [provenance.line(facts, render.LABELS)]
    if zero:
        zeros = [render.label(c) for c in zero if any(r.cells[c].value == 0 for r in rows)]
        none = [render.label(c) for c in zero if render.label(c) not in zeros]
        notes.append(f"Not shown, a column of zeros ranks nothing: every row scores exactly 0 on {', '.join(zeros)}"
                     + (f"; {', '.join(none)} is not computable (over a pre-trained score of 0)" if none else "")
                     + ".")
    if scale != "paper":
        notes.append(f"Scale: {scale} (`+scale={scale}`): not the papers' setting; see configs/scale/.")
    md = render.markdown(title, rows, shown, note="\n".join(notes))
    if extra:
        lower = set(nll) | {"avg_nll"}
        md += "\n" + render.markdown(f"Likelihood columns ({scale} scale): answer NLL per token (nats, lower is "
                                     "better), Kept %, held-out task exact match", rows, extra, lower=lower,
                                     labels={**render.LABELS, **likelihood.LABELS}, number=likelihood.number)
        md += "\n" + changes_markdown(likelihood.changes(rows, nll), nll + ["avg_nll"])
    if printed and at_paper:
        md += "\n" + render.comparison_markdown(rows, cols, reported)
    elif printed:
        said = likelihood.direction(rows, reported)
        md += "\n" + (said or "Direction: fewer than two methods with both the paper's Avg1 and our Kept %.") + "\n"
    paths = write_files(out, tcfg["name"], {"md": md, "tex": render.latex(title, rows, shown),
                                            "csv": render.csv_text(rows, cols + extra, reported)})
    if tcfg["sweep"]:
        from lnull.tables.figures import sweep_figure

        paths.append(str(sweep_figure(Path(out) / f"{tcfg['name']}.png", tcfg["title"], rows, reported,
                                      tcfg["sweep"])))
    log(md)
    return {"rows": len(rows), "complete_rows": sum(ok for _, ok in status(rows)), "paths": paths}


RESULTS = register(TableKind(
    "results", build, compose=composed, status=lambda cfg: status(filled(cfg)),
    run_missing=lambda cfg, log: run_rows(composed(cfg), None, log)))
