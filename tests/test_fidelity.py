"""Fidelity to the reference implementations, each checked by running the reference rule itself:

- ``calibration.official``: a transcription of the official LoRA-Null code's windows (datautils.get_calib_data)
  and covariance hook (act_aware_utils.calib_cov_distribution);
- CorDA: PEFT's own ``preprocess_corda`` on the same windows, run in fp64;
- LoRA / LoRA-FA / OPLoRA's random A: PEFT's own ``reset_lora_parameters`` for both ``init_a`` rules, one draw
  per layer;
- the null space's numerical floor, the per-module eigen-gap / energy report, and ``calibration.dtype``.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lnull import calibrate, initialize
from lnull.activations import load_statistic
from lnull.calibrate import calibration_windows, official_windows
from lnull.data.sources import load_records
from lnull.methods.corda import init_corda_ipm, init_corda_kpm
from lnull.methods.linalg import RankDeficientWarning, captured_energy
from lnull.methods.lora_null import init_lora_null, noise_floor, null_space
from lnull.modeling import load_model, load_tokenizer, resolve_model
from lnull.testing import peft_in_fp64
from lnull.tiny import TINY_ID

RANK_TINY = 4  # the tiny experiment's method.rank
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _stage(cfg: dict, tmp_path: Path, stage: str, calibration: Path | None = None) -> Path:
    out = tmp_path / stage
    out.mkdir()
    if stage == "calibration":
        calibrate.collect_into(cfg, out)
    else:
        initialize.build(cfg, out, calibration)
    return out


def _texts(cfg: dict) -> list[str]:
    cal = cfg["calibration"]
    return [r[cal["field"]] for r in load_records(cal["dataset"], cfg.get("cache_dir"))]


def _adapter(init_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} of an init adapter."""
    weights = load_file(str(init_dir / "adapter" / "adapter_model.safetensors"))
    out = {}
    for key, A in weights.items():
        if ".lora_A." in key:
            module = key[len("base_model.model."):].split(".lora_A.")[0]
            out[module] = (A, weights[key.replace(".lora_A.", ".lora_B.")])
    return out


# ---------------------------------------------------------------- 1. calibration.official

def official_get_calib_data(tokenizer, tot_text: str, nsamples: int, seqlen: int, seed: int) -> list:
    """Transcription of HungerPWAY/LoRA-Null adapterlib/datautils.py::get_calib_data (name="nqopen")."""
    random.seed(seed)
    traindataset = []
    for _ in range(nsamples):
        i = random.randint(0, len(tot_text) - seqlen - 1)
        j = i + seqlen * 10
        trainenc = tokenizer(tot_text[i:j], return_tensors="pt")
        inp = trainenc.input_ids[:, :seqlen]
        traindataset.append({"input_ids": inp, "attention_mask": torch.ones_like(inp)})
    return traindataset


def official_calib_cov_distribution(model, calib_loader, targets: list[str], peak=lambda x: torch.max(x).abs()):
    """Transcription of act_aware_utils.py::calib_cov_distribution's hook (in fp64 instead of fp16):
    ``input / torch.max(input).abs()``, ``covariance_matrix += input.t() @ input / 256``. ``peak`` swaps the
    divisor (to show the test tells max(x).abs() from max(|x|))."""
    cov = {}

    def hook(name):
        def fn(module, input, output):
            input = input[0].detach().squeeze(0).data.double()
            input = input / peak(input)
            cov[name] = cov.get(name, 0) + input.t().matmul(input) / 256
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    with torch.no_grad():
        for batch in calib_loader:
            model(**batch)
    for h in handles:
        h.remove()
    return cov


def _llama_style_tokenizer(path: str):
    """The tiny tokenizer, adding BOS on ``tokenizer(text)`` the way LLaMA's does (the official code relies on it)."""
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer(path)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def test_official_calibration_is_the_official_code(tiny_cfg, tmp_path):
    cfg = tiny_cfg("calibration.official=true", "calibration.batch_size=1", "calibration.samples=6",
                   "calibration.seqlen=48")
    stats = load_statistic(_stage(cfg, tmp_path, "calibration"))
    path = resolve_model(TINY_ID)
    text = "\n\n".join(_texts(cfg))
    loader = official_get_calib_data(_llama_style_tokenizer(path), text, 6, 48, 233)

    ours = official_windows(load_tokenizer(path), _texts(cfg), 6, 48, 233, add_bos=True)
    assert [w.tolist() for w in ours] == [b["input_ids"][0].tolist() for b in loader]
    assert all(len(w) <= 48 for w in ours) and ours[0][0] == load_tokenizer(path).bos_token_id

    model = load_model(path)
    reference = official_calib_cov_distribution(model, loader, TARGETS)
    wrong_rule = official_calib_cov_distribution(model, loader, TARGETS, peak=lambda x: x.abs().max())
    assert set(reference) == set(stats)
    discriminating = 0
    for name, C in reference.items():
        torch.testing.assert_close(stats[name].double(), C, rtol=1e-5, atol=1e-6 * float(C.abs().max()))
        discriminating += float((wrong_rule[name] - C).norm() / C.norm()) > 1e-2
    assert discriminating >= 4  # max(x).abs() != max|x| on this fixture: the old rule would fail above


