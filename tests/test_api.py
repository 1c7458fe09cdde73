"""lnull.api (issue 26 part 1): the statistics `lnull calibrate` writes, the adapters `lnull init` builds, through
PEFT-style calls on a model in memory; outputs unchanged at init for every adapter method; frozen parts stay
frozen through PEFT's own calls; the saved adapter is a plain PEFT adapter and `to_original` loads on the
untouched base with plain PEFT; bad input is one line before any heavy work."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lnull import api
from lnull.activations import CalibrationStats
from lnull.calibrate import calibration_windows, collect_into, resolve_source
from lnull.errors import ConfigError
from lnull.methods import REGISTRY
from lnull.modeling import load_model, load_tokenizer, resolve_model, target_linears

# PEFT-backed methods (Method.peft_init) are PEFT's own calls: the API sends their users to PEFT (test_peft_methods.py)
ADAPTER_METHODS = sorted(name for name, m in REGISTRY.items() if m.has_adapter and m.peft_init is None)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, tiny model folder, its calibration folder written by the calibrate stage, the stage's windows)."""
    from lnull.cli import compose

    root = tmp_path_factory.mktemp("api")
    cfg = compose(["+experiment=tiny", f"run.dir={root / 'run'}", "progress=false", "method=lora_null_v1"])
    path = resolve_model(cfg["model"]["name_or_path"])
    calibration = root / "calibration"
    calibration.mkdir()
    collect_into(cfg, calibration)
    cal = cfg["calibration"]
    _, records = resolve_source(cal["dataset"], None)
    windows = calibration_windows(load_tokenizer(path), [r[cal["field"]] for r in records], cal["samples"],
                                  cal["seqlen"], cal["seed"], cfg["model"]["add_bos"])
    return cfg, path, calibration, windows, cal["batch_size"]


def _model(path):
    return load_model(path, "float32", "cpu")


def _config(r=4, alpha=8, targets=TARGETS):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)


def _batches(windows, size):
    return [windows[i:i + size] for i in range(0, len(windows), size)]


def test_collect_statistics_equals_what_lnull_calibrate_writes(tiny, tmp_path):
    cfg, path, calibration, windows, size = tiny
    stage = CalibrationStats(calibration)
    in_memory = api.collect_statistics(_model(path), _batches(windows, size), TARGETS, progress=False)
    model = _model(path)

    def run_model():  # PEFT's preprocess_corda protocol: the caller makes the forwards
        with torch.no_grad():
            for batch in _batches(windows, size):
                model(input_ids=batch)

    from_runs = api.collect_statistics(model, target_modules=TARGETS, run_model=run_model)
    on_disk = api.collect_statistics(_model(path), [{"input_ids": b} for b in _batches(windows, size)], TARGETS,
                                     out_dir=tmp_path / "stats", progress=False)
    assert in_memory.alias == stage.alias == from_runs.alias == on_disk.alias
    for name in stage.alias:
        for statistic in ("covariance", "max_normalized_covariance"):
            want = stage.get(name, statistic)
            for got in (in_memory, from_runs, on_disk):
                assert torch.equal(got.get(name, statistic), want), (name, statistic)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_every_method_keeps_the_outputs_at_init_and_its_residual(method, tiny):
    cfg, path, calibration, windows, _ = tiny
    original = _model(path)
    model = _model(path)
    ids = windows[:2]
    with torch.no_grad():
        want = original(input_ids=ids).logits
    peft_model = api.preprocess(model, _config(), method=method, statistics=calibration, progress=False)
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=2e-4, rtol=0), (method, (got - want).abs().max())
    scale = 8 / 4
    for name, lin in target_linears(original, TARGETS).items():
        layer = peft_model.base_model.model.get_submodule(name)
        W = layer.base_layer.weight + scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert torch.allclose(W, lin.weight, atol=1e-5), (method, name)
    frozen = REGISTRY[method].frozen
    peft_model.set_adapter("default")  # PEFT re-enables grads on every LoRA part of the active adapter
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad == (not any(f".{p}." in name for p in frozen)), (method, name)


