"""The table-kind registry: one :class:`TableKind` per ``table.kind``, registered by its own module.

A table-kind module of ``lnull/tables/`` calls ``register(TableKind(...))`` at import time; the first lookup of a
kind not yet registered imports every such module, so adding a table kind is one new module plus a table config
(``configs/table/<name>.yaml`` with ``kind: <name>``), nothing else edited.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lnull.errors import ConfigError

Config = dict[str, Any]
Log = Callable[[str], None]
KIND_MARK = "register(TableKind("  # what makes a module of this package a table-kind module


def _nothing_missing(cfg: Config, log: Log) -> None:
    return None


def _no_rows(cfg: Config) -> list[tuple[str, bool]]:
    return []


@dataclass(frozen=True)
class TableKind:
    """One kind of table (``table.kind``): how its rows are composed from the table config, which are done, how
    the missing ones are run, and how the table is built from the store."""

    name: str
    # (config, output folder, log) -> {"rows": n, "paths": [written files], ...}; reads the store only
    build: Callable[[Config, Path, Log], dict[str, Any]]
    # (config) -> the table's rows (or fine-tunes), each with its composed config; raises ConfigError on a bad
    # spec before anything runs
    compose: Callable[[Config], Any] = lambda cfg: []
    # (config) -> [(row label, every record it needs stored)]: `lnull list`
    status: Callable[[Config], list[tuple[str, bool]]] = _no_rows
    # (config, log) -> None: run whatever rows the store lacks (``table.run_missing=true``)
    run_missing: Callable[[Config, Log], None] = _nothing_missing


REGISTRY: dict[str, TableKind] = {}


def register(kind: TableKind) -> TableKind:
    """Add ``kind`` to the registry (a module registering a name twice is a programming error)."""
    if kind.name in REGISTRY and REGISTRY[kind.name] is not kind:
        raise ValueError(f"table kind '{kind.name}' is registered twice")
    REGISTRY[kind.name] = kind
    return kind


def import_kinds() -> None:
    """Import every table-kind module of the ``lnull.tables`` package (found by :data:`KIND_MARK`)."""
    package = sys.modules[__package__]
    for folder in package.__path__:
        for path in sorted(Path(folder).glob("*.py")):
            if path.name != "base.py" and KIND_MARK in path.read_text():
                importlib.import_module(f"{package.__name__}.{path.stem}")


def kinds() -> list[str]:
    """Every registered table kind, sorted."""
    import_kinds()
    return sorted(REGISTRY)


def table_kind(name: str) -> TableKind:
    """The registered :class:`TableKind` ``name``; one ConfigError line naming the known kinds otherwise."""
    if name not in REGISTRY:
        import_kinds()
    if name not in REGISTRY:
        raise ConfigError(f"table.kind must be one of {', '.join(kinds())}, got '{name}'")
    return REGISTRY[name]
