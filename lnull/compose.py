"""Hydra composition: register the typed schema (every group, and each method's own options), compose, validate.

``lnull.config`` holds the schema and the checks that need nothing else; the checks here need the method
registry, the stage table and the benchmark registry, so they live above all three.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from lnull.config import GROUPS, LnullConfig, check_values, to_container
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

    check_values(cfg)
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

    register_schema()
    if GlobalHydra.instance().is_initialized():  # inside `lnull <command>` (hydra.main on CONFIG_DIR)
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    validate(cfg)
    return to_container(cfg)
