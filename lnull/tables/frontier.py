"""Table kind ``frontier`` (``lnull frontier``, ``make frontier``): every initialisation with its learning rate tuned,
compared by the knowledge it keeps at equal learning.

Each row of the table config is a method with its recommended learning rate (``lr``; default the experiment's
``train.lr``); the method runs at ``table.lr_points`` rates spaced by the factor ``table.lr_step`` around it, times
``table.seeds`` seeds, every point a normal stored run (only missing points are computed). When a method's best
rate by the task score lands on an edge of its grid, ``lnull frontier`` runs one more rate beyond that edge, up to
``table.widen`` times per method; a table built without running says which methods still need it.

Per point: task learned (``downstream[0]``, the held-out task score, %), knowledge lost (the mean over
``knowledge`` sets of the paired change of gold-answer NLL from the pre-trained model, nats/token) and, when
given, the change of general-text NLL (``general``). Outputs ``<name>.{md,tex,csv,png}``: the frontier figure
(one curve per method through its rates, error bars both ways, Pareto-optimal points ringed) and the table whose
headline column is knowledge lost at matched learning (:mod:`lnull.tables.frontier_stats`), with bootstrap
intervals and paired differences against ``against`` (default LoRA and LoRA-Null v1).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from lnull.errors import ConfigError
from lnull.tables.base import TableKind, register
from lnull.tables.frontier_stats import Interval, PointItems, bootstrap_matched, log_grid, matched_level, pareto, \
    widened
from lnull.tables import retention
from lnull.tables.retention import Fit, kept_percent
from lnull.tables.rows import check_columns, row_overrides, run_configs, stored_records, write_files

Log = Callable[[str], None]


@dataclass
class Point:
    """One method at one learning rate: its seeds' fits and what the table reads of them (None: not run)."""

    method: str
    label: str
    lr: float
    fits: list[Fit]
    task: Optional[float] = None  # mean held-out score over seeds (%)
    task_se: Optional[float] = None  # its standard error (one seed: the scorer's; more: sd over seeds / sqrt n)
    lost: Optional[float] = None  # mean knowledge NLL change (nats/token)
    lost_se: Optional[float] = None
    kept: Optional[float] = None  # Kept % (retention.kept_percent)
    general: Optional[float] = None  # mean general-text NLL change (nats/token)
    general_se: Optional[float] = None
    items: Optional[PointItems] = None
    pareto: bool = False
    # forgetting in the literature's units (lnull.forgetting): "peft" (PEFT method_comparison's, nats/token),
    # "biderman" (HellaSwag / ARC-C / WinoGrande average change, pp), "mmlu" (pp); each an Estimate
    literature: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.items is not None


@dataclass
class MethodPlan:
    """A row of the table: the method, its label, its grid (base rates plus any widening) and its points."""

    method: str
    label: str
    spec: dict[str, Any]
    grid: list[float]
    points: list[Point] = field(default_factory=list)
    widened: list[float] = field(default_factory=list)
    edge: Optional[float] = None  # the next rate to run: best rate on an edge, widening budget left
    composed: dict[float, list[Fit]] = field(default_factory=dict)  # lr -> its fits (composing costs ~0.1 s)

    def best(self) -> Optional[Point]:
        done = [p for p in self.points if p.done]
        return max(done, key=lambda p: p.task) if done else None


def _check(tcfg: dict[str, Any]) -> None:
    if not tcfg["rows"] or not tcfg["experiment"]:
        raise ConfigError(f"table '{tcfg['name']}' has no rows or no experiment")
    if not tcfg["knowledge"] or not tcfg["downstream"]:
        raise ConfigError(f"table '{tcfg['name']}' (kind frontier) needs knowledge and downstream columns")
    if tcfg["lr_points"] < 2 or tcfg["lr_step"] <= 1.0:
        raise ConfigError(f"table.lr_points must be >= 2 and table.lr_step > 1, got {tcfg['lr_points']} and "
                          f"{tcfg['lr_step']}")


