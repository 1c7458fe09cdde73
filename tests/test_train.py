"""Training stage on CPU with the tiny model: every method learns, frozen parts stay bit-identical,
response-only loss, the batch plan, resume equivalence, multi-process launches and bad input."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lnull.config import ConfigError
from lnull.data.prompts import IGNORE_INDEX, encode_example
from lnull.methods import REGISTRY

METHODS = sorted(REGISTRY)
FROZEN_ADAPTER_PART = {name: m.frozen[0] for name, m in REGISTRY.items() if m.frozen}  # lora_A, or MiCA's lora_B


def _cfg(root: Path, method: str, *overrides: str) -> dict:
    from lnull.cli import compose

    return compose(["+experiment=tiny", f"run.dir={root / method}", "progress=false", f"method={method}",
                    "method.rank=4", "method.alpha=8", "task.dataset=synthetic:arithmetic:16", "train.batch_size=8",
                    "train.micro_batch_size=4", "train.max_steps=16", "train.lr=3e-3", *overrides])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One calibration of the tiny model shared by every method's init."""
    from lnull import calibrate

    root = tmp_path_factory.mktemp("train")
    (root / "calibration").mkdir()
    calibrate.collect_into(_cfg(root, "lora"), root / "calibration")
    return SimpleNamespace(root=root, calib=root / "calibration")


def _init(calibrated, method: str, *overrides: str) -> tuple[dict, Path]:
    from lnull import initialize

    cfg = _cfg(calibrated.root, method, *overrides)
    init_dir = calibrated.root / method / "init"
    if not (init_dir / "report.json").exists():
        init_dir.mkdir(parents=True)
        initialize.build(cfg, init_dir, calibrated.calib)
    return cfg, init_dir


def _train(cfg: dict, init_dir: Path, out: Path) -> dict:
    from lnull import train

    out.mkdir(parents=True, exist_ok=True)
    return train.train_into(cfg, out, init_dir)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_and_keeps_its_frozen_parts(method, calibrated):
    cfg, init_dir = _init(calibrated, method)
    out = calibrated.root / method / "train"
    summary = _train(cfg, init_dir, out)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 16 and summary["steps"] == 16
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.03, f"{method}: loss {first:.3f} -> {last:.3f}"  # v2 (B only, null-space A) learns slowest
    if method == "full":
        assert (out / "model" / "config.json").exists()
        return
    trained, initial = _tensors(out / "adapter"), _tensors(init_dir / "adapter")
    assert trained.keys() == initial.keys()
    for name, value in trained.items():
        part = "lora_A" if "lora_A" in name else "lora_B"
        if method == "oplora":  # the saved adapter has P_U B A P_V baked in; checked in test_oplora
            continue
        if FROZEN_ADAPTER_PART.get(method) == part:
            assert torch.equal(value, initial[name]), f"{method}: frozen {name} changed"
        else:
            assert not torch.equal(value, initial[name]), f"{method}: trainable {name} did not move"


def test_base_weights_are_untouched_by_adapter_training(calibrated):
    """The trained adapter sits on the residual model rebuilt from the original (its recorded base) and
    init/adapter; that model's weights are the ones training held frozen, bit for bit."""
    from peft import PeftModel

    from lnull.modeling import original_path
    from lnull.residual import load_residual_model

    cfg, init_dir = _init(calibrated, "lora_null_v1")
    out = calibrated.root / "base-check" / "train"
    _train(cfg, init_dir, out)
    recorded = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == original_path(cfg)
    residual = load_residual_model(recorded, init_dir / "adapter", "float32")
    base = {k: v.clone() for k, v in residual.state_dict().items()}
    original = load_residual_model(recorded, None, "float32").state_dict()
    assert any(not torch.equal(base[k], original[k]) for k in base)  # LoRA-Null v1 moves weight out of W0
    model = PeftModel.from_pretrained(residual, out / "adapter")
    for name, param in model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        assert torch.equal(param.detach(), base[key]), name


