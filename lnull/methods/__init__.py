"""Initialisation methods; importing this package fills ``REGISTRY``.

Stage code reaches a method only through this package: ``REGISTRY[name]`` (name from the config or from an
artifact's ``lnull_method.json``) and the helpers below, never by importing a method file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lnull.methods import (corda, eva, full, lora, lora_fa, lora_ga, lora_null, mica, milora, olora,  # noqa: F401
                           oplora, orthogonal, pissa)  # (registration)
from lnull.methods.base import REGISTRY, STATISTICS, LayerInit, Method, layer_generator, register

METHOD_FILE = "lnull_method.json"  # in init/adapter/ (and init/ for methods without an adapter)

__all__ = ["REGISTRY", "STATISTICS", "LayerInit", "Method", "layer_generator", "register", "METHOD_FILE",
           "method_of", "attach", "bake"]


def method_of(adapter_dir: Path) -> Optional[Method]:
    """The registered method that wrote ``adapter_dir`` (from its ``lnull_method.json``), or None for an
    adapter lnull did not write."""
    info = Path(adapter_dir) / METHOD_FILE
    if not info.exists():
        return None
    return REGISTRY.get(json.loads(info.read_text())["method"])


def _needing_hooks(adapter_dir: Path) -> list[Method]:
    """Methods whose extra file sits in ``adapter_dir`` (its adapter computes more than s B A)."""
    return [m for m in REGISTRY.values() if m.extra_file and (Path(adapter_dir) / m.extra_file).exists()]


def needs_hooks(adapter_dir: Path) -> bool:
    """True when a PEFT adapter folder only computes its update with a method's hooks attached."""
    return bool(_needing_hooks(adapter_dir))


def attach(peft_model: Any, adapter_dir: Path) -> None:
    """Attach whatever hooks the adapter's method needs (no-op for plain LoRA adapters)."""
    for method in _needing_hooks(adapter_dir):
        method.attach(peft_model, Path(adapter_dir))


def bake(peft_model: Any, adapter_dir: Path) -> None:
    """Fold the method's hooks into the adapter weights, so it saves/merges as a plain PEFT LoRA."""
    for method in _needing_hooks(adapter_dir):
        method.bake(peft_model, Path(adapter_dir))
