"""Small fp64 linear-algebra helpers shared by the SVD/eigen-based initialisations.

Decompositions of a layer input's statistic (LoRA-Null's eigh, CorDA's damped inverse) go through
:func:`memoised`: inside a :func:`shared_decompositions` scope (``lnull.initialize`` opens one per init), a
decomposition of the very tensor object the previous call got is reused, so q/k/v (and gate/up), which share one
input and one statistic tensor, are decomposed once: 4 decompositions per LLaMA layer, not 7. The scope holds
one input's results at a time (dropped when another input arrives, or when the scope ends); outside a scope
nothing is kept. The method functions stay pure: the same arguments give the same (bit-identical) result.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Hashable, Iterator, Optional, TypeVar

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


T = TypeVar("T")


class _Memo:
    """Results computed from one input tensor, valid while it is that object, unmodified (its version)."""

    def __init__(self) -> None:
        self.input: Optional[torch.Tensor] = None  # held, so its id cannot be reused while cached
        self.version = -1
        self.results: dict[Hashable, Any] = {}

    def get(self, C: torch.Tensor, key: Hashable, compute: Callable[[], T]) -> T:
        if self.input is not C or self.version != C._version:
            self.input, self.version, self.results = None, -1, {}  # drop the previous input's results first
            result = compute()
            self.input, self.version, self.results = C, C._version, {key: result}
            return result
        if key not in self.results:
            self.results[key] = compute()
        return self.results[key]


_SCOPE: contextvars.ContextVar[Optional[_Memo]] = contextvars.ContextVar("lnull_shared_decompositions",
                                                                         default=None)


@contextlib.contextmanager
def shared_decompositions() -> Iterator[None]:
    """Scope in which :func:`memoised` decompositions of the same statistic tensor are computed once (module
    docstring). The caller passes a shared input's statistic as one tensor object to every module reading it."""
    token = _SCOPE.set(_Memo())
    try:
        yield
    finally:
        _SCOPE.reset(token)


def release_shared() -> None:
    """Drop what the current :func:`shared_decompositions` scope holds (the caller is done with that input)."""
    memo = _SCOPE.get()
    if memo is not None:
        memo.input, memo.version, memo.results = None, -1, {}


def memoised(C: torch.Tensor, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, a decomposition of ``C`` named by ``key`` (function and its other arguments), reused
    inside a :func:`shared_decompositions` scope when asked again for the same ``C`` object; callers must not
    modify the result in place."""
    memo = _SCOPE.get()
    if memo is None or C.is_inference():  # an inference tensor has no version counter to tell a modified C
        return compute()
    return memo.get(C, key, compute)


def eigh64(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric C [n, n] in fp64: (eigenvalues [n] ascending, eigenvectors [n, n]
    as columns, signs fixed by :func:`fix_signs`). C is symmetrised first (fp32 storage breaks symmetry).
    Memoised (:func:`memoised`) inside a :func:`shared_decompositions` scope."""
    return memoised(C, "eigh64", lambda: _eigh64(C))


def _eigh64(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    C = C.double()
    vals, vecs = torch.linalg.eigh((C + C.T) / 2)
    return vals, fix_signs(vecs)


def svd64(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin fp64 SVD M [m, n] = U diag(S) Vh: U [m, k], S [k] descending, Vh [k, n], k = min(m, n); each
    singular pair's sign fixed on U (largest-|.| entry positive) with Vh flipped alongside."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return _fix_pair_signs(U, S, Vh)


def _fix_pair_signs(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fixed = fix_signs(U)
    flip = (fixed * U).sum(dim=0).sign()  # +1 / -1 per column
    return fixed, S, Vh * flip.unsqueeze(1)


QR_FIRST = 1.5  # aspect ratio from which svd64_part factors the long side out first (LAPACK's gesdd: 11/6)


def svd64_part(M: torch.Tensor, keep: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``svd64(M)`` restricted to the singular triples ``keep`` (a slice of the descending order, e.g.
    ``slice(-r, None)`` for the r smallest): (U [m, k], S [k], Vh [k, n]), signs fixed as :func:`svd64`.

    Same maths and the same backward-stable steps as the full SVD, without forming the singular vectors that
    are dropped on the long side of an oblong M: Householder QR of M (tall) or of M^T (wide), M = Q R, thin SVD of
    the small square R (all its singular values and vectors, so the smallest ones are as accurate as in
    ``svd64``), then Q applied to the kept vectors only (``ormqr``, no Q formed). LAPACK's gesdd goes through the
    same QR when one side is >= 11/6 of the other, but then forms Q [m, n] and Q U_R [m, n] in full. Nearly square
    M (aspect < :data:`QR_FIRST`) gets the plain thin SVD, sliced."""
    M = M.double()
    m, n = M.shape
    if m >= QR_FIRST * n:  # tall: M = Q R, R = U S Vh -> M = (Q U) S Vh
        a, tau = torch.geqrf(M)
        U, S, Vh = torch.linalg.svd(a[:n].triu(), full_matrices=False)
        U = torch.ormqr(a, tau, torch.nn.functional.pad(U[:, keep], (0, 0, 0, m - n)))
        return _fix_pair_signs(U, S[keep], Vh[keep])
    if n >= QR_FIRST * m:  # wide: M^T = Q R, R^T = U S Vh -> M = U S (Q Vh^T)^T
        a, tau = torch.geqrf(M.T)
        U, S, Vh = torch.linalg.svd(a[:m].triu().T, full_matrices=False)
        V = torch.ormqr(a, tau, torch.nn.functional.pad(Vh[keep].T, (0, 0, 0, n - m)))
        return _fix_pair_signs(U[:, keep], S[keep], V.T)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return _fix_pair_signs(U[:, keep], S[keep], Vh[keep])


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
