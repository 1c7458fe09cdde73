"""vLLM's LoRA format rules (lnull.serving), checked on hand-written adapter folders and on a tiny exported run."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lnull.config import ConfigError
from lnull.serving import VLLM_MAX_LORA_RANKS, adapter_rank, check_vllm_adapter, vllm_max_lora_rank, vllm_report

R, D = 4, 16
PREFIX = "base_model.model.model.layers.0."
GOOD_CONFIG = {"peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": ["q_proj", "v_proj", "down_proj"],
               "bias": "none", "modules_to_save": None, "use_dora": False, "use_rslora": False,
               "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
               "base_model_name_or_path": "some/llama"}


def _tensors(rank: int = R, modules=("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")) -> dict:
    out = {}
    for m in modules:
        out[f"{PREFIX}{m}.lora_A.weight"] = torch.zeros(rank, D)
        out[f"{PREFIX}{m}.lora_B.weight"] = torch.zeros(D, rank)
    return out


def _adapter(folder, config=None, tensors=None, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(GOOD_CONFIG if config is None else config, **changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(_tensors() if tensors is None else tensors, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return folder


def test_rank_rounds_up_to_the_next_value_vllm_accepts():
    assert VLLM_MAX_LORA_RANKS == (8, 16, 32, 64, 128, 256, 320, 512)
    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 58, 116, 128, 129, 300, 320, 321, 512)] == \
        [8, 8, 16, 64, 128, 128, 256, 320, 320, 512, 512]
    with pytest.raises(ConfigError, match="above vLLM's largest max_lora_rank 512"):
        vllm_max_lora_rank(513)
    with pytest.raises(ConfigError, match="not a positive integer"):
        vllm_max_lora_rank(0)


def test_a_plain_lora_passes(tmp_path):
    folder = _adapter(tmp_path / "good")
    assert check_vllm_adapter(folder) == []
    assert vllm_report(folder) == {"max_lora_rank": 8, "problems": []}
    # gate/up and q/k/v are packed by vLLM itself; embeddings use lora_embedding_A/B; rsLoRA is honoured
    tensors = _tensors(modules=("self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(R, 32)
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(D, R)
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(R, D).bfloat16()
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(32, R).bfloat16()
    assert check_vllm_adapter(_adapter(tmp_path / "wide", tensors=tensors, use_rslora=True,
                                       init_lora_weights="gaussian")) == []


@pytest.mark.parametrize("changes, expected", [
    ({"bias": "all"}, "bias: 'all'; vLLM supports only 'none'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save: ['lm_head']; vLLM supports only none for a causal LM"),
    ({"use_dora": True}, "use_dora: true; vLLM does not support DoRA"),
    ({"lora_bias": True}, "lora_bias: true; vLLM does not support LoRA bias"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out: true; vLLM ignores it"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights: 'pissa' changes the base weights"),
    ({"layer_replication": [[0, 1]]}, "layer_replication: set; vLLM does not support layer_replication"),
    ({"trainable_token_indices": [5]}, "trainable_token_indices: set; vLLM does not support trainable tokens"),
    ({"peft_type": "ADALORA"}, "peft_type: 'ADALORA' is not a LoRA"),
    ({"r": 0}, "r: 0 is not a positive integer"),
    ({"alpha_pattern": {"q_proj": 2 * R * 3}},
     "model.layers.0.self_attn.q_proj: PEFT scales it by 6 (rank_pattern / alpha_pattern) but vLLM <= 0.11"),
    ({"rank_pattern": {"v_proj": 2}}, "model.layers.0.self_attn.v_proj: tensors have rank 4, the config says 2"),
])
def test_each_violation_is_one_line_naming_the_field(tmp_path, changes, expected):
    problems = check_vllm_adapter(_adapter(tmp_path / "bad", **changes))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_missing_fields_keys_modules_and_shapes_are_named(tmp_path):
    config = {k: v for k, v in GOOD_CONFIG.items() if k != "target_modules"}
    assert check_vllm_adapter(_adapter(tmp_path / "fields", config=config)) == \
        ["adapter_config.json: missing required field(s) target_modules (vLLM's PEFTHelper needs them)"]

    tensors = _tensors()
    tensors[f"{PREFIX}self_attn.q_proj.lora_B.bias"] = torch.zeros(D)  # PEFT's lora_bias
    (problem,) = check_vllm_adapter(_adapter(tmp_path / "key", tensors=tensors))
    assert problem.startswith("adapter_model.safetensors: tensor base_model.model.model.layers.0.self_attn.q_proj."
                              "lora_B.bias is not a LoRA weight vLLM parses"), problem

    (problem,) = check_vllm_adapter(_adapter(tmp_path / "module", tensors=_tensors(modules=("mlp.dense",))))
    assert problem.startswith("model.layers.0.mlp.dense: vLLM loads no LoRA into 'dense'"), problem

    tensors = _tensors()
    tensors[f"{PREFIX}mlp.down_proj.lora_B.weight"] = torch.zeros(D, R + 1)
    (problem,) = check_vllm_adapter(_adapter(tmp_path / "shape", tensors=tensors))
    assert problem.startswith("model.layers.0.mlp.down_proj: lora_A [4, 16] and lora_B [16, 5]"), problem

    tensors = _tensors()
    del tensors[f"{PREFIX}mlp.down_proj.lora_B.weight"]
    assert check_vllm_adapter(_adapter(tmp_path / "half", tensors=tensors)) == \
        ["model.layers.0.mlp.down_proj: has lora_A without its lora_B"]

    folder = _adapter(tmp_path / "vocab")
    (folder / "new_embeddings.safetensors").write_bytes(b"")
    assert check_vllm_adapter(folder) == \
        ["new_embeddings.safetensors: extra vocabulary is deprecated in vLLM 0.11 and removed in 0.12"]

    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(GOOD_CONFIG))
    assert check_vllm_adapter(folder) == ["adapter_model.safetensors: missing (this check reads only safetensors)"]
    assert check_vllm_adapter(tmp_path / "nothing")[0].startswith("adapter_config.json: cannot be read")


def test_rank_above_512_cannot_be_served(tmp_path):
    folder = _adapter(tmp_path / "huge", tensors=_tensors(rank=520, modules=("self_attn.q_proj",)), r=520,
                      lora_alpha=1040)
    assert check_vllm_adapter(folder) == [
        "r: rank 520 is above vLLM's largest max_lora_rank 512; vLLM cannot serve this adapter",
        "model.layers.0.self_attn.q_proj: rank 520 is above vLLM's largest max_lora_rank 512"]
    assert vllm_report(folder)["max_lora_rank"] is None
    # a rank-2r conversion of r = 58 is served with max_lora_rank 128
    folder = _adapter(tmp_path / "r116", tensors=_tensors(rank=116), r=116, lora_alpha=232)
    assert adapter_rank(folder) == 116 and vllm_report(folder) == {"max_lora_rank": 128, "problems": []}


def test_exported_lora_null_adapter_loads_under_vllms_rules(tmp_path):
    """`lnull export` of a tiny LoRA-Null run: lora_on_original/ (rank 2r, residual conversion) and the trained
    adapter a non-residual method ships as is both pass, and the report says which max_lora_rank serves it."""
    from lnull.cli import compose, export_run
    from lnull.pipeline import run_pipeline

    cfg = compose(["+experiment=tiny", f"run.dir={tmp_path / 'run'}", "progress=false", "train.max_steps=1",
                   "method=lora_null_v1", f"method.rank={R}", f"method.alpha={2 * R}"])
    run_pipeline(cfg, stages=["calibrate", "init", "train"], log=lambda m: None)
    export_run(cfg, log=lambda m: None)
    export = tmp_path / "run" / "export"
    assert check_vllm_adapter(export / "lora_on_original") == []
    assert check_vllm_adapter(tmp_path / "run" / "train" / "adapter") == []
    report = json.loads((export / "report.json").read_text())["lora_on_original"]
    assert report["rank"] == 2 * R and report["vllm"] == {"max_lora_rank": vllm_max_lora_rank(2 * R), "problems": []}
