"""Initialisation methods; importing this package fills ``REGISTRY``."""
from lnull.methods import corda, full, lora, lora_fa, lora_null, milora, oplora, pissa  # noqa: F401  (registration)
from lnull.methods.base import REGISTRY, LayerInit, Method, register

__all__ = ["REGISTRY", "LayerInit", "Method", "register"]
