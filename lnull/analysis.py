"""Stage `analyze`: the papers' diagnostics of one run, written to ``<run>/analysis/`` (CSV + PNG).

Parts (each runs only when its inputs exist; a skipped part is listed in ``summary.json`` with the reason):

- ``effective_rank``  (calibration): eRank (Roy & Vetterli; LoRA-Null Table 2) of W0 and of X per module.
- ``spectra``         (calibration): singular values of X (sqrt of eig(C), fp64) and of W0 (Fig. 2).
- ``projection_profile`` (calibration + init adapter): components of A on the eigenvectors of C (Fig. 4).
- ``table1``          (calibration + init adapter): measured AAAI Table 1 -- residual change and how much
                      of A lies in the principal eigen-space of C.
- ``relative_change`` (init + train adapters): ||A*-A0||/||A0||, ||B*-B0||/||B0|| (Fig. 1); for OPLoRA
                      of the effective factors A P_V and P_U B.
- ``rho_k``           (init + train): OPLoRA's subspace interference of the trained update.

C = X^T X with X [tokens, d_in] as stored by calibration; its eigenvectors are the left singular vectors
of the paper's X_pre [d_in, tokens], and sqrt(eig(C)) its singular values. Everything is fp64.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

from lnull.io import atomic_write_json, atomic_write_text, save_png
from lnull.methods import method_of
from lnull.methods.linalg import svd64
from lnull.stages import StageContext

Factors = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]  # ({module: A}, {module: B}, scale)


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007)."""
    s = singular_values.double().clamp_min(0)
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def activation_singular_values(cov: torch.Tensor) -> torch.Tensor:
    """Singular values of X [d_in] descending from C = X^T X [d_in, d_in] (fp64 eigh; negatives clipped)."""
    return torch.linalg.eigvalsh(cov.double()).clamp_min(0).sqrt().flip(0)


def eigenbasis_desc(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [d_in] DESCENDING, eigenvectors U [d_in, d_in] as columns) of C, fp64. Uses the same
    ``eigh64`` as LoRA-Null, so U[:, -r:] is exactly the U_null that method used."""
    from lnull.methods.linalg import eigh64

    vals, vecs = eigh64(cov)
    return vals.flip(0), vecs.flip(1)


def projection_profile(A: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Components of A [r, d_in] on the columns u_i of U [d_in, d_in] (descending eigenvalue order).

    Returns ``(pa [d_in], energy [d_in])`` with P = A U [r, d_in]:
    - pa_i = sum_j |P_ji| -- the paper's definition (LoRA-Null Eq. 12-13), unnormalised;
    - energy_i = ||A u_i||^2 / ||A||_F^2 = sum_j P_ji^2 / ||P||_F^2 -- the share of A's energy along u_i;
      it sums to 1 (U orthonormal), so cumulative curves are comparable across methods and scales."""
    P = A.double() @ U.double()
    energy = P.pow(2).sum(0)
    return P.abs().sum(0), energy / energy.sum().clamp_min(1e-300)


def rho_k(W0: torch.Tensor, W_eff: torch.Tensor, k: int) -> float:
    """Subspace alignment of the update (OPLoRA paper, eq. 5): with ΔW = W_eff - W0 [d_out, d_in] and
    Q_k = U_k U_kᵀ the projector on W0's top-k left singular vectors,

        ρ_k = ||Q_k ΔW||_F² / ||ΔW||_F²  ∈ [0, 1]   (computed as ||U_kᵀ ΔW||_F², fp64);

    0: the update avoids W0's dominant column space; 1: it lies inside it. 0.0 for ΔW = 0."""
    U, _, _ = svd64(W0)
    delta = W_eff.double() - W0.double()
    total = float(delta.pow(2).sum())
    return float((U[:, :k].T @ delta).pow(2).sum()) / total if total > 0 else 0.0


def relative_change(new: torch.Tensor, old: torch.Tensor) -> tuple[float, bool]:
    """(||new - old||_F / ||old||_F, True), or (||new - old||_F, False) when ||old|| == 0 (e.g. LoRA's B0)."""
    diff = float((new.double() - old.double()).norm())
    base = float(old.double().norm())
    return (diff / base, True) if base > 0 else (diff, False)


# ---------------------------------------------------------------- writing helpers

def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([[f"{v:.10g}" if isinstance(v, float) else v for v in row] for row in rows])
    atomic_write_text(path, buf.getvalue())
    return path


def _save_png(fig: Any, path: Path) -> Path:
    return save_png(fig, path, dpi=110)


def _figure(ncols: int = 1, width: float = 7.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, 4.2), squeeze=False)