def test_official_calibration_needs_batch_one(tiny_cfg):
    from lnull.config import ConfigError

    with pytest.raises(ConfigError, match="calibration.batch_size=1"):
        tiny_cfg("calibration.official=true", "calibration.batch_size=8")


def test_official_factors_are_cast_to_fp16(tiny_cfg, tmp_path):
    cfg = tiny_cfg("calibration.official=true", "calibration.batch_size=1", "method=lora_null_v1")
    init_dir = _stage(cfg, tmp_path, "init", _stage(cfg, tmp_path, "calibration"))
    for A, B in _adapter(init_dir).values():
        assert torch.equal(A, A.half().float()) and torch.equal(B, B.half().float())
    info = json.loads((init_dir / "adapter" / "lnull_method.json").read_text())
    report = json.loads((init_dir / "report.json").read_text())
    assert info["official_fp16"] and report["official_fp16"]
    assert 1e-5 < report["max_reconstruction_rel_err"] < 1e-2  # fp16 round-off, as the official residual


# ---------------------------------------------------------------- 2. CorDA = PEFT's CorDA

@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_corda_is_peft_preprocess_corda_on_the_same_windows(mode, tiny_cfg, tmp_path):
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    cfg = tiny_cfg(f"method=corda_{mode}", "method.rank=4", "method.alpha=8")
    calib = _stage(cfg, tmp_path, "calibration")
    ours = _adapter(_stage(cfg, tmp_path, "init", calib))
    stored = load_statistic(calib, "max_normalized_covariance")
    plain = load_statistic(calib, "covariance")

    cal, path = cfg["calibration"], resolve_model(TINY_ID)
    windows = calibration_windows(load_tokenizer(path), _texts(cfg), cal["samples"], cal["seqlen"], cal["seed"],
                                  cfg["model"]["add_bos"])
    model = load_model(path).double()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=mode, prune_temporary_fields=False))
    with peft_in_fp64(), torch.no_grad():  # PEFT's hook wants one sample per forward
        preprocess_corda(model, config, run_model=lambda: [model(input_ids=w[None]) for w in windows])

    init = init_corda_kpm if mode == "kpm" else init_corda_ipm
    old_rule_off = 0
    for name, module in model.named_modules():
        if not hasattr(module, "eigens"):
            continue
        e = module.eigens
        reference = e.U_WC @ torch.diag(e.S_WC) @ e.V_WC.T  # = scale * B @ A of PEFT's corda_init
        W0 = module.weight.detach()
        # The statistic: lnull's fp32 forward + fp32 storage vs PEFT's fp64 run.
        C = module.covariance_matrix
        torch.testing.assert_close(stored[name].double(), C, rtol=0, atol=1e-5 * float(C.abs().max()))
        # The rule, fp64 on both sides: lnull's CorDA on PEFT's own covariance.
        exact = init(W0, C, 4, 2.0, SimpleNamespace(damping=0.01))
        rel = (2 * exact.B.double() @ exact.A.double() - reference).norm() / reference.norm()
        assert rel < 1e-6, f"{name}: rule differs from PEFT by {rel:.1e}"
        # End to end: the stored adapter (fp32 activations) as PEFT's within fp32 noise.
        A, B = ours[name]
        rel = (2 * B.double() @ A.double() - reference).norm() / reference.norm()
        assert rel < 2e-3, f"{name}: lnull's adapter differs from PEFT by {rel:.1e}"
        # The old rule (CorDA on the plain sum x x^T) is what this test exists to reject.
        old = init(W0.float(), plain[name], 4, 2.0, SimpleNamespace(damping=0.01))
        old_rule_off += float((2 * old.B.double() @ old.A.double() - reference).norm() / reference.norm()) > 1e-2
    assert old_rule_off >= 8


