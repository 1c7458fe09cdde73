"""`lnull analyze`: the papers' diagnostics on finished tiny runs, and the metric functions on known cases."""
from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lnull.activations import CalibrationStats
from lnull.analysis import eigenbasis_desc, projection_profile, relative_change, rho_k
from lnull.cli import run_analysis
from lnull.pipeline import run_pipeline

METHODS = ("lora", "lora_null_v1", "lora_null_v2", "pissa", "oplora", "full")
CSV_COLUMNS = {
    "effective_rank.csv": ["module", "matrix", "effective_rank"],
    "spectra.csv": ["module", "matrix", "index", "value"],
    "projection_profile.csv": ["module", "i", "pa_i", "energy_i"],
    "table1.csv": ["module", "residual_rel_change", "m", "A_energy_top_m", "A_energy_bottom_r"],
    "relative_change.csv": ["module", "matrix", "value", "kind"],
    "rho_k.csv": ["module", "k", "rho_k", "delta_norm"],
}
PNGS = ("effective_rank.png", "spectra.png", "projection_profile.png", "relative_change.png")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == CSV_COLUMNS[path.name], path.name
        return list(reader)


# ---------------------------------------------------------------- metric functions

def test_projection_profile_matches_the_paper_definition_by_hand():
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, -2.0, 0.0]])
    pa, energy = projection_profile(A, torch.eye(3))
    torch.testing.assert_close(pa, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))  # sum_j |P_ji|
    torch.testing.assert_close(energy, torch.tensor([0.2, 0.8, 0.0], dtype=torch.float64))
    Q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    A = torch.randn(2, 6, dtype=torch.float64)
    pa, energy = projection_profile(A, Q)
    torch.testing.assert_close(pa, (A @ Q).abs().sum(0))
    assert float(energy.sum()) == pytest.approx(1.0) and bool((energy >= 0).all())


def test_eigenbasis_is_descending_and_reconstructs_the_covariance():
    X = torch.randn(40, 5, dtype=torch.float64)
    vals, U = eigenbasis_desc(X.T @ X)
    assert bool((vals[:-1] >= vals[1:]).all())
    torch.testing.assert_close(U @ torch.diag(vals) @ U.T, X.T @ X)


def test_relative_change_of_a_known_perturbation():
    A0 = torch.randn(4, 8)
    assert relative_change(A0 * 1.25, A0) == (pytest.approx(0.25), True)
    E = torch.zeros(4, 8)
    E[0, 0] = 3.0
    value, relative = relative_change(A0 + E, A0)
    assert relative and value == pytest.approx(3.0 / float(A0.double().norm()))
    B1 = torch.full((8, 4), 0.5)  # B0 = 0: the absolute norm, marked as such
    assert relative_change(B1, torch.zeros(8, 4)) == (pytest.approx(0.5 * 32 ** 0.5), False)


def test_rho_k_known_cases():
    U = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    W0 = U[:, :5] @ torch.diag(torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64)) @ V.T
    assert rho_k(W0, W0.clone(), 2) == 0.0  # no update: no interference
    in_top = torch.outer(U[:, 0], torch.randn(5, dtype=torch.float64))
    assert rho_k(W0, W0 + in_top, 1) == pytest.approx(1.0)
    outside = torch.outer(U[:, 3], torch.randn(5, dtype=torch.float64))
    assert rho_k(W0, W0 + outside, 3) == pytest.approx(0.0, abs=1e-12)
    assert rho_k(W0, W0 + outside, 4) == pytest.approx(1.0)
    mixed = in_top / in_top.norm() + 2 * outside / outside.norm()  # energy 1 inside, 4 outside
    assert rho_k(W0, W0 + mixed, 2) == pytest.approx(0.2)


# ---------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """{method: (cfg, analysis folder, summary)} for finished tiny runs (calibrate, init, train)."""
    from lnull.cli import compose

    root = tmp_path_factory.mktemp("analysis-runs")
    out = {}
    for method in METHODS:
        cfg = compose(["+experiment=tiny", f"run.root={root}", "progress=false", "train.max_steps=2",
                       f"method={method}"])
        run = run_pipeline(cfg, stages=["calibrate", "init", "train"], log=lambda m: None)
        paths = run_analysis(cfg)
        assert paths[-1].name == "summary.json" and all(p.exists() for p in paths)
        out[method] = (cfg, run.dir / "analysis", json.loads(paths[-1].read_text()))
    return out


def _shapes() -> dict[str, tuple[int, int]]:
    from lnull.modeling import load_model, resolve_model, target_linears
    from lnull.tiny import TINY_ID

    model = load_model(resolve_model(TINY_ID))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {n: tuple(lin.weight.shape) for n, lin in target_linears(model, targets).items()}