def _short(module: str) -> str:
    """'model.layers.3.self_attn.k_proj' -> '3.k_proj'."""
    m = re.search(r"layers\.(\d+)\..*?([^.]+)$", module)
    return f"{m.group(1)}.{m.group(2)}" if m else module


def _plotted(modules: list[str]) -> list[str]:
    """Modules drawn as curves: those of the first layer (one line per module type), else all."""
    first = [m for m in modules if re.search(r"layers\.0\.", m)]
    return first or modules


def _adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """({module: A [r, d_in]}, {module: B [d_out, r]}, scale s = lora_alpha / r) of a PEFT adapter folder."""
    from safetensors.torch import load_file

    conf = json.loads((folder / "adapter_config.json").read_text())
    A, B = {}, {}
    for key, t in load_file(str(folder / "adapter_model.safetensors")).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m:
            (A if m.group(2) == "A" else B)[m.group(1)] = t.double()
    return A, B, float(conf["lora_alpha"]) / float(conf["r"])


# ---------------------------------------------------------------- the stage

NO_CALIBRATION = "calibrate stage not complete for this config (run `lnull calibrate`)"
NO_ADAPTER = "no adapter: the method has none (full fine-tuning)"
NO_INIT = "init stage not complete for this config (run `lnull init`)"
NO_TRAIN = "train stage not complete for this config (run `lnull train`)"


