"""CorDA (Yang et al.), as PEFT's ``peft/tuners/lora/corda.py``: SVD of W0 C, A from Vh C^-1.

C is PEFT's statistic, whatever LoRA-Null uses: each calibration sample's activations divided by
``max(x).abs()`` (the absolute value of the signed maximum), x^T x summed and divided by the number of
samples -- calibration's ``max_normalized_covariance``. The plain sum x x^T weights long-tailed samples
differently and moves BA by up to 0.67 relative on SmolLM2, so CorDA never reads it.

KPM (knowledge-preserved) keeps the r smallest singular triples of W0 C, IPM (instruction-previewed) the r
largest. Damping follows PEFT: C_fix = C + damp * mean(diag C) * I, with damp doubled until
||C_fix C_fix^-1 - I||_F < 0.05. PEFT starts at damp = 0.01 (hard-coded); here the start is
``cfg.damping`` (default 0.01, PEFT's exact behaviour). PEFT works in fp32; this runs in fp64 with
deterministic singular-vector signs (tests/test_methods.py runs PEFT's preprocess_corda in fp64 on the same
windows and compares).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lnull.config import MethodConfig
from lnull.methods.base import LayerInit, Method, register
from lnull.methods.linalg import factor, memoised, svd64

INV_TOLERANCE = 0.05  # PEFT's bound on ||C_fix C_fix^-1 - I||_F
PEFT_STATISTIC = "max_normalized_covariance"  # calibration's copy of PEFT's covariance


@dataclass
class CorDAConfig(MethodConfig):
    damping: float = 0.01  # starting damping of C (times mean diag), doubled until stable (PEFT's 0.01)


def damped_inverse(C: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_fix, C_fix^-1), both [d_in, d_in] fp64, with PEFT's doubling relative damping from ``damp``;
    memoised per input inside ``linalg.shared_decompositions`` (q/k/v, gate/up: one inverse)."""
    return memoised(C, ("damped_inverse", float(damp)), lambda: _damped_inverse(C, damp))


def _damped_inverse(C: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    C = C.double()
    mean_diag = torch.diagonal(C).mean()
    if not torch.isfinite(C).all() or mean_diag <= 0:
        raise ValueError("CorDA needs a finite, non-zero covariance")
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    for _ in range(64):  # PEFT loops unbounded; 2^64 x damp is far past any useful damping
        fixed = C + eye * mean_diag * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < INV_TOLERANCE:
            return fixed, inv
        damp *= 2
    raise ValueError(f"CorDA: no damping up to {damp:.1e} gives an accurate inverse")


def _corda(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any,
           smallest: bool) -> LayerInit:
    if cov is None:
        raise ValueError("CorDA needs the input covariance C [d_in, d_in]")
    fixed, inv = damped_inverse(cov, float(cfg.damping))
    U, S, Vh = svd64(W0.double() @ fixed)
    keep = slice(-rank, None) if smallest else slice(None, rank)
    return factor(U[:, keep], S[keep], (Vh @ inv)[keep], W0, scale)


def init_corda_kpm(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any,
                   generator: Optional[torch.Generator] = None) -> LayerInit:
    """KPM: W0 [d_out, d_in] C_fix = U S Vh; B [d_out, r] = U_r sqrt(S_r/s), A [r, d_in] = sqrt(S_r/s) Vh_r C_fix^-1
    for the r smallest singular values; residual = W0 - s B A."""
    return _corda(W0, cov, rank, scale, cfg, smallest=True)


def init_corda_ipm(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any,
                   generator: Optional[torch.Generator] = None) -> LayerInit:
    """IPM: as :func:`init_corda_kpm` with the r largest singular values."""
    return _corda(W0, cov, rank, scale, cfg, smallest=False)


CORDA_KPM = register(Method("corda_kpm", init_corda_kpm, options=CorDAConfig, statistic=PEFT_STATISTIC,
                            description="CorDA knowledge-preserved: smallest singular triples of W0 C"))
CORDA_IPM = register(Method("corda_ipm", init_corda_ipm, options=CorDAConfig, statistic=PEFT_STATISTIC,
                            description="CorDA instruction-previewed: largest singular triples of W0 C"))
