"""Records and configs that cannot be silently altered: a hand-edited stored record is reported and re-scored,
never reused or shown; a hand-edited config.yaml is never overwritten, and `lnull run --from` runs it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import lnull
from lnull.cli import compose
from lnull.errors import ConfigError
from lnull.pipeline import run_pipeline
from lnull.records import read_results
from lnull.store import Store

TINY = ["+experiment=tiny", "progress=false", "method=lora", "train.max_steps=2"]


def _run(root: Path, name: str = "run", *extra: str) -> tuple[Path, list[str]]:
    logs: list[str] = []
    cfg = compose([*TINY, f"run.root={root}", f"run.dir={root / name}", *extra])
    return run_pipeline(cfg, log=logs.append).dir, logs


def _forge(record: Path, value: float) -> float:
    """Edit a stored record's value by hand, as a user with a text editor would; return the old value."""
    data = json.loads(record.read_text())
    old, data["value"] = data["value"], value
    record.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return old


def test_a_hand_edited_record_is_re_scored_by_the_next_run_and_by_its_own_run(tmp_path):
    run, _ = _run(tmp_path)
    record = (run / "eval" / "trained" / "synthetic_facts.json").resolve()
    true_value = _forge(record, 99.9)
    store = Store(tmp_path / "store")
    assert store.read_record(record.stem) is None
    other, logs = _run(tmp_path, "other")  # a new run of the same config: would reuse the stored record
    notices = [line for line in logs if "does not match its digest" in line]
    assert len(notices) == 1 and "re-scoring" in notices[0], logs
    assert json.loads(record.read_text())["value"] == true_value
    _forge(record, 99.9)
    _, logs = _run(tmp_path)  # the first run again: its evaluation is redone, not reported as cached
    assert any(line.startswith("[evaluate] done") for line in logs), logs
    assert json.loads(record.read_text())["value"] == true_value
    values = {(r.model, r.benchmark): r.value for r in read_results(other / "eval" / "results.json")}
    assert values[("trained", "synthetic_facts")] == true_value


def test_tables_never_show_an_altered_record(tmp_path, capsys):
    run, _ = _run(tmp_path)
    results = run / "eval" / "results.json"
    data = json.loads(results.read_text())
    assert set(data["sha256"]) == {r["key"] for r in data["results"]}
    data["results"][0]["value"] = 99.9  # the copy inside results.json edited
    results.write_text(json.dumps(data))
    warnings: list[str] = []
    shown = read_results(results, warn=warnings.append)
    assert len(shown) == len(data["results"]) - 1 and len(warnings) == 1 and "digest" in warnings[0]
    # the store's copy edited: a paper/retention table's lookup by key shows it as missing, with one line
    key = data["results"][1]["key"]
    _forge(Store(tmp_path / "store").record(key), 99.9)
    told: list[str] = []
    assert Store(tmp_path / "store").read_record(key, warn=told.append) is None and len(told) == 1
    proc = lnull("table", f"run.root={tmp_path}", f"table.out_dir={tmp_path / 'tables'}")
    assert proc.returncode == 0, proc.stderr
    assert "99.90" not in (tmp_path / "tables" / "summary.md").read_text()
    assert "does not match its digest" in proc.stderr


def test_a_hand_edited_config_is_never_overwritten_and_runs_with_from(tmp_path):
    run, _ = _run(tmp_path)
    config = run / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["max_steps"] = 3
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    edited = config.read_text()
    with pytest.raises(ConfigError, match=r"edited by hand.*lnull run --from"):
        _run(tmp_path)  # the command's own config would silently revert the edit
    assert config.read_text() == edited
    proc = lnull("run", "--from", str(run), "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()
    assert json.loads((run / "train" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert yaml.safe_load(config.read_text())["train"]["max_steps"] == 3
    _run(tmp_path, "run", "train.max_steps=3")  # the edit is now lnull's own: the same config runs as a command
    cfg["train"]["max_stpes"] = 3  # a typo in an edited config: one line naming it
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = lnull("run", "--from", str(run), cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lnull: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "train.max_stpes" in errors[0], proc.stderr
