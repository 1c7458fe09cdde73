"""The content-addressed store: sweeps share work, records are reused, two processes never collide,
`lnull store ls|gc`, and the code's layering (methods known only to their registry, no import cycles)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, lnull
from lnull.cli import compose
from lnull.errors import ConfigError
from lnull.pipeline import run_pipeline

LNULL = REPO / "lnull"


def _cfg(root: Path, *overrides: str) -> dict:
    return compose(["+experiment=tiny", f"run.root={root}", "progress=false", "train.max_steps=2", "eval.limit=4",
                    *overrides])


def _run(cfg: dict, stages=None) -> list[str]:
    logs: list[str] = []
    run_pipeline(cfg, stages=stages, log=logs.append)
    return logs


def _count(logs: list[str], needle: str) -> int:
    return sum(needle in line for line in logs)


def test_a_rank_sweep_and_three_methods_calibrate_once(tmp_path):
    logs = []
    for extra in (["method.rank=2"], ["method.rank=4"], ["method.rank=8"], ["method=lora_null_v2"],
                  ["method=corda_kpm"]):
        logs += _run(_cfg(tmp_path, "method=lora_null_v1", *extra) if extra[0].startswith("method.rank")
                     else _cfg(tmp_path, *extra))
    assert _count(logs, "[calibrate] done") == 1 and _count(logs, "[calibrate] cached") == 4
    assert len(list((tmp_path / "store" / "calibration").iterdir())) == 1
    assert len(list((tmp_path / "store" / "init").iterdir())) == 5
    runs = list(tmp_path.glob("tiny/*"))
    assert len(runs) == 5 and len({(p / "calibration").resolve() for p in runs}) == 1


def test_methods_without_a_statistic_never_calibrate(tmp_path):
    logs = _run(_cfg(tmp_path, "method=lora"))
    assert _count(logs, "[calibrate] not needed") == 1 and not (tmp_path / "store" / "calibration").exists()
    record = json.loads(next(tmp_path.glob("tiny/*/eval/results.json")).read_text())["results"][-1]
    assert record["model"] == "trained" and record["calibration"] is None and record["method"]["name"] == "lora"


def test_the_base_model_is_scored_once_for_all_runs_and_benchmarks_score_alone(tmp_path):
    first = _run(_cfg(tmp_path, "method=lora"))
    second = _run(_cfg(tmp_path, "method=pissa"))
    assert _count(first, "base/synthetic_facts: scored") == 1
    assert _count(second, "base/synthetic_facts: stored record reused") == 1
    assert _count(second, "trained/synthetic_facts: scored") == 1

    # add a benchmark: only it is scored; remove it again: nothing is deleted, nothing rescored
    cfg = _cfg(tmp_path, "method=pissa")
    extra = dict(cfg["eval"]["benchmarks"]["synthetic_facts"], max_new_tokens=5)
    cfg["eval"]["benchmarks"]["facts_long"] = extra
    added = _run(cfg, stages=["evaluate"])
    assert _count(added, ": scored") == 2 and _count(added, "synthetic_facts: stored record reused") == 2
    assert {r["benchmark"] for r in json.loads(next(
        p for p in tmp_path.glob("tiny/*/eval/results.json") if "facts_long" in p.read_text()).read_text())[
        "results"]} == {"synthetic_facts", "facts_long"}
    records = len(list((tmp_path / "store" / "eval").glob("*.json")))
    removed = _run(_cfg(tmp_path, "method=pissa"), stages=["evaluate"])
    assert _count(removed, ": scored") == 0 and len(list((tmp_path / "store" / "eval").glob("*.json"))) == records


def test_two_processes_on_one_key_one_computes_the_other_waits_and_reuses(tmp_path):
    args = ["+experiment=tiny", f"run.root={tmp_path}", "progress=false", "method=lora", "train.max_steps=400"]
    run_pipeline(compose(args), stages=["init"], log=lambda m: None)
    procs = [subprocess.Popen([sys.executable, "-m", "lnull", "train", *args, f"run.dir={tmp_path / f'twin{i}'}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("[train] done" in o for o in outs) == 1, outs
    assert sum("computed by another process" in o for o in outs) == 1, outs
    assert any("waiting for another process" in o for o in outs), outs
    entries = list((tmp_path / "store" / "train").iterdir())
    assert len(entries) == 1 and (entries[0] / "complete.json").exists()
    twins = sorted(tmp_path.glob("twin*"))
    assert len(twins) == 2 and {(p / "train").resolve() for p in twins} == {entries[0]}


def test_store_ls_lists_users_and_gc_drops_only_what_no_run_uses(tmp_path):
    _run(_cfg(tmp_path, "method=lora_null_v1"))
    _run(_cfg(tmp_path, "method=lora_null_v2"))
    listed = lnull("store", "ls", f"run.root={tmp_path}", check=True).stdout
    calibration = next(line for line in listed.splitlines() if line.startswith("calibration/"))
    assert calibration.count("tiny/lora_null_v") == 2  # both runs use the one calibration
    v2 = next(p for p in tmp_path.glob("tiny/*") if "lora_null_v2" in (p / "config.yaml").read_text())
    v2_init = (v2 / "init").resolve()
    import shutil

    shutil.rmtree(v2)
    removed = lnull("store", "gc", "--yes", f"run.root={tmp_path}", check=True).stdout
    assert f"init/{v2_init.name}" in removed and not v2_init.exists()
    assert len(list((tmp_path / "store" / "calibration").iterdir())) == 1  # still used by v1
    assert (next(tmp_path.glob("tiny/*")) / "train" / "complete.json").exists()


def test_record_schema_round_trip_and_rejects_bad_records(tmp_path):
    from lnull.records import validate

    _run(_cfg(tmp_path, "method=lora_null_v1"))
    data = json.loads(next(tmp_path.glob("tiny/*/eval/results.json")).read_text())["results"]
    trained = next(r for r in data if r["model"] == "trained")
    record = validate(json.loads(json.dumps(trained)))
    assert record.to_dict() == trained
    assert record.method.rank == 4 and record.calibration.samples == 16 and record.train.effective_batch == 8
    for broken, field in ((dict(trained, n="4"), "record.n"), ({k: v for k, v in trained.items() if k != "value"},
                                                              "value"), (dict(trained, extra=1), "extra"),
                          (dict(trained, method=dict(trained["method"], rank="r")), "record.method.rank")):
        with pytest.raises(ConfigError, match=field):
            validate(broken)
    # a record written before schema 2 named ``weights_from`` ``identity``: read as the same fact
    assert trained["schema"] == 2 and "identity" not in trained
    old = {("identity" if k == "weights_from" else k): v for k, v in trained.items() if k != "schema"}
    assert validate(old).weights_from == trained["weights_from"] and validate(old).schema == 1


def test_full_fine_tuning_records_no_rank(tmp_path):
    _run(_cfg(tmp_path, "method=full", "train.lr=1e-4"))
    data = json.loads(next(tmp_path.glob("tiny/*/eval/results.json")).read_text())["results"]
    trained = next(r for r in data if r["model"] == "trained")
    assert trained["method"]["name"] == "full" and trained["method"]["rank"] is None
    assert trained["method"]["alpha"] is None


# ---------------------------------------------------------------- layering

def _modules() -> dict[str, Path]:
    found = {}
    for path in LNULL.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """lnull modules ``path`` imports anywhere (module level or inside functions)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in modules else base)
    return {m for m in out if m in modules}


