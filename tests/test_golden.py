"""Golden numbers, the torchtune way: the `tiny` experiment under fixed seeds, pinned.

For each of lora, lora_null_v1, corda_kpm and oplora (one store, so one calibration serves v1 and CorDA), a
short `tiny` run is compared with ``tests/golden/tiny_<method>.json``:

- every stage key (``StageKeys`` of the run's config, analyze's with every optional upstream, as its key in
  a run depends on what the store holds; checked against the run's keys and each ``complete.json``) and every
  result record's key, exactly: a key that changes orphans every user's stored results under the old key, so a
  change must be deliberate (the golden file updated in the same commit); the file also holds each key's inputs,
  so a failure says which input moved;
- the per-step training loss (rtol 1e-4), learning rate and token count of ``train/metrics.jsonl``;
- ``init/report.json`` (per module: reconstruction error, captured energy, eigen gaps, ...) and the Frobenius
  norms of each module's initial ``lora_A`` / ``lora_B`` in ``init/adapter`` (rtol 1e-5); reconstruction errors
  and captured energies are fp32 rounding or near it, compared to an absolute tolerance (FIELD_ATOL);
- the eval records' values (``eval/results.json``): synthetic-facts exact match and the held-out task's exact
  match / token accuracy / NLL per token, of the base, init and trained models.

Floats are compared with tolerances (a platform's float noise is not a change), keys and counts exactly. The
runs are forced onto the CPU (``device`` enters no key), so a GPU machine checks the same numbers; here they are
bit-identical across processes, run orders, global RNG states and thread counts (1 or 2). Caveat: the tiny
model's inputs are rank-deficient (layer 0's q/k/v see fewer distinct tokens than dimensions; layer 1's o_proj),
so LoRA-Null and CorDA-KPM pick part of their subspace inside exact null spaces: a BLAS that rounds the fp32
statistic differently (a 3e-7 x max|C| perturbation, measured) moves v1's losses by up to ~4e-4 relative and
those modules' init norms / eigen gaps beyond 1e-5; on such a platform regenerate and say so in the commit.
``pytest tests/test_golden.py --update-golden`` rewrites the golden files from this run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
METHODS = {"lora": (), "lora_null_v1": (), "corda_kpm": (), "oplora": ("method.k=8",)}
OVERRIDES = ("device=cpu", "progress=false", "train.max_steps=6", "eval=[synthetic,heldout]", "eval.limit=8",
             "eval.models=[base,init,trained]")
LOSS_RTOL = 1e-4
INIT_RTOL = 1e-5
# Absolute tolerances of values that are fp32 rounding by nature: reconstruction errors (W0 vs residual + s·B0A0,
# ~1e-8) and captured energies (eigenvalues of the fp32-summed statistic per unit of its trace; their rounding
# is the report's noise_floor, ~1e-6 x lambda_max, on the tiny model)
FIELD_ATOL = {"reconstruction_rel_err": 1e-6, "max_reconstruction_rel_err": 1e-6,
              "energy": 2e-6, "energy_min": 2e-6, "max_energy": 2e-6}
UPDATE_HINT = ("if the change is intended, run `pytest tests/test_golden.py --update-golden` and commit "
               "tests/golden/ in the same commit")


def _run(root: Path, method: str, extra: tuple[str, ...]) -> dict[str, Any]:
    """Run the `tiny` chain for one method under ``root`` (shared store) and collect what the golden file pins."""
    from safetensors.torch import load_file

    from lnull.compose import compose
    from lnull.pipeline import run_pipeline
    from lnull.stages import BY_NAME, STAGES, StageKeys

    overrides = ["+experiment=tiny", f"method={method}", *extra, *OVERRIDES]
    run = run_pipeline(compose([f"run.dir={root / method}", *overrides]), log=lambda msg: None)
    # every optional upstream counted (analyze's key in a run depends on what the store holds: order-dependent)
    stage_keys = StageKeys(run.cfg)
    keyed = [s.name for s in STAGES]
    keys = {name: stage_keys[name] for name in keyed}
    for name in keyed:
        if not BY_NAME[name].optional_reads:
            assert run.keys[name] == keys[name], f"{method}: the run's {name} key is not its config's"
    for name in ("calibrate", "init", "train", "evaluate"):
        marker = run.dir / {"calibrate": "calibration", "evaluate": "eval"}.get(name, name) / "complete.json"
        if marker.exists():
            assert json.loads(marker.read_text())["key"] == keys[name], f"{method}: {marker} holds another key"
    key_inputs = {}
    for name in keyed:
        record = stage_keys.record(name)
        key_inputs[name] = {"inputs": record["inputs"], "upstream": record["upstream"]}

    report = json.loads((run.dir / "init" / "report.json").read_text())
    report.pop("seconds", None)
    tensors = load_file(str(run.dir / "init" / "adapter" / "adapter_model.safetensors"))
    norms: dict[str, dict[str, float]] = {}
    for name, t in sorted(tensors.items()):
        module, _, rest = name.partition(".lora_")
        module = module.removeprefix("base_model.model.").removeprefix("model.")
        norms.setdefault(module, {})["lora_" + rest.removesuffix(".weight")] = float(t.double().norm())

    train = [json.loads(line) for line in (run.dir / "train" / "metrics.jsonl").read_text().splitlines()]
    records = {}
    for r in json.loads((run.dir / "eval" / "results.json").read_text())["results"]:
        records[f"{r['model']}/{r['benchmark']}"] = {
            "key": r["key"], "metric": r["metric"], "n": r["n"], "value": r["value"], "stderr": r["stderr"],
            **({"metrics": r["details"]["metrics"]} if "metrics" in (r.get("details") or {}) else {})}
    return {"overrides": overrides, "keys": keys, "record_keys": {k: v["key"] for k, v in records.items()},
            "train": [{k: m[k] for k in ("step", "loss", "lr", "tokens")} for m in train],
            "init_report": report, "adapter_norms": norms,
            "eval": {k: {f: v for f, v in r.items() if f != "key"} for k, r in records.items()},
            "key_inputs": key_inputs}


@pytest.fixture(scope="module")
def golden(tmp_path_factory, update_golden) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """method -> (observed, expected); under --update-golden the expected files are rewritten first."""
    root = tmp_path_factory.mktemp("golden")
    out = {}
    for method, extra in METHODS.items():
        observed = json.loads(json.dumps(_run(root, method, extra)))  # as the JSON file holds it
        path = GOLDEN / f"tiny_{method}.json"
        if update_golden:
            GOLDEN.mkdir(exist_ok=True)
            path.write_text(json.dumps(observed, indent=1, sort_keys=True) + "\n")
        if not path.exists():
            pytest.fail(f"{path} is missing: run `pytest tests/test_golden.py --update-golden`")
        out[method] = (observed, json.loads(path.read_text()))
    return out


def _diff(got: Any, want: Any, where: str, rtol: float, atol: float = 0.0) -> list[str]:
    """Differences of two JSON trees: dict keys, strings, ints, bools and None exactly, floats with tolerance
    (the fields of FIELD_ATOL to at least their absolute tolerance)."""
    atol = max(atol, FIELD_ATOL.get(where.rpartition(".")[2], 0.0))
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}: missing {sorted(set(want) - set(got))}, new {sorted(set(got) - set(want))}"] \
            if set(want) != set(got) else []
        return out + [d for k in sorted(set(want) & set(got))
                      for d in _diff(got[k], want[k], f"{where}.{k}", rtol, atol)]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: {len(got)} items, expected {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _diff(g, w, f"{where}[{i}]", rtol, atol)]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isclose(got, want, rel_tol=rtol, abs_tol=atol) or (math.isnan(got) and math.isnan(want)):
            return []
        return [f"{where}: {got!r}, expected {want!r} (rtol {rtol:g}, atol {atol:g})"]
    return [] if (type(got) is type(want) and got == want) else [f"{where}: {got!r}, expected {want!r}"]


def _fail_on(diffs: list[str], what: str) -> None:
    if diffs:
        pytest.fail(f"{what} moved from tests/golden/ ({len(diffs)} values):\n  " + "\n  ".join(diffs[:40])
                    + f"\n{UPDATE_HINT}", pytrace=False)


@pytest.mark.parametrize("method", METHODS)
def test_stage_and_record_keys_are_pinned(golden, method):
    got, want = golden[method]
    problems = []
    if set(got["keys"]) != set(want["keys"]):
        problems.append(f"stages with a key: {sorted(got['keys'])}, expected {sorted(want['keys'])}")
    for stage in sorted(set(got["keys"]) & set(want["keys"])):
        if got["keys"][stage] != want["keys"][stage]:
            moved = _diff(got["key_inputs"].get(stage), want["key_inputs"].get(stage), stage, rtol=0.0)
            problems.append(f"stage '{stage}' key {want['keys'][stage]} -> {got['keys'][stage]}: results stored "
                            f"under the old key will not be reused (every store recomputes this stage and the ones "
                            f"after it); key inputs that moved: {'; '.join(moved) or 'none (the hashing changed)'}")
    for name in sorted(set(got["record_keys"]) | set(want["record_keys"])):
        old, new = want["record_keys"].get(name), got["record_keys"].get(name)
        if old != new:
            problems.append(f"eval record '{name}' key {old} -> {new}: stored eval records under the old key will "
                            f"not be reused (every model is scored again)")
    if problems:
        pytest.fail(f"{method}: store keys changed:\n  " + "\n  ".join(problems) + f"\n{UPDATE_HINT}", pytrace=False)


@pytest.mark.parametrize("method", METHODS)
def test_training_losses_are_pinned(golden, method):
    got, want = golden[method]
    assert [m["step"] for m in got["train"]] == list(range(1, 7))
    _fail_on(_diff(got["train"], want["train"], "train", rtol=LOSS_RTOL), f"{method}: train/metrics.jsonl")


@pytest.mark.parametrize("method", METHODS)
def test_init_report_and_adapter_norms_are_pinned(golden, method):
    got, want = golden[method]
    _fail_on(_diff(got["init_report"], want["init_report"], "init_report", rtol=INIT_RTOL, atol=1e-12)
             + _diff(got["adapter_norms"], want["adapter_norms"], "adapter_norms", rtol=INIT_RTOL, atol=1e-12),
             f"{method}: init/report.json or the initial adapter's norms")


@pytest.mark.parametrize("method", METHODS)
def test_eval_records_are_pinned(golden, method):
    got, want = golden[method]
    _fail_on(_diff(got["eval"], want["eval"], "eval", rtol=LOSS_RTOL, atol=1e-9), f"{method}: eval/results.json")


def test_golden_files_cover_exactly_the_methods():
    assert sorted(p.name for p in GOLDEN.glob("*.json")) == sorted(f"tiny_{m}.json" for m in METHODS)
