"""Shared fixtures: an isolated asset cache per test session, and config composition."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/*.json from this run instead of comparing with them "
                          "(commit the change with the code that made it)")


@pytest.fixture(scope="session")
def update_golden(request) -> bool:
    """True under ``pytest --update-golden``: golden tests write their expected values instead of checking."""
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Point LNULL_CACHE at a temp folder (the tiny model is materialised there once) unless the caller
    set one; integration tests that need real assets read LNULL_ASSETS_CACHE."""
    old = os.environ.get("LNULL_CACHE")
    os.environ["LNULL_CACHE"] = str(tmp_path_factory.mktemp("lnull-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    yield Path(os.environ["LNULL_CACHE"])
    if old is None:
        os.environ.pop("LNULL_CACHE", None)
    else:
        os.environ["LNULL_CACHE"] = old


def lnull(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (as a user would) and capture its output."""
    proc = subprocess.run([sys.executable, "-m", "lnull", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"lnull {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def tiny_cfg(tmp_path):
    """Resolved `tiny` experiment config writing into a temp run folder, with a short training."""
    from lnull.cli import compose

    def make(*overrides: str) -> dict:
        return compose(["+experiment=tiny", f"run.dir={tmp_path / 'run'}", "progress=false", "train.max_steps=3",
                        *overrides])
    return make


@pytest.fixture
def tiny_base_context(tiny_cfg, tmp_path):
    """``make(*overrides) -> (cfg, EvalContext)`` of the tiny base model, scratch folder ``tmp_path/work``."""
    from lnull.evaluate.stage import load_for_eval
    from lnull.evaluate.base import EvalContext
    from lnull.layout import RunLayout

    def make(*overrides: str):
        cfg = tiny_cfg(*overrides)
        model, tok, (base, adapter, identity, _) = load_for_eval(cfg, RunLayout(cfg), "base", "cpu")
        ctx = EvalContext(model, tok, cfg, "base", identity, tmp_path / "work", base, adapter)
        ctx.work_dir.mkdir()
        return cfg, ctx
    return make
