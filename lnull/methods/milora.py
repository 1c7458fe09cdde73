"""MiLoRA (Wang et al.): the adapter holds W0's r smallest singular triples, the residual the rest."""
from __future__ import annotations

from typing import Any, Optional

import torch

from lnull.methods.base import LayerInit, Method, register
from lnull.methods.linalg import factor, svd64


def init_milora(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any,
                generator: Optional[torch.Generator] = None) -> LayerInit:
    """As PiSSA (fp64 thin SVD of W0 [d_out, d_in], scale folded into sqrt(S/s)) with the r smallest
    singular triples: B [d_out, r], A [r, d_in], residual = W0 - s B A."""
    U, S, Vh = svd64(W0)
    return factor(U[:, -rank:], S[-rank:], Vh[-rank:], W0, scale)


MILORA = register(Method("milora", init_milora, description="r smallest singular triples of W0"))