def _fits(table_cfg: dict[str, Any], plan: "MethodPlan", lr: float) -> list[Fit]:
    """The fine-tunes of ``plan``'s method at ``lr``, one per seed (``train.seed`` + 0, 1, ...), composed once."""
    from lnull.compose import compose

    if lr not in plan.composed:
        base = row_overrides(table_cfg, plan.spec)
        seed = compose(base)["train"]["seed"]
        plan.composed[lr] = [Fit(plan.method, plan.label, lr, seed + i,
                                 compose(base + [f"train.seed={seed + i}", f"train.lr={lr}"]))
                             for i in range(table_cfg["table"]["seeds"])]
    return plan.composed[lr]


def columns_of(tcfg: dict[str, Any]) -> list[str]:
    """The retention table's columns (knowledge, general, downstream) and the literature benchmarks."""
    return retention.columns_of(tcfg) + list(tcfg["literature"])


def _seed_mean(estimates: list[Any]) -> Any:
    """One :class:`lnull.forgetting.Estimate` from one per seed: the first missing one (its why), else the mean
    with the scorer's standard error (one seed) or the sd over seeds / sqrt(seeds)."""
    from lnull.forgetting import Estimate

    missing = next((e for e in estimates if e.value is None), None)
    if missing is not None or len(estimates) == 1:
        return missing or estimates[0]
    values = [e.value for e in estimates]
    return Estimate(statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5, estimates[0].n,
                    estimates[0].unit)


def literature_of(tcfg: dict[str, Any], base: dict[str, Any], fits: list[Fit]) -> dict[str, Any]:
    """The point's forgetting in the literature's units from its records: PEFT's on the first general text,
    Biderman et al.'s average and MMLU's change on ``table.literature`` (those not there are left out)."""
    from lnull import forgetting

    out = {}
    if tcfg["general"]:
        text = tcfg["general"][0]
        out["peft"] = _seed_mean([forgetting.peft_forgetting(base[text], f.records[text]) for f in fits])
    literature = list(tcfg["literature"])
    if literature:
        out["biderman"] = _seed_mean([forgetting.biderman_change([base[b] for b in literature],
                                                                 [f.records[b] for b in literature]) for f in fits])
        mmlu = [b for b in literature if (base[b].get("scorer") or {}).get("task") == "mmlu"]
        if mmlu:
            out["mmlu"] = _seed_mean([forgetting.accuracy_change(base[mmlu[0]], f.records[mmlu[0]]) for f in fits])
    return out


def compose_plans(table_cfg: dict[str, Any]) -> tuple[dict[str, Any], list[MethodPlan]]:
    """(config of the pre-trained model, one plan per row with its base grid); bad specs raise before anything
    runs."""
    from lnull.compose import compose

    tcfg = table_cfg["table"]
    _check(tcfg)
    plans, base_cfg = [], None
    for spec in tcfg["rows"]:
        first = compose(row_overrides(table_cfg, spec))
        base_cfg = base_cfg or first
        center = spec.get("lr") or first["train"]["lr"]
        grid = log_grid(center, tcfg["lr_points"], tcfg["lr_step"])
        plans.append(MethodPlan(spec["method"], spec.get("label") or spec["method"], spec, grid))
    check_columns(base_cfg, columns_of(tcfg), tcfg["name"])
    return base_cfg, plans


