"""examples/hf_trainer.py (issue 26): LoRA-Null v2 through lnull.api inside transformers' Trainer on the real
SmolLM2-135M-Instruct (needs `lnull assets`); its initial adapter is the one `lnull init` builds from the same
statistics, training leaves the frozen A untouched, and the shipped LoRA loads on the original with plain PEFT."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

ASSETS = Path(os.environ.get("LNULL_ASSETS_CACHE") or Path.home() / ".cache" / "lnull")


@pytest.mark.slow
@pytest.mark.integration
def test_the_trainer_example_trains_lora_null_v2_from_lnull_inits(tmp_path):
    if not (ASSETS / "models" / "smollm2-135m-instruct" / "config.json").exists():
        pytest.skip("SmolLM2 asset not fetched (`lnull assets`)")
    env = {**os.environ, "LNULL_CACHE": str(ASSETS)}
    out = tmp_path / "example"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "hf_trainer.py"), "--out", str(out), "--steps",
                           "2", "--windows", "8", "--seqlen", "64"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from lnull.cli import compose
    from lnull.initialize import build

    cfg = compose(["+experiment=demo", "method=lora_null_v2", f"run.dir={tmp_path / 'run'}", "progress=false",
                   f"cache_dir={ASSETS}"])
    stage = tmp_path / "init"
    stage.mkdir()
    build(cfg, stage, out / "statistics")
    want = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    init = load_file(str(out / "init_adapter" / "adapter_model.safetensors"))
    trained = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sorted(init) == sorted(want)
    for key in want:
        assert torch.equal(init[key], want[key]), key
        if ".lora_A." in key:
            assert torch.equal(trained[key], init[key]), key  # v2: A frozen through Trainer
    assert any(not torch.equal(trained[k], init[k]) for k in init if ".lora_B." in k)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ASSETS / "models" / "smollm2-135m-instruct")
    loaded = PeftModel.from_pretrained(base, str(out / "lora_on_original"))
    assert {m.r["default"] for m in loaded.modules() if hasattr(m, "lora_A") and "default" in m.r} == {16}
