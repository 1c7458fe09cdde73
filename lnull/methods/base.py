"""The method registry: one file per initialisation method, each registering a ``Method`` here.

A method is a pure function on one linear layer::

    init(W0 [d_out, d_in], statistic C [d_in, d_in] or None, rank r, scale s, cfg, generator) -> LayerInit

giving ``A`` [r, d_in], ``B`` [d_out, r] and the frozen residual [d_out, d_in] such that
``residual + s * B @ A == W0``; plus its freezing rule (which adapter parts training must not touch).
``generator`` is this layer's own random stream (:func:`layer_generator`); deterministic methods ignore it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

# Calibration statistics a method can ask for (keys ``<module>.<statistic>`` of calibration/stats.safetensors):
# - "covariance": C = sum_t x_t x_t^T over all calibration tokens (the papers' X X^T; under
#   ``calibration.official`` the official LoRA-Null code's normalised sum instead);
# - "max_normalized_covariance": mean over samples of (x / |max(x)|)^T (x / |max(x)|), PEFT's CorDA statistic.
STATISTICS = ("covariance", "max_normalized_covariance")


@dataclass
class LayerInit:
    """Result for one linear layer (all fp32 or the model dtype; shapes in the module docstring)."""

    A: torch.Tensor
    B: torch.Tensor
    residual: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)  # per-layer numbers for init/report.json


InitFn = Callable[[torch.Tensor, Optional[torch.Tensor], int, float, Any, torch.Generator], LayerInit]


@dataclass
class Method:
    """A registered initialisation method."""

    name: str
    init: Optional[InitFn]  # None: no adapter (full fine-tuning)
    statistic: Optional[str] = None  # the calibration statistic ``init`` reads (one of STATISTICS); None = none
    frozen: list[str] = field(default_factory=list)  # adapter parts kept frozen in training, e.g. ["lora_A"]
    description: str = ""
    # Optional (shape (d_out, d_in), cfg) -> None raising ConfigError; run on every layer before any work.
    check_shape: Optional[Callable[[tuple[int, int], Any], None]] = None
    # Optional (linears {name: nn.Linear} of the ORIGINAL model, method cfg dict, adapter dir) -> None:
    # extra files a method needs next to its PEFT adapter (e.g. OPLoRA's frozen projections).
    write_extras: Optional[Callable[[dict, dict, Any], None]] = None

    def __post_init__(self) -> None:
        if self.statistic is not None and self.statistic not in STATISTICS:
            raise ValueError(f"method '{self.name}': unknown statistic '{self.statistic}'")

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method '{method.name}' registered twice")
    REGISTRY[method.name] = method
    return method


def layer_generator(seed: int, module: str) -> torch.Generator:
    """CPU generator of one layer: seeded by sha256(``seed``, ``module`` name), so every layer draws its own
    numbers, the same ones whatever other layers are targeted or in which order they are initialised."""
    digest = hashlib.sha256(f"{int(seed)}:{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