def _read_point(table_cfg: dict[str, Any], plan: MethodPlan, lr: float, base: dict[str, Any]) -> Point:
    """The point of ``plan`` at ``lr`` from the store (``base``: the pre-trained records)."""
    from lnull.evaluate.likelihood import mean_and_stderr
    from lnull.tables.retention import paired_change

    tcfg = table_cfg["table"]
    fits = _fits(table_cfg, plan, lr)
    benches = columns_of(tcfg)
    for fit in fits:
        fit.records = stored_records(fit.cfg, "trained", benches)
    point = Point(plan.method, plan.label, lr, fits)
    if any(r is None for f in fits for r in f.records.values()) or any(base[b] is None for b in benches):
        return point
    learning = tcfg["downstream"][0]
    task = np.array([f.records[learning]["details"]["items"] for f in fits], dtype=np.float64)
    knowledge = []
    for b in tcfg["knowledge"]:
        pre = np.asarray(base[b]["details"]["items"], dtype=np.float64)
        per_seed = np.array([f.records[b]["details"]["items"] for f in fits], dtype=np.float64)
        if per_seed.shape[1] != pre.shape[0]:
            raise ConfigError(f"benchmark {b}: {per_seed.shape[1]} items scored after fine-tuning but "
                              f"{pre.shape[0]} before: not paired")
        knowledge.append(per_seed - pre)
    point.items = PointItems(lr, task, knowledge)
    values = [f.records[learning]["value"] for f in fits]
    point.task = statistics.fmean(values)
    point.task_se = (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1
                     else fits[0].records[learning].get("stderr"))
    seed_lost = [statistics.fmean(float(k[i].mean()) for k in knowledge) for i in range(len(fits))]
    point.lost = statistics.fmean(seed_lost)
    if len(fits) > 1:
        point.lost_se = statistics.stdev(seed_lost) / len(fits) ** 0.5
    else:
        point.lost_se = float(np.sqrt(sum(mean_and_stderr(k[0].tolist())[1] ** 2 for k in knowledge))
                              / len(knowledge))  # the knowledge sets' paired changes, independent
    nll = {b: statistics.fmean(f.records[b]["value"] for f in fits) for b in tcfg["knowledge"]}
    point.kept = kept_percent(nll, {b: base[b]["value"] for b in tcfg["knowledge"]})
    if tcfg["general"]:
        changes = [paired_change(np.mean([f.records[g]["details"]["items"] for f in fits], axis=0).tolist(),
                                 base[g]["details"]["items"]) for g in tcfg["general"]]
        point.general = statistics.fmean(c[0] for c in changes)
        point.general_se = float(np.sqrt(sum((c[1] or 0.0) ** 2 for c in changes)) / len(changes))
    point.literature = literature_of(tcfg, base, fits)
    return point


def collect(table_cfg: dict[str, Any], run: Optional[Log] = None) -> tuple[dict[str, Any], list[MethodPlan]]:
    """(config of the pre-trained model, every method's plan with its points read from the store). With ``run`` (a log),
    missing points are run first and each method's grid is widened (up to ``table.widen`` extra rates) while
    its best rate lies on an edge; without, a stored widening point is shown and a missing one is named in
    ``plan.edge``."""
    tcfg = table_cfg["table"]
    base_cfg, plans = compose_plans(table_cfg)
    benches = columns_of(tcfg)
    for plan in plans:
        if run is not None:
            _run(table_cfg, plan, plan.grid, run)
        base = stored_records(base_cfg, "base", benches)  # the first run of a table scores the pre-trained model
        plan.points = [_read_point(table_cfg, plan, lr, base) for lr in plan.grid]
        while True:
            best = plan.best()
            extra = widened(sorted(p.lr for p in plan.points), best.lr if best else None, tcfg["lr_step"])
            if extra is None or len(plan.widened) >= tcfg["widen"]:
                plan.edge = None
                break
            if run is not None:
                _run(table_cfg, plan, [extra], run)
            point = _read_point(table_cfg, plan, extra, base)
            if not point.done:
                plan.edge = extra
                break
            plan.widened.append(extra)
            plan.points = sorted(plan.points + [point], key=lambda p: p.lr)
    return base_cfg, plans


def _run(table_cfg: dict[str, Any], plan: MethodPlan, rates: list[float], log: Log) -> None:
    jobs = [(f"{plan.label}: lr {lr:g}, seed {fit.seed}", fit.cfg)
            for lr in rates for fit in _fits(table_cfg, plan, lr)]
    run_configs(jobs, None, log)


def status(table_cfg: dict[str, Any]) -> list[tuple[str, bool]]:
    """(point label, stored) for every point of every method's grid (with stored widenings)."""
    _, plans = collect(table_cfg)
    return [(f"{p.label} (lr {p.lr:g})", p.done) for plan in plans for p in plan.points]


