"""PEFT's other initialisations as lnull methods (issue 28, must-have 1): OLoRA, MiCA, orthogonal, EVA and LoRA-GA
through PEFT's own code. On the tiny model, lnull's init stage gives PEFT's own call's factors and model (same seed,
same task batches); outputs are unchanged at init except orthogonal's rounding, exactly as PEFT's; the methods
that read the task data key and record it, the others do not; EVA's rho != 1 and an odd orthogonal rank are one
ConfigError line; MiCA's lora_B stays frozen in training."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lnull.errors import ConfigError
from lnull.methods import REGISTRY

RANK, ALPHA = 4, 8
SCALE = ALPHA / RANK
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["olora", "mica", "orthogonal", "eva", "lora_ga"]
DATA_METHODS = ["eva", "lora_ga"]
KEEP_OUTPUTS = ["olora", "mica", "eva", "lora_ga"]  # B A = 0 or W0 - s B A: the init model is the original
MOVES_WEIGHT = ["olora", "lora_ga"]  # PEFT subtracts s B A from W0


def _cfg(root: Path, method: str, *overrides: str) -> dict:
    from lnull.cli import compose

    return compose(["+experiment=tiny", f"run.dir={root / method}", "progress=false", "device=cpu",
                    f"method={method}", f"method.rank={RANK}", f"method.alpha={ALPHA}", *overrides])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matrices on 2 shared cores: one thread is faster than two busy ones (see test_architectures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``init(method, *overrides) -> init dir`` through the init stage's ``build`` (memoised), the tiny model's
    folder and a fresh fp32 original."""
    from lnull import initialize
    from lnull.modeling import load_model, resolve_model
    from lnull.tiny import TINY_ID

    root = tmp_path_factory.mktemp("peft_methods")
    done: dict[tuple, Path] = {}

    def init(method: str, *overrides: str) -> Path:
        if (method, overrides) not in done:
            out = root / f"{method}-{len(done)}" / "init"
            out.mkdir(parents=True)
            initialize.build(_cfg(root, method, *overrides), out, None)
            done[(method, overrides)] = out
        return done[(method, overrides)]

    path = resolve_model(TINY_ID)
    return SimpleNamespace(init=init, root=root, path=path, original=lambda: load_model(path, "float32", "cpu"))


def _batches(cfg: dict, path: str, examples: int = 32, size: int = 4) -> list[dict[str, torch.Tensor]]:
    """The task batches as a PEFT user would make them: the train stage's tokenised examples, right-padded."""
    from lnull.modeling import load_tokenizer
    from lnull.training.data import build_examples, collate

    tok = load_tokenizer(path)
    kept = build_examples(cfg, tok)[:examples]
    return [collate(kept[i:i + size], tok.pad_token_id) for i in range(0, len(kept), size)]


def _peft_model(method: str, model: torch.nn.Module, batches: list, seed: int = 0):
    """PEFT's own documented call for ``method`` on ``model``, after ``torch.manual_seed(seed)``."""
    from peft import EvaConfig, LoraConfig, LoraGAConfig, get_peft_model, initialize_lora_eva_weights
    from peft.tuners.lora import preprocess_loraga

    extra = {"eva": {"eva_config": EvaConfig(rho=1.0)}, "lora_ga": {"lora_ga_config": LoraGAConfig()}}.get(method, {})
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=method,
                        task_type="CAUSAL_LM", **extra)
    torch.manual_seed(seed)
    if method == "lora_ga":
        def train_step():
            for batch in batches:
                model(**batch).loss.backward()
        preprocess_loraga(model, config, train_step)
    peft_model = get_peft_model(model, config)
    if method == "eva":
        initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
    return peft_model.eval()