# rho_k over the 14 modules after the tiny 2-step training (fixed seeds): (mean row, min, max)
RHO_K_TINY = {"lora": (0.284658621, 0.09858019061, 0.5649976219),
              "lora_null_v1": (0.4525991813, 0.2178812082, 0.7538440612),
              "pissa": (0.6510121994, 0.4163124345, 0.8738070426)}


@pytest.mark.parametrize("method", ["lora", "lora_null_v1", "pissa"])
def test_every_file_exists_with_its_columns_and_rows(analysed, method):
    _, folder, summary = analysed[method]
    shapes = _shapes()
    assert len(shapes) == 14
    assert {p: v["status"] for p, v in summary["parts"].items()} == dict.fromkeys(
        ("effective_rank", "spectra", "projection_profile", "table1", "relative_change", "rho_k"), "done")
    for png in PNGS:
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_rows(folder / "effective_rank.csv")) == 2 * 14
    spectra = _rows(folder / "spectra.csv")
    assert len(spectra) == sum(min(s) + s[1] for s in shapes.values())
    assert len(_rows(folder / "projection_profile.csv")) == sum(s[1] for s in shapes.values())
    table = _rows(folder / "table1.csv")
    assert len(table) == 15 and table[-1]["module"] == "mean"
    assert len(_rows(folder / "relative_change.csv")) == 2 * 14
    rho = _rows(folder / "rho_k.csv")
    values = [float(r["rho_k"]) for r in rho[:-1]]
    assert len(rho) == 15 and rho[-1]["module"] == "mean" and float(rho[-1]["rho_k"]) == pytest.approx(sum(values) / 14)
    assert (float(rho[-1]["rho_k"]), min(values), max(values)) == pytest.approx(RHO_K_TINY[method], rel=1e-3)
    assert all(int(r["k"]) == 16 for r in rho)


def _profiles(folder: Path) -> dict[str, list[dict[str, str]]]:
    by_module = defaultdict(list)
    for row in _rows(folder / "projection_profile.csv"):
        by_module[row["module"]].append(row)
    return by_module


def test_projection_profile_puts_lora_null_in_the_null_space_only(analysed):
    r = 4
    for method in ("lora", "lora_null_v1"):
        cfg, folder, _ = analysed[method]
        adapter = load_file(str(folder.parent / "init" / "adapter" / "adapter_model.safetensors"))
        for module, rows in _profiles(folder).items():
            energy = [float(row["energy_i"]) for row in rows]
            assert [int(row["i"]) for row in rows] == list(range(len(rows)))
            assert sum(energy) == pytest.approx(1.0)
            top = sum(energy[: len(rows) - r])  # energy outside the r smallest eigenvectors of C
            if method == "lora_null_v1":
                assert top < 1e-8, module
            else:
                assert top > 0.5, module
        # pa_i is the paper's sum_j |(A U)_ji| for the adapter file's A
        module = "model.layers.1.self_attn.o_proj"
        A = adapter[f"base_model.model.{module}.lora_A.weight"].double()
        C = CalibrationStats(folder.parent / "calibration").get(module, "covariance")
        pa = (A @ eigenbasis_desc(C)[1]).abs().sum(0)
        torch.testing.assert_close(torch.tensor([float(row["pa_i"]) for row in _profiles(folder)[module]],
                                                dtype=torch.float64), pa, rtol=1e-5, atol=1e-9)


def test_table1_residual_change_and_principal_energy(analysed):
    tables = {m: _rows(analysed[m][1] / "table1.csv") for m in ("lora", "lora_null_v1", "pissa")}
    assert all(float(r["residual_rel_change"]) == 0.0 for r in tables["lora"])
    for method in ("lora_null_v1", "pissa"):
        assert all(float(r["residual_rel_change"]) > 1e-2 for r in tables[method])
    assert all(float(r["A_energy_top_m"]) < 1e-8 and float(r["A_energy_bottom_r"]) == pytest.approx(1.0)
               for r in tables["lora_null_v1"])
    assert float(tables["lora"][-1]["A_energy_top_m"]) > 0.2 and float(tables["pissa"][-1]["A_energy_top_m"]) > 0.2


def test_relative_change_marks_zero_B0_and_frozen_A(analysed):
    lora = _rows(analysed["lora"][1] / "relative_change.csv")
    assert all(r["kind"].startswith("absolute") and float(r["value"]) > 0 for r in lora if r["matrix"] == "B")
    assert all(r["kind"] == "relative" and float(r["value"]) > 0 for r in lora if r["matrix"] == "A")
    v2 = _rows(analysed["lora_null_v2"][1] / "relative_change.csv")  # A frozen in training
    assert all(float(r["value"]) == 0.0 for r in v2 if r["matrix"] == "A")
    assert all(float(r["value"]) > 0.0 for r in v2 if r["matrix"] == "B")


