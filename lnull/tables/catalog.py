"""`lnull list`: every paper table, the experiment its rows run, and which rows the store already holds."""
from __future__ import annotations

from lnull.errors import ConfigError


def table_names() -> list[str]:
    """Every paper table spec in ``configs/table/`` (the generic ``summary`` is not one)."""
    from lnull.compose import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / "table").glob("*.yaml") if p.stem != "summary")


def describe(overrides: list[str]) -> str:
    """One block per table: name, title, experiment, and per row done / missing (``overrides`` as given to
    ``lnull list``, e.g. ``+scale=demo run.root=...``)."""
    from lnull.compose import compose
    from lnull.layout import RunLayout
    from lnull.tables import paper

    lines = []
    keep = [o for o in overrides if not o.startswith("table=")]
    for name in table_names():
        cfg = compose([f"table={name}", *keep])
        tcfg = cfg["table"]
        if tcfg["kind"] == "retention":
            from lnull.tables.retention import status

            try:
                done, why = status(cfg), ""
            except FileNotFoundError as exc:  # the demo's model is an offline asset not fetched here
                done, why = [(f"{r.get('label') or r['method']}", False) for r in tcfg["rows"]], f" ({exc})"
            lines.append(f"{name:<9} {sum(ok for _, ok in done)}/{len(done)} rows done  experiment "
                         f"{tcfg['experiment']:<12} {tcfg['title']}{why}")
            lines += [f"    {'done   ' if ok else 'missing'}  {label}" for label, ok in done]
            continue
        rows = paper.compose_rows(cfg)
        if tcfg["kind"] == "analysis":
            done = [(r.label, RunLayout(r.cfg).is_complete("analyze")) for r in rows[1:]]
        else:
            try:
                paper.check_benchmarks(rows, tcfg)
            except ConfigError as exc:
                raise ConfigError(f"table '{name}': {exc}") from None
            paper.fill(rows, tcfg)
            done = paper.status(rows)
        count = sum(ok for _, ok in done)
        lines.append(f"{name:<9} {count}/{len(done)} rows done  experiment {tcfg['experiment']:<20} {tcfg['title']}")
        lines += [f"    {'done   ' if ok else 'missing'}  {label}" for label, ok in done]
    return "\n".join(lines)


