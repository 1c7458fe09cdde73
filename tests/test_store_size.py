"""A store that fits one machine (issue 24 part 2): calibration statistics stored once as packed upper triangles
(half the bytes, the same matrices read back, old full-format folders still read), and `lnull store du`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import lnull
from lnull import activations, calibrate
from lnull.activations import PACKED, STATS_INDEX, CalibrationStats, load_statistic, pack_triu, unpack_triu
from lnull.errors import ConfigError

BUDGETS = {"one group": "null", "eight groups": "0.00004"}  # GiB; the tiny model's 8 unique inputs, one a group


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@pytest.mark.parametrize("n", [1, 2, 5, 13, 64])
def test_pack_round_trip_is_bit_equal_without_index_tensors(n, monkeypatch):
    monkeypatch.setattr(torch, "triu_indices", None)  # an index tensor is 0.97 GB of int64 at n = 11008
    monkeypatch.setattr(activations, "MIRROR_BLOCK", 4)  # several mirror blocks, a partial last one
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3 * n, n, generator=g)
    C = x.T @ x
    C[0, -1] = C[-1, 0] = -0.0  # signed zeros and infinities survive: copies, no arithmetic
    C[n // 2, n // 2] = float("inf")
    packed = pack_triu(C)
    assert packed.shape == (n * (n + 1) // 2,) and packed.dtype == torch.float32
    assert torch.equal(_bits(packed), _bits(torch.cat([C[i, i:] for i in range(n)])))
    assert torch.equal(_bits(unpack_triu(packed)), _bits(C))
    # fp64 in, fp32 packed: the rounding of .float(), element by element
    C64 = C.double() / 3
    assert torch.equal(_bits(unpack_triu(pack_triu(C64, torch.float32))), _bits(C64.float()))
    # a matrix that is not symmetric comes back as its upper triangle mirrored
    A = torch.randn(n, n, generator=g)
    assert torch.equal(unpack_triu(pack_triu(A)), torch.triu(A) + torch.triu(A, 1).T)


def test_a_length_that_is_no_triangle_is_refused():
    with pytest.raises(ValueError, match="not the upper triangle"):
        unpack_triu(torch.zeros(4))


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("stats*.safetensors"))


@pytest.mark.parametrize("budget", list(BUDGETS.values()), ids=list(BUDGETS))
def test_tiny_calibration_is_packed_in_half_the_bytes_and_reads_back_the_full_matrices(budget, tiny_cfg, tmp_path,
                                                                                     monkeypatch):
    cfg = tiny_cfg(f"calibration.device_budget_gb={budget}")
    packed, full = tmp_path / "packed", tmp_path / "full"
    packed.mkdir()
    calibrate.collect_into(cfg, packed)
    with monkeypatch.context() as patch:  # the format before packing: full fp32 matrices under the plain key
        patch.setattr(calibrate, "pack_triu", lambda m, dtype=None: m.to(dtype or m.dtype))
        patch.setattr(calibrate, "PACKED", "")
        full.mkdir()
        calibrate.collect_into(cfg, full)
    meta = json.loads((packed / "meta.json").read_text())
    assert meta == json.loads((full / "meta.json").read_text())
    assert (packed / STATS_INDEX).exists() == (budget != "null")
    keys = [k for f in packed.glob("stats*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert sorted(k for k in keys if k.endswith(PACKED)) == sorted(
        f"{m}.{s}{PACKED}" for m, a in meta["alias"].items() if m == a for s in activations.STATS)
    ratio = _bytes(packed) / _bytes(full)
    print(f"\ntiny calibration ({budget}): packed {_bytes(packed)} B, full {_bytes(full)} B, ratio {ratio:.3f}")
    assert 0.49 < ratio < 0.56  # n (n + 1) / 2 of n^2 numbers at n = 64 and 128, plus headers and counts
    ours, reference = CalibrationStats(packed), CalibrationStats(full)
    for statistic in activations.STATS:
        for module in meta["alias"]:
            got, want = ours.get(module, statistic), reference.get(module, statistic)
            assert got.shape == want.shape == (want.shape[0], want.shape[0]) and got.dtype == torch.float32
            assert torch.equal(_bits(got), _bits(want)), (module, statistic)  # bit-equal to the full format
        q, k = (ours.get(f"model.layers.0.self_attn.{m}_proj", statistic) for m in "qk")
        assert k is q  # one object per shared input asked back to back: init decomposes it once


@pytest.mark.parametrize("sharded", [False, True], ids=["one file", "index"])
def test_a_calibration_folder_in_the_old_full_format_still_loads(sharded, tmp_path):
    g = torch.Generator().manual_seed(0)
    alias = {"l.q": "l.q", "l.k": "l.q", "l.o": "l.o"}
    tensors = {}
    for module, n in (("l.q", 6), ("l.o", 9)):
        for statistic in activations.STATS:
            x = torch.randn(20, n, generator=g)
            tensors[f"{module}.{statistic}"] = x.T @ x
        tensors[f"{module}.tokens"] = torch.tensor([20])
    if sharded:
        index = {}
        for i, module in enumerate(("l.q", "l.o"), 1):
            part = {k: v for k, v in tensors.items() if k.startswith(module + ".")}
            save_file(part, str(tmp_path / f"stats-{i:05d}-of-00002.safetensors"))
            index.update({k: f"stats-{i:05d}-of-00002.safetensors" for k in part})
        (tmp_path / STATS_INDEX).write_text(json.dumps(index))
    else:
        save_file(tensors, str(tmp_path / activations.STATS_FILE))
    (tmp_path / "meta.json").write_text(json.dumps({"alias": alias}))
    stats = CalibrationStats(tmp_path)
    for module in alias:
        for statistic in activations.STATS:
            assert torch.equal(stats.get(module, statistic), tensors[f"{alias[module]}.{statistic}"])
    covs = load_statistic(tmp_path)
    assert covs["l.k"] is covs["l.q"] and torch.equal(covs["l.o"], tensors["l.o.covariance"])
    del tensors["l.o.covariance"]
    if not sharded:
        save_file(tensors, str(tmp_path / activations.STATS_FILE))
        with pytest.raises(ConfigError, match="run `lnull calibrate` again"):
            CalibrationStats(tmp_path).get("l.o", "covariance")


# ---------------------------------------------------------------------------------------------- lnull store du


def _on_disk(store: Path, folder: str, key: str) -> int:
    """Bytes of one entry, walked independently of lnull.store: a record with its digest and work folder."""
    paths = ([store / "eval" / f"{key}{suffix}" for suffix in (".json", ".sha256", ".work")] if folder == "eval"
             else [store / folder / key])
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        for top, _, files in os.walk(path):
            total += sum(os.lstat(os.path.join(top, f)).st_size for f in files
                         if not os.path.islink(os.path.join(top, f)))
    return total


def test_store_du_bytes_per_stage_and_per_run_equal_the_entries_on_disk(tmp_path):
    from lnull.cli import compose, du_lines
    from lnull.pipeline import run_pipeline
    from lnull.store import Store, human_bytes

    runs = {}
    for method in ("lora_null_v1", "lora_null_v2"):  # one calibration and the base model's records shared
        cfg = compose(["+experiment=tiny", f"run.root={tmp_path}", f"run.dir={tmp_path / method}", "progress=false",
                       f"method={method}", "train.max_steps=2", "eval.limit=4"])
        runs[method] = run_pipeline(cfg, log=lambda _: None).dir
    store = tmp_path / "store"
    du = Store(store).du()
    refs = {name: json.loads((runs[name] / ".lnull-ref.json").read_text()) for name in runs}
    pairs = {name: {*ref["entries"].items(), *(("eval", k) for k in ref["records"])} for name, ref in refs.items()}
    entries = {(p.parent.name, p.name if p.parent.name != "eval" else p.stem)
               for p in store.glob("*/*") if p.parent.name not in ("locks", "refs", "procs")
               and not p.name.endswith((".partial", ".sha256", ".work"))}
    assert pairs["lora_null_v1"] | pairs["lora_null_v2"] == entries  # every entry is used by a run
    size = {pair: _on_disk(store, *pair) for pair in entries}
    assert {s["folder"]: s["bytes"] for s in du["stages"]} == {
        folder: sum(b for (f, _), b in size.items() if f == folder) for folder, _ in entries}
    assert {s["folder"] for s in du["stages"]} >= {"calibration", "init", "train", "eval"}
    shared = pairs["lora_null_v1"] & pairs["lora_null_v2"]
    assert ("calibration", refs["lora_null_v1"]["entries"]["calibration"]) in shared
    for row in du["runs"]:
        mine = pairs[row["run"]]
        assert row["bytes"] == sum(size[p] for p in mine) == row["own"] + row["shared"]
        assert row["shared"] == sum(size[p] for p in mine & shared) > 0
        assert row["local"] == sum(f.stat().st_size for f in Path(row["path"]).rglob("*")
                                   if f.is_file() and not f.is_symlink()) > 0
    assert du["bytes"] == sum(size.values()) and du["unused"] == 0
    assert du["shared"] == sum(size[p] for p in shared)  # counted once in the totals
    assert du["own"] + du["shared"] == du["bytes"]

    out = lnull("store", "du", f"run.root={tmp_path}", check=True).stdout
    print("\n" + out)
    assert out.strip().splitlines() == du_lines(du, store.resolve())
    lines = out.splitlines()
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[-2:] == human_bytes(du["bytes"]).split()
    for name in runs:
        row = next(r for r in du["runs"] if r["run"] == name)
        line = next(line for line in lines if line.startswith(name + " "))
        assert " ".join(line.split()[2:8]) == " ".join(human_bytes(row[k]) for k in ("bytes", "own", "shared"))
    header = next(line for line in lines if line.startswith("run "))
    assert len({len(line) for line in lines[lines.index(header):lines.index(header) + 3]}) == 1  # aligned

    shutil.rmtree(runs["lora_null_v2"])  # its own entries become unused; the shared ones are v1's own now
    after = Store(store).du()
    assert [r["run"] for r in after["runs"]] == ["lora_null_v1"]
    assert after["unused"] == sum(size[p] for p in pairs["lora_null_v2"] - shared)
    assert after["own"] == sum(size[p] for p in pairs["lora_null_v1"]) and after["shared"] == 0
