"""Initialisation methods; importing this package fills ``REGISTRY``."""
from lnull.methods import full, lora  # noqa: F401  (registration side effect)
from lnull.methods.base import REGISTRY, LayerInit, Method, register

__all__ = ["REGISTRY", "LayerInit", "Method", "register"]
