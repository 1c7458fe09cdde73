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
    from lnull.tables.base import table_kind

    lines = []
    keep = [o for o in overrides if not o.startswith("table=")]
    for name in table_names():
        cfg = compose([f"table={name}", *keep])
        tcfg = cfg["table"]
        why = ""
        try:
            done = table_kind(tcfg["kind"]).status(cfg)
        except ConfigError as exc:
            said = str(exc)
            raise ConfigError(said if said.startswith(f"table '{name}'") else f"table '{name}': {said}") from None
        except FileNotFoundError as exc:  # e.g. the demo's model is an offline asset not fetched here
            done, why = [(r.get("label") or r["method"], False) for r in tcfg["rows"]], f" ({exc})"
        count = sum(ok for _, ok in done)
        lines.append(f"{name:<9} {count}/{len(done)} rows done  experiment {tcfg['experiment']:<20} "
                     f"{tcfg['title']}{why}")
        lines += [f"    {'done   ' if ok else 'missing'}  {label}" for label, ok in done]
    return "\n".join(lines)
