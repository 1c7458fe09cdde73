"""Models beyond LLaMA (issue 26): every adapter method on tiny random Qwen2, Gemma3 (text), Mistral and Phi-3
(fused qkv_proj / gate_up_proj) models, through lnull's own calibrate and init stages; GPT-2's Conv1D layers and
target names a model lacks fail with one line before any statistic or factor is computed.

Per (family, method): W_res + s B0 A0 = W0 in every targeted module (the residual rebuilt by lnull.residual),
the residual model + initial adapter gives the original logits, and for LoRA-Null the rows of A hold exactly the
activation energy of the covariance's r smallest eigenvalues (A C A^T minimal). Per family: the stored
covariance of every targeted module is X^T X of the inputs that module really sees (shared inputs included).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lnull import calibrate, initialize
from lnull.activations import CalibrationStats
from lnull.errors import ConfigError
from lnull.methods import REGISTRY
from lnull.methods.linalg import captured_energy
from lnull.modeling import load_model, target_linears
from lnull.tiny_families import LAYERS, TARGETS, materialize_family

RANK, ALPHA = 4, 8
SCALE = ALPHA / RANK
FAMILIES = ["qwen2", "gemma3", "mistral", "phi3"]  # gpt2: rejected (test_conv1d_targets_fail_in_one_line)
# lnull's own per-layer inits; PEFT's (Method.peft_init) are checked against PEFT itself in test_peft_methods.py
METHODS = sorted(name for name, m in REGISTRY.items() if m.has_adapter and m.peft_init is None)
NULL_METHODS = sorted(name for name in METHODS if REGISTRY[name].statistic == "covariance")
B_ZERO = {"lora", "lora_fa", "oplora"}  # start at B0 = 0 (residual = W0); every other method moves weight
# Unique layer inputs per decoder layer: q/k/v share one, gate/up one (Phi-3 fuses them: no sharing left).
UNIQUE_INPUTS_PER_LAYER = {"qwen2": 4, "gemma3": 4, "mistral": 4, "phi3": 4}


def _cfg(root: Path, folder: Path, method: str, targets: list[str], data: Path | None = None) -> dict:
    from lnull.cli import compose

    return compose(["+experiment=tiny", f"run.dir={root / method}", "progress=false", f"method={method}",
                    f"method.rank={RANK}", f"method.alpha={ALPHA}", f"model.name_or_path={folder}",
                    f"model.target_modules=[{','.join(targets)}]"]
                   + ([f"calibration.dataset={data}", "calibration.field=text"] if data is not None else []))


def _random_text(path: Path, records: int = 64, seed: int = 0) -> Path:
    """A JSONL calibration set of random character strings: the byte-level BPE cuts them into most of its
    vocabulary, so every layer input's covariance has full rank (the tiny experiment's synthetic facts use few
    distinct tokens: layer-0 inputs would span fewer than d_in = 64 directions, and the null space be degenerate)."""
    import json
    import random

    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?()-'"
    path.write_text("".join(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(400))}) + "\n"
                            for _ in range(records)))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """fp64 eigh / SVD of 64-128 wide matrices on one thread: on 2 busy cores torch's default 2 threads made
    each 60-70x slower (measured: eigh 128 x 128, 63 ms vs 0.9 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from lnull.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizer):
    """``get(family)``: (memoised) the family's model folder, original model, one calibration (lnull's
    calibrate stage on random text) and ``init(method) -> init dir`` (memoised)."""
    root = tmp_path_factory.mktemp("families")
    data = _random_text(root / "random_text.jsonl")
    done: dict[str, SimpleNamespace] = {}

    def get(family: str) -> SimpleNamespace:
        if family in done:
            return done[family]
        base = root / family
        folder = materialize_family(family, base / "model", tokenizer)
        targets = TARGETS[family]
        calib = base / "calibration"
        calib.mkdir()
        cfg = _cfg(base, folder, "lora_null_v1", targets, data)
        calibrate.collect_into(cfg, calib)
        inits: dict[str, Path] = {}

        def init(method: str) -> Path:
            if method not in inits:
                out = base / method / "init"
                out.mkdir(parents=True)
                needs = REGISTRY[method].needs_calibration
                initialize.build(_cfg(base, folder, method, targets, data), out, calib if needs else None)
                inits[method] = out
            return inits[method]

        done[family] = SimpleNamespace(folder=folder, targets=targets, calib=calib, cfg=cfg, init=init,
                                       original=load_model(str(folder)))
        return done[family]
    return SimpleNamespace(get=get)


