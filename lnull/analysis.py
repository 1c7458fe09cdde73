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
from typing import Any

import torch

from lnull.io import atomic_write_json, atomic_write_text, save_png
from lnull.methods import method_of
from lnull.methods.linalg import svd64


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

def run_analysis(cfg: dict[str, Any]) -> list[Path]:
    """`lnull analyze`: the run's ``analysis/`` files (``summary.json`` last)."""
    from lnull.pipeline import run_pipeline

    folder = run_pipeline(cfg, stages=["analyze"]).view("analyze")
    summary = json.loads((folder / "summary.json").read_text())
    names = [f for part in summary["parts"].values() for f in part.get("files", [])]
    return [folder / name for name in names] + [folder / "summary.json"]


def run(cfg: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Stage entry: write the analysis into ``ctx.out`` from whatever of calibration / init / train is
    complete for this config; return per part ``done`` or ``skipped`` (also in ``summary.json``)."""
    from safetensors.torch import load_file

    from lnull.activations import load_statistic
    from lnull.modeling import load_model, original_path, target_linears
    from lnull.residual import subtract_initial_update

    out = ctx.out
    calib_dir, init_dir, train_dir = (ctx.maybe_input(s) for s in ("calibrate", "init", "train"))
    model = load_model(original_path(cfg), "float32")
    W0 = {n: lin.weight.detach().double() for n, lin in target_linears(model, cfg["model"]["target_modules"]).items()}
    modules = list(W0)
    shown = _plotted(modules)
    parts: dict[str, dict[str, Any]] = {}

    def done(part: str, *paths: Path, **extra: Any) -> None:
        parts[part] = {"status": "done", "files": [p.name for p in paths], **extra}

    def skip(part: str, reason: str) -> None:
        parts[part] = {"status": "skipped", "reason": reason}
        for stale in out.glob(f"{part}.*"):  # from an earlier analysis of this folder
            stale.unlink()

    has_cal, has_init, has_train = calib_dir is not None, init_dir is not None, train_dir is not None
    init_adapter = init_dir / "adapter" if has_init else None
    train_adapter = train_dir / "adapter" if has_train else None
    no_cal = "calibrate stage not complete for this config (run `lnull calibrate`)"
    no_adapter = "no adapter: the method has none (full fine-tuning)"

    # ---- effective rank + spectra (Table 2, Fig. 2)
    svals_W = {n: torch.linalg.svdvals(w) for n, w in W0.items()}
    covs = load_statistic(calib_dir) if has_cal else {}
    svals_X = {n: activation_singular_values(c) for n, c in covs.items()}
    if has_cal:
        er = [[n, kind, effective_rank(s[n])] for n in modules for kind, s in (("weight", svals_W), ("activation", svals_X))]
        fig, axes = _figure(width=max(7.0, 0.35 * len(modules)))
        x = torch.arange(len(modules)).tolist()
        for off, kind in ((-0.2, "weight"), (0.2, "activation")):
            axes[0, 0].bar([i + off for i in x], [r[2] for r in er if r[1] == kind], width=0.4, label=kind)
        axes[0, 0].set_xticks(x, [_short(n) for n in modules], rotation=90, fontsize=7)
        axes[0, 0].set(ylabel="effective rank", title="Effective rank of W0 and X per module")
        axes[0, 0].legend()
        done("effective_rank", _write_csv(out / "effective_rank.csv", ["module", "matrix", "effective_rank"], er),
             _save_png(fig, out / "effective_rank.png"))

        spec = [[n, kind, i, float(v)] for n in modules for kind, s in (("weight", svals_W), ("activation", svals_X))
                for i, v in enumerate(s[n].tolist())]
        fig, axes = _figure(2)
        for ax, kind, s in ((axes[0, 0], "activation", svals_X), (axes[0, 1], "weight", svals_W)):
            for n in shown:
                ax.plot(s[n].clamp_min(1e-30).tolist(), label=_short(n))
            ax.set(yscale="log", xlabel="index i", ylabel="singular value",
                   title=f"{'X (sqrt eig C)' if kind == 'activation' else 'W0'}")
            ax.legend(fontsize=7)
        done("spectra", _write_csv(out / "spectra.csv", ["module", "matrix", "index", "value"], spec),
             _save_png(fig, out / "spectra.png"), plotted=shown)
    else:
        skip("effective_rank", no_cal)
        skip("spectra", no_cal)

    # ---- adapter-based parts need init/adapter
    A0 = B0 = None
    if has_init and init_adapter.exists():
        A0, B0, scale = _adapter(init_adapter)

    # ---- projection profile (Fig. 4) and Table 1
    if A0 is None:
        reason = no_adapter if has_init else "init stage not complete for this config (run `lnull init`)"
        for part in ("projection_profile", "table1"):
            skip(part, reason)
    elif not has_cal:
        for part in ("projection_profile", "table1"):
            skip(part, no_cal)
    else:
        subtract_initial_update(model, init_adapter)  # the fp32 model becomes the init's residual model
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
        for n in shown:
            axes[0, 0].plot(range(1, len(curves[n]) + 1), curves[n].tolist(), label=_short(n))
        axes[0, 0].set(xlabel="i (eigenvectors of C, descending eigenvalue)", ylabel="cumulative energy of A",
                       title=f"Projection of A onto eigenvectors of C ({cfg['method']['name']})", ylim=(-0.02, 1.02))
        axes[0, 0].legend(fontsize=7)
        done("projection_profile",
             _write_csv(out / "projection_profile.csv", ["module", "i", "pa_i", "energy_i"], prof),
             _save_png(fig, out / "projection_profile.png"),
             note="i sorted by descending eigenvalue of C; pa_i = sum_j |(A U)_ji| (paper Eq. 13); "
                  "energy_i = ||A u_i||^2/||A||_F^2 (sums to 1 per module)")
        done("table1", _write_csv(out / "table1.csv", ["module", "residual_rel_change", "m", "A_energy_top_m",
                                                       "A_energy_bottom_r"], table),
             note="residual_rel_change = ||W_res - W0||_F/||W0||_F; A_energy_top_m = share of ||A||_F^2 in the "
                  "top-m eigen-space of C, m = min(round(eRank(X)), d_in - r); A_energy_bottom_r: in U_null")

    # ---- relative change (Fig. 1) and rho_k need the trained model
    if not has_train:
        for part in ("relative_change", "rho_k"):
            skip(part, "train stage not complete for this config (run `lnull train`)")
        atomic_write_json(out / "summary.json", {"method": cfg["method"]["name"], "parts": parts})
        return _summary(parts)
    k = int(cfg["analysis"]["k"])
    if A0 is not None and train_adapter.exists():
        A1, B1, _ = _adapter(train_adapter)
        method = method_of(init_adapter)
        if method is not None and method.effective_factors is not None:  # e.g. OPLoRA: A P_V, P_U B
            A0, B0 = method.effective_factors(A0, B0, init_adapter)
            A1, B1 = method.effective_factors(A1, B1, init_adapter)
        rel, rk = [], []
        for n in modules:
            for name, new, old in (("A", A1[n], A0[n]), ("B", B1[n], B0[n])):
                value, relative = relative_change(new, old)
                rel.append([n, name, value, "relative" if relative else "absolute (||M0|| = 0)"])
            delta = scale * (B1[n] @ A1[n] - B0[n] @ A0[n])
            rk.append([n, min(k, min(W0[n].shape)), rho_k(W0[n], W0[n] + delta, min(k, min(W0[n].shape))),
                       float(delta.norm())])
        fig, axes = _figure(width=max(7.0, 0.35 * len(modules)))
        x = list(range(len(modules)))
        for off, name in ((-0.2, "A"), (0.2, "B")):
            axes[0, 0].bar([i + off for i in x], [r[2] for r in rel if r[1] == name], width=0.4,
                           label=f"||{name}*-{name}0||/||{name}0||" if all(r[3] == "relative" for r in rel
                                                                          if r[1] == name) else f"{name} (absolute)")
        axes[0, 0].set_xticks(x, [_short(n) for n in modules], rotation=90, fontsize=7)
        axes[0, 0].set(ylabel="change", title=f"Change of the adapter in training ({cfg['method']['name']})")
        axes[0, 0].legend()
        done("relative_change", _write_csv(out / "relative_change.csv", ["module", "matrix", "value", "kind"], rel),
             _save_png(fig, out / "relative_change.png"))
    else:
        skip("relative_change", no_adapter)
        trained = load_file(str(train_dir / "model" / "model.safetensors"))
        rk = []
        for n in modules:
            kk = min(k, min(W0[n].shape))
            W1 = trained[f"{n}.weight"].double()
            rk.append([n, kk, rho_k(W0[n], W1, kk), float((W1 - W0[n]).norm())])
    rk.append(["mean", k, sum(r[2] for r in rk) / len(rk), sum(r[3] for r in rk) / len(rk)])
    done("rho_k", _write_csv(out / "rho_k.csv", ["module", "k", "rho_k", "delta_norm"], rk),
         note="rho_k = ||U_k U_k^T dW||_F^2/||dW||_F^2, U_k top-k left singular vectors of W0 (OPLoRA Eq. 5); "
              "dW = s(B*A* - B0A0) of the effective factors (OPLoRA: P_U B, A P_V), or W_trained - W0 for full "
              "fine-tuning")
    atomic_write_json(out / "summary.json", {"method": cfg["method"]["name"], "parts": parts})
    return _summary(parts)


def _summary(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {part: info["status"] for part, info in parts.items()}
