"""Stage behaviour on the tiny model: covariance maths, init invariant, tables and analysis outputs."""
from __future__ import annotations

import json

import pytest
import torch

from lnull.analysis import activation_singular_values, effective_rank
from lnull.calibrate import collect
from lnull.modeling import load_model, load_tokenizer, resolve_model
from lnull.pipeline import run_pipeline
from lnull.tiny import TINY_ID


@pytest.fixture(scope="module")
def tiny_model():
    path = resolve_model(TINY_ID)
    return load_model(path), load_tokenizer(path)


def test_covariance_equals_explicit_xtx_and_shared_inputs_are_aliased(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(3, 200, (6, 20), generator=torch.Generator().manual_seed(0))
    captured = {}
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, i, o: captured.setdefault("x", []).append(i[0].detach().reshape(-1, i[0].shape[-1])))
    col = collect(model, ids, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  batch_size=4, progress=False)
    handle.remove()
    X = torch.cat(captured["x"]).double()
    torch.testing.assert_close(col.cov["model.layers.1.mlp.down_proj"], X.T @ X, rtol=1e-5, atol=1e-5)
    assert col.tokens["model.layers.1.mlp.down_proj"] == 6 * 20
    for layer in (0, 1):
        q = f"model.layers.{layer}.self_attn.q_proj"
        assert col.alias[f"model.layers.{layer}.self_attn.k_proj"] == q
        assert col.alias[f"model.layers.{layer}.self_attn.v_proj"] == q
        assert col.alias[f"model.layers.{layer}.mlp.up_proj"] == f"model.layers.{layer}.mlp.gate_proj"
        assert col.alias[f"model.layers.{layer}.self_attn.o_proj"] == f"model.layers.{layer}.self_attn.o_proj"
    assert len(col.cov) == 2 * 4  # per layer: qkv, o, gate/up, down
    assert col.alias["model.layers.1.self_attn.q_proj"] != col.alias["model.layers.0.self_attn.q_proj"]


def test_max_normalized_statistic_divides_each_sample_by_the_abs_of_its_signed_max(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(1))
    col = collect(model, ids, ["o_proj"], batch_size=3, progress=False)
    captured = []
    h = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    model(input_ids=ids)
    h.remove()
    x = captured[0].double()
    expected = sum((s / s.max().abs()).T @ (s / s.max().abs()) for s in x)
    torch.testing.assert_close(col.max_normalized["model.layers.0.self_attn.o_proj"], expected, rtol=1e-5, atol=1e-7)
    assert col.samples["model.layers.0.self_attn.o_proj"] == 3


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    X = torch.randn(50, 6, dtype=torch.float64)
    torch.testing.assert_close(activation_singular_values(X.T @ X), torch.linalg.svdvals(X))


@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory):
    from lnull.cli import compose

    root = tmp_path_factory.mktemp("runs")
    cfg = compose(["+experiment=tiny", f"run.root={root}", "progress=false", "train.max_steps=2",
                   f"table.out_dir={root / 'tables'}"])
    run_pipeline(cfg, log=lambda m: None)
    return cfg


def test_lora_init_reproduces_the_original_logits_after_reload(finished_tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lnull.runs import default_run_dir

    run_dir = default_run_dir(finished_tiny_run)
    original = load_model(resolve_model(TINY_ID))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "init" / "base"),
                                         run_dir / "init" / "adapter").eval()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - original(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4
    report = json.loads((run_dir / "init" / "report.json").read_text())
    assert report["rank"] == 4 and report["max_reconstruction_rel_err"] < 1e-6
    assert len(report["modules"]) == 14


def test_table_is_built_from_results_json(finished_tiny_run):
    from pathlib import Path

    from lnull.tables import build_tables

    paths = build_tables(finished_tiny_run)
    assert sorted(p.suffix for p in paths) == [".csv", ".md", ".tex"]
    md = Path(finished_tiny_run["table"]["out_dir"], "summary.md").read_text()
    results = json.loads((Path(finished_tiny_run["run"]["root"]).glob("tiny-*").__next__() / "eval" /
                          "results.json").read_text())["results"]
    for rec in results:
        assert f"| tiny | lora | 4 | {rec['model']} | {rec['value']:.2f} |" in md


def test_analyze_writes_effective_ranks_for_weights_and_activations(finished_tiny_run):
    import csv

    from lnull.analysis import run_analysis

    [path] = [p for p in run_analysis(finished_tiny_run) if p.name == "effective_rank.csv"]
    rows = list(csv.DictReader(path.open()))
    assert {r["matrix"] for r in rows} == {"weight", "activation"} and len(rows) == 28
    assert all(0 < float(r["effective_rank"]) <= 128 for r in rows)


def test_rank_deficient_covariance_warns_naming_the_module(tiny_cfg, tmp_path):
    from lnull import calibrate, initialize

    cfg = tiny_cfg("method.name=lora_null_v1", "calibration.samples=1", "calibration.seqlen=8")
    (tmp_path / "cal").mkdir()
    (tmp_path / "init").mkdir()
    calibrate.run(cfg, tmp_path / "cal")  # 8 tokens: C has rank <= 8 of d_in = 64
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.self_attn\.q_proj: covariance has \d+ eigenvalues below"):
        initialize.run(cfg, tmp_path / "init", tmp_path / "cal")
    report = json.loads((tmp_path / "init" / "report.json").read_text())
    assert any(w.startswith("model.layers.1.mlp.down_proj: ") for w in report["warnings"])
    assert report["max_reconstruction_rel_err"] < 1e-6


def test_nq_open_calibration_uses_offline_dev_split_and_says_so(tiny_cfg, tmp_path, monkeypatch):
    from lnull import calibrate

    cache = tmp_path / "cache"
    (cache / "data" / "nq_open").mkdir(parents=True)
    rows = [{"question": f"who wrote the book number {i}", "answer": ["x"]} for i in range(200)]
    (cache / "data" / "nq_open" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_cfg("calibration.dataset=nq_open", f"cache_dir={cache}")
    calibrate.run(cfg, tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["source"] == "asset:nq_open/dev" and meta["records"] == 200


def test_init_checks_every_layer_before_any_work(tiny_cfg, tmp_path):
    from lnull import initialize
    from lnull.config import ConfigError

    with pytest.raises(ConfigError, match="method.rank=65 exceeds min"):
        initialize.run(tiny_cfg("method.rank=65"), tmp_path, None)
    with pytest.raises(ConfigError, match="needs calibration stats"):
        initialize.run(tiny_cfg("method.name=lora_null_v2"), tmp_path, None)
    assert not (tmp_path / "base").exists()
