"""The table-kind registry: every ``table.kind`` is one ``TableKind`` registered by its own module, and adding a
kind is one module plus one table config (a fake kind, written as a module of a temporary folder on
``lnull.tables``' path, with its ``configs/table/fake.yaml`` in a copy of the config folder, is composed, listed
by ``lnull list``, run and built by ``lnull table``)."""
from __future__ import annotations

import shutil
import sys
import textwrap

import pytest

from lnull.errors import ConfigError

FAKE_MODULE = "lnull_fake_table"
FAKE_KIND = '''
    """Fake table kind ``fake_count``: per row of the table's experiment, how many of its records are stored."""
    from lnull.tables.base import TableKind, register
    from lnull.tables.paper import compose_rows
    from lnull.tables.rows import run_configs, stored_records, write_files


    def composed(cfg):
        return compose_rows(cfg)[1:]


    def counts(cfg):
        benches = list(cfg["table"]["knowledge"])
        return [(row.label, sum(r is not None for r in stored_records(row.cfg, "trained", benches).values()))
                for row in composed(cfg)]


    def build(cfg, out, log):
        lines = [f"{label}: {n}" for label, n in counts(cfg)]
        return {"rows": len(lines), "paths": write_files(out, cfg["table"]["name"], {"txt": "\\n".join(lines)})}


    register(TableKind("fake_count", build, compose=composed,
                       status=lambda cfg: [(label, n == len(cfg["table"]["knowledge"])) for label, n in counts(cfg)],
                       run_missing=lambda cfg, log: run_configs([(r.label, r.cfg) for r in composed(cfg)], None,
                                                                log)))
'''
FAKE_CONFIG = """
    # Fake counting table: `lnull table table=fake`.
    name: fake
    kind: {kind}
    title: "Stored records per row"
    experiment: tiny
    knowledge: [synthetic_facts]
    rows:
      - {{method: lora, label: LoRA}}
      - {{method: lora_null_v1, label: LoRA-Null v1}}
"""


@pytest.fixture
def fake_kind(tmp_path, monkeypatch):
    """The fake kind's module in a folder added to ``lnull.tables.__path__``, the config folder copied with
    ``table/fake.yaml`` (kind fake_count) and ``table/fake_bad.yaml`` (an unknown kind); removed afterwards."""
    import lnull.compose
    import lnull.tables as tables
    from lnull.tables.base import REGISTRY

    folder = tmp_path / "kinds"
    folder.mkdir()
    (folder / f"{FAKE_MODULE}.py").write_text(textwrap.dedent(FAKE_KIND))
    monkeypatch.setattr(tables, "__path__", [*tables.__path__, str(folder)])
    configs = shutil.copytree(lnull.compose.CONFIG_DIR, tmp_path / "configs")
    for name, kind in (("fake", "fake_count"), ("fake_bad", "fake_nope")):
        (configs / "table" / f"{name}.yaml").write_text(textwrap.dedent(FAKE_CONFIG.format(kind=kind)))
    monkeypatch.setattr(lnull.compose, "CONFIG_DIR", configs)
    yield configs
    REGISTRY.pop("fake_count", None)
    sys.modules.pop(f"lnull.tables.{FAKE_MODULE}", None)


def _store_one_record(cfg):
    """A stored synthetic_facts record for the first row's trained model (the second row stays missing)."""
    from lnull.evaluate import expected_records
    from lnull.layout import RunLayout
    from lnull.tables.paper import compose_rows

    row = compose_rows(cfg)[1]
    layout = RunLayout(row.cfg)
    key = expected_records(layout, "trained")["synthetic_facts"]
    layout.store.write_record(key, {"key": key, "model": "trained", "benchmark": "synthetic_facts", "value": 50.0,
                                    "kind": "lm_eval"})


def test_every_builtin_kind_is_registered_by_its_own_module():
    from lnull.tables import kinds, table_kind

    assert {"summary", "results", "analysis", "retention"} <= set(kinds())
    modules = {table_kind(k).build.__module__ for k in ("summary", "results", "analysis", "retention")}
    assert len(modules) == 4


def test_an_unknown_kind_is_one_line_at_compose_time(fake_kind, tmp_path):
    from lnull.compose import compose

    with pytest.raises(ConfigError) as err:
        compose(["table=fake_bad", f"run.root={tmp_path}"])
    message = str(err.value)
    assert "\n" not in message and "'fake_nope'" in message and "retention" in message


def test_a_new_kind_is_one_module_and_one_config_listed_run_and_built(fake_kind, tmp_path, monkeypatch):
    import lnull.pipeline
    from lnull.compose import compose
    from lnull.tables import log_file, run_table
    from lnull.tables.catalog import describe

    for spec in (fake_kind / "table").glob("*.yaml"):  # `lnull list` of the fake table alone
        if spec.stem not in ("fake", "summary"):
            spec.unlink()
    root = tmp_path / "runs"
    cfg = compose(["table=fake", f"run.root={root}", f"table.out_dir={tmp_path / 'out'}", "table.run_missing=true"])
    _store_one_record(cfg)
    listed = describe([f"run.root={root}"])
    block = listed[listed.index("fake "):].splitlines()
    assert block[0].startswith("fake      1/2 rows done") and "done     LoRA" in block[1] and "missing" in block[2]

    ran = []
    monkeypatch.setattr(lnull.pipeline, "run_pipeline", lambda c, stages=None, log=None: ran.append(c["method"]["name"]))
    said = []
    summary = run_table(cfg, log=said.append)
    assert ran == ["lora", "lora_null_v1"]  # run_missing: every row (the pipeline reuses what is stored)
    assert (tmp_path / "out" / "fake.txt").read_text() == "LoRA: 1\nLoRA-Null v1: 0"
    assert summary["rows"] == 2 and said[-1].startswith("[table] done in")
    assert log_file(cfg) == root / "logs" / "table.log"  # library chatter, when the console is quiet (the CLI)