def _copy_of(analysed_run, tmp_path):
    """(cfg, run dir) of a copy of an analysed run and its store, without its analysis: the copy's stored
    train adapter can be replaced by a hand-made one."""
    cfg, folder, _ = analysed_run
    copy = tmp_path / "copy"
    root = folder.parent.parent.parent  # run.root: <experiment>/<run>/analysis below it, the store beside
    shutil.copytree(root, copy, symlinks=True)
    run = copy / folder.parent.relative_to(root)
    shutil.rmtree(run / "analysis")
    return {**cfg, "run": {**cfg["run"], "root": str(copy)}}, run


def _replace_trained_adapter(run_dir, tensors) -> None:
    """Write ``tensors`` as the run's stored train adapter and re-list the entry's files in its marker (the store
    treats an entry whose files differ from its manifest as damaged)."""
    import json

    from lnull.store import manifest

    entry = (run_dir / "train").resolve()
    save_file(tensors, str(entry / "adapter" / "adapter_model.safetensors"))
    marker = json.loads((entry / "complete.json").read_text())
    (entry / "complete.json").write_text(json.dumps({**marker, "files": manifest(entry)}))


def test_hand_made_trained_adapter_gives_known_changes_and_rho(analysed, tmp_path):
    """Replace PiSSA's trained adapter by A* = 1.1 A0, B* = 0.5 B0: changes 0.1 and 0.5; the update
    dW = s (0.55 - 1) B0 A0 lies in W0's top-r (r = 4 <= k = 16) left singular space, so rho_k = 1."""
    cfg, run_dir = _copy_of(analysed["pissa"], tmp_path)
    init = load_file(str(run_dir / "init" / "adapter" / "adapter_model.safetensors"))
    edited = {k: (1.1 if ".lora_A." in k else 0.5) * v for k, v in init.items()}
    _replace_trained_adapter(run_dir, edited)
    run_analysis(cfg)
    for row in _rows(run_dir / "analysis" / "relative_change.csv"):
        assert row["kind"] == "relative"
        assert float(row["value"]) == pytest.approx(0.1 if row["matrix"] == "A" else 0.5, rel=1e-5)
    assert all(float(r["rho_k"]) == pytest.approx(1.0, abs=1e-6) for r in _rows(run_dir / "analysis" / "rho_k.csv"))


def test_rho_k_is_zero_for_oplora_and_not_for_lora(analysed):
    """OPLoRA keeps the update out of W0's top-k left singular space (k = method.k = analysis.k = 16)."""
    oplora = _rows(analysed["oplora"][1] / "rho_k.csv")
    lora = _rows(analysed["lora"][1] / "rho_k.csv")
    assert all(float(r["rho_k"]) < 1e-8 and float(r["delta_norm"]) > 0 for r in oplora)
    assert all(float(r["rho_k"]) > 1e-2 for r in lora)


def test_unbaked_oplora_adapter_is_projected_before_rho_k(analysed, tmp_path):
    """A trained OPLoRA adapter saved without baking (raw A, B) still yields rho_k = 0: the analysis
    applies P_U, P_V from init/adapter/oplora_projections.safetensors."""
    cfg, run_dir = _copy_of(analysed["oplora"], tmp_path)
    gen = torch.Generator().manual_seed(0)
    init = load_file(str(run_dir / "init" / "adapter" / "adapter_model.safetensors"))
    raw = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in init.items()}
    _replace_trained_adapter(run_dir, raw)
    run_analysis(cfg)
    assert all(float(r["rho_k"]) < 1e-8 for r in _rows(run_dir / "analysis" / "rho_k.csv"))


def test_full_finetuning_skips_adapter_parts_with_a_reason(analysed):
    _, folder, summary = analysed["full"]
    for part in ("projection_profile", "table1", "relative_change"):
        assert summary["parts"][part]["status"] == "skipped" and "adapter" in summary["parts"][part]["reason"]
        assert not list(folder.glob(f"{part}.*"))
    assert summary["parts"]["rho_k"]["status"] == "done"
    rho = _rows(folder / "rho_k.csv")
    assert len(rho) == 15 and all(float(r["delta_norm"]) > 0 for r in rho)


def test_missing_stages_are_recorded_as_skipped(tmp_path):
    from lnull.cli import compose

    cfg = compose(["+experiment=tiny", f"run.dir={tmp_path / 'run'}", "progress=false"])
    paths = run_analysis(cfg)  # nothing computed yet
    summary = json.loads(paths[-1].read_text())
    assert [p.name for p in paths] == ["summary.json"]
    assert all(v["status"] == "skipped" and v["reason"] for v in summary["parts"].values())
    assert len(summary["parts"]) == 6
    run_pipeline(cfg, stages=["calibrate"], log=lambda m: None)
    summary = json.loads(run_analysis(cfg)[-1].read_text())
    assert summary["parts"]["spectra"]["status"] == "done"
    assert "init" in summary["parts"]["table1"]["reason"] and "train" in summary["parts"]["rho_k"]["reason"]