def test_response_only_labels_on_a_hand_made_example(tiny_cfg):
    from lnull.modeling import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("lnull:tiny"))
    enc = encode_example(tok, "Add 2 and 3.", "2 + 3 = 5.\nThe answer is: 5", 512)
    prompt = tok("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:", add_special_tokens=False)
    n_prompt = 1 + len(prompt["input_ids"])  # BOS + prompt
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert enc["labels"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"][n_prompt:-1]).strip() == "2 + 3 = 5.\nThe answer is: 5"
    short = encode_example(tok, "Add 2 and 3.", "2 + 3 = 5.", n_prompt + 2)
    assert len(short["input_ids"]) == n_prompt + 2 and short["labels"][-2:] == short["input_ids"][-2:]


def test_response_loss_is_the_mean_of_each_examples_own_loss():
    """Each example's loss is the model's own (mean over its response tokens); a micro-batch's is their mean,
    as micro-batch 1 accumulates them (not HF's token mean pooled over the batch)."""
    from lnull.modeling import load_model, resolve_model
    from lnull.training.model import ResponseLoss

    model = load_model(resolve_model("lnull:tiny"))
    ids = torch.randint(3, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX
    labels[2, 15:] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    each = [model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1]).loss for i in range(3)]
    assert torch.allclose(ResponseLoss(model)(ids, mask, labels), torch.stack(each).mean(), atol=1e-5)
    assert not torch.allclose(ResponseLoss(model)(ids, mask, labels), model(input_ids=ids, attention_mask=mask,
                                                                            labels=labels).loss, atol=1e-5)


def test_step_plan_is_a_seeded_partition_of_each_epoch():
    from lnull.training.data import step_plan

    lengths = [5 + (i * 7) % 23 for i in range(24)]
    tcfg = {"batch_size": 8, "micro_batch_size": 2, "seed": 3, "group_by_length": False}
    epoch = [i for s in range(3) for mb in step_plan(lengths, s, tcfg) for i in mb]
    assert sorted(epoch) == list(range(24))
    assert step_plan(lengths, 1, tcfg) == step_plan(lengths, 1, tcfg)
    ranks = [step_plan(lengths, 1, tcfg)[r::2] for r in range(2)]  # as the loop deals them
    assert sorted(i for r in ranks for mb in r for i in mb) == sorted(i for mb in step_plan(lengths, 1, tcfg)
                                                                       for i in mb)
    assert sorted(i for mb in step_plan(lengths, 3, tcfg) for i in mb) != epoch[:8]  # next epoch reshuffles
    grouped = step_plan(lengths, 1, {**tcfg, "group_by_length": True})
    assert sorted(i for mb in grouped for i in mb) == sorted(epoch[8:16])  # same examples in the step
    flat = [lengths[i] for mb in grouped for i in mb]
    assert flat == sorted(flat, reverse=True)


def test_resumed_run_ends_with_the_same_adapter(calibrated, monkeypatch):
    """Kill during step 5 (after the step-4 checkpoint), resume, and compare with an uninterrupted run.
    LoRA dropout is on, so the RNG state must be restored too."""
    cfg, init_dir = _init(calibrated, "lora", "method.dropout=0.1")
    cfg["train"] = {**cfg["train"], "max_steps": 7, "checkpoint_every": 2}
    whole = _train(cfg, init_dir, calibrated.root / "resume" / "whole")

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    out = calibrated.root / "resume" / "killed"
    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, init_dir, out)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]
    from lnull import train

    resumed = train.train_into(cfg, out, init_dir)
    a, b = _tensors(calibrated.root / "resume" / "whole" / "adapter"), _tensors(out / "adapter")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 8))
    assert resumed["last_loss"] == pytest.approx(whole["last_loss"], abs=1e-6)
    assert not (out / "checkpoints").exists()