def _saved(init_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    weights = load_file(str(init_dir / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model."
    return {k[len(prefix):k.index(".lora_A.")]: (A, weights[k.replace(".lora_A.", ".lora_B.")])
            for k, A in weights.items() if ".lora_A." in k}


def _ids() -> torch.Tensor:
    return torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method", METHODS)
def test_lnull_init_equals_peft_own_call(method, tiny):
    from peft import PeftModel

    from lnull.residual import is_residual, load_residual_model

    init_dir = tiny.init(method)
    cfg = _cfg(tiny.root, method)
    peft_model = _peft_model(method, tiny.original(), _batches(cfg, tiny.path) if method in DATA_METHODS else [])
    saved = _saved(init_dir)
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert set(saved) == set(layers) and len(saved) == 14
    for name, (A, B) in saved.items():
        want_A, want_B = layers[name].lora_A["default"].weight.detach(), layers[name].lora_B["default"].weight.detach()
        assert A.shape == (RANK, want_A.shape[1]) and B.shape == (want_B.shape[0], RANK)
        assert torch.equal(A, want_A) and torch.equal(B, want_B), (method, name)  # bit for bit: PEFT's own numbers

    loaded = PeftModel.from_pretrained(load_residual_model(tiny.path, init_dir / "adapter", "float32"),
                                       init_dir / "adapter").eval()
    with torch.no_grad():
        got, want, original = loaded(input_ids=_ids()).logits, peft_model(input_ids=_ids()).logits, \
            tiny.original()(input_ids=_ids()).logits
    assert (got - want).abs().max() <= 1e-5, f"{method}: |lnull - PEFT| {(got - want).abs().max():.2e}"
    if method in KEEP_OUTPUTS:
        assert (got - original).abs().max() <= 1e-4, method
    else:  # orthogonal: B A is rounding noise on the untouched W0, PEFT's model and lnull's alike
        assert not torch.equal(want, original) and torch.equal(got, want)

    info = json.loads((init_dir / "adapter" / "lnull_method.json").read_text())
    assert info["method"] == method and info["frozen"] == REGISTRY[method].frozen and info["scale"] == SCALE
    assert info.get("base", "residual") == ("original" if method == "orthogonal" else "residual")
    assert is_residual(init_dir / "adapter")[0] == (method in MOVES_WEIGHT)
    report = json.loads((init_dir / "report.json").read_text())
    assert report["max_reconstruction_rel_err"] < 1e-5 and len(report["modules"]) == 14
    moved = max(m["base_change_rel"] for m in report["modules"].values())
    assert (moved > 1e-3) == (method in MOVES_WEIGHT), (method, moved)


def test_orthogonal_init_keeps_w0_and_its_update_is_rounding_noise(tiny):
    from lnull.residual import load_residual_model

    init_dir = tiny.init("orthogonal")
    original = tiny.original().state_dict()
    rebuilt = load_residual_model(tiny.path, init_dir / "adapter", "float32").state_dict()
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    for name, (A, B) in _saved(init_dir).items():
        A, B = A.double(), B.double()
        assert A.norm() > 1e-2 and B.norm() > 1e-2
        assert 0 < (B @ A).norm() < 1e-6 * B.norm() * A.norm(), name  # Q_even Q_odd^T = 0 up to fp32 rounding


@pytest.mark.parametrize("method", ["orthogonal", "lora_ga"])
def test_same_options_give_bit_identical_inits_and_the_seed_matters(method, tiny):
    first, again = _saved(tiny.init(method)), _saved(tiny.init(method, "train.log_every=2"))  # a second build
    other = _saved(tiny.init(method, "method.seed=1"))
    assert all(torch.equal(first[n][i], again[n][i]) for n in first for i in (0, 1))
    if method == "orthogonal":  # LoRA-GA's 4r-wide sketch of a gradient of rank <= tokens is nearly exact
        assert not any(torch.equal(first[n][0], other[n][0]) for n in first)
    cfg = _cfg(tiny.root, method)
    model, batches = tiny.original(), _batches(cfg, tiny.path) if method in DATA_METHODS else None
    options = REGISTRY[method].make_options(cfg["method"])
    state = torch.random.get_rng_state()
    direct = REGISTRY[method].peft_init(model, TARGETS, RANK, ALPHA, 0.0, options, batches)
    assert torch.equal(torch.random.get_rng_state(), state)  # PEFT drew from a forked stream: the caller's is intact
    assert all(torch.equal(direct[n][i], first[n][i]) for n in first for i in (0, 1))


@pytest.mark.parametrize("method", DATA_METHODS)
def test_data_methods_record_what_they_read(method, tiny):
    info = json.loads((tiny.init(method) / "lnull_method.json").read_text())
    assert info["data"]["task"] == "synthetic:arithmetic:512" and info["data"]["fingerprint"] is None
    assert info["data"]["examples"] == 32 and info["data"]["batches"] == 8 and info["data"]["response_tokens"] > 0
    assert info["data"]["max_length"] == 128 and json.loads((tiny.init(method) / "report.json").read_text())["data"]
    assert "data" not in json.loads((tiny.init("olora") / "lnull_method.json").read_text())


def test_only_the_data_methods_key_the_task_data(tmp_path):
    from lnull.stages import StageKeys

    data = tmp_path / "task.jsonl"

    def key(method: str, text: str, *overrides: str) -> str:
        data.write_text(json.dumps({"query": "What is 2 + 3?", "response": text}) + "\n")
        return StageKeys(_cfg(tmp_path, method, f"task.dataset={data}", *overrides))["init"]

    for method in ["eva", "lora_ga", "olora", "mica", "orthogonal", "lora", "lora_null_v1"]:
        same = key(method, "5") == key(method, "6") == key(method, "5", "train.max_length=64")
        assert same == (method not in DATA_METHODS), method
        assert key(method, "5") == key(method, "5")


def test_eva_rho_and_odd_orthogonal_rank_are_one_line_errors(tmp_path):
    for method, override, match in (("eva", "method.rho=2.0", "rho=2.0"), ("orthogonal", "method.rank=3", "even"),
                                    ("lora_ga", "method.direction=up", "direction")):
        with pytest.raises(ConfigError, match=match) as err:
            _cfg(tmp_path, method, override)
        assert "\n" not in str(err.value)
    assert _cfg(tmp_path, "eva")["method"]["rho"] == 1.0


def test_mica_trains_a_and_keeps_b_frozen(tiny):
    from lnull.training.model import assert_frozen, load_trainable

    model, info = load_trainable(tiny.init("mica"), tiny.path, "float32")
    assert info["frozen"] == ["lora_B"]
    assert assert_frozen(model, info) > 0
    model.train()
    named = dict(model.named_parameters())
    a_name = next(n for n in named if n.endswith("layers.1.mlp.down_proj.lora_A.default.weight"))
    b_name = a_name.replace("lora_A", "lora_B")
    before_a, before_b = named[a_name].detach().clone(), named[b_name].detach().clone()
    assert not before_a.any() and before_b.any()  # A = 0, B = minor singular vectors
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    opt.step()
    assert torch.equal(named[b_name].detach(), before_b) and not torch.equal(named[a_name].detach(), before_a)


def test_a_relation_peft_did_not_produce_is_refused(tiny):
    """The init stage checks PEFT's weights against the method's declared base: OLoRA declared on the original
    base (PEFT subtracts s B A) is a RuntimeError naming the module."""
    from lnull.initialize import method_record, peft_inits
    from lnull.modeling import target_linears

    wrong = dataclasses.replace(REGISTRY["olora"], base="original")
    model = tiny.original()
    cfg = _cfg(tiny.root, "olora")
    info = method_record(wrong, cfg["method"])
    with pytest.raises(RuntimeError, match="declares base 'original'"):
        peft_inits(wrong, model, target_linears(model, TARGETS), TARGETS, info, wrong.make_options(cfg["method"]),
                   None, torch.device("cpu"))


@pytest.mark.parametrize("method", METHODS)
def test_the_python_api_sends_peft_inits_to_peft(method, tiny):
    from peft import LoraConfig

    from lnull import api

    with pytest.raises(ConfigError, match="PEFT's own initialisation"):
        api.preprocess(tiny.original(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS), method=method)


@pytest.mark.parametrize("method", ["orthogonal", "olora"])
def test_lora_on_original_follows_the_recorded_base(method, tiny, tmp_path):
    """A trained adapter written for the untouched base model (vLLM's view) computes what PeftModel(residual
    model, adapter) does: orthogonal's init sits on W0 (no conversion term), OLoRA's on W0 - s B0 A0."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import save_file

    from lnull.residual import load_residual_model, lora_on_original

    init_dir = tiny.init(method)
    trained = tmp_path / "trained"
    shutil.copytree(init_dir / "adapter", trained)
    weights = load_file(str(trained / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in weights.items()},
              str(trained / "adapter_model.safetensors"))
    converted = lora_on_original(trained, init_dir / "adapter", tmp_path / "on_original", tiny.path)
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_residual_model(tiny.path, init_dir / "adapter", "float32"),
                                         trained).eval()(input_ids=_ids()).logits
        got = PeftModel.from_pretrained(tiny.original(), converted).eval()(input_ids=_ids()).logits
    assert (got - want).abs().max() <= 1e-5, (method, (got - want).abs().max())
