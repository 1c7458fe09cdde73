"""`lnull export`: the merged model and the LoRA adapter on the ORIGINAL model reproduce the trained model,
load with plain transformers/peft, and residual inits ship as rank-2r adapters (PEFT's PiSSA -> LoRA form)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import lnull
from lnull.cli import compose
from lnull.config import ConfigError
from lnull.cli import export_run
from lnull.export import PROBE
from lnull.residual import is_residual
from lnull.modeling import resolve_model
from lnull.pipeline import run_pipeline
from lnull.residual import load_residual_model
from lnull.tiny import TINY_ID

RANK, ALPHA = 4, 8
METHODS = {"lora_null_v1": True, "pissa": True, "lora": False, "oplora": False, "full": False}  # -> residual
ATOL = 1e-4  # fp32 logits; measured diffs are ~3e-7 (merge / conversion rounding only)


def _cfg(run_dir, method: str) -> dict:
    # as the `tiny_cfg` fixture (which is per test), with a larger lr so that 3 steps clearly move the adapter
    return compose(["+experiment=tiny", f"run.dir={run_dir}", "progress=false", "train.max_steps=3",
                    "train.lr=1e-2", f"method={method}", f"method.rank={RANK}", f"method.alpha={ALPHA}",
                    *(["method.k=8"] if method == "oplora" else [])])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{method: run dir} of trained and exported tiny runs."""
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for method in METHODS:
        cfg = _cfg(root / method, method)
        run_pipeline(cfg, stages=["calibrate", "init", "train"], log=lambda m: None)
        export_run(cfg, log=lambda m: None)
        out[method] = root / method
    return out


@pytest.fixture(scope="module")
def probe_ids():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(TINY_ID))(PROBE, return_tensors="pt")["input_ids"][:, :32]


@torch.no_grad()
def _logits(model, ids):
    return model.eval()(input_ids=ids).logits.float()


@torch.no_grad()
def _trained_logits(run_dir, ids):
    """The trained model as training left it: PeftModel(residual model, train/adapter), or train/model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if (run_dir / "train" / "model").exists():
        return _logits(AutoModelForCausalLM.from_pretrained(run_dir / "train" / "model", dtype=torch.float32), ids)
    base = load_residual_model(resolve_model(TINY_ID), run_dir / "init" / "adapter", "float32")
    model = PeftModel.from_pretrained(base, run_dir / "train" / "adapter")
    if (run_dir / "init" / "adapter" / "oplora_projections.safetensors").exists():
        from lnull.methods.oplora import attach_projections  # no-op on the baked adapter train/ writes

        attach_projections(model, run_dir / "init" / "adapter")
    return _logits(model, ids)


# Runs in a fresh interpreter with only transformers + peft: what a user without lnull does.
PLAIN_LOADER = r"""
import json, sys, torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM
spec, ids = json.loads(sys.argv[1]), torch.tensor([json.loads(sys.argv[2])])
out = {}
with torch.no_grad():
    for name, folders in spec.items():
        merged = AutoModelForCausalLM.from_pretrained(folders["merged"], dtype=torch.float32).eval()
        out[name + "/merged"] = merged(input_ids=ids).logits
        if folders["lora"]:
            original = PeftConfig.from_pretrained(folders["lora"]).base_model_name_or_path
            base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
            out[name + "/lora"] = PeftModel.from_pretrained(base, folders["lora"]).eval()(input_ids=ids).logits
assert not [m for m in sys.modules if m == "lnull" or m.startswith("lnull.")], "lnull was imported"
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def plain_logits(runs, probe_ids, tmp_path_factory):
    """Logits of every exported artefact, loaded in a subprocess that never imports lnull."""
    spec = {m: {"merged": str(d / "export" / "merged"),
                "lora": str(d / "export" / "lora_on_original") if m != "full" else None} for m, d in runs.items()}
    target = tmp_path_factory.mktemp("plain") / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOADER, json.dumps(spec), json.dumps(probe_ids[0].tolist()),
                           str(target)], cwd=target.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(target)


