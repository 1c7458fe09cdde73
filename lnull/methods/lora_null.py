"""LoRA-Null: the adapter starts in the null space of the input activations' covariance C.

U_null [d_in, r] = eigenvectors of C for its r smallest eigenvalues (fp64 eigh); the adapter holds
W0 U_null U_null^T (via the thin SVD of W0 U_null, never a full SVD of a d_out x d_in matrix), the residual
W0 (I - U_null U_null^T). v1 trains A and B; v2 freezes A (so the update stays in the null space).

Numerical floor: C is stored in fp32 (or whatever ``C.dtype`` is), so each entry carries a relative rounding
error up to eps/2 and, by Weyl's inequality, every eigenvalue moves by up to ||E||_2 <= eps/2 ||C||_F <=
eps/2 sqrt(d) lambda_max. Eigenvalues below ``noise_floor`` = eps sqrt(d) lambda_max (a factor 2 of margin)
are indistinguishable from zero: their order, hence which of them U_null takes, is noise.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch

from lnull.methods.base import LayerInit, Method, register
from lnull.methods.linalg import RankDeficientWarning, eigh64, factor, svd64


def noise_floor(dtype: torch.dtype, dim: int) -> float:
    """Relative eigenvalue floor (times lambda_max) of a [dim, dim] covariance stored in ``dtype``:
    eps(dtype) * sqrt(dim) (module docstring). fp32, dim 576: 2.9e-6; dim 11008: 1.3e-5."""
    return torch.finfo(dtype).eps * math.sqrt(dim)


def null_space(C: torch.Tensor, rank: int) -> tuple[torch.Tensor, dict[str, float]]:
    """(U_null [d_in, r] fp64, diagnostics) for C [d_in, d_in]: the eigenvectors of the r smallest
    eigenvalues (ascending lambda_1 <= lambda_2 <= ...; signs fixed). Diagnostics (floats):

    - ``eigen_gap`` = lambda_{r+1} / lambda_r (>= 1; near 1 the cut, hence U_null, is ill-determined; None
      when lambda_r <= 0 or r = d_in);
    - ``energy_min`` = sum_{i<=r} lambda_i / sum_i lambda_i, the least activation energy any rank-r subspace
      can hold (what U_null holds);
    - ``near_zero``: eigenvalues below :func:`noise_floor` x lambda_max, ``noise_floor`` the relative floor.

    When more than r eigenvalues are below the floor, the null space is degenerate at C's precision and the
    basis is whichever r vectors eigh returns first (deterministic for the same C on the same machine, but
    arbitrary among equivalent bases); a :class:`RankDeficientWarning` says so."""
    vals, vecs = eigh64(C)
    lam_max = float(vals.abs().max())
    floor = noise_floor(C.dtype, C.shape[0])
    near_zero = int((vals <= floor * lam_max).sum())
    if near_zero > rank:
        warnings.warn(RankDeficientWarning(
            f"covariance has {near_zero} eigenvalues below its {C.dtype} noise floor ({floor:.1e} x lambda_max; "
            f"> rank {rank}): null space is degenerate"), stacklevel=3)
    total = float(vals.clamp_min(0).sum())
    low = vals[:rank].clamp_min(0)
    gap = float(vals[rank] / vals[rank - 1]) if rank < len(vals) and vals[rank - 1] > 0 else None
    diagnostics = {"eigen_gap": gap, "energy_min": float(low.sum()) / total if total > 0 else 0.0,
                   "near_zero": near_zero, "noise_floor": floor}
    return vecs[:, :rank], diagnostics


def null_basis(C: torch.Tensor, rank: int) -> torch.Tensor:
    """U_null [d_in, r] fp64 of :func:`null_space` (without its diagnostics)."""
    return null_space(C, rank)[0]


def init_lora_null(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any,
                   generator: Optional[torch.Generator] = None) -> LayerInit:
    """W0 [d_out, d_in] U_null = P S Q^T (thin, [d_out, r]); B [d_out, r] = P sqrt(S/s),
    A [r, d_in] = sqrt(S/s) Q^T U_null^T, so s B A = W0 U_null U_null^T; residual = W0 - s B A.
    ``diagnostics`` of the result: those of :func:`null_space`."""
    if cov is None:
        raise ValueError("LoRA-Null needs the input covariance C [d_in, d_in]")
    U_null, diagnostics = null_space(cov, rank)
    P, S, Qh = svd64(W0.double() @ U_null)
    result = factor(P, S, Qh @ U_null.T, W0, scale)
    result.diagnostics = diagnostics
    return result


LORA_NULL_V1 = register(Method("lora_null_v1", init_lora_null, statistic="covariance",
                               description="null space of activations; A and B trained"))
LORA_NULL_V2 = register(Method("lora_null_v2", init_lora_null, statistic="covariance", frozen=["lora_A"],
                               description="null space of activations; A frozen"))