# ---------------------------------------------------------------- 3-4. random A: one draw per layer, PEFT's rules

@pytest.mark.parametrize("method", ["lora", "lora_fa", "oplora"])
def test_every_layer_draws_its_own_a(method, tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"method={method}")
    adapters = _adapter(_stage(cfg, tmp_path, "init", None))
    assert len(adapters) == 14
    for (n1, (A1, _)), (n2, (A2, _)) in itertools.combinations(adapters.items(), 2):
        if A1.shape == A2.shape:
            assert not torch.equal(A1, A2), f"{n1} and {n2} share A"
            assert abs(float(torch.corrcoef(torch.stack([A1.flatten(), A2.flatten()]))[0, 1])) < 0.2

    # Deterministic per module name: the same draw whichever modules are targeted.
    only_v = tiny_cfg(f"method={method}", "model.target_modules=[v_proj]")
    (tmp_path / "v").mkdir()
    again = _adapter(_stage(only_v, tmp_path / "v", "init", None))
    for name, (A, _) in again.items():
        assert torch.equal(A, adapters[name][0])


def _peft_a(init_lora_weights, r: int, d_in: int, seed: int) -> torch.Tensor:
    """A [r, d_in] as PEFT itself draws it (LoraLayer.reset_lora_parameters)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(d_in, 8, bias=False))
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=["lin"],
                                            init_lora_weights=init_lora_weights))
    return peft.base_model.model.lin.lora_A["default"].weight.detach()


@pytest.mark.parametrize("init_a, peft_rule", [("gaussian", "gaussian"), ("kaiming_uniform", True)])
def test_random_a_has_pefts_distribution(init_a, peft_rule, tiny_cfg, tmp_path):
    from lnull.methods.base import layer_generator
    from lnull.methods.lora import random_a

    r, d_in = 16, 4096
    ours = random_a(r, d_in, init_a, layer_generator(0, "x")).flatten().sort().values
    peft = _peft_a(peft_rule, r, d_in, 0).flatten().sort().values
    # Two-sample Kolmogorov-Smirnov distance of 65,536 draws each: ~0.004 for one law, 0.3+ across the two.
    ks = float(torch.searchsorted(peft, ours).float().div(len(peft)).sub(torch.arange(len(ours)) / len(ours))
               .abs().max())
    assert ks < 0.015, f"{init_a}: KS distance {ks:.3f} from PEFT's {peft_rule!r}"
    assert float(ours.std()) == pytest.approx(float(peft.std()), rel=0.02)

    cfg = tiny_cfg("method=lora_fa", f"method.init_a={init_a}")
    init_dir = _stage(cfg, tmp_path, "init", None)
    assert json.loads((init_dir / "adapter" / "lnull_method.json").read_text())["options"]["init_a"] == init_a


def test_paper_baselines_default_to_gaussian_a():
    from lnull.cli import compose

    for method, init_a in (("lora", "gaussian"), ("lora_fa", "gaussian"), ("oplora", "kaiming_uniform")):
        assert compose(["+experiment=math_llama2", f"method={method}"])["method"]["init_a"] == init_a


# ---------------------------------------------------------------- 5. numerical floor and report

def test_noise_floor_counts_eigenvalues_lost_in_fp32_storage():
    d, rank = 48, 4
    Q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    spectrum = torch.cat([torch.logspace(0, -4, d - 8, dtype=torch.float64), torch.full((8,), 1e-9)])
    C64 = Q @ torch.diag(spectrum) @ Q.T
    C32 = C64.float()
    # Storing C in fp32 moves the 1e-9 eigenvalues by far more than their size: they are noise ...
    moved = torch.linalg.eigvalsh(C32.double())[:8]
    assert float((moved - 1e-9).abs().max()) > 2e-9 and float(moved.min()) < 0
    assert 1e-9 < noise_floor(torch.float32, d) < 1e-5
    # ... so 8 > rank of them count as zero, and the warning says so (the old 1e-10 x lambda_max counted none).
    with pytest.warns(RankDeficientWarning, match="8 eigenvalues below its torch.float32 noise floor"):
        _, diag = null_space(C32, rank)
    assert diag["near_zero"] == 8
    with warnings_as_errors():
        _, diag64 = null_space(C64, rank)  # the same spectrum in fp64 is resolved
    assert diag64["near_zero"] == 0


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficientWarning)
        yield


def test_eigen_gap_and_energy_of_a_known_spectrum():
    d, rank = 10, 3
    spectrum = torch.tensor([1e-3, 2e-3, 3e-3, 6e-3, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    C = Q @ torch.diag(spectrum) @ Q.T
    W0 = torch.randn(6, d, generator=torch.Generator().manual_seed(2))
    result = init_lora_null(W0, C, rank, 1.0, None)
    assert result.diagnostics["eigen_gap"] == pytest.approx(2.0)  # lambda_4 / lambda_3
    assert result.diagnostics["energy_min"] == pytest.approx(6e-3 / float(spectrum.sum()))
    assert captured_energy(result.A, C) == pytest.approx(result.diagnostics["energy_min"], rel=1e-6)
    assert captured_energy(Q[:, -rank:].T, C) == pytest.approx(3 / float(spectrum.sum()))  # the top-3 eigenvectors


# LoRA-Null v1's captured energy per module on the tiny calibration (fixed seeds); 0: its rank-4 subspace lies in
# the exact null space of a rank-deficient input (layer 0's q/k/v see fewer distinct tokens than dimensions)
TINY_ENERGY = {
    "layers.0.self_attn.q_proj": 0.0, "layers.0.self_attn.k_proj": 0.0, "layers.0.self_attn.v_proj": 0.0,
    "layers.0.self_attn.o_proj": 3.57752e-07, "layers.0.mlp.gate_proj": 0.000177752, "layers.0.mlp.up_proj":
    0.000177752, "layers.0.mlp.down_proj": 0.000125377, "layers.1.self_attn.q_proj": 0.000204303,
    "layers.1.self_attn.k_proj": 0.000204303, "layers.1.self_attn.v_proj": 0.000204303,
    "layers.1.self_attn.o_proj": 1.69076e-07, "layers.1.mlp.gate_proj": 0.000344059, "layers.1.mlp.up_proj":
    0.000344059, "layers.1.mlp.down_proj": 0.000334098}


def test_init_report_has_eigen_gap_and_energy_per_module(tiny_cfg, tmp_path):
    lnull_cfg = tiny_cfg("method=lora_null_v1")
    calib = _stage(lnull_cfg, tmp_path, "calibration")
    lnull_report = json.loads((_stage(lnull_cfg, tmp_path, "init", calib) / "report.json").read_text())
    (tmp_path / "lora").mkdir()
    lora_init = _stage(tiny_cfg("method=lora"), tmp_path / "lora", "init", None)
    lora_report = json.loads((lora_init / "report.json").read_text())
    covariances, lora = load_statistic(calib), _adapter(lora_init)
    for name, m in lnull_report["modules"].items():
        # no gap when lambda_r is itself rounding noise (<= 0): the tiny model has such degenerate inputs
        assert (m["eigen_gap"] >= 1) if m["eigen_gap"] is not None else m["near_zero"] >= RANK_TINY
        # pinned (energy_min by the next line); the noise floor is what an fp32 statistic can tell from zero
        assert m["energy"] == pytest.approx(TINY_ENERGY[name.removeprefix("model.")], rel=1e-4, abs=m["noise_floor"])
        # equal up to the fp32 rounding of the stored C (its noise floor, per unit of lambda_max <= tr C)
        assert m["energy"] == pytest.approx(m["energy_min"], rel=1e-3, abs=4 * m["noise_floor"])
        assert "eigen_gap" not in lora_report["modules"][name] and "energy" not in lora_report["modules"][name]
        # a random A sees the activations: its row space holds far more of their energy
        assert captured_energy(lora[name][0], covariances[name]) > 10 * m["energy"]
    assert lnull_report["max_energy"] == max(m["energy"] for m in lnull_report["modules"].values())


# ---------------------------------------------------------------- 6. calibration.dtype

def test_calibration_dtype_is_independent_of_the_model_dtype(tiny_cfg, tmp_path):
    fp32 = load_statistic(_stage(tiny_cfg(), tmp_path, "calibration"))
    (tmp_path / "bf16model").mkdir()
    bf16_model = load_statistic(_stage(tiny_cfg("model.dtype=bfloat16"), tmp_path / "bf16model",
                                                    "calibration"))
    (tmp_path / "bf16").mkdir()
    bf16_calibration = _stage(tiny_cfg("calibration.dtype=bfloat16"), tmp_path / "bf16", "calibration")
    bf16 = load_statistic(bf16_calibration)
    assert json.loads((bf16_calibration / "meta.json").read_text())["dtype"] == "bfloat16"
    for name, C in fp32.items():
        assert torch.equal(bf16_model[name], C)  # the model's dtype does not reach the calibration
        assert not torch.equal(bf16[name], C)
