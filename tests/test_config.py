"""Config composition: every experiment composes and validates; keys are strict; run dirs are stable."""
from __future__ import annotations

from pathlib import Path

import pytest

from lnull.cli import CONFIG_DIR, compose
from lnull.config import ConfigError
from lnull.layout import default_run_dir
from lnull.stages import StageKeys

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_experiments_exist():
    assert {"tiny", "demo", "math_llama2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_with_public_keys(name):
    cfg = compose([f"+experiment={name}"])
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    if "sweeper:" in text:  # a multirun file: its runs belong to the experiment it sweeps
        base = text.split("defaults:")[1].split("- ")[1].split()[0]
        assert cfg["experiment"] == base
    else:
        assert cfg["experiment"] == name
    assert cfg["method"]["rank"] >= 1 and cfg["calibration"]["samples"] >= 1 and cfg["calibration"]["seqlen"] > 1
    assert cfg["model"]["name_or_path"]
    assert "dir" in cfg["run"]


def test_every_yaml_starts_with_a_comment_giving_a_command():
    for path in CONFIG_DIR.rglob("*.yaml"):
        first = path.read_text().splitlines()[0]
        if first.startswith("# @package"):
            first = path.read_text().splitlines()[1]
        assert first.startswith("#") and ("lnull" in first or "make" in first), path


@pytest.mark.parametrize("override", ["method.rnak=3", "calibration.sampels=3", "model.nme=x", "nope=1"])
def test_misspelt_key_is_an_error(override):
    with pytest.raises(Exception, match=override.split("=")[0].split(".")[-1]):
        compose(["+experiment=tiny", override])


def test_cross_field_error_names_the_value():
    with pytest.raises(ConfigError, match="'bogus'"):
        compose(["+experiment=tiny", "method.name=bogus"])


def test_run_dir_is_stable_and_ignores_eval_and_run_keys(tmp_path):
    a = compose(["+experiment=tiny"])
    b = compose(["+experiment=tiny", "eval.limit=3", "progress=false"])
    c = compose(["+experiment=tiny", "method.rank=8"])
    assert default_run_dir(a) == default_run_dir(b)
    assert default_run_dir(a) != default_run_dir(c)
    assert Path(default_run_dir(a)).parent.name == "tiny" and Path(default_run_dir(a)).name.startswith("lora-r4-")


def test_run_folder_is_experiment_method_rank_and_a_hash_of_the_stage_keys(tmp_path):
    """`<run.root>/<experiment>/<method>-r<rank>-<hash>` (full fine-tuning: no rank); a knob that enters no stage
    key does not move it, one that enters a key does, exactly when the stage keys move."""
    import re

    from lnull.stages import StageKeys

    base = ["+experiment=tiny", f"run.root={tmp_path}"]
    lora = default_run_dir(compose(base))
    assert lora.parent == tmp_path / "tiny" and re.fullmatch(r"lora-r4-[0-9a-f]{8}", lora.name), lora
    assert re.fullmatch(r"full-[0-9a-f]{8}", default_run_dir(compose([*base, "method=full"])).name)
    assert re.fullmatch(r"lora_null_v1-r16-[0-9a-f]{8}",
                        default_run_dir(compose([*base, "method=lora_null_v1", "method.rank=16"])).name)

    def keys(cfg: dict) -> tuple:
        k = StageKeys(cfg)
        return k["calibrate"], k["init"], k["train"]

    for method in ("lora", "lora_null_v1"):
        ref = compose([*base, f"method={method}"])
        for knob in ("train.log_every=5", "train.checkpoint_every=3", "train.wandb=offline",
                     "calibration.device_budget_gb=1", "eval.limit=2", "progress=false",
                     "calibration.samples=8", "train.lr=0.1", "method.rank=8", "task.max_examples=16", "model.dtype=bfloat16"):
            other = compose([*base, f"method={method}", knob])
            used = slice(0 if method == "lora_null_v1" else 1, 3)  # lora reads no calibration: its key is unused
            same_keys = keys(ref)[used] == keys(other)[used]
            assert (default_run_dir(ref) == default_run_dir(other)) == same_keys, (method, knob)
            if knob.startswith(("train.log_every", "train.checkpoint_every")):
                assert same_keys, knob


def test_keys_chain_so_a_change_invalidates_later_stages_only():
    a = StageKeys(compose(["+experiment=tiny", "method=lora_null_v1"]))
    b = StageKeys(compose(["+experiment=tiny", "method=lora_null_v1", "train.lr=0.1"]))
    c = StageKeys(compose(["+experiment=tiny", "method=lora_null_v1", "calibration.samples=8"]))
    assert a["calibrate"] == b["calibrate"] and a["init"] == b["init"]
    assert a["train"] != b["train"] and a["export"] != b["export"] and a["evaluate"] != b["evaluate"]
    assert a["calibrate"] != c["calibrate"] and a["init"] != c["init"] and a["train"] != c["train"]


def test_keys_hash_exactly_what_a_stage_reads():
    base = ["+experiment=tiny", "method=lora_null_v1"]
    a = StageKeys(compose(base))
    # a rank sweep and v1/v2 share one calibration; resource and logging knobs change no key
    for extra in (["method.rank=2"], ["method=lora_null_v2"], ["method=corda_kpm"],
                  ["calibration.device_budget_gb=1"], ["train.log_every=5", "train.checkpoint_every=3"]):
        other = StageKeys(compose(base + extra))
        assert other["calibrate"] == a["calibrate"], extra
    assert StageKeys(compose(base + ["train.log_every=5"]))["train"] == a["train"]
    # methods without calibration do not depend on it; full fine-tuning does not depend on rank
    lora = [StageKeys(compose(["+experiment=tiny", "method=lora", *x])) for x in ([], ["calibration.samples=8"])]
    assert lora[0]["init"] == lora[1]["init"]
    full = [StageKeys(compose(["+experiment=tiny", "method=full", f"method.rank={r}"])) for r in (2, 4)]
    assert full[0]["init"] == full[1]["init"]


def test_method_options_exist_only_on_their_method():
    assert compose(["+experiment=tiny", "method=oplora", "method.k=4"])["method"]["k"] == 4
    assert compose(["+experiment=tiny", "method=corda_kpm"])["method"]["damping"] == 0.01
    for method, option in (("lora", "k"), ("pissa", "damping"), ("lora_null_v1", "seed"), ("corda_kpm", "k")):
        with pytest.raises(Exception, match=option):
            compose(["+experiment=tiny", f"method={method}", f"method.{option}=1"])
        assert option not in compose(["+experiment=tiny", f"method={method}"])["method"]


METHOD_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))


def test_every_registered_method_has_a_config_and_vice_versa():
    from lnull.methods import REGISTRY

    assert set(METHOD_CONFIGS) == set(REGISTRY)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_every_method_config_composes(name):
    cfg = compose(["+experiment=tiny", f"method={name}"])
    assert cfg["method"]["name"] == name


@pytest.mark.parametrize("group", ["accelerate", "task", "eval", "train"])
def test_every_group_option_composes_with_the_paper_experiment(group):
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        cfg = compose(["+experiment=math_llama2", f"{group}={path.stem}"])
        assert cfg[group], path
        if group == "accelerate":  # the paper's effective batch splits over the config's processes
            launch = cfg["accelerate"]["launch"]
            assert cfg["train"]["batch_size"] % (cfg["train"]["micro_batch_size"] * launch["num_processes"]) == 0
