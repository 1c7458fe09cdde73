"""LoRA-Null: the adapter starts in the null space of the input activations' covariance C.

U_null [d_in, r] = eigenvectors of C for its r smallest eigenvalues (fp64 eigh); the adapter holds
W0 U_null U_null^T (via the thin SVD of W0 U_null, never a full SVD of a d_out x d_in matrix), the residual
W0 (I - U_null U_null^T). v1 trains A and B; v2 freezes A (so the update stays in the null space).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from lnull.methods.base import LayerInit, Method, register
from lnull.methods.linalg import RankDeficientWarning, eigh64, factor, svd64

NEAR_ZERO = 1e-10  # eigenvalues below NEAR_ZERO * lambda_max count as zero


def null_basis(C: torch.Tensor, rank: int) -> torch.Tensor:
    """U_null [d_in, r] fp64: eigenvectors of C [d_in, d_in] for the r smallest eigenvalues, signs fixed.

    When more than r eigenvalues are ~0 the null space is degenerate and the chosen basis is whichever r
    vectors eigh returns first (deterministic for the same C on the same machine, but arbitrary among
    equivalent bases); a :class:`RankDeficientWarning` says so."""
    vals, vecs = eigh64(C)
    near_zero = int((vals <= NEAR_ZERO * vals.abs().max()).sum())
    if near_zero > rank:
        warnings.warn(RankDeficientWarning(f"covariance has {near_zero} near-zero eigenvalues (> rank {rank}): "
                                           "null space is degenerate"), stacklevel=3)
    return vecs[:, :rank]


def init_lora_null(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any) -> LayerInit:
    """W0 [d_out, d_in] U_null = P S Q^T (thin, [d_out, r]); B [d_out, r] = P sqrt(S/s),
    A [r, d_in] = sqrt(S/s) Q^T U_null^T, so s B A = W0 U_null U_null^T; residual = W0 - s B A."""
    if cov is None:
        raise ValueError("LoRA-Null needs the input covariance C [d_in, d_in]")
    U_null = null_basis(cov, rank)
    P, S, Qh = svd64(W0.double() @ U_null)
    return factor(P, S, Qh @ U_null.T, W0, scale)


LORA_NULL_V1 = register(Method("lora_null_v1", init_lora_null, needs_calibration=True,
                               description="null space of activations; A and B trained"))
LORA_NULL_V2 = register(Method("lora_null_v2", init_lora_null, needs_calibration=True, frozen=["lora_A"],
                               description="null space of activations; A frozen"))
