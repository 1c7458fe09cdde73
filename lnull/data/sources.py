"""Record sources behind one spec string, so configs name data the same way online and offline.

Spec forms:
    synthetic:<generator>:<n>[:<seed>]   generated in code (lnull.data.synthetic; seed 0 by default)
    asset:<name>/<split>        an offline asset converted by ``lnull assets``
    /path/to/file.jsonl         a local jsonl (or .json list) file
    hub:<dataset>[/<config>]:<split>   ``datasets.load_dataset`` when a hub is reachable
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lnull.errors import ConfigError


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub endpoint does not answer a TCP connect within ``timeout``
    seconds (saves the hub client's ~25 s of retries on offline machines)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _asset_file(spec: str, cache_dir: Optional[str]) -> Path:
    """File of ``asset:<name>[/<split>]`` (split defaults to test); FileNotFoundError / ValueError as
    ``lnull.assets.asset_path``."""
    from lnull.assets import asset_path

    name, _, split = spec[len("asset:"):].partition("/")
    return asset_path(name, split or "test", cache_dir=cache_dir)


def _local_file(spec: str, what: str = "dataset") -> Path:
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{what} '{spec}' not found: not a file, and not synthetic:/asset:/hub:")
    return path


def load_records(spec: str, cache_dir: Optional[str] = None, limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Records named by ``spec`` (see module docstring), at most ``limit`` of them, in source order."""
    if spec.startswith("synthetic:"):
        from lnull.data.synthetic import GENERATORS

        parts = spec.split(":")
        if len(parts) not in (3, 4) or parts[1] not in GENERATORS or not all(p.isdigit() for p in parts[2:]):
            raise ConfigError(f"bad synthetic dataset '{spec}'; use synthetic:<{'|'.join(GENERATORS)}>:<n>[:<seed>]")
        rows = GENERATORS[parts[1]](int(parts[2]), int(parts[3]) if len(parts) == 4 else 0)
    elif spec.startswith("asset:"):
        rows = read_jsonl(_asset_file(spec, cache_dir))
    elif spec.startswith("hub:"):
        import datasets

        name, _, split = spec[len("hub:"):].rpartition(":")
        path, _, config = name.partition("/") if name.count("/") > 1 else (name, "", "")
        ds = datasets.load_dataset(path, config or None, split=split or "train")
        rows = [dict(r) for r in (ds.select(range(min(limit, len(ds)))) if limit else ds)]
    else:
        path = _local_file(spec)
        rows = read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text())
    return rows[:limit] if limit is not None else rows


def require_fields(rows: list[dict[str, Any]], fields: list[str], spec: str) -> None:
    """Raise ConfigError naming the first missing field (checked on the first record)."""
    if not rows:
        raise ConfigError(f"dataset '{spec}' is empty")
    for name in fields:
        if name not in rows[0]:
            raise ConfigError(f"dataset '{spec}' has no field '{name}' (fields: {', '.join(rows[0])})")


def data_fingerprint(spec: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """sha256 (16 hex) of the file behind ``spec`` (a local file or an offline asset), None for synthetic data
    (a pure function of the spec) and hub datasets (named by the spec)."""
    import hashlib

    if spec.startswith(("synthetic:", "hub:")):
        return None
    path = _asset_file(spec, cache_dir) if spec.startswith("asset:") else _local_file(spec)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_available(spec: str, cache_dir: Optional[str] = None, what: str = "dataset") -> None:
    """Cheap check that ``spec`` can be loaded here (file or asset present, hub reachable), so a run fails in
    seconds instead of after the stages before the one that reads it."""
    if spec.startswith("synthetic:"):
        load_records(spec, cache_dir, 1)
    elif spec.startswith("asset:"):
        try:
            _asset_file(spec, cache_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{what} '{spec}': {exc}") from None
    elif spec.startswith("hub:"):
        if not hub_reachable():
            raise ConfigError(f"{what} '{spec}' needs the Hugging Face hub, which is not reachable (offline); "
                              "point it at a local jsonl file instead")
    else:
        _local_file(spec, what)
