"""What a table says it ran (issue 27): its title and a provenance line, from the records its rows read (the
configs the rows compose to where a row has no record yet), so a table run at demo scale never carries the
paper's setting as its own.

At the paper's scale (``scale.name == paper`` and no ``table.overrides``) the title is the spec's. Elsewhere it
says "at <scale> scale: <model>, <task> (r = ..., <n> calibration windows of <t> tokens, <s> training steps)"
and names the paper's setting (the spec title's part after its first ": ") as what the run stands in for.
"""
from __future__ import annotations

from typing import Any, Iterable

from lnull.tables.rows import Row


def _join(values: Iterable[Any]) -> str:
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    return " / ".join(str(v) for v in distinct) if distinct else "?"


def ran(rows: list[Row]) -> dict[str, Any]:
    """{model, ranks, calibration (samples, seqlen), task, steps, items {benchmark: n}, from_records} of the
    rows that run (not cited): read from their records, from their configs where a row has none."""
    runs = [r for r in rows if not r.is_cited]
    facts: dict[str, list[Any]] = {"model": [], "rank": [], "samples": [], "seqlen": [], "task": [], "steps": []}
    items: dict[str, list[int]] = {}
    recorded = 0
    for row in runs:
        recs = [rec for rec in row.records.values() if rec]
        recorded += bool(recs)
        for bench, rec in row.records.items():
            if rec:
                items.setdefault(bench, []).append(rec["n"])
        cfg = row.cfg
        rec = next((r for r in recs if r.get("method") or row.is_base), recs[0] if recs else None)
        facts["model"].append((rec or {}).get("base_model", {}).get("name") or cfg["model"]["name"])
        if row.is_base:
            continue
        method, cal, train = (rec or {}).get("method"), (rec or {}).get("calibration"), (rec or {}).get("train")
        facts["rank"].append(method["rank"] if method else cfg["method"]["rank"])
        if cal or row.cfg.get("calibration"):
            facts["samples"].append(cal["samples"] if cal else cfg["calibration"]["samples"])
            facts["seqlen"].append(cal["seqlen"] if cal else cfg["calibration"]["seqlen"])
        facts["task"].append(train["task"] if train else cfg["task"]["name"])
        facts["steps"].append(train["steps"] if train else cfg["train"]["max_steps"])
    return {**{k: _join(v) for k, v in facts.items()},
            "items": {b: _join(sorted(set(n))) for b, n in items.items()}, "from_records": recorded, "rows": len(runs)}


def title(tcfg: dict[str, Any], scale: str, paper_setting: bool, facts: dict[str, Any]) -> str:
    """The table's title: the spec's at the paper's setting; otherwise what ran, and what it stands in for."""
    spec = tcfg["title"] or tcfg["name"]
    if paper_setting:
        return spec
    name, _, setting = spec.partition(": ")
    where = f"at {scale} scale" if scale != "paper" else "with overrides"
    stands = f" — stands in for {setting}" if setting else ""
    return (f"{name} {where}: {facts['model']}, {facts['task']} (r = {facts['rank']}, {facts['samples']} "
            f"calibration windows of {facts['seqlen']} tokens, {facts['steps']} training steps){stands}")


def line(facts: dict[str, Any], labels: dict[str, str]) -> str:
    """One line under the title: what ran, item counts per benchmark, and where the facts come from."""
    items = ", ".join(f"{labels.get(b, b)} {n}" for b, n in facts["items"].items()) or "none scored yet"
    source = (f"read from the records of {facts['from_records']} of {facts['rows']} rows"
              if facts["from_records"] else "from the rows' configs: no record read")
    return (f"Ran: {facts['model']}; r = {facts['rank']}; calibration {facts['samples']} windows × "
            f"{facts['seqlen']} tokens; task {facts['task']}, {facts['steps']} steps; items per benchmark: {items} "
            f"({source}).")
