"""The sweep tables' figure: Avg1 and Avg2 against the swept value (rank or calibration samples), one line per
method (LoRA-Null vs CorDA), the papers' numbers dashed where they were reported."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lnull.io import save_png
from lnull.tables.rows import Row
from lnull.tables.reported import ReportedRow

AXES = {"method.rank": "rank r", "calibration.samples": "calibration samples"}


def sweep_figure(path: Path, title: str, rows: list[Row], reported: list[Optional[ReportedRow]], sweep: str,
                 metrics: tuple[str, ...] = ("avg1", "avg2")) -> Path:
    """Write a PNG with one panel per metric; x = the row's paper value of ``sweep`` (at demo scale too, so the
    papers' points share the axis), y = the metric, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    methods = list(dict.fromkeys(r.method for r in rows if not r.is_base))
    for ax, metric in zip(axes[0], metrics):
        for method in methods:
            mine = [(r, rep) for r, rep in zip(rows, reported) if r.method == method]
            name = mine[0][0].label.split(" (")[0]
            xs = [r.x for r, _ in mine]
            ys = [r.cells[metric].value for r, _ in mine]
            shown = [(x, y) for x, y in zip(xs, ys) if y is not None]
            line = ax.plot([x for x, _ in shown], [y for _, y in shown], "o-", label=f"{name} (ours)")[0]
            paper = [(rep.calib_samples if sweep == "calibration.samples" else rep.rank, rep.values.get(metric))
                     for _, rep in mine if rep is not None and rep.values.get(metric) is not None]
            if paper:
                ax.plot([x for x, _ in paper], [y for _, y in paper], "s--", color=line.get_color(), alpha=0.6,
                        label=f"{name} (paper)")
        ax.set(xscale="log", xlabel=AXES.get(sweep, sweep), ylabel=metric.replace("avg", "Avg"), title=metric)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_png(fig, path, dpi=110)


