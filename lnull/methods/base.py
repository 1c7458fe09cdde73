"""The method registry: one file per initialisation method, each registering a ``Method`` here.

A method is a pure function on one linear layer::

    init(W0 [d_out, d_in], statistic C [d_in, d_in] or None, rank r, scale s, options, generator) -> LayerInit

giving ``A`` [r, d_in], ``B`` [d_out, r] and the frozen residual [d_out, d_in] such that
``residual + s * B @ A == W0``; plus its freezing rule (which adapter parts training must not touch).
``options`` is an instance of ``Method.options`` (the method's typed config section); ``generator`` is this
layer's own random stream (:func:`layer_generator`); deterministic methods ignore it.

Everything else a method needs from the stages is a hook here, so no module outside ``lnull/methods/``
imports a method file or compares a method name: extra files beside its adapter (``write_extras``,
``extra_file``), hooks on a loaded adapter (``attach``), what saving/merging must bake in (``bake``), the
effective factors analysis should measure (``effective_factors``) and which options enter its store key
(``key_options``).

A method PEFT itself implements (OLoRA, MiCA, orthogonal, EVA, LoRA-GA) is no per-layer function but a model-level
hook, ``Method.peft_init`` (``lnull.methods.peft_backed``): PEFT's own call on the model, whose (A, B) lnull keeps.
Such a method may read the fine-tuning data (``reads_task_data``: EVA's activations, LoRA-GA's gradients), and may
leave W0 untouched while B0 A0 != 0 (``base="original"``: PEFT's orthogonal init, whose B0 A0 is rounding noise
that PEFT keeps on top of W0 rather than subtracting).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch

from lnull.activations import STATS
from lnull.config import MethodConfig

# Calibration statistics a method can ask for (keys ``<module>.<statistic>`` of calibration/stats.safetensors):
# - "covariance": C = sum_t x_t x_t^T over all calibration tokens (the papers' X X^T; under
#   ``calibration.official`` the official LoRA-Null code's normalised sum instead);
# - "max_normalized_covariance": mean over samples of (x / |max(x)|)^T (x / |max(x)|), PEFT's CorDA statistic.
STATISTICS = STATS  # what calibration collects (lnull.activations): a method reads one of them

Factors = dict[str, torch.Tensor]  # module -> A [r, d_in] or B [d_out, r]


@dataclass
class LayerInit:
    """Result for one linear layer (all fp32 or the model dtype; shapes in the module docstring)."""

    A: torch.Tensor
    B: torch.Tensor
    residual: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)  # per-layer numbers for init/report.json


InitFn = Callable[[torch.Tensor, Optional[torch.Tensor], int, float, Any, torch.Generator], LayerInit]
# (model with the ORIGINAL weights, target module suffixes, rank r, lora_alpha, dropout, options, batches or None)
# -> {module: (A [r, d_in], B [d_out, r])} fp32 on the CPU. The call may change the targeted weights in place (PEFT
# subtracts s B A for OLoRA / LoRA-GA) and returns the model to plain modules; the init stage checks the relation.
PeftInitFn = Callable[[torch.nn.Module, list, int, float, float, Any, Optional[list]],
                      dict[str, tuple[torch.Tensor, torch.Tensor]]]
BASES = ("residual", "original")  # what the init adapter sits on: W0 - s B0 A0 (every per-layer method), or W0


def all_options(options: dict[str, Any]) -> dict[str, Any]:
    """Default ``key_options``: every option of the method's section enters its store key."""
    return dict(options)


@dataclass
class Method:
    """A registered initialisation method."""

    name: str
    init: Optional[InitFn]  # None: no adapter (full fine-tuning)
    options: type = MethodConfig  # the typed config section of this method (a MethodConfig subclass)
    statistic: Optional[str] = None  # the calibration statistic ``init`` reads (one of STATISTICS); None = none
    frozen: list[str] = field(default_factory=list)  # adapter parts kept frozen in training, e.g. ["lora_A"]
    description: str = ""
    # (shape (d_out, d_in), options) -> None raising ConfigError; run on every layer before any work.
    check_shape: Optional[Callable[[tuple[int, int], Any], None]] = None
    # (options) -> None raising ConfigError; run at compose time.
    check_options: Optional[Callable[[Any], None]] = None
    # (linears {name: nn.Linear} of the ORIGINAL model, options, adapter dir) -> None: files the method needs
    # next to its PEFT adapter; ``extra_file`` names the one whose presence means "this adapter needs attach".
    write_extras: Optional[Callable[[dict, Any, Any], None]] = None
    extra_file: Optional[str] = None
    # (peft model, adapter dir) -> None: hooks a loaded adapter needs to compute this method's update.
    attach: Optional[Callable[[Any, Any], None]] = None
    # (peft model, adapter dir) -> None: fold those hooks into the adapter weights (before saving or merging).
    bake: Optional[Callable[[Any, Any], None]] = None
    # ({module: A}, {module: B}, adapter dir) -> (A, B) as the update s B A really acts (analysis).
    effective_factors: Optional[Callable[[Factors, Factors, Any], tuple[Factors, Factors]]] = None
    # (options dict) -> the part of them the init reads (its store key); default all of them.
    key_options: Callable[[dict[str, Any]], dict[str, Any]] = all_options
    # Instead of ``init``: PEFT's own initialisation of the whole model (PeftInitFn above).
    peft_init: Optional[PeftInitFn] = None
    # True: ``peft_init`` reads batches of the run's task data; its options then have ``data_examples`` and
    # ``data_batch_size`` (``peft_backed.TaskDataConfig``) and the task enters the init key (``lnull.stages``).
    reads_task_data: bool = False
    # "original": the adapter sits on the untouched W0 although B0 A0 != 0 (PEFT's orthogonal init: the outputs
    # change at init by B0 A0's rounding noise, as in PEFT); recorded in lnull_method.json, where lnull.residual
    # reads it. "residual": on W0 - s B0 A0.
    base: str = "residual"

    def __post_init__(self) -> None:
        if self.init is not None and self.peft_init is not None:
            raise ValueError(f"method '{self.name}': give either a per-layer init or a peft_init, not both")
        if self.reads_task_data and self.peft_init is None:
            raise ValueError(f"method '{self.name}': only a peft_init reads the task data")
        if self.base not in BASES:
            raise ValueError(f"method '{self.name}': base must be one of {', '.join(BASES)}")
        if self.statistic is not None and self.statistic not in STATISTICS:
            raise ValueError(f"method '{self.name}': unknown statistic '{self.statistic}'")
        if not issubclass(self.options, MethodConfig):
            raise ValueError(f"method '{self.name}': options must subclass lnull.config.MethodConfig")

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None

    @property
    def has_adapter(self) -> bool:
        return self.init is not None or self.peft_init is not None

    def make_options(self, section: dict[str, Any]) -> Any:
        """The typed options of a resolved ``method`` section (unknown keys: TypeError)."""
        return self.options(**section)

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.options)]


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
