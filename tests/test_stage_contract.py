"""The stage contract (issue 25 part 2): every stage's ``run(cfg, ctx)`` is typed with the
``lnull.stages.StageContext`` protocol, the pipeline's context satisfies it, and no stage module imports the
pipeline (command helpers such as ``export_run`` / ``run_analysis`` live in ``lnull.cli``)."""
from __future__ import annotations

import ast
import importlib
import inspect
import typing
from pathlib import Path

from lnull.pipeline import LayoutContext
from lnull.stages import STAGES, StageContext

def _module_file(stage) -> Path:
    return Path(importlib.import_module(stage.runner.partition(":")[0]).__file__)


def test_every_stage_run_takes_a_stage_context():
    for stage in STAGES:
        params = list(inspect.signature(stage.function()).parameters.values())
        assert [p.name for p in params] == ["cfg", "ctx"], stage.name
        assert typing.get_type_hints(stage.function())["ctx"] is StageContext, stage.name


def test_the_pipeline_context_has_every_member_of_the_protocol():
    members = {n for n in vars(StageContext) if not n.startswith("_")} | set(StageContext.__annotations__)
    fields = set(LayoutContext.__dataclass_fields__) | {n for n in vars(LayoutContext) if not n.startswith("_")}
    assert members <= fields, members - fields


def test_no_stage_module_imports_the_pipeline():
    for stage in STAGES:
        tree = ast.parse(_module_file(stage).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "lnull.pipeline" not in imported, f"stage '{stage.name}' ({stage.runner}) imports lnull.pipeline"


def test_table_is_a_command_not_a_stage():
    """`lnull table` reads other runs' records and runs them: a command with no key and no run folder."""
    from lnull.cli import COMMANDS
    from lnull.stages import BY_NAME

    assert "table" in COMMANDS and "table" not in BY_NAME
