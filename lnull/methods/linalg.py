"""Small fp64 linear-algebra helpers shared by the SVD/eigen-based initialisations."""
from __future__ import annotations

import torch

from lnull.methods.base import LayerInit


class RankDeficientWarning(UserWarning):
    """The covariance has more near-zero eigenvalues than the rank: the null space basis is arbitrary.

    Method functions do not know the module name; ``lnull.initialize`` re-raises it with the name."""


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column of ``vectors`` [n, k] so its largest-|.| entry is positive (deterministic basis)."""
    idx = vectors.abs().argmax(dim=0)
    sign = torch.sign(vectors.gather(0, idx.unsqueeze(0)))
    sign[sign == 0] = 1
    return vectors * sign


def eigh64(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric C [n, n] in fp64: (eigenvalues [n] ascending, eigenvectors [n, n]
    as columns, signs fixed by :func:`fix_signs`). C is symmetrised first (fp32 storage breaks symmetry)."""
    C = C.double()
    vals, vecs = torch.linalg.eigh((C + C.T) / 2)
    return vals, fix_signs(vecs)


def svd64(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin fp64 SVD M [m, n] = U diag(S) Vh: U [m, k], S [k] descending, Vh [k, n], k = min(m, n); each
    singular pair's sign fixed on U (largest-|.| entry positive) with Vh flipped alongside."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    fixed = fix_signs(U)
    flip = (fixed * U).sum(dim=0).sign()  # +1 / -1 per column
    return fixed, S, Vh * flip.unsqueeze(1)


def factor(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, W0: torch.Tensor, scale: float) -> LayerInit:
    """Split a rank-r product U [d_out, r] diag(S [r]) Vh [r, d_in] (fp64) into LoRA factors with
    ``scale * B @ A == U diag(S) Vh``: B = U sqrt(S/scale), A = sqrt(S/scale) Vh (as PEFT's PiSSA/CorDA);
    residual = W0 - scale * B @ A. All outputs fp32."""
    root = (S.double() / scale).clamp_min(0).sqrt()
    B = U.double() * root.unsqueeze(0)
    A = root.unsqueeze(1) * Vh.double()
    residual = W0.double() - scale * (B @ A)
    return LayerInit(A=A.float().contiguous(), B=B.float().contiguous(), residual=residual.float().contiguous())


def captured_energy(A: torch.Tensor, C: torch.Tensor) -> float:
    """Share of the activation energy in the row space of A [r, d_in], for C = X^T X [d_in, d_in]:
    ||X Q||_F^2 / ||X||_F^2 = tr(Q^T C Q) / tr(C) with Q [d_in, r] an orthonormal basis of A's rows (fp64).

    Scale-free (unlike ||X A^T||^2 / ||X||^2), in [0, 1]: 0 = A sees none of the calibration activations;
    LoRA-Null reaches the minimum, the r smallest eigenvalues' share. Energy, not subspace angles, is what the
    method minimises: at eigen-gaps of 1.004-1.05 near the cut, subspaces far apart in angle hold the same energy."""
    Q = torch.linalg.qr(A.T.to(device=C.device, dtype=torch.float64)).Q
    C = C.double()
    total = float(torch.diagonal(C).sum())
    # A subspace inside C's rounding noise can come out at -1e-9: clip to the physical range.
    return min(1.0, max(0.0, float((Q * (C @ Q)).sum()) / total)) if total > 0 else 0.0
