"""Result records: one scored (model, benchmark) with everything about what was scored, read from the
artifacts that produced it (store entries' ``complete.json``), never from the config of whoever reads it.

Validated on write (``lnull evaluate``) and on read (``lnull table``): a record missing a field, with an
unknown one, or with a value of the wrong type is a ConfigError naming the record and the field.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

from lnull.errors import ConfigError

SCHEMA_VERSION = 2  # 2: ``identity`` renamed ``weights_from`` (schema-1 records are read as such)


@dataclass
class BaseModelInfo:
    """The pre-trained model: config name, name_or_path, weight fingerprint (lnull.modeling), dtype loaded in."""

    name: str
    name_or_path: str
    sha256: Optional[str]
    dtype: str


@dataclass
class MethodInfo:
    """The initialisation and adapter: rank and alpha None for full fine-tuning; trainable parameters as
    measured by training (None for a model scored at init)."""

    name: str
    rank: Optional[int]
    alpha: Optional[float]
    options: dict[str, Any]
    trainable_params: Optional[int]


@dataclass
class CalibrationInfo:
    dataset: str
    source: str
    samples: int
    seqlen: int
    seed: int
    official: bool
    dtype: str


@dataclass
class TrainInfo:
    task: str
    dataset: str
    data_sha256: Optional[str]
    lr: float
    steps: int
    effective_batch: int
    epochs: float
    max_length: int
    seed: int
    processes: int


@dataclass
class ScorerInfo:
    kind: str
    version: str  # the scorer's version with its packages' (lnull.evaluate.base.Scorer.full_version)
    lm_eval_version: Optional[str]
    task: Optional[str]
    task_version: Optional[str]


@dataclass
class ResultRecord:
    """One (model, benchmark) score. ``model``: base | init | trained | a model path or hub name;
    ``weights_from``: the folder (or hub name) its weights came from (schema 1 called it ``identity``).
    ``value`` None: not scored (e.g. no judge), never 0; ``stderr``: standard error of ``value`` where the
    scorer has one."""

    key: str
    model: str
    weights_from: str
    base_model: BaseModelInfo
    method: Optional[MethodInfo]
    calibration: Optional[CalibrationInfo]
    train: Optional[TrainInfo]
    benchmark: str
    kind: str
    metric: str
    value: Optional[float]
    stderr: Optional[float]
    n: int
    scorer: ScorerInfo
    settings: dict[str, Any]
    details: dict[str, Any]
    seconds: float
    items_per_s: Optional[float]
    created: str
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to ``hint`` (a dataclass, Optional, dict, list or a scalar), ConfigError if not."""
    origin = get_origin(hint)
    if origin is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        return None if value is None else _check(value, args[0], where)
    if hint is Any:
        return value
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, where)
    if origin in (dict, list):
        if not isinstance(value, origin):
            raise ConfigError(f"{where}: expected {origin.__name__}, got {type(value).__name__}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field '{unknown[0]}'")
    values = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = _check(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is MISSING:
            raise ConfigError(f"{where}: missing field '{f.name}'")
    return cls(**values)


def validate(data: dict[str, Any], where: str = "record") -> ResultRecord:
    """A :class:`ResultRecord` from ``data``; ConfigError naming ``where`` and the first bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: not a record")
    if data.get("schema", 1) == 1 and "identity" in data:  # written before schema 2: the same fact, renamed
        data = {("weights_from" if k == "identity" else k): v for k, v in data.items()}
        data["schema"] = 1
    return _build(ResultRecord, data, where)


# ---------------------------------------------------------------- what was scored, from its artifacts

def lineage(markers: dict[str, dict[str, Any]], base: BaseModelInfo) -> dict[str, Any]:
    """``method`` / ``calibration`` / ``train`` identities from the ``complete.json`` markers of the scored
    model's store entries (``{"init": ..., "train": ..., "calibrate": ...}``, each optional)."""
    init, train, cal = markers.get("init"), markers.get("train"), markers.get("calibrate")
    method = None
    if init is not None:
        options = init["inputs"]["method"]
        info = init["summary"]
        method = MethodInfo(name=info["method"], rank=info.get("rank"), alpha=info.get("alpha"),
                                options=options, trainable_params=(train or {}).get("summary", {}).get(
                                    "trainable_params"))
    calibration = None
    if cal is not None:
        c, s = cal["inputs"]["calibration"], cal["summary"]
        calibration = CalibrationInfo(dataset=c["dataset"], source=s.get("source", c["dataset"]),
                                          samples=c["samples"], seqlen=c["seqlen"], seed=c["seed"],
                                          official=bool(c.get("official", False)), dtype=c.get("dtype", "float32"))
    trained = None
    if train is not None:
        i, s = train["inputs"], train["summary"]
        t = i["train"]
        trained = TrainInfo(task=i["task"]["name"], dataset=i["task"]["dataset"], data_sha256=i.get("data"),
                                lr=float(t["lr"]), steps=int(s["steps"]), effective_batch=int(t["batch_size"]),
                                epochs=float(t["epochs"]), max_length=int(t["max_length"]), seed=int(t["seed"]),
                                processes=int(s.get("processes", 1)))
    return {"base_model": base, "method": method, "calibration": calibration, "train": trained}


def record_digest(record: dict[str, Any]) -> str:
    """sha256 of a record's content (key order and whitespace do not count; every value does)."""
    from lnull.io import stable_hash

    return stable_hash(record, 64)


def read_results(path: Path, warn: Optional[Callable[[str], None]] = None) -> list[ResultRecord]:
    """The validated records of a run's ``eval/results.json`` whose content matches the digest listed beside
    them; a record changed after scoring (or a file written before digests) is reported with ``warn`` in one
    line and left out, never shown."""
    from lnull import io

    warn = warn or io.warn
    data = io.read_json(path)
    digests = data.get("sha256")
    if not isinstance(digests, dict):
        warn(f"lnull: {path} lists no record digests (written before digests): its records are not shown; rerun "
             "`lnull evaluate` for that run")
        return []
    records = []
    for i, rec in enumerate(data.get("results", [])):
        key = rec.get("key") if isinstance(rec, dict) else None
        if key is None or digests.get(key) != record_digest(rec):
            warn(f"lnull: {path} record {i} ({key}) does not match its digest: it was changed after it was "
                 "scored; not shown (rerun `lnull evaluate` for that run to re-score it)")
            continue
        records.append(validate(rec, f"{path} record {i}"))
    return records
