"""OPLoRA (orthogonal projection LoRA): ΔW = P_U B A P_V with P_U = I - U_k U_kᵀ, P_V = I - V_k V_kᵀ.

U_k [d_out, k], V_k [d_in, k] are the top-k singular vectors of W0 (fp64 SVD, frozen). Because
ΔW V_k = 0 and U_kᵀ ΔW = 0, every top-k singular triple (u_i, σ_i, v_i) of W0 stays a singular triple of
W0 + ΔW, whatever A and B training reaches. Init: A random (as LoRA), B = 0, residual = W0.

The projectors are never formed (d x d): they act as x - V_k (V_kᵀ x) and y - U_k (U_kᵀ y).

Files: the init adapter folder holds a plain PEFT LoRA adapter plus ``oplora_projections.safetensors``
(keys ``<module>.U_k`` [d_out, k], ``<module>.V_k`` [d_in, k], fp32), written by
:func:`write_init_extras`, registered as ``Method.write_extras`` (``lnull.initialize`` calls it with the
original model's linears); ``Method.check_shape`` rejects k + r > min(d_out, d_in) before any work.

How to load an OPLoRA adapter:

- the init adapter (B = 0) and a *baked* trained adapter (:func:`bake_projections`, A <- A P_V,
  B <- P_U B) are plain PEFT LoRA adapters: ``PeftModel.from_pretrained`` reproduces them, no hooks;
- an *unbaked* adapter (A, B as trained under the hooks) needs ``attach_projections(model, adapter_dir)``
  after ``PeftModel.from_pretrained``, else it computes the unprojected B A.
Attaching to a baked adapter is harmless (projectors are idempotent). Bake before ``merge_and_unload``:
merging reads lora_A/lora_B weights and bypasses the hooks. Do not keep training after baking with the
hooks removed (the update would leave the complement again).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from lnull.errors import ConfigError
from lnull.methods.base import Factors, LayerInit, Method, register
from lnull.methods.linalg import svd64
from lnull.methods.lora import LoRAConfig, check_init_a, init_lora


@dataclass
class OPLoRAConfig(LoRAConfig):
    k: int = 16  # top singular directions of W0 (left and right) the update stays orthogonal to
    init_a: str = "kaiming_uniform"  # the OPLoRA paper's LoRA init (PEFT's default)

PROJECTIONS_FILE = "oplora_projections.safetensors"
_HANDLES_ATTR = "_oplora_hook_handles"

Projections = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (U_k [d_out, k], V_k [d_in, k])


def check_k(k: int, rank: int, shape: tuple[int, int]) -> None:
    """ConfigError unless 0 <= k and k + r <= min(d_out, d_in) (the complement must hold a rank-r update)."""
    if k < 0:
        raise ConfigError(f"method.k must be >= 0, got k={k}")
    if k + rank > min(shape):
        raise ConfigError(f"OPLoRA needs k + r <= min(d_out, d_in): k={k} + r={rank} > {min(shape)} "
                          f"for a weight of shape {tuple(shape)}")


def check_shape(shape: tuple[int, int], cfg: Any) -> None:
    """``Method.check_shape`` hook: :func:`check_k` with ``cfg.k``, ``cfg.rank``."""
    check_k(int(cfg.k), int(cfg.rank), shape)


def init_oplora(W0: torch.Tensor, cov: Optional[torch.Tensor], rank: int, scale: float, cfg: Any,
                generator: Optional[torch.Generator] = None) -> LayerInit:
    """As LoRA: A [r, d_in] random (``cfg.init_a``; the OPLoRA paper: kaiming-uniform), B [d_out, r] = 0,
    residual = W0 [d_out, d_in]; the projections (:func:`write_init_extras`) make ΔW = P_U B A P_V.
    Raises ConfigError if k + r > min(d_out, d_in)."""
    check_k(int(cfg.k), rank, tuple(W0.shape))
    return init_lora(W0, cov, rank, scale, cfg, generator)


def top_singular_subspaces(W0: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k [d_out, k], V_k [d_in, k]) fp32: the top-k left/right singular vectors of W0 [d_out, d_in].

    A full thin fp64 SVD (exact, unlike the paper's ``svd_lowrank``, which leaks ρ_k ≈ 3e-3 at k = 128);
    O(d_out d_in min(d)) per layer is fine on CPU for the tiny/135M models, minutes for a 7B model."""
    U, _, Vh = svd64(W0)
    return U[:, :k].float().contiguous(), Vh[:k].T.float().contiguous()


def save_projections(adapter_dir: Path, projections: Projections) -> Path:
    """Write ``adapter_dir/oplora_projections.safetensors`` (keys ``<module>.U_k``, ``<module>.V_k``)."""
    tensors = {}
    for name, (U_k, V_k) in projections.items():
        tensors[f"{name}.U_k"] = U_k.detach().float().contiguous().cpu()
        tensors[f"{name}.V_k"] = V_k.detach().float().contiguous().cpu()
    path = Path(adapter_dir) / PROJECTIONS_FILE
    save_file(tensors, str(path))
    return path