class Parts:
    """Each part's outcome in the order the parts ran (``summary.json``): done with its files, or skipped."""

    def __init__(self, out: Path):
        self.out = out
        self.parts: dict[str, dict[str, Any]] = {}

    def done(self, part: str, *paths: Path, **extra: Any) -> None:
        self.parts[part] = {"status": "done", "files": [p.name for p in paths], **extra}

    def skip(self, part: str, reason: str) -> None:
        self.parts[part] = {"status": "skipped", "reason": reason}
        for stale in self.out.glob(f"{part}.*"):  # from an earlier analysis of this folder
            stale.unlink()

    def finish(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary.json``; the stage summary: per part ``done`` or ``skipped``."""
        atomic_write_json(self.out / "summary.json", {"method": cfg["method"]["name"], "parts": self.parts})
        return {part: info["status"] for part, info in self.parts.items()}


def run(cfg: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Stage entry: write the analysis into ``ctx.out`` from whatever of calibration / init / train is
    complete for this config; return per part ``done`` or ``skipped`` (also in ``summary.json``)."""
    from lnull.activations import load_statistic
    from lnull.modeling import load_model, original_path, target_linears

    calib_dir, init_dir, train_dir = (ctx.maybe_input(s) for s in ("calibrate", "init", "train"))
    model = load_model(original_path(cfg), "float32")
    W0 = {n: lin.weight.detach().double() for n, lin in target_linears(model, cfg["model"]["target_modules"]).items()}
    parts = Parts(ctx.out)
    covs = load_statistic(calib_dir) if calib_dir is not None else {}
    svals_X = {n: activation_singular_values(c) for n, c in covs.items()}
    effective_rank_and_spectra(parts, W0, svals_X, calib_dir is not None)
    init_adapter = init_dir / "adapter" if init_dir is not None else None
    init = _adapter(init_adapter) if init_adapter is not None and init_adapter.exists() else None
    projection_profile_and_table1(parts, cfg, model, W0, covs, svals_X, init_adapter, init, calib_dir is not None)
    if train_dir is None:
        for part in ("relative_change", "rho_k"):
            parts.skip(part, NO_TRAIN)
        return parts.finish(cfg)
    train_adapter = train_dir / "adapter"
    if init is not None and train_adapter.exists():
        factors = effective_factors(init_adapter, init, _adapter(train_adapter))
        relative_change_part(parts, cfg, W0, factors)
        rk = rho_k_of_adapters(W0, factors, init[2], int(cfg["analysis"]["k"]))
    else:
        parts.skip("relative_change", NO_ADAPTER)
        rk = rho_k_of_trained_model(W0, train_dir / "model" / "model.safetensors", int(cfg["analysis"]["k"]))
    rho_k_part(parts, rk, int(cfg["analysis"]["k"]))
    return parts.finish(cfg)


def effective_rank_and_spectra(parts: Parts, W0: dict[str, torch.Tensor], svals_X: dict[str, torch.Tensor],
                               calibrated: bool) -> None:
    """Parts ``effective_rank`` (Table 2) and ``spectra`` (Fig. 2): eRank and singular values of W0 and X."""
    if not calibrated:
        parts.skip("effective_rank", NO_CALIBRATION)
        parts.skip("spectra", NO_CALIBRATION)
        return
    out, modules = parts.out, list(W0)
    svals_W = {n: torch.linalg.svdvals(w) for n, w in W0.items()}
    er = [[n, kind, effective_rank(s[n])] for n in modules for kind, s in (("weight", svals_W), ("activation", svals_X))]
    fig, axes = _figure(width=max(7.0, 0.35 * len(modules)))
    x = torch.arange(len(modules)).tolist()
    for off, kind in ((-0.2, "weight"), (0.2, "activation")):
        axes[0, 0].bar([i + off for i in x], [r[2] for r in er if r[1] == kind], width=0.4, label=kind)
    axes[0, 0].set_xticks(x, [_short(n) for n in modules], rotation=90, fontsize=7)
    axes[0, 0].set(ylabel="effective rank", title="Effective rank of W0 and X per module")
    axes[0, 0].legend()
    parts.done("effective_rank", _write_csv(out / "effective_rank.csv", ["module", "matrix", "effective_rank"], er),
               _save_png(fig, out / "effective_rank.png"))

    shown = _plotted(modules)
    spec = [[n, kind, i, float(v)] for n in modules for kind, s in (("weight", svals_W), ("activation", svals_X))
            for i, v in enumerate(s[n].tolist())]
    fig, axes = _figure(2)
    for ax, kind, s in ((axes[0, 0], "activation", svals_X), (axes[0, 1], "weight", svals_W)):
        for n in shown:
            ax.plot(s[n].clamp_min(1e-30).tolist(), label=_short(n))
        ax.set(yscale="log", xlabel="index i", ylabel="singular value",
               title=f"{'X (sqrt eig C)' if kind == 'activation' else 'W0'}")
        ax.legend(fontsize=7)
    parts.done("spectra", _write_csv(out / "spectra.csv", ["module", "matrix", "index", "value"], spec),
               _save_png(fig, out / "spectra.png"), plotted=shown)


def projection_profile_and_table1(parts: Parts, cfg: dict[str, Any], model: torch.nn.Module,
                                  W0: dict[str, torch.Tensor], covs: dict[str, torch.Tensor],
                                  svals_X: dict[str, torch.Tensor], init_adapter: Optional[Path],
                                  init: Optional[Factors], calibrated: bool) -> None:
    """Parts ``projection_profile`` (Fig. 4) and ``table1`` (measured AAAI Table 1) from the calibration and the
    init adapter. ``model`` (the original, fp32) becomes the init's residual model."""
    from lnull.residual import subtract_initial_update

    if init is None:
        for part in ("projection_profile", "table1"):
            parts.skip(part, NO_ADAPTER if init_adapter is not None else NO_INIT)
        return
    if not calibrated:
        for part in ("projection_profile", "table1"):
            parts.skip(part, NO_CALIBRATION)
        return
    out, modules, A0 = parts.out, list(W0), init[0]
    subtract_initial_update(model, init_adapter)
    W_res = {f"{n}.weight": model.get_submodule(n).weight.detach() for n in modules}
    prof, table, curves = [], [], {}
    for n in modules:
        _, U = eigenbasis_desc(covs[n])
        pa, energy = projection_profile(A0[n], U)
        prof += [[n, i, float(p), float(e)] for i, (p, e) in enumerate(zip(pa.tolist(), energy.tolist()))]
        curves[n] = energy.cumsum(0)
        r, d_in = A0[n].shape
        m = max(1, min(round(effective_rank(svals_X[n])), d_in - r))
        res_change = float((W_res[f"{n}.weight"].double() - W0[n]).norm() / W0[n].norm())
        table.append([n, res_change, m, float(energy[:m].sum()), float(energy[-r:].sum())])
    table.append(["mean", *[sum(row[c] for row in table) / len(table) for c in (1, 2, 3, 4)]])
    fig, axes = _figure()
    for n in _plotted(modules):
        axes[0, 0].plot(range(1, len(curves[n]) + 1), curves[n].tolist(), label=_short(n))
    axes[0, 0].set(xlabel="i (eigenvectors of C, descending eigenvalue)", ylabel="cumulative energy of A",
                   title=f"Projection of A onto eigenvectors of C ({cfg['method']['name']})", ylim=(-0.02, 1.02))
    axes[0, 0].legend(fontsize=7)
    parts.done("projection_profile",
               _write_csv(out / "projection_profile.csv", ["module", "i", "pa_i", "energy_i"], prof),
               _save_png(fig, out / "projection_profile.png"),
               note="i sorted by descending eigenvalue of C; pa_i = sum_j |(A U)_ji| (paper Eq. 13); "
                    "energy_i = ||A u_i||^2/||A||_F^2 (sums to 1 per module)")
    parts.done("table1", _write_csv(out / "table1.csv", ["module", "residual_rel_change", "m", "A_energy_top_m",
                                                         "A_energy_bottom_r"], table),
               note="residual_rel_change = ||W_res - W0||_F/||W0||_F; A_energy_top_m = share of ||A||_F^2 in the "
                    "top-m eigen-space of C, m = min(round(eRank(X)), d_in - r); A_energy_bottom_r: in U_null")


def effective_factors(init_adapter: Path, init: Factors, trained: Factors) -> tuple[Factors, Factors]:
    """(init, trained) factors as the method computes with them (e.g. OPLoRA: A P_V, P_U B), else as stored."""
    (A0, B0, scale), (A1, B1, trained_scale) = init, trained
    method = method_of(init_adapter)
    if method is not None and method.effective_factors is not None:
        A0, B0 = method.effective_factors(A0, B0, init_adapter)
        A1, B1 = method.effective_factors(A1, B1, init_adapter)
    return (A0, B0, scale), (A1, B1, trained_scale)


def relative_change_part(parts: Parts, cfg: dict[str, Any], W0: dict[str, torch.Tensor],
                         factors: tuple[Factors, Factors]) -> None:
    """Part ``relative_change`` (Fig. 1): ||A*-A0||/||A0||, ||B*-B0||/||B0|| of the effective factors."""
    (A0, B0, _), (A1, B1, _) = factors
    modules = list(W0)
    rel = []
    for n in modules:
        for name, new, old in (("A", A1[n], A0[n]), ("B", B1[n], B0[n])):
            value, relative = relative_change(new, old)
            rel.append([n, name, value, "relative" if relative else "absolute (||M0|| = 0)"])
    fig, axes = _figure(width=max(7.0, 0.35 * len(modules)))
    x = list(range(len(modules)))
    for off, name in ((-0.2, "A"), (0.2, "B")):
        axes[0, 0].bar([i + off for i in x], [r[2] for r in rel if r[1] == name], width=0.4,
                       label=f"||{name}*-{name}0||/||{name}0||" if all(r[3] == "relative" for r in rel
                                                                      if r[1] == name) else f"{name} (absolute)")
    axes[0, 0].set_xticks(x, [_short(n) for n in modules], rotation=90, fontsize=7)
    axes[0, 0].set(ylabel="change", title=f"Change of the adapter in training ({cfg['method']['name']})")
    axes[0, 0].legend()
    parts.done("relative_change",
               _write_csv(parts.out / "relative_change.csv", ["module", "matrix", "value", "kind"], rel),
               _save_png(fig, parts.out / "relative_change.png"))


def rho_k_of_adapters(W0: dict[str, torch.Tensor], factors: tuple[Factors, Factors], scale: float,
                      k: int) -> list[list[Any]]:
    """[module, k, rho_k, ||dW||] with dW = s (B* A* - B0 A0) of the effective factors."""
    (A0, B0, _), (A1, B1, _) = factors
    rows = []
    for n, w in W0.items():
        kk = min(k, min(w.shape))
        delta = scale * (B1[n] @ A1[n] - B0[n] @ A0[n])
        rows.append([n, kk, rho_k(w, w + delta, kk), float(delta.norm())])
    return rows


def rho_k_of_trained_model(W0: dict[str, torch.Tensor], weights: Path, k: int) -> list[list[Any]]:
    """[module, k, rho_k, ||dW||] with dW = W_trained - W0 (full fine-tuning)."""
    from safetensors.torch import load_file

    trained = load_file(str(weights))
    rows = []
    for n, w in W0.items():
        kk = min(k, min(w.shape))
        W1 = trained[f"{n}.weight"].double()
        rows.append([n, kk, rho_k(w, W1, kk), float((W1 - w).norm())])
    return rows


def rho_k_part(parts: Parts, rows: list[list[Any]], k: int) -> None:
    """Part ``rho_k`` (OPLoRA Eq. 5): the per-module rows and their mean."""
    rows = rows + [["mean", k, sum(r[2] for r in rows) / len(rows), sum(r[3] for r in rows) / len(rows)]]
    parts.done("rho_k", _write_csv(parts.out / "rho_k.csv", ["module", "k", "rho_k", "delta_norm"], rows),
               note="rho_k = ||U_k U_k^T dW||_F^2/||dW||_F^2, U_k top-k left singular vectors of W0 (OPLoRA Eq. 5); "
                    "dW = s(B*A* - B0A0) of the effective factors (OPLoRA: P_U B, A P_V), or W_trained - W0 for full "
                    "fine-tuning")
