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

Cost (the maths is PEFT's, every step backward stable in fp64; tests/test_corda_speed.py compares with PEFT's
steps written out): one damped factorisation per unique input (q/k/v, gate/up share it); no explicit
C_fix^-1 nor its n^3 check product where bounds prove PEFT's check passes (:func:`inverse_is_accurate`; else
PEFT's loop runs), C_fix^-1 applied to the r kept rows of Vh only (an LU solve); and of the SVD of W0 C_fix only
the r kept singular vectors are formed on the long side (``linalg.svd64_part``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lnull.config import MethodConfig
from lnull.methods.base import LayerInit, Method, register
from lnull.methods.linalg import factor, memoised, svd64_part

INV_TOLERANCE = 0.05  # PEFT's bound on ||C_fix C_fix^-1 - I||_F
PEFT_STATISTIC = "max_normalized_covariance"  # calibration's copy of PEFT's covariance
UNIT_ROUNDOFF = 2.0 ** -53  # fp64


@dataclass
class CorDAConfig(MethodConfig):
    damping: float = 0.01  # starting damping of C (times mean diag), doubled until stable (PEFT's 0.01)


@dataclass(frozen=True)
class DampedCovariance:
    """C_fix = C + damp * mean(diag C) * I [d_in, d_in] fp64, and a factorisation to apply C_fix^-1 with: its LU
    (``lu``, ``pivots``) or, where the damping loop had to form it, the explicit inverse ``inv``."""

    fixed: torch.Tensor
    damp: float
    lu: Optional[torch.Tensor] = None
    pivots: Optional[torch.Tensor] = None
    inv: Optional[torch.Tensor] = None

    def right_solve(self, B: torch.Tensor) -> torch.Tensor:
        """B C_fix^-1 for B [k, d_in] (fp64)."""
        if self.inv is not None:
            return B.double() @ self.inv
        return torch.linalg.lu_solve(self.lu, self.pivots, B.double(), left=False)


def damped_inverse(C: torch.Tensor, damp: float) -> DampedCovariance:
    """C_fix and how to apply C_fix^-1 (:class:`DampedCovariance`, fp64), with PEFT's doubling relative damping
    from ``damp``; memoised per input inside ``linalg.shared_decompositions`` (q/k/v, gate/up: one factorisation)."""
    return memoised(C, ("damped_inverse", float(damp)), lambda: _damped_inverse(C, damp))


def inverse_is_accurate(C: torch.Tensor, shift: float) -> bool:
    """True when fp64 inversion of C_fix = C + shift * I [n, n] (C fp64) is certain to pass PEFT's test
    ||C_fix C_fix^-1 - I||_F < INV_TOLERANCE, judged from bounds alone: no inverse is formed (one Cholesky).

    With S, K the symmetric and skew parts of C, a successful Cholesky of S + shift/2 I proves (Cholesky's backward
    error, Higham Thm 10.3: ||dA||_2 <= n (n+1) u ||A||_2) lambda_min(S) >= -shift/2 - n (n+1) u (||S||_F + shift/2),
    hence sigma_min(C_fix) >= low = shift/2 - n (n+1) u (||S||_F + shift/2) - ||K||_F, and
    sigma_max(C_fix) <= ||C||_F + shift: kappa(C_fix) <= (||C||_F + shift) / low. An LU-based inverse leaves a
    residual of the order of u kappa (times small powers of n); this asks for n^2 u kappa < INV_TOLERANCE / 10.
    The n^2 stands in for LAPACK's worst-case constants (observed residuals are ~ u kappa). At PEFT's damping
    (shift = 0.01 mean(diag C)) a covariance has kappa <= ~200 n ||C||_F / tr(C) <= 200 n: certified for any
    covariance up to n ~ 6000 (SmolLM2, LLaMA's 4096) and beyond while ||C||_F / tr(C) is small (n = 11008:
    < 0.17). False sends the caller to PEFT's own explicit check, so the damping is PEFT's either way."""
    n = C.shape[0]
    twice_skew = C - C.mT  # 2 K; calibration's statistics are exactly symmetric: S = C, no copy
    skew_norm = float(torch.linalg.matrix_norm(twice_skew)) / 2
    S = C if skew_norm == 0 else C - twice_skew / 2
    shifted = S.clone()
    shifted.diagonal().add_(shift / 2)
    _, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        return False
    s_norm = float(torch.linalg.matrix_norm(S))
    u = UNIT_ROUNDOFF
    low = shift / 2 - n * (n + 1) * u * (s_norm + shift / 2) - skew_norm
    if not low > 0:
        return False
    kappa = ((s_norm if skew_norm == 0 else float(torch.linalg.matrix_norm(C))) + shift) / low
    return n * n * u * kappa < INV_TOLERANCE / 10


def _damped_inverse(C: torch.Tensor, damp: float) -> DampedCovariance:
    C = C.double()
    mean_diag = torch.diagonal(C).mean()
    if not torch.isfinite(C).all() or mean_diag <= 0:
        raise ValueError("CorDA needs a finite, non-zero covariance")
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    for _ in range(64):  # PEFT loops unbounded; 2^64 x damp is far past any useful damping
        fixed = C + eye * mean_diag * damp
        # The same damping PEFT's loop (in fp64) keeps, without its explicit inverse and n^3 check product when
        # bounds prove the check passes; then C_fix^-1 is applied through one LU (2/3 n^3 instead of ~4 n^3).
        if inverse_is_accurate(C, float(mean_diag) * damp):
            lu, pivots = torch.linalg.lu_factor(fixed)
            return DampedCovariance(fixed, damp, lu=lu, pivots=pivots)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < INV_TOLERANCE:
            return DampedCovariance(fixed, damp, inv=inv)
        damp *= 2
    raise ValueError(f"CorDA: no damping up to {damp:.1e} gives an accurate inverse")


def _corda(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any,
           smallest: bool) -> LayerInit:
    if cov is None:
        raise ValueError("CorDA needs the input covariance C [d_in, d_in]")
    damped = damped_inverse(cov, float(cfg.damping))
    keep = slice(-rank, None) if smallest else slice(None, rank)
    # Only the r kept singular triples are formed, and only their r rows of Vh go through C_fix^-1.
    U, S, Vh = svd64_part(W0.double() @ damped.fixed, keep)
    return factor(U, S, damped.right_solve(Vh), W0, scale)


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
