"""Issue 24 (part 1): bf16 training on CPU. Full fine-tuning keeps fp32 master weights whatever model.dtype,
every launcher saves the adapter in fp32, stages release accelerator memory, and a tokenizer without a pad
token (LLaMA-2's) trains and generates."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _cfg(root: Path, *overrides: str) -> dict:
    from lnull.cli import compose

    return compose(["+experiment=tiny", f"run.dir={root}", "progress=false", "task.dataset=synthetic:arithmetic:16",
                    "train.batch_size=8", "train.micro_batch_size=4", "train.checkpoint_every=0", *overrides])


def _init(cfg: dict, init_dir: Path, calibration: Path | None = None) -> Path:
    from lnull import initialize

    init_dir.mkdir(parents=True)
    initialize.build(cfg, init_dir, calibration)
    return init_dir


def _one_step(root: Path, dtype: str, monkeypatch) -> tuple[dict, dict]:
    """(weights before, weights after) one AdamW step of full fine-tuning at lr 2e-5, as the loop holds them."""
    import lnull.training.loop as loop
    from lnull import train

    cfg = _cfg(root, "method=full", f"model.dtype={dtype}", "train.max_steps=1", "train.lr=2e-5",
               "train.warmup_ratio=0", "train.scheduler=constant", "train.max_grad_norm=null")
    init_dir = _init(cfg, root / "init")
    seen: dict[str, dict] = {}
    real_load, real_save = loop.load_trainable, loop._save_result

    def load(*args, **kwargs):
        model, info = real_load(*args, **kwargs)
        seen["before"] = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        return model, info

    def save(accelerator, wrapped, *args, **kwargs):
        model = accelerator.unwrap_model(wrapped).model
        seen["after"] = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        return real_save(accelerator, wrapped, *args, **kwargs)

    monkeypatch.setattr(loop, "load_trainable", load)
    monkeypatch.setattr(loop, "_save_result", save)
    (root / "train").mkdir()
    train.train_into(cfg, root / "train", init_dir)
    monkeypatch.undo()
    return seen["before"], seen["after"]


def test_one_bf16_step_of_full_fine_tuning_moves_the_weights_an_fp32_step_moves(tmp_path, monkeypatch):
    """At lr 2e-5 an update to a weight of ~0.02 is below half a bf16 ulp: AdamW on bf16 weights rounds most
    updates away. With fp32 master weights (bf16 compute) the same weights move as in an fp32 step."""
    changed = {}
    for dtype in ("float32", "bfloat16"):
        before, after = _one_step(tmp_path / dtype, dtype, monkeypatch)
        changed[dtype] = {n: before[n] != after[n] for n in before}
    reference = sum(int(m.sum()) for m in changed["float32"].values())
    both = sum(int((changed["bfloat16"][n] & m).sum()) for n, m in changed["float32"].items())
    fraction = both / reference
    print(f"bf16 step changes {fraction:.4%} of the {reference} weights an fp32 step changes")
    assert reference > 0.5 * sum(m.numel() for m in changed["float32"].values())
    assert fraction >= 0.99
    saved = load_file(str(tmp_path / "bfloat16" / "train" / "model" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}  # saved in model.dtype, as before


def test_a_bf16_adapter_is_saved_in_fp32(tmp_path):
    """DeepSpeed bf16 holds the whole module, LoRA weights included, in bf16: the saving code casts to fp32
    (today's single process already holds PEFT's fp32 LoRA weights; both launchers now save one dtype)."""
    from types import SimpleNamespace

    from peft import PeftModel

    from lnull.modeling import load_model, original_path
    from lnull.training.loop import _save_result
    from lnull.training.model import ResponseLoss

    cfg = _cfg(tmp_path, "method=lora")
    init_dir = _init(cfg, tmp_path / "init")
    model = PeftModel.from_pretrained(load_model(original_path(cfg)), str(init_dir / "adapter"),
                                      is_trainable=True).to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds it
    accelerator = SimpleNamespace(wait_for_everyone=lambda: None, state=SimpleNamespace(deepspeed_plugin=None),
                                  unwrap_model=lambda m: m, is_main_process=True)
    _save_result(accelerator, ResponseLoss(model), {"adapter": True}, init_dir, tmp_path / "out", original_path(cfg),
                 "bfloat16")
    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    initial = load_file(str(init_dir / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == initial.keys() and {v.dtype for v in saved.values()} == {torch.float32}
    for name, value in saved.items():
        assert torch.equal(value, initial[name].to(torch.bfloat16).float()), name


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_single_process_and_zero2_save_the_same_fp32_adapter(tmp_path, monkeypatch):
    """The same config gives the same adapter (dtype and values) whichever launcher trains it; a bf16 single
    process (no DeepSpeed, which refuses bf16 on CPU) saves fp32 too.

    Tolerance: both runs see the same examples and the same mean-of-micro-batch-means gradient; a single
    process accumulates the two micro-batches' halves in place, ZeRO-2 all-reduces them across the two ranks.
    A sum of two fp32 terms does not depend on their order and halving is exact, so the adapters come out
    bitwise equal (observed: max |diff| 0); the clipping norm, which DeepSpeed sums per partition, may differ
    in the last ulp, so 1e-6 absolute is allowed (updates here reach ~6e-3, 3 steps at lr 3e-3)."""
    from lnull import train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ("method=lora", "train.max_steps=3", "train.lr=3e-3")
    init_dir = _init(_cfg(tmp_path, *common), tmp_path / "init")
    runs = {}
    for name, extra in (("single", ()), ("zero2", ("accelerate=cpu_zero2",)),
                        ("single-bf16", ("model.dtype=bfloat16",))):
        out = tmp_path / name
        out.mkdir()
        summary = train.train_into(_cfg(tmp_path, *common, *extra), out, init_dir)
        runs[name] = _adapter(out)
        assert {v.dtype for v in runs[name].values()} == {torch.float32}, name
        if name == "zero2":
            assert summary["distributed_type"] == "DEEPSPEED" and summary["processes"] == 2
    initial = _adapter(init_dir)
    diff = max(float((runs["single"][k] - runs["zero2"][k]).abs().max()) for k in initial)
    moved = max(float((runs["single"][k] - initial[k]).abs().max()) for k in initial)
    print(f"single vs ZeRO-2 adapter: max |diff| {diff:.3e} (updates up to {moved:.3e})")
    assert moved > 1e-3
    for name in initial:
        assert torch.allclose(runs["single"][name], runs["zero2"][name], atol=1e-6, rtol=0), name


def test_release_accelerator_memory_is_a_cheap_no_op_on_cpu(monkeypatch):
    import gc

    from lnull.modeling import release_accelerator_memory

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: not a no-op there")
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    release_accelerator_memory()
    assert calls == []


def _fake_vllm(monkeypatch, on_build):
    import importlib.machinery
    import sys
    import types

    class LLM:
        def __init__(self, **kwargs):
            on_build(kwargs)

        def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=" 7")]) for _ in prompts]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec answers as for an installed one
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda *args: args
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_vllm_gets_its_memory_share_and_is_built_while_no_hf_copy_is_held(tmp_path, monkeypatch):
    """eval.vllm.gpu_memory_utilization composes and reaches vllm.LLM; with a benchmark scored in this process
    (held-out NLL, HF weights) and one generated by vLLM, the HF model is freed before the engine is built."""
    import gc
    import weakref

    import lnull.evaluate.stage as evaluate
    from lnull.cli import compose
    from lnull.pipeline import run_pipeline

    assert compose(["+experiment=tiny"])["eval"]["vllm"] == {"gpu_memory_utilization": 0.9}
    with pytest.raises(Exception, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        compose(["+experiment=tiny", "eval.vllm.gpu_memory_utilization=1.5"])
    built, hf_models = [], []

    def on_build(kwargs):
        gc.collect()  # what release_accelerator_memory does on a CUDA machine
        built.append({**kwargs, "hf_alive": sum(r() is not None for r in hf_models)})

    _fake_vllm(monkeypatch, on_build)
    real_load = evaluate.load_residual_model

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        hf_models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(evaluate, "load_residual_model", load)
    from lnull.evaluate import vllm_engine

    monkeypatch.setattr(vllm_engine, "_ENGINE", {})
    cfg = compose(["+experiment=tiny", f"run.dir={tmp_path / 'run'}", "progress=false", "eval=[synthetic,heldout]",
                   "eval.models=[base]", "eval.limit=2", "eval.engine=vllm", "eval.vllm.gpu_memory_utilization=0.5"])
    names = list(cfg["eval"]["benchmarks"])
    assert names.index("synthetic_facts") < names.index("task_heldout")  # vLLM's comes first in the config
    run_pipeline(cfg, stages=["evaluate"], log=lambda m: None)
    assert len(hf_models) == 1 and [b["gpu_memory_utilization"] for b in built] == [0.5]
    assert built[0]["hf_alive"] == 0
    assert vllm_engine._ENGINE == {}  # the stage ends without holding an engine
    gc.collect()
    assert all(r() is None for r in hf_models)  # nor the HF model


def test_a_tokenizer_without_a_pad_token_trains_generates_and_scores(tmp_path):
    """LLaMA-2's tokenizer has no pad token: the tiny model with its pad token removed trains (2 steps),
    generates (batched = one by one, so the padding is masked) and answers an lm-eval loglikelihood request."""
    import math
    import shutil

    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer

    from lnull.cli import compose
    from lnull.evaluate.stage import load_for_eval
    from lnull.evaluate.generate import generate
    from lnull.evaluate.harness import _explicit_bos_lm
    from lnull.layout import RunLayout
    from lnull.modeling import load_tokenizer, resolve_model
    from lnull.pipeline import run_pipeline

    folder = tmp_path / "no-pad"
    shutil.copytree(resolve_model("lnull:tiny"), folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    config = (folder / "config.json").read_text().replace('"pad_token_id": 2', '"pad_token_id": null')
    assert '"pad_token_id": null' in config
    (folder / "config.json").write_text(config)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    loaded = load_tokenizer(str(folder))
    assert loaded.pad_token_id == loaded.eos_token_id
    tok.eos_token = None  # nothing to pad with: one line saying so
    tok.save_pretrained(tmp_path / "no-pad-no-eos")
    from lnull.errors import ConfigError

    with pytest.raises(ConfigError, match="has no pad, EOS or UNK token"):
        load_tokenizer(str(tmp_path / "no-pad-no-eos"))

    cfg = compose(["+experiment=tiny", f"run.dir={tmp_path / 'run'}", "progress=false", f"model.name_or_path={folder}",
                   "method=lora", "task.dataset=synthetic:arithmetic:16", "train.batch_size=8",
                   "train.micro_batch_size=4", "train.max_steps=2"])
    run_pipeline(cfg, stages=["init", "train"], log=lambda m: None)
    layout = RunLayout(cfg)
    assert len((layout.view("train") / "metrics.jsonl").read_text().splitlines()) == 2
    model, tokenizer, _ = load_for_eval(cfg, layout, "trained", "cpu")
    prompts = ["Q: What is 2 plus 3?\nA:", "Q: 7?\nA:", "Hello"]  # different lengths: left padding with EOS
    batched = generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=3, progress=False)
    single = [generate(model, tokenizer, [p], max_new_tokens=4, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single and len(batched) == 3

    lm = _explicit_bos_lm(model, tokenizer, 2, True)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(context, " 5"), idx=0)
                for context in ("Q: What is 2 plus 3?\nA:", "2+3=")]
    scores = lm.loglikelihood(requests)
    assert len(scores) == 2 and all(math.isfinite(ll) and ll < 0 for ll, _ in scores)


def test_the_train_stage_holds_no_model_when_it_ends(tmp_path, monkeypatch):
    """In-process training drops every reference to the trained model and then releases accelerator memory
    (gc + empty_cache on CUDA; checked here by the call and by the model being gone without a gc pass)."""
    import weakref

    import lnull.modeling as modeling
    import lnull.training.loop as loop
    from lnull import train

    refs, released = [], []
    real_load = loop.load_trainable

    def load(*args, **kwargs):
        model, info = real_load(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model, info

    monkeypatch.setattr(loop, "load_trainable", load)
    monkeypatch.setattr(modeling, "release_accelerator_memory", lambda: released.append(len(refs)))
    cfg = _cfg(tmp_path, "method=lora", "train.max_steps=2")
    init_dir = _init(cfg, tmp_path / "init")
    (tmp_path / "train").mkdir()
    train.train_into(cfg, tmp_path / "train", init_dir)
    assert released == [1] and len(refs) == 1 and refs[0]() is None