@pytest.mark.parametrize("method", ["lora_null_v1", "lora_null_v2", "corda_kpm", "pissa", "lora", "oplora"])
def test_the_saved_adapter_is_the_one_lnull_init_builds_from_the_same_statistics(method, tiny, tmp_path):
    from lnull.cli import compose
    from lnull.initialize import build

    cfg, path, calibration, _, _ = tiny
    stage_cfg = compose(["+experiment=tiny", f"run.dir={tmp_path / 'run'}", "progress=false", f"method={method}",
                         "method.alpha=8"])
    out = tmp_path / "init"
    out.mkdir()
    build(stage_cfg, out, calibration if REGISTRY[method].needs_calibration else None)
    peft_model = api.preprocess(_model(path), _config(r=stage_cfg["method"]["rank"], alpha=8), method=method,
                                statistics=calibration, progress=False)
    saved = api.save_adapter(peft_model, tmp_path / "api_adapter")
    want, got = load_file(str(out / "adapter" / "adapter_model.safetensors")), \
        load_file(str(saved / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    effective = REGISTRY[method].effective_factors
    if effective is not None:  # the stage's adapter keeps its hooks' files; the API's is saved with them folded in
        names = {k[len("base_model.model."):k.index(".lora_A.")]: k for k in want if ".lora_A." in k}
        A, B = effective({n: want[k] for n, k in names.items()},
                         {n: want[k.replace(".lora_A.", ".lora_B.")] for n, k in names.items()}, out / "adapter")
        want = {**{k: A[n].float() for n, k in names.items()},
                **{k.replace(".lora_A.", ".lora_B."): B[n].float() for n, k in names.items()}}
    for key in want:
        assert torch.equal(got[key], want[key]), (method, key)
    assert (saved / "lnull_method.json").exists() and (saved / "adapter_config.json").exists()


@pytest.mark.parametrize("method", ["lora_null_v1", "oplora"])
def test_to_original_loads_on_the_untouched_base_with_plain_peft(method, tiny, tmp_path):
    from peft import PeftModel

    cfg, path, calibration, windows, _ = tiny
    peft_model = api.preprocess(_model(path), _config(), method=method, statistics=calibration, progress=False)
    with torch.no_grad():  # stands in for training: every trainable LoRA weight moves
        generator = torch.Generator().manual_seed(0)
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        want = peft_model(input_ids=windows[:2]).logits
    out = api.to_original(peft_model, tmp_path / "on_original", base_model_name_or_path=path)
    loaded = PeftModel.from_pretrained(_model(path), str(out))
    with torch.no_grad():
        got = loaded(input_ids=windows[:2]).logits
    assert torch.allclose(got, want, atol=2e-4, rtol=0), (got - want).abs().max()
    r = load_file(str(out / "adapter_model.safetensors"))
    ranks = {t.shape[0] for k, t in r.items() if ".lora_A." in k}
    assert ranks == ({8} if method == "lora_null_v1" else {4})  # rank 2r where the init moved weight
    from lnull.serving import check_vllm_adapter

    assert check_vllm_adapter(out) == []  # and vLLM's LoRA rules take it


def test_bad_input_is_one_line_before_any_work(tiny):
    cfg, path, calibration, windows, _ = tiny
    cases = [
        (dict(method="lora_nul"), "unknown method 'lora_nul'"),
        (dict(method="full"), "no adapter"),
        (dict(method="lora_null_v1"), "pass statistics="),
        (dict(method="lora_null_v1", statistics=calibration, config=_config(targets=["q_proj", "qq_proj"])),
         "qq_proj"),
        (dict(method="lora", options={"init": "x"}), "no option 'init'"),
    ]
    for kwargs, message in cases:
        config = kwargs.pop("config", _config())
        with pytest.raises(ConfigError) as err:
            api.preprocess(_model(path), config, progress=False, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))


def test_statistics_of_another_model_fail_naming_the_module(tiny):
    """Statistics collected on a model of another width: one line naming the first module, before any eigh."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg, path, calibration, windows, _ = tiny
    small = LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    other = api.collect_statistics(small, [windows[:2]], TARGETS, progress=False)
    with pytest.raises(ConfigError, match=r"statistics of module model\.layers\.0\.self_attn\.q_proj are 32 x 32 "
                                          r"but its input has 64 features"):
        api.preprocess(_model(path), _config(), method="lora_null_v1", statistics=other, progress=False)
    with pytest.raises(ConfigError, match="padded"):
        api.collect_statistics(small, [{"input_ids": windows[:2], "attention_mask": torch.zeros_like(windows[:2])}],
                               TARGETS)


def test_corda_reads_each_inputs_statistics_once(tiny, monkeypatch):
    """CorDA's init reads PEFT's statistic and, for its report, the covariance of every input: each packed
    triangle is unpacked once per input (not once per module, nor twice when the two statistics alternate)."""
    import lnull.activations as activations

    cfg, path, calibration, _, _ = tiny
    calls = []
    unpack = activations.unpack_triu
    monkeypatch.setattr(activations, "unpack_triu", lambda packed: calls.append(1) or unpack(packed))
    api.preprocess(_model(path), _config(), method="corda_kpm", statistics=calibration, progress=False)
    inputs = len(set(CalibrationStats(calibration).alias.values()))
    assert len(calls) == 2 * inputs
