"""The method registry: one file per initialisation method, each registering a ``Method`` here.

A method is a pure function on one linear layer::

    init(W0 [d_out, d_in], covariance C [d_in, d_in] or None, rank r, scale s, cfg) -> LayerInit

giving ``A`` [r, d_in], ``B`` [d_out, r] and the frozen residual [d_out, d_in] such that
``residual + s * B @ A == W0``; plus its freezing rule (which adapter parts training must not touch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class LayerInit:
    """Result for one linear layer (all fp32 or the model dtype; shapes in the module docstring)."""

    A: torch.Tensor
    B: torch.Tensor
    residual: torch.Tensor


InitFn = Callable[[torch.Tensor, Optional[torch.Tensor], int, float, Any], LayerInit]


@dataclass
class Method:
    """A registered initialisation method."""

    name: str
    init: Optional[InitFn]  # None: no adapter (full fine-tuning)
    needs_calibration: bool = False
    frozen: list[str] = field(default_factory=list)  # adapter parts kept frozen in training, e.g. ["lora_A"]
    description: str = ""
    # Optional (shape (d_out, d_in), cfg) -> None raising ConfigError; run on every layer before any work.
    check_shape: Optional[Callable[[tuple[int, int], Any], None]] = None
    # Optional (linears {name: nn.Linear} of the ORIGINAL model, method cfg dict, adapter dir) -> None:
    # extra files a method needs next to its PEFT adapter (e.g. OPLoRA's frozen projections).
    write_extras: Optional[Callable[[dict, dict, Any], None]] = None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method '{method.name}' registered twice")
    REGISTRY[method.name] = method
    return method
