"""Instruments shared by lnull's tests and benchmarks (as ``transformers.testing_utils``): nothing in a stage
imports this module."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch


def counting_head_calls(load: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    """``load`` (a model loader, e.g. ``lnull.calibrate.load_model``) wrapped so that every forward of the loaded
    model's LM head (output embeddings) adds 1 to ``calls[0]``."""

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        model = load(*args, **kwargs)
        model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return model
    return counting_load


@contextlib.contextmanager
def peft_in_fp64() -> Iterator[None]:
    """Run PEFT's CorDA code in fp64: its ``.float()`` casts become ``.double()`` and new tensors are fp64 (the
    reference then has no fp32 round-off of its own to compare against)."""
    float_, default = torch.Tensor.float, torch.get_default_dtype()
    torch.Tensor.float = lambda self, *a, **k: self.double()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.Tensor.float = float_
        torch.set_default_dtype(default)
