"""Stage `analyze`: effective rank (Roy & Vetterli) of W0 and of the calibration activations X.

The effective rank of X comes from C = X^T X without X: the singular values of X are sqrt(eig(C)).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from lnull.config import ConfigError
from lnull.runs import RunFolder, atomic_write_text


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007)."""
    s = singular_values.double().clamp_min(0)
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def activation_singular_values(cov: torch.Tensor) -> torch.Tensor:
    """Singular values of X from C = X^T X (fp64 eigh; tiny negative eigenvalues clipped)."""
    return torch.linalg.eigvalsh(cov.double()).clamp_min(0).sqrt().flip(0)


def run_analysis(cfg: dict[str, Any]) -> list[Path]:
    """Write ``<run>/analysis/effective_rank.csv`` (module, matrix, effective_rank)."""
    from lnull.initialize import load_covariances
    from lnull.modeling import load_model, resolve_model, target_linears

    run = RunFolder.for_config(cfg)
    if not run.is_complete("calibrate"):
        raise ConfigError("`lnull analyze` needs the calibrate stage: run `lnull calibrate` with the same config")
    covs = load_covariances(run.stage_dir("calibrate"))
    model = load_model(resolve_model(cfg["model"]["name_or_path"], cfg.get("cache_dir")), "float32")
    rows = [["module", "matrix", "effective_rank"]]
    for name, lin in target_linears(model, cfg["model"]["target_modules"]).items():
        rows.append([name, "weight", f"{effective_rank(torch.linalg.svdvals(lin.weight.detach().double())):.2f}"])
        rows.append([name, "activation", f"{effective_rank(activation_singular_values(covs[name])):.2f}"])
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    path = run.path / "analysis" / "effective_rank.csv"
    atomic_write_text(path, buf.getvalue())
    return [path]
