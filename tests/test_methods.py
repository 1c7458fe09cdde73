"""Initialisation methods on CPU: the init invariant after a PEFT reload for every method, LoRA-Null's
null-space properties, frozen A in training, and agreement with PEFT's PiSSA and CorDA."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lnull.methods import REGISTRY
from lnull.methods.corda import init_corda_ipm, init_corda_kpm
from lnull.methods.linalg import RankDeficientWarning
from lnull.methods.lora_null import init_lora_null, null_basis
from lnull.methods.pissa import init_pissa

RANK, ALPHA = 4, 8
SCALE = ALPHA / RANK
METHODS = sorted(m for m in REGISTRY if m != "full")
EXPECTED_FROZEN = {"lora": [], "lora_fa": ["lora_A"], "pissa": [], "milora": [], "corda_kpm": [], "corda_ipm": [],
                   "lora_null_v1": [], "lora_null_v2": ["lora_A"]}
MODULE = "model.layers.1.mlp.down_proj"  # d_in 128: the widest input of the tiny model


def _cfg(root: Path, method: str) -> dict:
    from lnull.cli import compose

    return compose(["+experiment=tiny", f"run.dir={root / method}", "progress=false", f"method={method}",
                    f"method.rank={RANK}", f"method.alpha={ALPHA}"])


@pytest.fixture(scope="module")
def tiny_inits(tmp_path_factory):
    """``get(method) -> init dir`` (memoised) sharing one calibration; ``seconds`` records init times."""
    from lnull import calibrate, initialize

    root = tmp_path_factory.mktemp("methods")
    calib = root / "calibration"
    calib.mkdir()
    calibrate.collect_into(_cfg(root, "lora"), calib)
    done: dict[str, Path] = {}
    seconds: dict[str, float] = {}

    def get(method: str) -> Path:
        if method not in done:
            out = root / method / "init"
            out.mkdir(parents=True)
            start = time.perf_counter()
            initialize.build(_cfg(root, method), out, calib)
            seconds[method] = time.perf_counter() - start
            done[method] = out
        return done[method]
    return SimpleNamespace(get=get, root=root, calib=calib, seconds=seconds)


@pytest.fixture(scope="module")
def original():
    from lnull.modeling import load_model, resolve_model
    from lnull.tiny import TINY_ID

    return load_model(resolve_model(TINY_ID))


def _adapter(init_dir: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    weights = load_file(str(init_dir / "adapter" / "adapter_model.safetensors"))
    prefix = f"base_model.model.{module}"
    return weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"]


@pytest.mark.parametrize("method", METHODS)
def test_reload_reproduces_original_logits(method, tiny_inits, original):
    """The init folder holds the adapter and records only; the residual model rebuilt from the original weights
    (lnull.residual) plus the adapter gives the original outputs."""
    from peft import PeftModel

    from lnull.modeling import resolve_model, target_linears
    from lnull.residual import load_residual_model
    from lnull.tiny import TINY_ID

    init_dir = tiny_inits.get(method)
    assert not list(init_dir.glob("**/model*.safetensors"))  # no stored copy of the model
    residual = load_residual_model(resolve_model(TINY_ID), init_dir / "adapter", "float32")
    reloaded = PeftModel.from_pretrained(residual, init_dir / "adapter").eval()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - original(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4, f"{method}: max |logit diff| {diff:.2e}"

    linears = target_linears(original, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(linears) == 14
    for name, lin in linears.items():
        A, B = _adapter(init_dir, name)
        assert A.shape == (RANK, lin.in_features) and B.shape == (lin.out_features, RANK)
    config = json.loads((init_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    info = json.loads((init_dir / "adapter" / "lnull_method.json").read_text())
    assert info["frozen"] == EXPECTED_FROZEN.get(method, REGISTRY[method].frozen)
    assert info["scale"] == SCALE
    assert json.loads((init_dir / "report.json").read_text())["max_reconstruction_rel_err"] < 1e-6


def _inputs_of(model: torch.nn.Module, module: str, cfg: dict) -> torch.Tensor:
    """X [tokens, d_in] fp64: the inputs of ``module`` over the calibration windows of ``cfg``."""
    from lnull.calibrate import calibration_windows
    from lnull.data.sources import load_records
    from lnull.modeling import load_tokenizer, resolve_model

    cal = cfg["calibration"]
    tok = load_tokenizer(resolve_model(cfg["model"]["name_or_path"]))
    texts = [r[cal["field"]] for r in load_records(cal["dataset"], cfg.get("cache_dir"))]
    windows = calibration_windows(tok, texts, cal["samples"], cal["seqlen"], cal["seed"], cfg["model"]["add_bos"])
    rows = []
    handle = model.get_submodule(module).register_forward_hook(
        lambda m, i, o: rows.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    return torch.cat(rows).double()


# Ratio ||A X^T|| / ||A_rand X^T|| allowed per module: the random tiny model's down_proj inputs have a only
# moderately spread spectrum (measured ~0.10), o_proj inputs a clear near-null space (measured ~1.4e-3).
NULL_SPACE_RATIO = {MODULE: 0.2, "model.layers.1.self_attn.o_proj": 0.01}


@pytest.mark.parametrize("method", ["lora_null_v1", "lora_null_v2"])
def test_lora_null_adapter_lies_in_the_activation_null_space(method, tiny_inits, original):
    from lnull.activations import load_statistic

    init_dir = tiny_inits.get(method)
    covs = load_statistic(tiny_inits.calib)
    for module, bound in NULL_SPACE_RATIO.items():
        X = _inputs_of(original, module, _cfg(tiny_inits.root, method))
        C = covs[module]
        torch.testing.assert_close(C.double(), X.T @ X, rtol=1e-4, atol=1e-3)
        A, B = (t.double() for t in _adapter(init_dir, module))

        # A barely sees the calibration activations; a random A of the same norm sees them fully, and
        # exactly ||A X^T||^2 <= ||A||^2 lambda_r(C) (r-th smallest eigenvalue).
        A_rand = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        A_rand *= A.norm() / A_rand.norm()
        seen, seen_rand = (A @ X.T).norm() / X.norm(), (A_rand @ X.T).norm() / X.norm()
        assert seen < bound * seen_rand, f"{module}: {seen:.3e} vs random {seen_rand:.3e}"
        lam_r = torch.linalg.eigvalsh(X.T @ X)[RANK - 1]
        assert (A @ X.T).norm() ** 2 <= A.norm() ** 2 * lam_r * (1 + 1e-4)

        U = null_basis(C, RANK)
        assert (A - A @ U @ U.T).norm() / A.norm() < 1e-6  # rows of A in span(U_null)
        W0 = original.get_submodule(module).weight.detach().double()
        naive = W0 @ U @ U.T
        assert (SCALE * B @ A - naive).norm() / naive.norm() < 1e-5


@pytest.mark.parametrize("method", ["lora_fa", "lora_null_v2"])
def test_frozen_a_is_unchanged_by_an_optimiser_step(method, tiny_inits):
    from lnull.modeling import resolve_model
    from lnull.tiny import TINY_ID
    from lnull.training.model import load_trainable

    model, info = load_trainable(tiny_inits.get(method), resolve_model(TINY_ID), "float32")
    assert info["frozen"] == ["lora_A"]
    model.train()
    named = dict(model.named_parameters())
    a_name = next(n for n in named if n.endswith(f"{MODULE}.lora_A.default.weight"))
    b_name = a_name.replace("lora_A", "lora_B")
    before_a, before_b = named[a_name].detach().clone(), named[b_name].detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(named[a_name].detach(), before_a)
    assert not torch.equal(named[b_name].detach(), before_b)


def _one_linear(d_in: int = 48, d_out: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(d_in, d_out, bias=False))
    return model.eval()


def _peft_delta(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale * B @ A, residual, A, B) of PEFT's adapter on ``lin``."""
    layer = model.base_model.model.lin
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    return layer.scaling["default"] * B @ A, layer.base_layer.weight.detach(), A, B


