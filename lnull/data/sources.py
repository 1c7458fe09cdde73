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


JSON_TYPES = {type(None): "null", bool: "true/false", list: "a list", dict: "an object", int: "a number",
              float: "a number", str: "a string"}


def _json_type(value: Any) -> str:
    """What a JSON value is, in a user's words (``null``, ``a list``, ...)."""
    return JSON_TYPES.get(type(value), type(value).__name__)


def _jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line; ConfigError naming the file and the line for bytes that
    are not UTF-8, a line that is not JSON, or a JSON value that is not an object."""
    rows = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path} line {number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at "
                                  f"column {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {number}: {_json_type(row)}, "
                                  "not a JSON object (one {...} record per line)")
            rows.append((number, row))
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a jsonl file (blank lines skipped); ConfigError naming the file and line of a bad one."""
    return [row for _, row in _jsonl_rows(path)]


def _json_rows(path: Path) -> list[dict[str, Any]]:
    """Records of a .json file holding a list of objects; ConfigError naming the file (and line) otherwise."""
    try:
        rows = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: {_json_type(rows)}, not a list of records")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{path} record {index}: {_json_type(row)}, "
                              "not a JSON object")
    return rows


def field_value(record: dict[str, Any], path: str) -> Any:
    """``record`` at a dotted ``path``; integer parts index lists (``conversations.1.value``).
    Raises KeyError naming the missing part."""
    value: Any = record
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(part)
    return value


def field_text(record: dict[str, Any], path: str, where: str, key: str = "") -> str:
    """The text at ``path`` of ``record`` (a number as written); ConfigError naming ``where`` (file and line, or
    dataset and record), the field and the config ``key`` it comes from when it is missing or not text (a null
    must never train as the text "None")."""
    hint = f" ({key})" if key else ""
    try:
        value = field_value(record, path)
    except KeyError:
        raise ConfigError(f"{where} has no field '{path}'{hint}; record fields: {', '.join(map(str, record))}") \
            from None
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return str(value)
    raise ConfigError(f"{where}: field '{path}' is {_json_type(value)}, not a "
                      f"string{hint}")


def task_fields(task: Any) -> dict[str, str]:
    """{config key: field path} of the text a task's template needs (its query and its response)."""
    return {f"task.{key}": task[key] for key in ("query_field", "response_field")}


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


def load_records(spec: str, cache_dir: Optional[str] = None, limit: Optional[int] = None,
                 fields: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """Records named by ``spec`` (see module docstring), at most ``limit`` of them, in source order. ``fields``
    ({config key: field path}, e.g. :func:`task_fields`): each returned record must hold text there, else a
    ConfigError naming the file and line (or the dataset and record)."""
    lines: Optional[list[int]] = None
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
        if path.suffix == ".jsonl":
            numbered = _jsonl_rows(path)
            rows, lines = [row for _, row in numbered], [number for number, _ in numbered]
        else:
            rows = _json_rows(path)
    rows = rows[:limit] if limit is not None else rows
    for index, row in enumerate(rows if fields else ()):
        if lines is not None:
            where = f"{spec} line {lines[index]}"
        elif not spec.startswith(("synthetic:", "asset:", "hub:")):
            where = f"{spec} record {index}"
        else:
            where = f"dataset '{spec}' record {index}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: {_json_type(row)}, not a record")
        for key, path_ in fields.items():
            field_text(row, path_, where, key)
    return rows


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


def check_available(spec: str, cache_dir: Optional[str] = None, what: str = "dataset",
                    fields: Optional[dict[str, str]] = None, limit: Optional[int] = None) -> None:
    """Cheap check that ``spec`` can be loaded here (file or asset present, hub reachable), so a run fails in
    seconds instead of after the stages before the one that reads it. A local jsonl / json file is read
    whole: bytes that are not UTF-8, a line that is not JSON or not an object, and (``fields``, ``limit``: as
    :func:`load_records`) a record without text where the template needs it are a ConfigError naming the file
    and the line, the same one the loader would raise."""
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
        path = _local_file(spec, what)
        if path.is_file() and path.suffix in (".jsonl", ".json"):
            load_records(spec, cache_dir, limit, fields)
