"""CorDA's fast path is PEFT's maths: only the kept singular triples are formed (svd64_part), C_fix^-1 is applied
through an LU, and the damping loop skips PEFT's explicit inverse only where bounds prove its check passes.

Each test compares against PEFT's algorithm written out in fp64 (explicit inverse, its residual check, full
thin SVD, Vh C_fix^-1, then the slice)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lnull.methods import corda
from lnull.methods.corda import INV_TOLERANCE, init_corda_ipm, init_corda_kpm, inverse_is_accurate
from lnull.methods.linalg import shared_decompositions, svd64, svd64_part


def peft_fp64(W0: torch.Tensor, C: torch.Tensor, rank: int, smallest: bool, damp: float = 0.01
              ) -> tuple[torch.Tensor, float]:
    """PEFT's collect_eigens_for_layer + crop, every step in fp64: (U_r S_r Vh_r C_fix^-1, the damping kept)."""
    W, C = W0.double(), C.double()
    eye = torch.eye(C.shape[0], dtype=torch.float64)
    while True:
        fixed = C + eye * torch.diagonal(C).mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < INV_TOLERANCE:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    keep = slice(-rank, None) if smallest else slice(None, rank)
    return U[:, keep] @ torch.diag(S[keep]) @ (Vh @ inv)[keep], damp


def covariance(n: int, tokens: int, seed: int, outliers: float = 0.0) -> torch.Tensor:
    """x^T x / tokens of activations with a decaying spectrum and, optionally, a few outlier features; fp32 as
    calibration stores it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    if outliers:
        x[:, :3] *= outliers
    return (x.T @ x / tokens).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (20, 20), (40, 30), (7, 40)])
@pytest.mark.parametrize("smallest", [True, False])
def test_svd64_part_is_svd64_sliced(shape, smallest):
    g = torch.Generator().manual_seed(sum(shape))
    M = torch.randn(*shape, generator=g, dtype=torch.float64)
    keep = slice(-4, None) if smallest else slice(None, 4)
    U, S, Vh = svd64(M)
    u, s, vh = svd64_part(M, keep)
    assert u.shape == (shape[0], 4) and s.shape == (4,) and vh.shape == (4, shape[1])
    torch.testing.assert_close(s, S[keep], rtol=1e-12, atol=1e-14)
    # Random matrices have separated singular values: the vectors themselves agree, signs included.
    torch.testing.assert_close(u, U[:, keep], rtol=0, atol=1e-10)
    torch.testing.assert_close(vh, Vh[keep], rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
@pytest.mark.parametrize("init,smallest", [(init_corda_kpm, True), (init_corda_ipm, False)])
def test_corda_is_peft_fp64(shape, init, smallest):
    d_out, d_in = shape
    g = torch.Generator().manual_seed(d_out * d_in)
    W0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    for C in (covariance(d_in, 4 * d_in, 1), covariance(d_in, 4 * d_in, 2, outliers=30.0),
              covariance(d_in, d_in // 2, 3)):  # the last one rank-deficient: damping does the work
        reference, _ = peft_fp64(W0, C, 4, smallest)
        res = init(W0, C, 4, 2.0, SimpleNamespace(damping=0.01))
        assert rel(2 * res.B.double() @ res.A.double(), reference) < 1e-6
        torch.testing.assert_close(res.residual.double() + 2 * res.B.double() @ res.A.double(), W0.double(),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("damping", [0.01, 1e-3, 1e-6, 1e-9])
def test_damping_is_peft_s_whether_or_not_bounds_certify_it(damping):
    """Where ``inverse_is_accurate`` says yes, PEFT's explicit check passes by a wide margin; where it says no,
    PEFT's loop runs; the damping kept is PEFT's either way."""
    n = 40
    indefinite = covariance(n, 4 * n, 7).double()
    indefinite -= torch.eye(n, dtype=torch.float64) * torch.linalg.eigvalsh(indefinite)[3]  # 3 eigenvalues < 0
    cases = [covariance(n, 4 * n, 4), covariance(n, 10, 5),  # full rank; rank 10 of 40
             covariance(n, 4 * n, 6, outliers=1e3), indefinite]
    certified = []
    for C in cases:
        C64 = C.double()
        shift = float(torch.diagonal(C64).mean()) * damping
        fixed = C64 + torch.eye(n, dtype=torch.float64) * shift
        ok = inverse_is_accurate(C64, shift)
        certified.append(ok)
        if ok:
            assert torch.dist(fixed @ torch.linalg.inv(fixed), torch.eye(n, dtype=torch.float64)) < INV_TOLERANCE / 10
        _, peft_damp = peft_fp64(torch.zeros(2, n), C, 1, True, damping)
        assert corda._damped_inverse(C, damping).damp == peft_damp
    if damping >= 1e-6:
        assert certified[:3] == [True, True, True]  # covariances: no explicit inverse
    if damping == 1e-9:
        assert certified == [False] * 4  # kappa ~ 1e9 n: left to PEFT's check


def test_singular_c_fix_doubles_the_damping_as_peft():
    """C with an eigenvalue at -damp * mean(diag C): C_fix is singular, PEFT's check fails and the damping doubles;
    the bounds must not certify it."""
    n, damping = 30, 0.01
    g = torch.Generator().manual_seed(9)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lam = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    lam[0] = -damping * float(lam[1:].sum()) / (n + damping)  # = -damping * mean(lam): C_fix has eigenvalue 0
    C = Q @ torch.diag(lam) @ Q.T
    C = (C + C.T) / 2
    assert not inverse_is_accurate(C, float(torch.diagonal(C).mean()) * damping)
    W0 = torch.randn(12, n, generator=g, dtype=torch.float64)
    reference, peft_damp = peft_fp64(W0, C, 3, True, damping)
    assert peft_damp > damping  # the loop did double
    assert corda._damped_inverse(C, damping).damp == peft_damp
    res = init_corda_kpm(W0, C, 3, 1.0, SimpleNamespace(damping=damping))
    assert rel(res.B.double() @ res.A.double(), reference) < 1e-6


def test_the_explicit_inverse_is_skipped_at_peft_s_damping(monkeypatch):
    calls = []
    inv = torch.linalg.inv
    monkeypatch.setattr(torch.linalg, "inv", lambda *a, **k: calls.append(1) or inv(*a, **k))
    C = covariance(64, 256, 8, outliers=50.0)
    W0 = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with shared_decompositions():
        for _ in range(3):  # q/k/v: one factorisation of their shared input
            init_corda_kpm(W0, C, 4, 1.0, SimpleNamespace(damping=0.01))
    assert calls == []
    init_corda_kpm(W0, C, 4, 1.0, SimpleNamespace(damping=1e-12))  # bounds cannot certify: PEFT's loop
    assert calls
