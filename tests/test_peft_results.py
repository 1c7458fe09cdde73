"""A tiny lnull run written in PEFT method_comparison's result-JSON layout (lnull.peft_results)."""
from __future__ import annotations

import json

import pytest

from lnull.errors import ConfigError
from lnull.peft_results import (FINAL_KEYS, PEFT_KEYS, STEP_KEYS, SYSTEM_KEYS, TRAIN_CONFIG_KEYS, peft_result_json,
                                write_peft_result)
from lnull.pipeline import run_pipeline

# Keys of PEFT's own result file (method_comparison/MetaMathQA/results/lora--llama-3.2-3B-rank32.json at peft
# 5d602fd; run_info.peft_worktree_is_dirty is written by log_results since that file was made).
PEFT_FILE_KEYS = {
    "run_info": {"created_at", "total_time", "experiment_name", "peft_branch", "peft_worktree_is_dirty",
                 "train_config", "peft_config", "error_msg"},
    "train_info": {"accelerator_memory_reserved_avg", "accelerator_memory_max", "accelerator_memory_reserved_99th",
                   "train_time", "file_size", "num_trainable_params", "num_total_params", "status", "metrics"},
    "meta_info": {"model_info", "dataset_info", "package_info", "system_info", "pytorch_info"},
}
PACKAGE_KEYS = {f"{p}-{what}" for p in ("transformers", "peft", "datasets", "bitsandbytes", "torch")
                for what in ("version", "commit-hash")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run, base and trained scored on synthetic facts, the held-out task and a text_nll benchmark."""
    from lnull.cli import compose

    tmp = tmp_path_factory.mktemp("peft-results")
    texts = tmp / "texts.jsonl"
    texts.write_text("".join(json.dumps({"passage": f"the capital of kalo number {i} is mivor ."}) + "\n"
                             for i in range(4)))
    cfg = compose(["+experiment=tiny", f"run.dir={tmp / 'run'}", "progress=false", "train.max_steps=3",
                   "eval=[synthetic,heldout,forgetting]", f"eval.benchmarks.wiki_text.dataset={texts}",
                   "eval.limit=4"])
    run_pipeline(cfg, log=lambda _: None)
    return tmp / "run"


def test_a_tiny_run_has_exactly_peft_keys(tiny_run):
    out = peft_result_json(tiny_run)
    assert set(out) == set(PEFT_KEYS) == set(PEFT_FILE_KEYS)
    for section, keys in PEFT_FILE_KEYS.items():
        assert set(out[section]) == keys == set(PEFT_KEYS[section])
    run_info, train_info, meta = out["run_info"], out["train_info"], out["meta_info"]
    assert set(run_info["train_config"]) == set(TRAIN_CONFIG_KEYS)
    assert set(meta["package_info"]) == PACKAGE_KEYS
    assert set(meta["system_info"]) == set(SYSTEM_KEYS)
    assert set(meta["model_info"]) == {"sha", "created_at"}
    assert all(set(v) == {"sha", "created_at"} for v in meta["dataset_info"].values())
    *steps, final = train_info["metrics"]
    assert len(steps) == 3 and all(set(s) == set(STEP_KEYS) for s in steps)
    assert set(final) == set(FINAL_KEYS)


def test_a_tiny_run_fills_what_lnull_knows_and_nulls_the_rest(tiny_run):
    out = peft_result_json(tiny_run)
    run_info, train_info, meta = out["run_info"], out["train_info"], out["meta_info"]
    assert train_info["status"] == "success" and run_info["error_msg"] == ""
    assert run_info["peft_config"]["peft_type"] == "LORA" and run_info["peft_config"]["r"] == 4
    assert run_info["train_config"]["max_steps"] == 3 and run_info["train_config"]["optimizer_type"] == "AdamW"
    assert train_info["num_trainable_params"] > 0 and train_info["file_size"] > 0
    assert train_info["accelerator_memory_max"] is None and train_info["num_total_params"] is None
    assert run_info["peft_branch"] is None and meta["pytorch_info"] is None
    assert meta["package_info"]["torch-version"] and meta["package_info"]["torch-commit-hash"] is None
    *steps, final = train_info["metrics"]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(s["valid accuracy"] is None for s in steps)
    assert final["train loss"] == steps[-1]["train loss"] and final["train samples"] == 3 * 8
    assert 0.0 <= final["test accuracy"] <= 1.0  # PEFT's fractions, from the held-out exact match in %
    assert isinstance(final["forgetting"], float)  # trained - base pooled NLL per token of the 4 texts
    assert run_info["total_time"] > 0 and run_info["created_at"]


def test_written_file_round_trips(tiny_run, tmp_path):
    path = write_peft_result(tiny_run, tmp_path / "tiny--lora.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(peft_result_json(tiny_run)))


def test_a_folder_that_is_no_trained_run_is_one_error(tmp_path):
    with pytest.raises(ConfigError, match="not an lnull run folder"):
        peft_result_json(tmp_path)
    (tmp_path / "config.yaml").write_text("experiment: x\n")
    with pytest.raises(ConfigError, match="no complete train stage"):
        peft_result_json(tmp_path)


def test_cli_writes_a_runs_peft_json_and_refuses_a_folder_that_is_no_run(tiny_run, tmp_path):
    from conftest import lnull

    out = lnull("peft-json", str(tiny_run), "-o", str(tmp_path / "x.json"), check=True)
    assert out.stdout.strip() == str(tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == json.loads(json.dumps(peft_result_json(tiny_run)))
    bad = lnull("peft-json", str(tmp_path))
    assert bad.returncode != 0 and "not an lnull run folder" in bad.stderr and len(bad.stderr.splitlines()) == 1