def test_two_process_deepspeed_zero2_on_cpu(calibrated, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg, init_dir = _init(calibrated, "lora_null_v2", "accelerate=cpu_zero2", "train.max_steps=3")
    out = calibrated.root / "zero2" / "train"
    summary = _train(cfg, init_dir, out)
    assert summary["processes"] == 2 and summary["distributed_type"] == "DEEPSPEED"
    trained, initial = _tensors(out / "adapter"), _tensors(init_dir / "adapter")
    for name, value in trained.items():
        assert torch.equal(value, initial[name]) == ("lora_A" in name), name
    assert (out / "launch" / "accelerate.yaml").exists() and (out / "launch" / "config.yaml").exists()


def test_batch_not_divisible_is_a_config_error(tmp_path):
    from lnull.cli import compose

    with pytest.raises(ConfigError, match="train.batch_size=8 is not divisible"):
        compose(["+experiment=tiny", "accelerate=cpu_zero2", "train.micro_batch_size=8"])


@pytest.mark.parametrize("override, message", [
    ("task.response_field=solution", "record 0 has no field 'solution'"),
    ("train.max_length=8", "longer than train.max_length=8"),
])
def test_bad_task_data_fails_before_training(calibrated, override, message):
    cfg, init_dir = _init(calibrated, "lora", override)
    with pytest.raises(ConfigError, match=message):
        _train(cfg, init_dir, calibrated.root / "bad" / override.split("=")[0])


def test_frozen_part_that_would_get_gradients_fails_before_training(calibrated, monkeypatch):
    import lnull.training.loop as loop

    cfg, init_dir = _init(calibrated, "lora_null_v2")
    real = loop.load_trainable

    def leaky(*args, **kwargs):  # as PEFT's set_adapter would: re-enable every LoRA part
        model, info = real(*args, **kwargs)
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(True)
        return model, info

    monkeypatch.setattr(loop, "load_trainable", leaky)
    out = calibrated.root / "leak" / "train"
    with pytest.raises(ConfigError, match="frozen parameter .*lora_A.* would get gradients"):
        _train(cfg, init_dir, out)
    assert not (out / "metrics.jsonl").exists()


def test_dotted_fields_read_sharegpt_records():
    from lnull.data.sources import field_value

    row = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
    assert field_value(row, "conversations.0.value") == "Q?"
    assert field_value(row, "conversations.1.value") == "A."
    with pytest.raises(KeyError):
        field_value(row, "conversations.2.value")


def test_options_gradient_checkpointing_grouping_and_wandb_offline(calibrated):
    cfg, init_dir = _init(calibrated, "lora", "train.gradient_checkpointing=true", "train.group_by_length=true",
                          "train.micro_batch_size=2", "train.max_steps=3", "train.log_every=2",
                          "train.wandb=offline")
    out = calibrated.root / "options" / "train"
    summary = _train(cfg, init_dir, out)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and [r["step"] for r in log] == [2, 3] and summary["last_loss"] > 0
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run folder missing"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["oplora", "full"])
def test_zero3_on_cpu_matches_a_single_process(method, calibrated, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg, init_dir = _init(calibrated, method, "train.max_steps=3")
    single = calibrated.root / "zero3" / method / "single"
    _train(cfg, init_dir, single)
    from lnull.cli import compose

    launch = compose(["+experiment=tiny", "accelerate=cpu_zero2", "train.micro_batch_size=4",
                      "accelerate.launch.deepspeed_config.zero_stage=3",
                      "+accelerate.launch.deepspeed_config.zero3_save_16bit_model=true"])["accelerate"]
    out = calibrated.root / "zero3" / method / "sharded"
    summary = _train({**cfg, "accelerate": launch}, init_dir, out)
    assert summary["distributed_type"] == "DEEPSPEED" and cfg["accelerate"] is None
    folder = "model" if method == "full" else "adapter"
    a, b = _tensors(single / folder), _tensors(out / folder)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_offline_hub_task_fails_before_any_stage(tmp_path, monkeypatch):
    from lnull.cli import compose
    from lnull.pipeline import run_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(["+experiment=tiny", "task=instruct", f"run.dir={tmp_path / 'run'}", "progress=false"])
    with pytest.raises(ConfigError, match="task.dataset 'hub:WizardLMTeam/.*' needs the Hugging Face hub"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "calibration").exists()


def test_a_worker_error_reaches_the_parent_as_one_line(calibrated, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg, init_dir = _init(calibrated, "lora", "accelerate=cpu_ddp", "train.precision=bf16")
    with pytest.raises(ConfigError, match="train.precision=bf16 needs a CUDA device"):
        _train(cfg, init_dir, calibrated.root / "worker-error" / "train")


def test_attention_and_clipping_options_take_effect(calibrated):
    from lnull.modeling import original_path
    from lnull.training.model import load_trainable

    cfg, init_dir = _init(calibrated, "lora", "train.max_steps=2")
    model, _ = load_trainable(init_dir, original_path(cfg), "float32", "eager")
    assert model.get_base_model().config._attn_implementation == "eager"
    runs = {}
    for clip in ("null", "1e-4"):
        cfg, init_dir = _init(calibrated, "lora", "train.max_steps=2", f"train.max_grad_norm={clip}")
        out = calibrated.root / "clip" / clip
        _train(cfg, init_dir, out)
        runs[clip] = _tensors(out / "adapter")
    moved = {k: float((runs["null"][k] - runs["1e-4"][k]).abs().max()) for k in runs["null"]}
    assert max(moved.values()) > 1e-4  # a tiny clip norm changes the update, so clipping is applied
