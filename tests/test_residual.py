"""The residual model is rebuilt on load, never stored (lnull.residual): W_res = (W0 - s B0 A0) in fp32, cast to
model.dtype; bit-equal on every load; modules with B0 = 0 and full fine-tuning keep W0; an init writes no model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lnull import initialize
from lnull.modeling import DTYPES, load_model, original_path
from lnull.residual import initial_factors, load_residual_model


@pytest.fixture
def pissa_init(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method=pissa", "method.rank=4", "method.alpha=8", "model.dtype=bfloat16")
    out = tmp_path / "init"
    out.mkdir()
    initialize.build(cfg, out, None)
    return cfg, out


def test_the_residual_is_w0_minus_s_b0_a0_in_fp32_cast_to_model_dtype(pissa_init):
    cfg, init = pissa_init
    original = load_model(original_path(cfg), "bfloat16")
    rebuilt = load_residual_model(original_path(cfg), init / "adapter", "bfloat16")
    again = load_residual_model(original_path(cfg), init / "adapter", "bfloat16")
    factors, scale = initial_factors(init / "adapter")
    assert scale == 2.0 and len(factors) == 14  # every targeted module of the tiny model moved weight (PiSSA)
    for name, (A, B) in factors.items():
        W0 = original.get_submodule(name).weight
        want = (W0.float() - scale * (B.float() @ A.float())).to(DTYPES["bfloat16"])
        got = rebuilt.get_submodule(name).weight
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name
        assert torch.equal(got, again.get_submodule(name).weight)  # every load is bit-equal (resume)
        assert not torch.equal(got, W0)
    untouched = [n for n, _ in original.named_parameters() if n.removesuffix(".weight") not in factors]
    assert untouched and all(torch.equal(rebuilt.get_parameter(n), original.get_parameter(n)) for n in untouched)


def test_inits_store_no_model_and_zero_b0_modules_keep_w0(tiny_cfg, tmp_path):
    for method in ("lora", "full"):
        cfg = tiny_cfg(f"method={method}")
        out = tmp_path / method
        out.mkdir()
        initialize.build(cfg, out, None)
        files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        assert not any(f.endswith(".safetensors") and not f.startswith("adapter/") for f in files), files
        if method == "full":
            assert files == {"lnull_method.json", "report.json"}
            continue
        assert initial_factors(out / "adapter")[0] == {}  # B0 = 0: nothing to subtract
        original = load_model(original_path(cfg))
        rebuilt = load_residual_model(original_path(cfg), out / "adapter", "float32")
        assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), rebuilt.state_dict().values()))
        saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == saved[
            next(k for k in saved if ".lora_A." in k)].shape[0]
