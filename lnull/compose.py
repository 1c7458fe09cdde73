"""Hydra composition: register the typed schema (every group, and each method's own options), compose, validate.

``lnull.config`` holds the schema and the checks that need nothing else; the checks here need the method
registry, the stage table and the benchmark registry, so they live above all three.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from lnull.config import GROUPS, LnullConfig, check_values, to_container, unknown_key
from lnull.errors import ConfigError

CONFIG_DIR = Path(os.environ.get("LNULL_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


def register_schema() -> None:
    """Register the schema so YAML groups are validated (idempotent). A method's YAML starts with
    ``defaults: [/schema/method/<name>@_here_, _self_]``: its section is typed by ``Method.options``."""
    from hydra.core.config_store import ConfigStore

    from lnull.methods import REGISTRY

    cs = ConfigStore.instance()
    cs.store(name="lnull_schema", node=LnullConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
    for name, method in REGISTRY.items():
        cs.store(group="schema/method", name=name, node=method.options)


def validate(cfg: DictConfig | LnullConfig) -> None:
    """Every check that needs no model and no data; ConfigError naming the first bad value."""
    from lnull.evaluate.registry import check_eval_config
    from lnull.methods import REGISTRY
    from lnull.stages import BY_NAME
    from lnull.tables.base import table_kind

    check_values(cfg)
    table_kind(cfg.table.kind)  # a ConfigError naming the registered kinds when there is none
    name = cfg.method.name
    if name not in REGISTRY:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(sorted(REGISTRY))}")
    method = REGISTRY[name]
    keys = set(cfg.method.keys())
    if keys != set(method.option_names()):
        raise ConfigError(f"method.name={name} was set over another method's options ({', '.join(sorted(keys))}); "
                          f"choose the method with method={name}")
    if method.check_options is not None:
        method.check_options(method.make_options(to_container(cfg.method)))
    for stage in cfg.run.stages or ():
        if stage not in BY_NAME:
            raise ConfigError(f"unknown stage '{stage}' in run.stages; known: {', '.join(BY_NAME)}")
    check_eval_config(cfg.eval)


def check_group_choices(overrides: list[str]) -> None:
    """A one-line ConfigError, listing the choices, for an override naming a config file that does not exist
    (``+experiment=nope``, ``method=nope``, ``eval=[knowledge,nope]``, a sweep ``method=lora,nope``); Hydra's own
    error is several lines and a hint about HYDRA_FULL_ERROR. Other overrides are left to Hydra."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        folder = CONFIG_DIR / key
        if not sep or "/" in key or not folder.is_dir() or any(c in value for c in "$(){}*"):
            continue
        names = [v.strip() for v in value.strip("[]").split(",") if v.strip() and v.strip() != "null"]
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        for name in names:
            if name not in known:
                raise ConfigError(f"unknown {key} '{name}' (no configs/{key}/{name}.yaml); "
                                  f"available: {', '.join(known)}")