def test_pissa_matches_peft():
    from peft import LoraConfig, get_peft_model

    model = _one_linear()
    W0 = model.lin.weight.detach().clone()
    ours = init_pissa(W0, None, RANK, SCALE, None)
    peft = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin"],
                                            init_lora_weights="pissa"))
    delta, residual, A, B = _peft_delta(peft)
    # PEFT's fp32 SVD vs our fp64: products agree to fp32 round-off; factors up to a sign per rank-1 pair.
    torch.testing.assert_close(SCALE * ours.B @ ours.A, delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.residual, residual, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.A.abs(), A.abs(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.B.abs(), B.abs(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_corda_matches_peft(mode):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    d_in = 48
    gen = torch.Generator().manual_seed(1)
    # Anisotropic inputs (a decaying spectrum), 8 samples of 40 tokens, fed one sample at a time as PEFT expects.
    samples = [torch.randn(1, 40, d_in, generator=gen) * torch.logspace(0, -2, d_in) for _ in range(8)]
    model = _one_linear(d_in)
    W0 = model.lin.weight.detach().clone()
    # PEFT's hook: each sample divided by max(x).abs(), x^T x summed, then averaged over samples.
    C = sum((s[0] / s.max().abs()).T @ (s[0] / s.max().abs()) for s in samples) / len(samples)
    init = init_corda_kpm if mode == "kpm" else init_corda_ipm
    ours = init(W0, C, RANK, SCALE, SimpleNamespace(damping=0.01))  # PEFT's hard-coded starting damp

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin"], init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(model, config, run_model=lambda: [model(s) for s in samples])
    delta, residual, _, _ = _peft_delta(get_peft_model(model, config))
    # PEFT runs inv/SVD in fp32 (condition number of C_fix up to ~1e2 * d_in here): relative 1e-4.
    scale = delta.abs().max()
    torch.testing.assert_close(SCALE * ours.B @ ours.A, delta, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(ours.residual, residual, rtol=0, atol=1e-4 * W0.abs().max())


def test_rank_deficient_covariance_is_deterministic_and_warns():
    gen = torch.Generator().manual_seed(4)
    W0 = torch.randn(32, 48, generator=gen)
    v = torch.randn(48, 1, generator=gen, dtype=torch.float64)
    C = v @ v.T  # effective rank 1: 47 (tied) zero eigenvalues
    cfg = SimpleNamespace(seed=0)
    with pytest.warns(RankDeficientWarning, match="covariance has 47 eigenvalues below its torch.float64 noise floor"):
        first = init_lora_null(W0, C, RANK, SCALE, cfg)
    with pytest.warns(RankDeficientWarning):
        second = init_lora_null(W0, C, RANK, SCALE, cfg)
    for t in (first.A, first.B, first.residual):
        assert torch.isfinite(t).all()
    assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        U1, U2 = null_basis(C, RANK), null_basis(C.clone(), RANK)
    assert torch.equal(U1, U2)
    assert (C @ U1).norm() < 1e-10 * C.norm()
    torch.testing.assert_close(first.residual + SCALE * first.B @ first.A, W0, rtol=0, atol=1e-5)
    for init in (init_corda_kpm, init_corda_ipm):  # damping keeps CorDA finite on the same C
        corda = init(W0, C, RANK, SCALE, SimpleNamespace(damping=1e-6))
        assert all(torch.isfinite(t).all() for t in (corda.A, corda.B, corda.residual))
    # Full-rank C: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficientWarning)
        X = torch.randn(200, 48, generator=gen, dtype=torch.float64)
        init_lora_null(W0, X.T @ X, RANK, SCALE, cfg)


def test_init_times_are_small(tiny_inits):
    for method in METHODS:
        tiny_inits.get(method)
    print({m: round(s, 2) for m, s in tiny_inits.seconds.items()})
    assert all(s < 30 for s in tiny_inits.seconds.values())
