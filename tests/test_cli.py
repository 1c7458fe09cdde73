"""The command line: help, strict keys and one-line errors for bad input before any heavy work."""
from __future__ import annotations

import pytest

from conftest import lnull
from lnull.cli import STAGE_HELP


def test_help_lists_every_stage_with_one_line():
    proc = lnull("--help", check=True)
    for stage in ("run", "calibrate", "init", "train", "evaluate", "export", "table", "analyze", "assets", "store"):
        assert stage in STAGE_HELP
        assert any(line.split()[:1] == [stage] for line in proc.stdout.splitlines()), stage


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "real_accelerator" not in ln]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("args, needle", [
    (("frobnicate",), "unknown command 'frobnicate'"),
    (("run", "+experiment=nosuch"), "nosuch"),
    (("run", "+experiment=tiny", "method.rnak=8"), "rnak"),
    (("run", "+experiment=tiny", "method=nosuch"), "nosuch"),
    (("run", "+experiment=tiny", "method.name=nosuch"), "unknown method 'nosuch'"),
    (("run", "+experiment=tiny", "model=nosuch"), "nosuch"),
    (("run", "+experiment=tiny", "calibration.samples=0"), "calibration.samples must be >= 1, got 0"),
    (("run", "+experiment=tiny", "run.dir=/proc/lnull-cannot-write"), "run.dir '/proc/lnull-cannot-write' is not writable"),
    (("run", "+experiment=tiny", "model.name_or_path=/no/such/model"), "'/no/such/model' does not exist"),
])
def test_bad_input_fails_fast_with_one_clear_line(args, needle, tmp_path):
    proc = lnull(*args, f"run.root={tmp_path}") if args[0] == "run" else lnull(*args)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*/calibration")), "heavy work started before the error"


def test_missing_asset_is_one_line_naming_the_fix(tmp_path):
    proc = lnull("run", "+experiment=demo", f"run.root={tmp_path}", f"cache_dir={tmp_path / 'empty-cache'}")
    assert proc.returncode != 0
    assert "lnull assets" in _error_line(proc), proc.stderr


def test_multirun_sweeps_rank_into_separate_run_folders(tmp_path):
    proc = lnull("run", "-m", "+experiment=tiny", "method.rank=2,4", f"run.root={tmp_path}", "progress=false",
                 "train.max_steps=1", "eval.limit=4", "eval.models=[trained]")
    assert proc.returncode == 0, proc.stderr
    ranks = sorted(__import__("json").loads((p / "init" / "report.json").read_text())["rank"]
                   for p in tmp_path.glob("tiny/*"))
    assert ranks == [2, 4]
