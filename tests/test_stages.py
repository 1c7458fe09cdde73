"""Stage behaviour on the tiny model: covariance maths, init invariant, tables and analysis outputs."""
from __future__ import annotations

import json

import pytest
import torch

from lnull.activations import collect_groups, probe_aliases
from lnull.analysis import activation_singular_values, effective_rank
from lnull.modeling import load_model, load_tokenizer, resolve_model, target_linears
from lnull.pipeline import run_pipeline
from lnull.tiny import TINY_ID

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def collect(model, ids, targets, batch_size, budget_gb=None):
    """(alias, sums, tokens, samples, groups) of ``lnull.activations`` on ``ids`` [n, T]."""
    linears = target_linears(model, targets)
    alias = probe_aliases(model, linears, ids[:1, :16])
    sums, tokens, samples, groups = {}, {}, {}, 0
    for _, s, t, n in collect_groups(model, linears, ids, batch_size, alias, budget_gb, progress=False):
        sums.update(s), tokens.update(t), samples.update(n)
        groups += 1
    return alias, sums, tokens, samples, groups


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
    alias, sums, tokens, samples, _ = collect(model, ids, ALL, batch_size=4)
    handle.remove()
    X = torch.cat(captured["x"][1:]).double()  # [0] is the alias probe's forward
    torch.testing.assert_close(sums["model.layers.1.mlp.down_proj.covariance"], X.T @ X, rtol=1e-5, atol=1e-5)
    assert tokens["model.layers.1.mlp.down_proj"] == 6 * 20 and samples["model.layers.1.mlp.down_proj"] == 6
    for layer in (0, 1):
        q = f"model.layers.{layer}.self_attn.q_proj"
        assert alias[f"model.layers.{layer}.self_attn.k_proj"] == q
        assert alias[f"model.layers.{layer}.self_attn.v_proj"] == q
        assert alias[f"model.layers.{layer}.mlp.up_proj"] == f"model.layers.{layer}.mlp.gate_proj"
        assert alias[f"model.layers.{layer}.self_attn.o_proj"] == f"model.layers.{layer}.self_attn.o_proj"
    assert len(tokens) == 2 * 4  # per layer: qkv, o, gate/up, down
    assert alias["model.layers.1.self_attn.q_proj"] != alias["model.layers.0.self_attn.q_proj"]


def test_max_normalized_statistic_divides_each_sample_by_the_abs_of_its_signed_max(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(1))
    _, sums, _, samples, _ = collect(model, ids, ["o_proj"], batch_size=3)
    captured = []
    h = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    model(input_ids=ids)
    h.remove()
    x = captured[0].double()
    expected = sum((s / s.max().abs()).T @ (s / s.max().abs()) for s in x)
    got = sums["model.layers.0.self_attn.o_proj.max_normalized_covariance"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert samples["model.layers.0.self_attn.o_proj"] == 3


def test_module_groups_under_a_device_budget_give_the_same_statistics(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(2))
    _, whole, _, _, one = collect(model, ids, ALL, batch_size=2)
    # 2 statistics x (64^2 or 128^2) x 8 bytes: a 0.0003 GiB budget fits about one unique input per group
    _, grouped, _, _, many = collect(model, ids, ALL, batch_size=2, budget_gb=0.0003)
    assert one == 1 and many >= 4
    assert whole.keys() == grouped.keys()
    for key, value in whole.items():
        assert torch.equal(grouped[key], value), key  # same products, same order: bit for bit


def test_sharded_statistics_are_read_back_per_module(tiny_cfg, tmp_path):
    from lnull import calibrate
    from lnull.activations import STATS_INDEX, load_statistic

    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    calibrate.collect_into(tiny_cfg(), tmp_path / "one")
    calibrate.collect_into(tiny_cfg("calibration.device_budget_gb=0.0003"), tmp_path / "many")
    assert (tmp_path / "many" / STATS_INDEX).exists() and not (tmp_path / "one" / STATS_INDEX).exists()
    assert json.loads((tmp_path / "many" / "meta.json").read_text())["groups"] >= 4
    for statistic in ("covariance", "max_normalized_covariance"):
        one, many = load_statistic(tmp_path / "one", statistic), load_statistic(tmp_path / "many", statistic)
        assert one.keys() == many.keys() and len(one) == 14
        assert all(torch.equal(one[k], many[k]) for k in one)


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

    from lnull.layout import default_run_dir
    from lnull.residual import load_residual_model

    run_dir = default_run_dir(finished_tiny_run)
    original = load_model(resolve_model(TINY_ID))
    reloaded = PeftModel.from_pretrained(load_residual_model(resolve_model(TINY_ID), run_dir / "init" / "adapter",
                                                             "float32"), run_dir / "init" / "adapter").eval()
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
    results = json.loads((Path(finished_tiny_run["run"]["root"]).glob("tiny/*").__next__() / "eval" /
                          "results.json").read_text())["results"]
    for rec in results:  # the base model is the pre-trained row, with no method, rank or calibration
        row = "| tiny | lora | 4 |  | trained |" if rec["model"] == "trained" else "| tiny | pre-trained |  |  | base |"
        assert f"{row} {rec['value']:.2f} |" in md


def test_analyze_writes_effective_ranks_for_weights_and_activations(finished_tiny_run):
    import csv

    from lnull.cli import run_analysis

    run_pipeline(finished_tiny_run, stages=["calibrate"], log=lambda m: None)  # LoRA's `lnull run` skips it
    [path] = [p for p in run_analysis(finished_tiny_run) if p.name == "effective_rank.csv"]
    rows = list(csv.DictReader(path.open()))
    assert {r["matrix"] for r in rows} == {"weight", "activation"} and len(rows) == 28
    assert all(0 < float(r["effective_rank"]) <= 128 for r in rows)


def test_rank_deficient_covariance_warns_naming_the_module(tiny_cfg, tmp_path):
    from lnull import calibrate, initialize

    cfg = tiny_cfg("method=lora_null_v1", "calibration.samples=1", "calibration.seqlen=8")
    (tmp_path / "cal").mkdir()
    (tmp_path / "init").mkdir()
    calibrate.collect_into(cfg, tmp_path / "cal")  # 8 tokens: C has rank <= 8 of d_in = 64
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.self_attn\.q_proj: covariance has \d+ eigenvalues below"):
        initialize.build(cfg, tmp_path / "init", tmp_path / "cal")
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
    calibrate.collect_into(cfg, tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["source"] == "asset:nq_open/dev" and meta["records"] == 200


def test_init_checks_every_layer_before_any_work(tiny_cfg, tmp_path):
    from lnull import initialize
    from lnull.config import ConfigError

    with pytest.raises(ConfigError, match="method.rank=65 exceeds min"):
        initialize.build(tiny_cfg("method.rank=65"), tmp_path, None)
    with pytest.raises(ConfigError, match="needs calibration stats"):
        initialize.build(tiny_cfg("method=lora_null_v2"), tmp_path, None)
    assert not list(tmp_path.iterdir())