def compose(overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Resolved, validated config dict for ``overrides`` (what `lnull` would run), for library use and tests."""
    check_group_choices(list(overrides or []))
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    overrides = list(overrides or [])
    try:
        if GlobalHydra.instance().is_initialized():  # inside `lnull <command>` (hydra.main on CONFIG_DIR)
            cfg = hydra_compose(config_name="config", overrides=overrides)
        else:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = hydra_compose(config_name="config", overrides=overrides)
        validate(cfg)
        return to_container(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain(exc, overrides)) from None


# What Hydra's "could not be converted to <type>" means for a user.
EXPECTED = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string",
            "Path": "a path"}


def explain(exc: BaseException, overrides: Optional[list[str]] = None) -> str:
    """One line for an error of Hydra's composition or of OmegaConf, naming the key and the value (Hydra's own
    message is several lines, with a hint about HYDRA_FULL_ERROR)."""
    import re

    from hydra.errors import OverrideParseException
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                                  ValidationError)

    text = str(exc)
    cause = exc if isinstance(exc, OmegaConfBaseException) else (exc.__cause__ or exc.__context__)
    first = next(iter(str(cause if cause is not None else exc).splitlines()), "")
    key = getattr(cause, "full_key", None)
    override = re.search(r"(?:Error merging override |Could not override ')([^\n]+?)'?(?:\.?\n|$)", text)
    shown = override.group(1) if override else key
    if text.startswith("Could not override '"):  # the override's value is not in the message; find it
        shown = next((o for o in overrides or () if o.lstrip("+~").partition("=")[0] == shown), shown)
    if isinstance(exc, OverrideParseException) or "Error parsing override" in text:
        bad = next((o for o in overrides or () if not _parses(o)), None)
        return f"cannot parse override '{bad or '?'}': {first}"
    if text.startswith("Ambiguous value for argument"):
        bad = re.search(r"argument '([^']+)'", text)
        return (f"{bad.group(1) if bad else text.splitlines()[0]}: a comma-separated value is a sweep, which needs "
                f"-m (lnull run -m ...); for a list write key=[a,b], for a text quote it")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        return unknown_key(key, _known_keys(cause))
    if isinstance(cause, MissingMandatoryValue) and key:
        return f"{key} is not set (mandatory)"
    if isinstance(cause, ValidationError):
        converted = re.search(r"could not be converted to (\w+)", first)
        if converted:
            why = f"expected {EXPECTED.get(converted.group(1), converted.group(1))}"
        elif "is not a valid bool" in first:
            why = "expected true or false"
        elif "is not Optional" in first:
            why = "this key cannot be null"
        elif "is not a ListConfig, list or tuple" in first:
            why = "expected a list, e.g. [a,b]"
        elif "is not a subclass of BenchmarkConfig" in first:
            why = "a benchmark is added by an eval config (configs/eval/), not key by key"
        else:
            why = first
        return f"{shown}: {why}" if shown else why
    where = f"{shown}: " if shown and shown not in first else ""
    return f"{where}{first}" if first else repr(exc)


def _parses(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_override(override)
        return True
    except HydraException:
        return False


def _known_keys(exc: Any) -> list[str]:
    """The keys the node of an unknown-key error has (its schema's fields, or the keys it holds)."""
    import dataclasses

    kind = getattr(exc, "object_type", None)
    if kind is not None and dataclasses.is_dataclass(kind):
        return [f.name for f in dataclasses.fields(kind)]
    parent = getattr(exc, "parent_node", None)
    return [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []


def check_overrides(overrides: list[str], multirun: bool = False) -> None:
    """Compose and validate what ``lnull <command> <overrides>`` would run, so a bad value is one ConfigError
    line before Hydra's own (multi-line) report and before any work. With ``multirun``, each value of each sweep
    (``method.rank=2,4``, ``range(...)``) is composed once with the other overrides at their first value (a
    sweep Hydra cannot enumerate, e.g. ``glob(*)``, is left to Hydra)."""
    if not multirun:
        compose(overrides)
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    fixed: list[str] = []
    sweeps: list[list[str]] = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as exc:
            raise ConfigError(explain(exc, [text])) from None
        if not override.is_sweep_override():
            fixed.append(text)
            continue
        try:
            key = override.get_key_element()
            values = [f"{key}={value}" for value in override.sweep_string_iterator()]
        except Exception:  # noqa: BLE001 (a sweep only Hydra's sweeper expands)
            continue
        if values:
            sweeps.append(values)
    firsts = [values[0] for values in sweeps]
    compose(fixed + firsts)
    for index, values in enumerate(sweeps):
        for value in values[1:]:
            compose(fixed + firsts[:index] + [value] + firsts[index + 1:])


def compose_from_file(path: Path, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """The config of a run folder's ``config.yaml`` (edited by hand or not) with ``key=value`` overrides, under
    the same typed schema and checks as a composed one (``lnull run --from <run dir>``); no Hydra, so nothing
    is written in the current folder. ConfigError naming the file and the first bad key or value."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lnull.config import AccelerateConfig
    from lnull.methods import REGISTRY

    path = Path(path)
    try:
        raw = OmegaConf.load(path)
        data = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides or [])))
        name = data.get("method", {}).get("name")
        if name not in REGISTRY:
            raise ConfigError(f"{path}: unknown method '{name}'; known: {', '.join(sorted(REGISTRY))}")
        schema = OmegaConf.structured(LnullConfig)
        schema.method = OmegaConf.structured(REGISTRY[name].options)
        if data.get("accelerate") is not None:
            schema.accelerate = OmegaConf.structured(AccelerateConfig)
        cfg = OmegaConf.merge(schema, data)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {explain(exc)}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as a config: {str(exc).splitlines()[0]}") from None
    validate(cfg)
    return to_container(cfg)