def _factors(init_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A0, B0)} of an init adapter as saved."""
    weights = load_file(str(init_dir / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model."
    return {key[len(prefix):key.index(".lora_A.")]: (A, weights[key.replace(".lora_A.", ".lora_B.")])
            for key, A in weights.items() if ".lora_A." in key}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_init_invariants_hold_on_every_family(family, method, families):
    """W_res + s B0 A0 = W0 per targeted module (W_res as lnull.residual rebuilds it), and the residual model
    plus the initial adapter reproduces the original logits."""
    from peft import PeftModel

    from lnull.residual import load_residual_model

    fam = families.get(family)
    init_dir = fam.init(method)
    linears = target_linears(fam.original, fam.targets)
    assert len(linears) == LAYERS * len(fam.targets)
    factors = _factors(init_dir)
    assert set(factors) == set(linears), f"{family}/{method}: adapter modules differ from the targeted ones"

    residual = load_residual_model(str(fam.folder), init_dir / "adapter", "float32")
    moved = 0
    for name, lin in linears.items():
        A, B = factors[name]
        W0 = lin.weight.detach()
        assert A.shape == (RANK, W0.shape[1]) and B.shape == (W0.shape[0], RANK), name
        W_res = residual.get_submodule(name).weight.detach()
        rebuilt = W_res.double() + SCALE * B.double() @ A.double()
        err = float((rebuilt - W0.double()).norm() / W0.double().norm())
        assert err < 1e-6, f"{family}/{method} {name}: ||W_res + s B A - W0|| / ||W0|| = {err:.2e}"
        if bool(B.any()):
            moved += 1
            assert not torch.equal(W_res, W0), f"{name}: B0 != 0 but the residual is W0"
        else:
            assert torch.equal(W_res, W0), f"{name}: B0 = 0 but the residual moved"
    assert moved == (0 if method in B_ZERO else len(linears)), f"{family}/{method}: {moved} modules with B0 != 0"

    reloaded = PeftModel.from_pretrained(residual, init_dir / "adapter").eval()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = fam.original(input_ids=ids).logits
        diff = float((reloaded(input_ids=ids).logits - want).abs().max())
    assert diff <= 1e-4 * max(1.0, float(want.abs().max())), f"{family}/{method}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("method", NULL_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_null_a_holds_the_least_activation_energy(family, method, families):
    """tr(Q^T C Q) / tr(C) of A's row space equals the share of C's r smallest eigenvalues (the minimum over
    rank-r subspaces) in every targeted module, fused ones included; a random A holds far more."""
    fam = families.get(family)
    stats = CalibrationStats(fam.calib)
    factors = _factors(fam.init(method))
    gen = torch.Generator().manual_seed(0)
    for name, (A, _B) in factors.items():
        C = stats.get(name, "covariance")
        vals = torch.linalg.eigvalsh(C.double())
        floor = float(vals[:RANK].clamp_min(0).sum() / vals.clamp_min(0).sum())
        got = captured_energy(A, C)
        assert abs(got - floor) <= 1e-9 + 1e-4 * floor, f"{family}/{method} {name}: energy {got:.3e}, min {floor:.3e}"
        rand = captured_energy(torch.randn(A.shape, generator=gen), C)
        assert rand > 5 * floor, f"{family} {name}: random A {rand:.3e} vs minimum {floor:.3e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_sees_each_targeted_modules_own_input(family, families):
    """lnull's collection (activations.py via the calibrate stage) stores X^T X of the inputs each targeted
    module is called with in that family's forward, shared inputs detected as aliases."""
    from lnull.calibrate import calibration_windows
    from lnull.data.sources import load_records
    from lnull.modeling import load_tokenizer

    fam = families.get(family)
    cal = fam.cfg["calibration"]
    texts = [r[cal["field"]] for r in load_records(cal["dataset"], fam.cfg.get("cache_dir"))]
    windows = calibration_windows(load_tokenizer(str(fam.folder)), texts, cal["samples"], cal["seqlen"],
                                  cal["seed"], fam.cfg["model"]["add_bos"])
    rows: dict[str, list[torch.Tensor]] = {}
    linears = target_linears(fam.original, fam.targets)
    handles = [lin.register_forward_hook(
        lambda m, i, o, name=name: rows.setdefault(name, []).append(i[0].detach().reshape(-1, i[0].shape[-1])))
        for name, lin in linears.items()]
    with torch.no_grad():
        fam.original(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    stats = CalibrationStats(fam.calib)
    assert sum(1 for n, a in stats.alias.items() if n == a) == UNIQUE_INPUTS_PER_LAYER[family] * LAYERS
    for name in linears:
        X = torch.cat(rows[name]).double()
        torch.testing.assert_close(stats.get(name, "covariance").double(), X.T @ X, rtol=1e-4, atol=1e-3,
                                   msg=lambda m, name=name: f"{family} {name}: {m}")


def _one_line_error(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("family", FAMILIES)
def test_preflight_accepts_each_familys_targets(family, families):
    """The init stage's pre-flight (config.json only: the model's meta-device skeleton) passes for the family's
    own target names, and would fail on a name it lacks."""
    from lnull.modeling import check_shapes

    fam = families.get(family)
    check_shapes(fam.cfg)
    bad = _cfg(fam.folder.parent, fam.folder, "lora", fam.targets + ["w_nope"])
    assert _one_line_error(lambda: check_shapes(bad)).startswith("model.target_modules: w_nope match no module")


def test_conv1d_targets_fail_in_one_line(tmp_path, tokenizer):
    """GPT-2's c_attn / c_fc / c_proj are Conv1D (weight [d_in, d_out]): the pre-flight (before any model loads),
    calibrate and init stop with one line naming them, before writing anything."""
    from lnull.modeling import check_shapes

    folder = materialize_family("gpt2", tmp_path / "gpt2", tokenizer)
    message = _one_line_error(lambda: check_shapes(_cfg(tmp_path, folder, "lora_null_v1", TARGETS["gpt2"])))
    assert message.startswith("model.target_modules: c_attn (Conv1D), c_fc (Conv1D), c_proj (Conv1D) of "
                              "GPT2LMHeadModel are not torch.nn.Linear layers"), message
    assert message.endswith(f"(model {folder})"), message
    for method, stage in (("lora_null_v1", "calibrate"), ("pissa", "init")):
        cfg = _cfg(tmp_path, folder, method, TARGETS["gpt2"])
        out = tmp_path / stage
        out.mkdir()
        if stage == "calibrate":
            message = _one_line_error(lambda: calibrate.collect_into(cfg, out))
        else:
            message = _one_line_error(lambda: initialize.build(cfg, out, None))
        assert message.startswith("model.target_modules: c_attn (Conv1D), c_fc (Conv1D), c_proj (Conv1D) of "
                                  "GPT2LMHeadModel are not torch.nn.Linear layers"), message
        assert not list(out.iterdir()), f"{stage} wrote {list(out.iterdir())} before failing"


@pytest.mark.parametrize("family, targets, missing", [
    ("phi3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
     "q_proj, k_proj, v_proj, gate_proj, up_proj"),
    ("qwen2", ["q_proj", "v_proj", "qkv_projx"], "qkv_projx"),
])
def test_unknown_target_names_fail_in_one_line(family, targets, missing, tmp_path, tokenizer):
    """A target name the model lacks is an error even when other names match (a silently smaller target set
    would change the method); the line names exactly the missing ones and the model's linear layers."""
    folder = materialize_family(family, tmp_path / family, tokenizer)
    cfg = _cfg(tmp_path, folder, "lora", targets)
    (tmp_path / "init").mkdir()
    message = _one_line_error(lambda: initialize.build(cfg, tmp_path / "init", None))
    assert message.startswith(f"model.target_modules: {missing} match no module of the model"), message
    from lnull.modeling import check_shapes

    assert _one_line_error(lambda: check_shapes(cfg)) == f"{message} (model {folder})"
    assert "its linear layers: " in message and "lm_head" in message and "o_proj" in message, message