def run_missing(table_cfg: dict[str, Any], log: Log) -> None:
    collect(table_cfg, run=log)


def _rates_text(plan: MethodPlan) -> str:
    done = sum(p.done for p in plan.points)
    text = f"{done} of {len(plan.points)}"
    if plan.widened:
        text += f" (widened to {', '.join(f'{lr:g}' for lr in plan.widened)})"
    if plan.edge is not None:
        text += f"; best on the edge: run lr {plan.edge:g} (`lnull frontier`)"
    return text


def build(cfg: dict[str, Any], out: Path, log: Log) -> dict[str, Any]:
    """Write ``<name>.{md,tex,csv,png}`` into ``out`` from the store (module docstring)."""
    from lnull.tables import frontier_render as render

    tcfg = cfg["table"]
    base_cfg, plans = collect(cfg)
    base = stored_records(base_cfg, "base", columns_of(tcfg))
    learning = tcfg["downstream"][0]
    points = [p for plan in plans for p in plan.points]
    done = [p for p in points if p.done]
    for p, flag in zip(done, pareto([(p.task, p.lost) for p in done])):
        p.pareto = flag
    base_rec = base[learning]
    base_task = None if base_rec is None else np.asarray(base_rec["details"]["items"], dtype=np.float64)
    curves = {plan.method: [(p.task, p.lost) for p in plan.points if p.done] for plan in plans}
    curves = {m: c for m, c in curves.items() if c}
    level, source = tcfg["match_at"], "table.match_at"
    if level is None:
        level, source = matched_level(curves), "the best score every method reaches"
    labels = {plan.method: plan.label for plan in plans}
    against = [b for b in tcfg["against"] if b in curves]
    pairs = [(m, b) for m in curves for b in against if m != b]
    per_method, per_pair = ({}, {})
    if base_task is not None and level is not None:
        items = {plan.method: [p.items for p in plan.points if p.done] for plan in plans if plan.method in curves}
        per_method, per_pair = bootstrap_matched(base_task, items, level, pairs, tcfg["bootstrap"])
    lines = []
    for plan in plans:
        best = plan.best()
        lines.append(render.Headline(
            plan.method, plan.label, _rates_text(plan),
            "—" if best is None else f"lr {best.lr:g}: {best.task:.1f} %",
            per_method.get(plan.method, Interval(None, None, None, None, 0)),
            {b: per_pair[(plan.method, b)] for b in against if (plan.method, b) in per_pair},
            sum(p.pareto for p in plan.points)))
    title = tcfg["title"] or tcfg["name"]
    ran = (f"Ran: {base_cfg['model']['name']}, task {base_cfg['task']['name']}, r = {base_cfg['method']['rank']}, "
           f"{base_cfg['train']['max_steps'] or base_cfg['train']['epochs']} steps, {tcfg['seeds']} seed(s) per "
           f"rate, {tcfg['lr_points']} rates per method spaced x{tcfg['lr_step']:g} (widened up to "
           f"{tcfg['widen']} more while the best is on an edge).")
    frontier_points = [f"{p.label} (lr {p.lr:g})" for p in done if p.pareto]
    md = "\n\n".join([f"### {title}", ran,
                      render.headline_markdown(level, source, lines, labels, against, tcfg["bootstrap"]),
                      render.answer_lines(lines, frontier_points, labels),
                      render.points_markdown(points, bool(tcfg["general"]))])
    paths = write_files(out, tcfg["name"], {"md": md, "tex": render.latex_headline(title, level, lines, against),
                                            "csv": render.csv_text(points, level, lines)})
    base_point = None if base_rec is None else (base_rec["value"], base_rec.get("stderr"))
    paths.append(str(render.figure(out / f"{tcfg['name']}.png", title, base_point, plans, level)))
    log(md)
    return {"rows": len(plans), "points": len(points), "complete_points": len(done), "paths": paths,
            "level": level}


FRONTIER = register(TableKind("frontier", build, compose=compose_plans, status=status, run_missing=run_missing))