@pytest.mark.parametrize("method", list(METHODS))
def test_exported_models_reproduce_the_trained_logits(method, runs, plain_logits, probe_ids):
    from transformers import AutoModelForCausalLM

    trained = _trained_logits(runs[method], probe_ids)
    original = _logits(AutoModelForCausalLM.from_pretrained(resolve_model(TINY_ID), dtype=torch.float32), probe_ids)
    assert (trained - original).abs().max() > 100 * ATOL, "training did not move the model: the check is void"
    torch.testing.assert_close(plain_logits[f"{method}/merged"], trained, atol=ATOL, rtol=0)
    report = json.loads((runs[method] / "export" / "report.json").read_text())
    assert report["merged"]["max_abs_logit_diff"] < ATOL
    if method == "full":
        assert not (runs[method] / "export" / "lora_on_original").exists()
        return
    torch.testing.assert_close(plain_logits[f"{method}/lora"], trained, atol=ATOL, rtol=0)
    assert report["lora_on_original"]["max_abs_logit_diff"] < ATOL


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_lora_on_original_is_rank_2r_for_residual_inits_and_points_at_the_original(method, runs):
    folder = runs[method] / "export" / "lora_on_original"
    config = json.loads((folder / "adapter_config.json").read_text())
    residual = METHODS[method]
    rank = 2 * RANK if residual else RANK
    assert config["base_model_name_or_path"] == resolve_model(TINY_ID)
    assert config["r"] == rank
    assert config["lora_alpha"] / config["r"] == ALPHA / RANK  # same scale s as training
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a_keys = [k for k in tensors if ".lora_A." in k]
    assert a_keys and all(tensors[k].shape[0] == rank for k in a_keys)
    assert all(tensors[k.replace(".lora_A.", ".lora_B.")].shape[1] == rank for k in a_keys)
    report = json.loads((runs[method] / "export" / "report.json").read_text())
    assert report["residual"] is residual and report["lora_on_original"]["rank"] == rank
    assert is_residual(runs[method] / "init" / "adapter")[0] is residual


def test_residual_base_really_differs_from_the_original_only_for_residual_inits(runs):
    original = load_file(str(resolve_model(TINY_ID) + "/model.safetensors"))
    for method, residual in METHODS.items():
        adapter = runs[method] / "init" / "adapter"
        base = load_residual_model(resolve_model(TINY_ID), adapter if adapter.exists() else None, "float32")
        moved = max(float((base.state_dict()[k] - original[k]).abs().max()) for k in original)
        assert (moved > 1e-6) is residual, (method, moved)


@pytest.mark.parametrize("method", ["lora_null_v1", "pissa", "lora"])
def test_lnulls_lora_on_original_equals_peft_conversion(runs, method, tmp_path):
    """``lnull.residual.lora_on_original`` (what vLLM evaluation loads; no model needed) writes PEFT's own
    ``path_initial_model_for_weight_conversion`` result (export) tensor for tensor, for a residual init, and
    for a B0 = 0 init a rank-2r adapter whose extra half contributes nothing (B0 = 0)."""
    from lnull.residual import lora_on_original

    run = runs[method]
    ours_dir = lora_on_original(run / "train" / "adapter", run / "init" / "adapter", tmp_path / "converted",
                                resolve_model(TINY_ID))
    ours = load_file(str(ours_dir / "adapter_model.safetensors"))
    config = json.loads((ours_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2 * RANK, 2 * ALPHA)
    assert config["base_model_name_or_path"] == resolve_model(TINY_ID)
    if METHODS[method]:
        peft = load_file(str(run / "export" / "lora_on_original" / "adapter_model.safetensors"))
        assert ours.keys() == peft.keys()
        for key in peft:
            assert torch.equal(ours[key], peft[key]), key
    else:
        trained = load_file(str(run / "train" / "adapter" / "adapter_model.safetensors"))
        for key, value in ours.items():
            if ".lora_B." in key:
                assert torch.equal(value[:, :RANK], trained[key]) and not value[:, RANK:].any(), key


def test_export_is_cached_per_training_and_needs_train_first(runs, tmp_path):
    messages = []
    export_run(_cfg(runs["pissa"], "pissa"), log=messages.append)
    assert messages and "cached" in messages[0]
    cfg = _cfg(tmp_path / "untrained", "lora")
    run_pipeline(cfg, stages=["calibrate", "init"], log=lambda m: None)
    with pytest.raises(ConfigError, match="needs 'train' first"):
        export_run(cfg, log=lambda m: None)
    assert not (tmp_path / "untrained" / "export").exists()


def test_cli_export_stage_fails_with_one_line_before_training(tmp_path):
    proc = lnull("export", "+experiment=tiny", f"run.dir={tmp_path / 'empty'}", "progress=false")
    assert proc.returncode != 0
    assert "stage 'export' needs 'init' first" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
