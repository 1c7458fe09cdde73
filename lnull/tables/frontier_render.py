"""What ``lnull frontier`` writes (:mod:`lnull.tables.frontier`): the headline table (knowledge lost at matched
learning), every point, the CSV in long format and the frontier figure."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lnull.tables.frontier_stats import Interval


@dataclass
class Headline:
    """One method's line of the headline table."""

    method: str
    label: str
    rates: str  # e.g. "5 of 5 (+1 widened)"
    best: str  # "lr 5e-4: 45.3 %"
    lost: Interval  # knowledge lost at the matched level
    against: dict[str, Interval]  # baseline method -> this method minus it
    frontier: int  # its Pareto-optimal points


def _num(value: Optional[float], digits: int, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def interval_text(iv: Optional[Interval], digits: int = 3, p_below: bool = False) -> str:
    """"+0.123 [+0.050, +0.200]" (with ", P(< 0) = 0.01" when ``p_below``); "—" without a value, "n/a" for a
    value without an interval."""
    if iv is None or iv.value is None:
        return "—"
    text = _num(iv.value, digits, signed=True)
    if iv.lo is None:
        return text + " (no interval)"
    text += f" [{_num(iv.lo, digits, True)}, {_num(iv.hi, digits, True)}]"
    return text + (f", P(< 0) = {iv.below_zero:.3f}" if p_below else "")


def verdict(iv: Optional[Interval]) -> str:
    """How a difference a - b of knowledge lost reads: a keeps more (interval below 0), less, or unresolved."""
    if iv is None or iv.lo is None:
        return "not computable"
    return "keeps more" if iv.hi < 0 else "keeps less" if iv.lo > 0 else "no resolved difference"


def headline_markdown(level: Optional[float], level_source: str, lines: list[Headline], labels: dict[str, str],
                      against: list[str], iters: int) -> str:
    head = ["Method", "Rates run", "Best rate: task score", "Knowledge lost at matched learning (95% CI)"]
    head += [f"− {labels.get(b, b)} (95% CI, P(< 0))" for b in against] + ["Frontier points"]
    level_text = "—" if level is None else f"{level:.1f} %"
    out = [f"#### Knowledge lost at matched learning: task score = {level_text} ({level_source})", "",
           "| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for h in lines:
        cells = [h.label, h.rates, h.best, interval_text(h.lost)]
        cells += [interval_text(h.against.get(b), p_below=True) if b != h.method else "—" for b in against]
        out.append("| " + " | ".join(cells + [str(h.frontier)]) + " |")
    out += ["", f"Knowledge lost: mean over the knowledge sets of the paired change of gold-answer NLL from the "
                f"pre-trained model (nats/token; lower keeps more), read off each method's curve through its rates "
                f"(the pre-trained model is every curve's first point) where the task score equals the level. "
                f"Intervals: {iters} bootstrap resamples of the same held-out problems, questions and seeds for "
                f"every method (differences are paired); a difference < 0 means the method keeps more than the "
                f"baseline at equal learning."]
    return "\n".join(out) + "\n"


def answer_lines(lines: list[Headline], frontier_points: list[str], labels: dict[str, str]) -> str:
    """Plain sentences: which points are Pareto-optimal and how each comparison resolves."""
    out = ["#### What it says", "",
           "- On the frontier (no other point learns at least as much while losing less): "
           + (", ".join(frontier_points) if frontier_points else "no point yet") + "."]
    for h in lines:
        for b, iv in h.against.items():
            if b != h.method:
                out.append(f"- {h.label} − {labels.get(b, b)}: {interval_text(iv, p_below=True)} nats/token "
                           f"({verdict(iv)}).")
    return "\n".join(out) + "\n"


LITERATURE = {"peft": ("PEFT forgetting (nats/token)", 3), "biderman": ("Biderman avg change (pp)", 1),
              "mmlu": ("MMLU change (pp)", 1)}


def _estimate(est: Any, digits: int, whys: list[str]) -> str:
    if est.value is None:
        whys.append(est.why)
        return f"n/a [{len(dict.fromkeys(whys))}]" if est.why else "n/a"
    return f"{est.value:+.{digits}f}" + (f" ± {est.stderr:.{digits}f}" if est.stderr is not None else "")


def points_markdown(points: list[Any], general: bool) -> str:
    """Every point of every method; the literature's units (PEFT's forgetting, Biderman's average, MMLU) where
    the points have them, a missing one as "n/a [k]" with its reason k under the table."""
    literature = [k for k in LITERATURE if any(k in p.literature for p in points)]
    head = ["Method", "lr", "Task score %", "Knowledge lost (nats/token)", "Kept %"]
    head += ["General text change (nats/token)"] if general else []
    head += [LITERATURE[k][0] for k in literature]
    out = ["#### Every point (± standard error; ◆ Pareto-optimal; — not run yet)", "",
           "| " + " | ".join(head + ["Frontier"]) + " |", "|---|" + "---:|" * len(head)]
    whys: list[str] = []
    for p in points:
        if not p.done:
            row = [p.label, f"{p.lr:g}"] + ["—"] * (len(head) - 2) + ["not run"]
        else:
            row = [p.label, f"{p.lr:g}", f"{p.task:.1f} ± {p.task_se or 0:.1f}",
                   f"{p.lost:+.3f} ± {p.lost_se or 0:.3f}", f"{p.kept:.1f}"]
            row += [f"{p.general:+.3f} ± {p.general_se or 0:.3f}"] if general else []
            row += [_estimate(p.literature[k], LITERATURE[k][1], whys) for k in literature]
            row.append("◆" if p.pareto else "")
        out.append("| " + " | ".join(row) + " |")
    reasons = list(dict.fromkeys(w for w in whys if w))
    out += [""] + [f"[{i}] {why}" for i, why in enumerate(reasons, 1)] if reasons else []
    return "\n".join(out) + "\n"


def latex_headline(title: str, level: Optional[float], lines: list[Headline], against: list[str]) -> str:
    from lnull.tables.render import latex_escape as esc

    out = [r"\begin{tabular}{ll" + "r" * (1 + len(against)) + "}", r"\toprule",
           "Method & Best rate & Lost at " + ("--" if level is None else f"{level:.1f}") + r"\,\% "
           + "".join(f"& $-$ {esc(b)} " for b in against) + r"\\", r"\midrule"]
    for h in lines:
        cells = [esc(h.label), esc(h.best), esc(interval_text(h.lost))]
        cells += [esc(interval_text(h.against.get(b))) if b != h.method else "--" for b in against]
        out.append(" & ".join(cells) + r" \\")
    return "\n".join([f"% {title}"] + out + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def csv_text(points: list[Any], level: Optional[float], lines: list[Headline]) -> str:
    """Long format: one line per point (``kind`` point), then per method the matched-level value and each paired
    difference (``kind`` matched / difference)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "method", "label", "lr", "task", "task_se", "lost", "lost_se", "kept", "general",
                "general_se", "pareto", "level", "lo", "hi", "against", "status", *LITERATURE])
    f = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
    blank = [""] * len(LITERATURE)
    for p in points:
        lit = [f(p.literature[k].value) if k in p.literature else "" for k in LITERATURE]
        w.writerow(["point", p.method, p.label, f"{p.lr:g}", f(p.task), f(p.task_se), f(p.lost), f(p.lost_se),
                    f(p.kept), f(p.general), f(p.general_se), int(p.pareto), "", "", "", "",
                    "ok" if p.done else "not run", *lit])
    for h in lines:
        w.writerow(["matched", h.method, h.label, "", "", "", f(h.lost.value), "", "", "", "", "", f(level),
                    f(h.lost.lo), f(h.lost.hi), "", "ok" if h.lost.value is not None else "not computable", *blank])
        for b, iv in h.against.items():
            w.writerow(["difference", h.method, h.label, "", "", "", f(iv.value), "", "", "", "", "", f(level),
                        f(iv.lo), f(iv.hi), b, "ok" if iv.value is not None else "not computable", *blank])
    return buf.getvalue()


def figure(path: Path, title: str, base_task: Optional[tuple[float, Optional[float]]], plans: list[Any],
           level: Optional[float]) -> Path:
    """Knowledge lost (y) against task learned (x): one curve per method through its rates from the pre-trained
    point, error bars both ways, Pareto-optimal points ringed, the matched level as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lnull.tables.figures import save_png

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    if base_task is not None:
        ax.errorbar([base_task[0]], [0.0], xerr=[base_task[1] or 0], fmt="s", color="black", capsize=3)
        ax.annotate("pre-trained", (base_task[0], 0.0), textcoords="offset points", xytext=(6, 6), fontsize=8)
    for plan in plans:
        done = [p for p in plan.points if p.done]
        if not done:
            continue
        xs, ys = [p.task for p in done], [p.lost for p in done]
        line = ax.errorbar(xs, ys, xerr=[p.task_se or 0 for p in done], yerr=[p.lost_se or 0 for p in done],
                           fmt="o-", ms=4, lw=1, capsize=2, label=plan.label)
        color = line[0].get_color()
        if base_task is not None:
            ax.plot([base_task[0], xs[0]], [0.0, ys[0]], ":", lw=0.8, color=color)
        for p in done:
            ax.annotate(f"{p.lr:g}", (p.task, p.lost), textcoords="offset points", xytext=(3, -9), fontsize=5.5,
                        color=color)
            if p.pareto:
                ax.scatter([p.task], [p.lost], s=140, facecolors="none", edgecolors=color, linewidths=1.4)
    if level is not None:
        ax.axvline(level, color="grey", lw=0.7, ls=":")
    ax.axhline(0.0, color="grey", lw=0.5, ls="-")
    ax.set_xlabel("task learned: held-out score (%)")
    ax.set_ylabel("knowledge lost: answer NLL change (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return save_png(fig, path)