def load_projections(adapter_dir: Path) -> Projections:
    """``{module: (U_k, V_k)}`` from ``adapter_dir/oplora_projections.safetensors``."""
    tensors = load_file(str(Path(adapter_dir) / PROJECTIONS_FILE))
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {name: (tensors[f"{name}.U_k"], tensors[f"{name}.V_k"]) for name in names}


def write_init_extras(model_linears: dict[str, torch.nn.Linear], options: Any, adapter_dir: Path) -> None:
    """SVD each targeted layer's weight (= W0 = the OPLoRA residual) and save its (U_k, V_k)."""
    k, rank = int(options.k), int(options.rank)
    projections = {}
    for name, lin in model_linears.items():
        check_k(k, rank, tuple(lin.weight.shape))
        projections[name] = top_singular_subspaces(lin.weight.detach().float(), k)
    save_projections(adapter_dir, projections)


def _lora_layers(peft_model: torch.nn.Module, projections: Projections):
    """Yield (name, lora layer, U_k, V_k) for each projected module of the PEFT model."""
    root = peft_model.base_model.model
    for name, (U_k, V_k) in projections.items():
        yield name, root.get_submodule(name), U_k, V_k


class _Cached:
    """A frozen tensor re-cast lazily to the device/dtype of whatever it meets (model moved after attach)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def like(self, x: torch.Tensor) -> torch.Tensor:
        if self.t.device != x.device or self.t.dtype != x.dtype:
            self.t = self.t.to(device=x.device, dtype=x.dtype)
        return self.t


def attach_projections(peft_model: torch.nn.Module, adapter_dir: Path,
                       adapter: str = "default") -> list[torch.utils.hooks.RemovableHandle]:
    """Hook every projected layer so the PEFT model computes W_res x + s P_U B A P_V x.

    Pre-hook on ``lora_A[adapter]``: x [..., d_in] -> x - (x V_k) V_kᵀ; forward hook on ``lora_B[adapter]``:
    y [..., d_out] -> y - (y U_k) U_kᵀ. U_k, V_k live in the hook closures (not buffers, so PEFT's
    ``save_pretrained`` never writes them into the adapter). Returns the handles (also kept on the model for
    :func:`bake_projections`)."""
    handles = []
    for name, layer, U_k, V_k in _lora_layers(peft_model, load_projections(adapter_dir)):
        if getattr(layer, "merged", False):
            raise RuntimeError(f"{name}: adapter is merged; merged weights bypass the OPLoRA hooks")
        U, V = _Cached(U_k), _Cached(V_k)

        def project_in(module, args, V=V):
            x = args[0]
            Vx = V.like(x)
            return (x - (x @ Vx) @ Vx.T,) + tuple(args[1:])

        def project_out(module, args, y, U=U):
            Uy = U.like(y)
            return y - (y @ Uy) @ Uy.T

        handles.append(layer.lora_A[adapter].register_forward_pre_hook(project_in))
        handles.append(layer.lora_B[adapter].register_forward_hook(project_out))
    object.__setattr__(peft_model, _HANDLES_ATTR, getattr(peft_model, _HANDLES_ATTR, []) + handles)
    return handles


@torch.no_grad()
def bake_projections(peft_model: torch.nn.Module, adapter_dir: Path, adapter: str = "default") -> None:
    """In place: A [r, d_in] <- A - (A V_k) V_kᵀ, B [d_out, r] <- B - U_k (U_kᵀ B) (fp64), so B A = P_U B A P_V
    exactly and the adapter is a plain PEFT LoRA; then removes the hooks of :func:`attach_projections`."""
    for _, layer, U_k, V_k in _lora_layers(peft_model, load_projections(adapter_dir)):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        U, V = U_k.to(A.device, torch.float64), V_k.to(A.device, torch.float64)
        A64, B64 = A.double(), B.double()
        A.copy_((A64 - (A64 @ V) @ V.T).to(A.dtype))
        B.copy_((B64 - U @ (U.T @ B64)).to(B.dtype))
    for handle in getattr(peft_model, _HANDLES_ATTR, []):
        handle.remove()
    object.__setattr__(peft_model, _HANDLES_ATTR, [])


def effective_factors(A: Factors, B: Factors, adapter_dir: Path) -> tuple[Factors, Factors]:
    """({module: A P_V}, {module: P_U B}) fp64: the factors whose product is the update OPLoRA applies
    (idempotent on a baked adapter)."""
    projections = load_projections(adapter_dir)
    A_eff, B_eff = {}, {}
    for name in A:
        U_k, V_k = (t.double() for t in projections[name])
        A_eff[name] = A[name].double() - (A[name].double() @ V_k) @ V_k.T
        B_eff[name] = B[name].double() - U_k @ (U_k.T @ B[name].double())
    return A_eff, B_eff


OPLORA = register(Method("oplora", init_oplora, options=OPLoRAConfig, check_options=check_init_a,
                         description="LoRA with ΔW = P_U B A P_V, orthogonal to W0's top-k singular subspaces",
                         check_shape=check_shape, write_extras=write_init_extras, extra_file=PROJECTIONS_FILE,
                         attach=attach_projections, bake=bake_projections, effective_factors=effective_factors))
