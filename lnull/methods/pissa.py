"""PiSSA (Meng et al.): the adapter holds W0's top-r singular triples, the residual the rest."""
from __future__ import annotations

from typing import Any, Optional

import torch

from lnull.methods.base import LayerInit, Method, register
from lnull.methods.linalg import factor, svd64


def init_pissa(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any,
               generator: Optional[torch.Generator] = None) -> LayerInit:
    """W0 [d_out, d_in] = U S Vh (fp64 thin SVD); B [d_out, r] = U_r sqrt(S_r/s), A [r, d_in] = sqrt(S_r/s) Vh_r,
    residual = W0 - s B A. Same as PEFT ``init_lora_weights="pissa"`` (which divides S by the scaling too),
    but in fp64 and with deterministic signs, so B and A may differ from PEFT's by a sign per rank-1 pair."""
    U, S, Vh = svd64(W0)
    return factor(U[:, :rank], S[:rank], Vh[:rank], W0, scale)


PISSA = register(Method("pissa", init_pissa, description="top-r singular triples of W0"))
