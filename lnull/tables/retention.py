"""Table kind ``retention`` (``table=demo``, ``make demo``): how much pre-trained knowledge each method keeps while it learns.

Rows are the table's experiment with one method each, fine-tuned ``seeds`` times (``train.seed`` + 0, 1, ...) at
each of ``lrs`` (none: the experiment's ``train.lr``); a method's row is its best learning rate by the learning
column (``downstream[0]``), its cells the mean over seeds.  Columns, in the AAAI layout on likelihood metrics:

- ``knowledge`` (``lm_eval_nll``): gold-answer NLL per token (nats, lower is better), then ``avg_nll`` and
  ``kept`` = mean over them of min(100, 100 exp(-(NLL - NLL_pre-trained))): the per-token probability of the gold
  answers as a % of the pre-trained model's (Avg1(Per) of the paper, on probabilities);
- ``general`` (``text_nll``): NLL per token of held-out general text;
- ``downstream`` (``task_heldout``): held-out exact match on the fine-tuning task (%); ``gm`` = sqrt(kept x that).

Cells show ± the scorer's standard error (one seed) or the standard deviation over seeds.  Under the table: the
change of every NLL from the pre-trained model (paired over the same questions, ± standard error), and a paired
bootstrap over questions of ``compare`` minus ``against`` on the average knowledge NLL change.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from lnull.errors import ConfigError
from lnull.tables.base import TableKind, register
from lnull.tables.rows import (Cell, Row, check_columns, mean_stderr, row_overrides, run_configs, stored_records,
                               write_files)

LABELS = {"nq_open_nll": "NQ-Open", "triviaqa_nll": "TriviaQA", "webqs_nll": "WebQS", "avg_nll": "Avg",
          "kept": "Kept %", "wiki_text": "Wiki text", "task_heldout": "Task EM %", "gm": "GM"}


@dataclass
class Fit:
    """One fine-tune of a table row: its method at one learning rate and seed, and the composed config."""

    method: str
    label: str
    lr: float
    seed: int
    cfg: dict[str, Any]
    records: Optional[dict[str, Optional[dict[str, Any]]]] = None  # benchmark -> stored record (None: not run)


def columns_of(tcfg: dict[str, Any]) -> list[str]:
    """Every benchmark the table reads: knowledge, general, downstream."""
    return list(tcfg["knowledge"]) + list(tcfg["general"]) + list(tcfg["downstream"])


def compose_fits(table_cfg: dict[str, Any]) -> tuple[dict[str, Any], list[Fit]]:
    """(config of the pre-trained row, every fine-tune of the table); its columns checked to be benchmarks of
    the experiment."""
    from lnull.compose import compose

    tcfg = table_cfg["table"]
    if not tcfg["rows"] or not tcfg["experiment"]:
        raise ConfigError(f"table '{tcfg['name']}' has no rows or no experiment")
    if not tcfg["knowledge"] or not tcfg["downstream"]:
        raise ConfigError(f"table '{tcfg['name']}' (kind retention) needs knowledge and downstream columns")
    fits = []
    for spec in tcfg["rows"]:
        base = row_overrides(table_cfg, spec)
        first = compose(base)
        for lr in tcfg["lrs"] or [first["train"]["lr"]]:
            for i in range(tcfg["seeds"]):
                cfg = compose(base + [f"train.seed={first['train']['seed'] + i}", f"train.lr={lr}"])
                fits.append(Fit(spec["method"], spec.get("label") or spec["method"], lr, cfg["train"]["seed"], cfg))
    check_columns(fits[0].cfg, columns_of(tcfg), tcfg["name"])
    return fits[0].cfg, fits


def _items(rec: dict[str, Any]) -> list[float]:
    return rec["details"]["items"]


def _mean_items(recs: list[dict[str, Any]]) -> list[float]:
    """Per-item mean over seeds (the same items, in the same order, in every record)."""
    lengths = {len(_items(r)) for r in recs}
    if len(lengths) != 1:
        raise ConfigError(f"records of one benchmark scored different item counts {sorted(lengths)}: not paired")
    return [statistics.fmean(values) for values in zip(*(_items(r) for r in recs))]


def paired_change(items: list[float], base: list[float]) -> tuple[float, Optional[float]]:
    """(mean of items - base, its standard error) over paired items."""
    from lnull.evaluate.likelihood import mean_and_stderr

    if len(items) != len(base):
        raise ConfigError(f"paired items differ in count ({len(items)} vs {len(base)})")
    return mean_and_stderr([a - b for a, b in zip(items, base)])


def kept_percent(nll: dict[str, float], base: dict[str, float]) -> float:
    """Mean over benchmarks of min(100, 100 exp(-(NLL - NLL_pre-trained))): per-token answer probability kept (%)."""
    return statistics.fmean(min(100.0, 100.0 * math.exp(-(nll[b] - base[b]))) for b in nll)


def paired_bootstrap(diffs: dict[str, list[float]], iters: int, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap over items of the mean over benchmarks of each benchmark's mean difference.

    ``diffs``: benchmark -> per-item difference (method A - method B, same items); items are resampled with
    replacement within each benchmark.  Returns the observed value, the 2.5 / 97.5 % percentiles and the share of
    resamples below 0."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = [np.asarray(d, dtype=np.float64) for d in diffs.values()]
    observed = float(np.mean([a.mean() for a in arrays]))
    stats = np.zeros(iters)
    for a in arrays:
        stats += a[rng.integers(0, len(a), size=(iters, len(a)))].mean(axis=1)
    stats /= len(arrays)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": observed, "lo": float(lo), "hi": float(hi), "below_zero": float((stats < 0).mean())}


@dataclass
class MethodResult:
    """A method at one learning rate: its fits, mean cells and per-item means (knowledge + general)."""

    method: str
    label: str
    lr: float
    fits: list[Fit]
    cells: dict[str, Cell]
    items: dict[str, list[float]]
    params: Optional[int]


def _aggregate(fits: list[Fit], benches: list[str]) -> tuple[dict[str, Cell], dict[str, list[float]], Optional[int]]:
    cells, items, params = {}, {}, None
    for b in benches:
        recs = [f.records[b] for f in fits]
        if any(r is None for r in recs):
            cells[b] = Cell(None, missing="not run")
            continue
        values = [r["value"] for r in recs]
        spread = statistics.stdev(values) if len(values) > 1 else recs[0].get("stderr")
        items[b] = _mean_items(recs)
        cells[b] = Cell(statistics.fmean(values), spread, items=items[b])
        params = params or next((r["method"]["trainable_params"] for r in recs if r.get("method")), None)
    return cells, items, params


def _derived(cells: dict[str, Cell], base: dict[str, Cell], knowledge: list[str], learning: Optional[str]) -> None:
    values = {b: cells[b].value for b in knowledge}
    if any(v is None for v in values.values()) or any(base[b].value is None for b in knowledge):
        for c in ("avg_nll", "kept", "gm"):
            cells[c] = Cell(None, missing="not run")
        return
    cells["avg_nll"] = Cell(statistics.fmean(values.values()), mean_stderr([cells[b] for b in knowledge]))
    kept = kept_percent(values, {b: base[b].value for b in knowledge})
    cells["kept"] = Cell(kept)
    acc = cells[learning].value if learning else None
    cells["gm"] = Cell(math.sqrt(kept * acc), None) if acc is not None else Cell(None, missing="not run")


def collect(table_cfg: dict[str, Any]) -> tuple[MethodResult, list[MethodResult], list[MethodResult]]:
    """(pre-trained, each method at its best learning rate, every method x learning rate) from the store."""
    tcfg = table_cfg["table"]
    knowledge, downstream, benches = list(tcfg["knowledge"]), list(tcfg["downstream"]), columns_of(tcfg)
    learning = downstream[0] if downstream else None
    base_cfg, fits = compose_fits(table_cfg)
    base_fit = Fit("base", "", 0.0, 0, base_cfg, stored_records(base_cfg, "base", benches))
    for fit in fits:
        fit.records = stored_records(fit.cfg, "trained", benches)
    cells, items, _ = _aggregate([base_fit], benches)
    _derived(cells, cells, knowledge, learning)
    pre = MethodResult("base", f"{base_cfg['model']['name']} (pre-trained)", 0.0, [base_fit], cells, items, None)
    grid: list[MethodResult] = []
    for method in dict.fromkeys(f.method for f in fits):
        for lr in dict.fromkeys(f.lr for f in fits if f.method == method):
            group = [f for f in fits if f.method == method and f.lr == lr]
            cells, items, params = _aggregate(group, benches)
            _derived(cells, pre.cells, knowledge, learning)
            grid.append(MethodResult(method, group[0].label, lr, group, cells, items, params))
    best = []
    for method in dict.fromkeys(r.method for r in grid):
        mine = [r for r in grid if r.method == method]
        scored = [r for r in mine if learning and r.cells[learning].value is not None]
        best.append(max(scored, key=lambda r: r.cells[learning].value) if scored else mine[0])
    return pre, best, grid


def status(table_cfg: dict[str, Any]) -> list[tuple[str, bool]]:
    """(fine-tune label, every record of it and of the pre-trained model stored) per fine-tune of the table."""
    benches = columns_of(table_cfg["table"])
    base_cfg, fits = compose_fits(table_cfg)
    base_done = all(r is not None for r in stored_records(base_cfg, "base", benches).values())
    return [(f"{f.label} (lr {f.lr:g}, seed {f.seed})",
             base_done and all(r is not None for r in stored_records(f.cfg, "trained", benches).values()))
            for f in fits]


def _as_rows(pre: MethodResult, results: list[MethodResult], show_lr: bool) -> list[Row]:
    rows = [Row(pre.label, "base", pre.fits[0].cfg, "base", cells=pre.cells)]
    for r in results:
        label = f"{r.label} (lr {r.lr:g})" if show_lr else r.label
        rows.append(Row(label, r.method, r.fits[0].cfg, r.method, cells=r.cells, params=r.params))
    return rows


def changes(pre: MethodResult, results: list[MethodResult], columns: list[str]) -> list[tuple[str, dict[str, Cell]]]:
    """Per method: paired change from the pre-trained model of each NLL column (+ ``avg_nll``), ± stderr."""
    out = []
    knowledge = [c for c in columns if c != "avg_nll"]
    for r in results:
        cells = {}
        for c in knowledge:
            if c in r.items and c in pre.items:
                mean, se = paired_change(r.items[c], pre.items[c])
                cells[c] = Cell(mean, se)
            else:
                cells[c] = Cell(None, missing="not run")
        out.append((r.label, cells))
    return out


def with_average(rows: list[tuple[str, dict[str, Cell]]], knowledge: list[str]) -> list[tuple[str, dict[str, Cell]]]:
    """Add ``avg_nll`` (mean of the knowledge columns' paired changes, its stderr from theirs) to each row."""
    for _, cells in rows:
        present = [cells[k] for k in knowledge if cells[k].value is not None]
        cells["avg_nll"] = Cell(statistics.fmean(c.value for c in present),
                                math.sqrt(sum((c.stderr or 0) ** 2 for c in present)) / len(present)) \
            if len(present) == len(knowledge) else Cell(None, missing="not run")
    return rows


def bootstrap_lines(results: list[MethodResult], knowledge: list[str], compare: list[str], against: list[str],
                    iters: int) -> list[str]:
    """One line per (compare, against) pair: the paired bootstrap of the average knowledge NLL change."""
    by = {r.method: r for r in results}
    lines = []
    for a in compare:
        for b in against:
            if a not in by or b not in by or a == b:
                continue
            if any(k not in by[a].items or k not in by[b].items for k in knowledge):
                lines.append(f"- {by[a].label} − {by[b].label}: not run yet")
                continue
            diffs = {k: [x - y for x, y in zip(by[a].items[k], by[b].items[k])] for k in knowledge}
            s = paired_bootstrap(diffs, iters)
            verdict = "keeps more" if s["hi"] < 0 else "keeps less" if s["lo"] > 0 else "no resolved difference"
            lines.append(f"- {by[a].label} − {by[b].label}: {s['mean']:+.3f} nats/token, 95% CI "
                         f"[{s['lo']:+.3f}, {s['hi']:+.3f}], P(< 0) = {s['below_zero']:.3f} ({verdict})")
    return lines


def _cell_text(cell: Cell, digits: int, signed: bool = False) -> str:
    if cell.value is None:
        return "—"
    value = f"{cell.value:+.{digits}f}" if signed else f"{cell.value:.{digits}f}"
    return value + (f" ± {cell.stderr:.{digits}f}" if cell.stderr is not None else "")


def _digits(column: str) -> int:
    return 1 if column in ("kept", "task_heldout", "gm") else 3


def changes_markdown(rows: list[tuple[str, dict[str, Cell]]], cols: list[str]) -> str:
    lines = ["#### Change from the pre-trained model (paired over the same items, ± standard error; nats/token)", "",
             "| Method | " + " | ".join(LABELS.get(c, c) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(_cell_text(cells[c], 3, signed=True) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def grid_markdown(grid: list[MethodResult], learning: str) -> str:
    lines = ["#### Learning-rate sweep (best per method by the learning column is the table's row)", "",
             "| Method | lr | Avg | Kept % | Task EM % |", "|---|---:|---:|---:|---:|"]
    for r in grid:
        lines.append(f"| {r.label} | {r.lr:g} | {_cell_text(r.cells['avg_nll'], 3)} | "
                     f"{_cell_text(r.cells['kept'], 1)} | {_cell_text(r.cells[learning], 1)} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row], cols: list[str], change_rows: list[tuple[str, dict[str, Cell]]],
             change_cols: list[str], lrs: dict[str, float], seeds: int) -> str:
    """Long format: row, method, lr, seeds, column, value, ± (stderr or sd over seeds), status; the paired
    changes as columns ``<name>_change``."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "method", "lr", "seeds", "params", "column", "value", "spread", "status"])
    fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    for row in rows:
        for c in cols:
            cell = row.cells[c]
            writer.writerow([row.label, row.method, lrs.get(row.method, ""), seeds, row.params or "", c,
                             fmt(cell.value), fmt(cell.stderr), cell.missing or "ok"])
    for (label, cells), row in zip(change_rows, rows[1:]):
        for c in change_cols:
            writer.writerow([label, row.method, lrs.get(row.method, ""), seeds, row.params or "", f"{c}_change",
                             fmt(cells[c].value), fmt(cells[c].stderr), cells[c].missing or "ok"])
    return buf.getvalue()


def figure(path: Path, title: str, pre: MethodResult, results: list[MethodResult], change_rows, learning: str,
           grid: Optional[list[tuple[MethodResult, Cell]]] = None) -> Path:
    """Knowledge kept (average paired NLL change, y) against task learned (held-out exact match, x), one point per
    method with error bars, the pre-trained model at (its accuracy, 0). ``grid``: every (method at one learning
    rate, its average change), drawn as one faint line per method through its rates, so a reader sees the
    trade-off each method spans, not only the point the learning column picked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lnull.tables.figures import save_png

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    base_acc = pre.cells[learning]
    if base_acc.value is not None:
        ax.errorbar([base_acc.value], [0.0], xerr=[base_acc.stderr or 0], fmt="s", color="black", capsize=3)
        ax.annotate("pre-trained", (base_acc.value, 0.0), textcoords="offset points", xytext=(6, 6), fontsize=8)
    for r, (_, cells) in zip(results, change_rows):
        x, y = r.cells[learning], cells["avg_nll"]
        if x.value is None or y.value is None:
            continue
        point = ax.errorbar([x.value], [y.value], xerr=[x.stderr or 0], yerr=[y.stderr or 0], fmt="o", capsize=3)
        ax.annotate(r.label, (x.value, y.value), textcoords="offset points", xytext=(6, 4), fontsize=8)
        line = sorted((g.lr, g.cells[learning].value, c.value) for g, c in grid or []
                      if g.method == r.method and g.cells[learning].value is not None and c.value is not None)
        if len(line) > 1:
            ax.plot([p[1] for p in line], [p[2] for p in line], "-", lw=0.8, alpha=0.45, color=point[0].get_color())
            for lr, gx, gy in line:
                ax.annotate(f"{lr:g}", (gx, gy), textcoords="offset points", xytext=(3, -9), fontsize=6,
                            color=point[0].get_color())
    ax.axhline(0.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("task learned: held-out exact match (%)")
    ax.set_ylabel("knowledge lost: answer NLL change (nats/token)")
    ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def lower_is_better(cfg: dict[str, Any], columns: list[str]) -> set[str]:
    """The columns ranked lowest first: each benchmark whose scorer says so (an NLL), and the NLL average."""
    from lnull.evaluate.registry import scorer_of

    benches = cfg["eval"]["benchmarks"]
    return {"avg_nll"} | {c for c in columns if c in benches and scorer_of(benches[c]["kind"]).lower_is_better}


def run_missing(cfg: dict[str, Any], log: Callable[[str], None]) -> None:
    """Run every fine-tune of the table (stored stages and records reused)."""
    _, fits = compose_fits(cfg)
    run_configs([(f"{fit.label}: lr {fit.lr:g}, seed {fit.seed}", fit.cfg) for fit in fits], None, log)


def build(cfg: dict[str, Any], out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Write ``<name>.{md,tex,csv,png}`` into ``out`` from the store."""
    from lnull.tables.render import latex, markdown

    tcfg = cfg["table"]
    knowledge, general, downstream = list(tcfg["knowledge"]), list(tcfg["general"]), list(tcfg["downstream"])
    pre, best, grid = collect(cfg)
    learning = downstream[0]
    cols = knowledge + ["avg_nll", "kept"] + general + downstream + ["gm"]
    lower = lower_is_better(pre.fits[0].cfg, cols)
    rows = _as_rows(pre, best, show_lr=len(tcfg["lrs"]) > 1)
    change_cols = knowledge + ["avg_nll"] + general
    change_rows = with_average(changes(pre, best, knowledge + general), knowledge)
    spread = f"sd over {tcfg['seeds']} seeds (pre-trained row: standard error)" if tcfg["seeds"] > 1 \
        else "standard error"
    note = (f"NLL columns: per answer token (knowledge) or text token (general), nats, lower is better; Kept %: gold-"
            f"answer probability per token as % of the pre-trained model's; Task EM %: held-out examples that greedy "
            f"decoding answers exactly; GM = sqrt(Kept % x Task EM %). ± {spread}.")
    md = markdown(tcfg["title"] or tcfg["name"], rows, cols, lower=lower, labels=LABELS,
                  number=lambda c, cell: _cell_text(cell, _digits(c)), note=note)
    md += "\n" + changes_markdown(change_rows, change_cols)
    boot = bootstrap_lines(best, knowledge, list(tcfg["compare"]), list(tcfg["against"]), tcfg["bootstrap"])
    if boot:
        md += (f"\n#### Paired bootstrap over questions ({tcfg['bootstrap']} resamples): average knowledge NLL "
               f"change, method − baseline (< 0: the method keeps more; questions only, the seed spread is in the "
               f"table)\n\n" + "\n".join(boot) + "\n")
    if len(tcfg["lrs"]) > 1:
        md += "\n" + grid_markdown(grid, learning)
    lrs = {r.method: r.lr for r in best}
    paths = write_files(out, tcfg["name"], {
        "md": md, "tex": latex(tcfg["title"] or tcfg["name"], rows, cols, lower=lower, labels=LABELS),
        "csv": csv_text(rows, cols, change_rows, change_cols, lrs, tcfg["seeds"])})
    grid_changes = None
    if len(tcfg["lrs"]) > 1:
        averaged = with_average(changes(pre, grid, knowledge), knowledge)
        grid_changes = [(g, cells["avg_nll"]) for g, (_, cells) in zip(grid, averaged)]
    paths.append(str(figure(out / f"{tcfg['name']}.png", tcfg["title"] or tcfg["name"], pre, best, change_rows,
                            learning, grid_changes)))
    log(md)
    done = sum(all(c.missing != "not run" for c in r.cells.values()) for r in rows)
    return {"rows": len(rows), "complete_rows": done, "paths": paths}


RETENTION = register(TableKind("retention", build, compose=compose_fits, status=status, run_missing=run_missing))
