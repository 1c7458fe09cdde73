"""OPLoRA on the tiny CPU model: init invariant, exact preservation of W0's top-k singular triples under the
projection hooks (and its failure for plain LoRA), ρ_k, baking into a plain PEFT adapter, bad k."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lnull.config import ConfigError
from lnull.methods.linalg import svd64
from lnull.analysis import rho_k
from lnull.methods.oplora import (PROJECTIONS_FILE, attach_projections, bake_projections, init_oplora,
                                  load_projections)

RANK, K = 4, 8
IDS = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(2))


def _cfg(root: Path, *extra: str) -> dict:
    from lnull.cli import compose

    return compose(["+experiment=tiny", f"run.dir={root}", "progress=false", "method=oplora",
                    f"method.rank={RANK}", f"method.k={K}", *extra])


@pytest.fixture(scope="module")
def original():
    from lnull.modeling import load_model, resolve_model
    from lnull.tiny import TINY_ID

    return load_model(resolve_model(TINY_ID)).eval()


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, original) -> Path:
    from lnull import initialize

    root = tmp_path_factory.mktemp("oplora")
    out = root / "init"
    out.mkdir()
    initialize.build(_cfg(root), out, None)
    return out


def _load(init_dir: Path, adapter: Path | None = None, trainable: bool = False):
    from peft import PeftModel

    from lnull.modeling import resolve_model
    from lnull.residual import load_residual_model
    from lnull.tiny import TINY_ID

    base = load_residual_model(resolve_model(TINY_ID), init_dir / "adapter", "float32")
    return PeftModel.from_pretrained(base, adapter or init_dir / "adapter", is_trainable=trainable).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _w0(original, name: str) -> torch.Tensor:
    return original.get_submodule(name).weight.detach()


def _randomise(model, names, seed: int = 0) -> None:
    """A ~ N(0, 1/d_in), B ~ N(0, 1/r): s B A of the order of W0, so fp32 probe errors stay small."""
    gen = torch.Generator().manual_seed(seed)
    root = model.base_model.model
    with torch.no_grad():
        for name in names:
            layer = root.get_submodule(name)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(torch.randn(A.shape, generator=gen) / A.shape[1] ** 0.5)
            B.copy_(torch.randn(B.shape, generator=gen) / RANK ** 0.5 * 0.1)


def _effective_weight(model, name: str) -> torch.Tensor:
    """W_eff [d_out, d_in] of the PEFT layer, probed with the identity (bias removed)."""
    layer = model.base_model.model.get_submodule(name)
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        out = layer(eye) - layer(torch.zeros(1, layer.in_features))
    return out.T.double()


def _triple_errors(W0: torch.Tensor, W_eff: torch.Tensor) -> SimpleNamespace:
    """Relative errors of U_kᵀ W V_k = S_k, U_kᵀ W = S_k V_kᵀ, W V_k = U_k S_k (W0's fp64 SVD)."""
    U, S, Vh = svd64(W0)
    Uk, Sk, Vk = U[:, :K], S[:K], Vh[:K].T
    norm = Sk.norm()
    return SimpleNamespace(core=float((Uk.T @ W_eff @ Vk - torch.diag(Sk)).norm() / norm),
                           left=float((Uk.T @ W_eff - Sk[:, None] * Vk.T).norm() / norm),
                           right=float((W_eff @ Vk - Uk * Sk).norm() / norm))


def test_init_reproduces_original_logits(init_dir, original):
    from lnull.modeling import target_linears

    assert (init_dir / "adapter" / PROJECTIONS_FILE).exists()
    reference = _logits(original)
    assert (_logits(_load(init_dir)) - reference).abs().max() <= 1e-4
    hooked = _load(init_dir)
    attach_projections(hooked, init_dir / "adapter")
    assert (_logits(hooked) - reference).abs().max() <= 1e-4

    projections = load_projections(init_dir / "adapter")
    linears = target_linears(original, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert set(projections) == set(linears)
    for name, (U_k, V_k) in projections.items():
        U, _, Vh = svd64(_w0(original, name))
        assert U_k.dtype == torch.float32 and U_k.shape == (linears[name].out_features, K)
        assert V_k.shape == (linears[name].in_features, K)
        assert torch.allclose(U_k.double(), U[:, :K], atol=1e-6) and torch.allclose(V_k.double(), Vh[:K].T, atol=1e-6)


def test_projected_update_keeps_top_k_singular_triples(init_dir, original):
    model = _load(init_dir)
    names = list(load_projections(init_dir / "adapter"))
    handles = attach_projections(model, init_dir / "adapter")
    _randomise(model, names)
    worst, worst_rho = 0.0, 0.0
    for name in names:
        W0, W_eff = _w0(original, name), _effective_weight(model, name)
        assert (W_eff - W0.double()).norm() > 0.05 * W0.norm()  # a real update
        err = _triple_errors(W0, W_eff)
        worst = max(worst, err.core, err.left, err.right)
        worst_rho = max(worst_rho, rho_k(W0, W_eff, K))
    assert worst <= 1e-5, f"top-k singular triples moved: rel err {worst:.2e}"
    assert worst_rho <= 1e-6, f"rho_k {worst_rho:.2e}"

    for handle in handles:  # the same A, B as a plain LoRA update
        handle.remove()
    for name in names:
        W0, W_eff = _w0(original, name), _effective_weight(model, name)
        err = _triple_errors(W0, W_eff)
        assert min(err.core, err.left, err.right) > 1e-2, f"{name}: plain LoRA kept the triples ({err})"
        assert rho_k(W0, W_eff, K) > 1e-2


def test_rho_k_definition():
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(24, 16, generator=gen)
    U, _, _ = svd64(W0)
    inside = U[:, :K] @ torch.randn(K, 16, generator=gen).double()
    outside = U[:, K:] @ torch.randn(16 - K, 16, generator=gen).double()
    assert abs(rho_k(W0, W0 + inside, K) - 1) < 1e-9
    assert rho_k(W0, W0 + outside, K) < 1e-9
    mixed = rho_k(W0, W0 + inside + outside, K)
    assert abs(mixed - inside.pow(2).sum() / (inside + outside).pow(2).sum()) < 1e-9
    assert rho_k(W0, W0, K) == 0.0


def test_gradients_stay_in_complement(init_dir):
    model = _load(init_dir, trainable=True).train()
    projections = load_projections(init_dir / "adapter")
    attach_projections(model, init_dir / "adapter")
    _randomise(model, projections, seed=1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    root = model.base_model.model
    for name, (U_k, V_k) in projections.items():
        layer = root.get_submodule(name)
        gA, gB = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        assert gA.norm() > 0 and gB.norm() > 0
        assert (gA @ V_k).norm() <= 1e-5 * gA.norm() and (U_k.T @ gB).norm() <= 1e-5 * gB.norm()


def test_bake_gives_plain_peft_adapter(init_dir, original, tmp_path):
    model = _load(init_dir)
    projections = load_projections(init_dir / "adapter")
    attach_projections(model, init_dir / "adapter")
    _randomise(model, projections, seed=2)
    hooked = _logits(model)
    assert (hooked - _logits(original)).abs().max() > 1e-3  # the update matters
    bake_projections(model, init_dir / "adapter")
    assert (_logits(model) - hooked).abs().max() <= 1e-5
    root = model.base_model.model
    for name, (U_k, V_k) in projections.items():
        layer = root.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert (A @ V_k).abs().max() <= 1e-6 and (U_k.T @ B).abs().max() <= 1e-6
        assert not layer.lora_A["default"]._forward_pre_hooks and not layer.lora_B["default"]._forward_hooks

    model.save_pretrained(tmp_path / "baked")
    assert not (tmp_path / "baked" / PROJECTIONS_FILE).exists()
    reloaded = _load(init_dir, tmp_path / "baked")
    assert (_logits(reloaded) - hooked).abs().max() <= 1e-5
    attach_projections(reloaded, init_dir / "adapter")  # idempotent on a baked adapter
    assert (_logits(reloaded) - hooked).abs().max() <= 1e-5


def test_k_plus_rank_too_large(tmp_path):
    from lnull import initialize

    cfg = _cfg(tmp_path, "method.k=30")  # k_proj is 32 x 64: 30 + 4 > 32
    out = tmp_path / "init"
    out.mkdir()
    with pytest.raises(ConfigError, match=r"k=30 \+ r=4"):
        initialize.build(cfg, out, None)
    with pytest.raises(ConfigError, match=r"k=30 \+ r=4"):
        init_oplora(torch.zeros(32, 64), None, RANK, 1.0, SimpleNamespace(k=30, seed=0))


def test_oplora_trained_adapter_preserves_top_k_through_the_pipeline(tmp_path):
    """End to end: train with the projections attached, save baked; plain PEFT loading keeps W0's top-k."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lnull.cli import compose
    from lnull.modeling import load_model, resolve_model
    from lnull.pipeline import run_pipeline
    from lnull.tiny import TINY_ID

    cfg = compose(["+experiment=tiny", f"run.dir={tmp_path}", "progress=false", "method=oplora", "method.rank=4",
                   "method.k=8", "train.max_steps=3", "train.lr=0.05", "eval.models=[trained]", "eval.limit=2"])
    run_pipeline(cfg, log=lambda m: None)
    original = load_model(resolve_model(TINY_ID))
    adapter = tmp_path / "train" / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == resolve_model(TINY_ID)  # OPLoRA's residual is W0: the adapter goes on the original as it is
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recorded), adapter).merge_and_unload()
    name = "model.layers.0.mlp.down_proj"
    W0 = original.get_submodule(name).weight.detach().double()
    W = trained.get_submodule(name).weight.detach().double()
    assert (W - W0).norm() / W0.norm() > 1e-3, "training did not move the weights"
    assert rho_k(W0, W, 8) < 1e-8
    assert json.loads((tmp_path / "init" / "adapter" / "lnull_method.json").read_text())["method"] == "oplora"