def test_no_import_cycle_inside_lnull():
    modules = _modules()
    graph = {m: _imports(p, m, modules) for m, p in modules.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph[node]
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_errors_import_nothing_and_config_imports_no_stage_or_registry():
    modules = _modules()
    assert not [n for n in ast.walk(ast.parse(modules["lnull.errors"].read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert _imports(modules["lnull.config"], "lnull.config", modules) == {"lnull.errors"}


def test_no_module_outside_methods_imports_a_method_file_or_compares_a_method_name():
    from lnull.methods import REGISTRY

    modules = _modules()
    method_files = {m for m, p in modules.items() if m.startswith("lnull.methods.") and "register(Method(" in
                    p.read_text()}
    assert {"lnull.methods.oplora", "lnull.methods.lora_null"} <= method_files
    names = set(REGISTRY)
    for module, path in modules.items():
        if module == "lnull.methods" or module.startswith("lnull.methods."):
            continue
        bad_imports = _imports(path, module, modules) & method_files
        assert not bad_imports, f"{module} imports {bad_imports}"
        tree = ast.parse(path.read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
        # vLLM's list of PEFT init_lora_weights values (lnull.serving): PEFT's names, some of which are also the
        # names of the lnull methods that call PEFT's init (eva, mica, ...); no method is compared there
        peft_values = set() if module != "lnull.serving" else {
            n.value for a in ast.walk(tree) if isinstance(a, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_PLAIN_INITS" for t in a.targets)
            for n in ast.walk(a.value) if isinstance(n, ast.Constant)}
        assert not (literals - peft_values) & names, f"{module} names method(s) {(literals - peft_values) & names}"
