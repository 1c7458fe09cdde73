"""A run folder and every path in it: the one place that knows where a stage's files are.

A run folder (``run.dir``, default ``<run.root>/<experiment>/<method>-r<rank>-<hash>``, see
:func:`default_run_dir`) holds ``config.yaml``,
``provenance.json``, views (symlinks) of its store entries (``calibration``, ``init``, ``train``, ``export``)
and the folders of its run-local stages (``eval``, ``analysis``). Stage code asks the layout for paths
(``layout.view("init") / "adapter"``), never builds another stage's paths itself.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from lnull.errors import ConfigError
from lnull.io import atomic_write_text, stable_hash, try_read_json
from lnull.stages import BY_NAME, STAGES, StageKeys
from lnull.store import MARKER, RECORDS, Store

CONFIG_DIGEST = ".config.sha256"  # sha256 of the config.yaml lnull wrote, to tell a hand edit


def run_name_inputs(cfg: dict[str, Any]) -> dict[str, Any]:
    """What names a default run folder: the config values that enter the keys of the stages making the run's
    model (``lnull.stages``: calibration when the method reads a statistic, init, train), the model and the data
    named rather than fingerprinted (the folder is known before they are downloaded, and does not move when a file
    is fetched). So a knob that enters no key (``train.log_every``, ``train.checkpoint_every``, wandb,
    ``calibration.device_budget_gb``, the calibration section of a method that reads no statistic) keeps the
    folder, and ``eval`` is left out on purpose: re-scoring with other benchmarks reuses the folder (its records
    are keyed on their own). A data file edited in place keeps the folder but changes the keys: the run's stale
    views are dropped (:meth:`RunLayout.drop_stale_views`)."""
    from lnull.methods import REGISTRY
    from lnull.stages import UNHASHED

    def section(name: str) -> Any:
        value = cfg.get(name)
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k not in UNHASHED.get(name, ())}
        return value

    model, method = cfg["model"], REGISTRY[cfg["method"]["name"]]
    ident = {"model": model["name_or_path"], "dtype": model["dtype"], "target_modules": model["target_modules"],
             "add_bos": model["add_bos"], "method": method.key_options(cfg["method"]), "task": cfg["task"],
             "train": section("train"), "accelerate": cfg.get("accelerate")}
    if method.needs_calibration:
        ident["calibration"] = section("calibration")
    return ident


def run_name(cfg: dict[str, Any]) -> str:
    """``<method>-r<rank>-<short hash of run_name_inputs>``; ``<method>-<hash>`` for a method without an adapter
    (full fine-tuning: its rank means nothing)."""
    from lnull.methods import REGISTRY

    name = cfg["method"]["name"]
    rank = f"-r{cfg['method']['rank']}" if REGISTRY[name].has_adapter else ""
    return f"{name}{rank}-{stable_hash(run_name_inputs(cfg), 8)}"


def default_run_dir(cfg: dict[str, Any]) -> Path:
    """``<run.root>/<experiment>/<method>-r<rank>-<hash>`` (:func:`run_name`); never a timestamp, so every process
    of a multi-process launch computes the same folder. Folders of older versions (``<run.root>/<experiment>-
    <hash>``) keep working: the store finds them through their refs, ``lnull run --from <folder>`` runs them."""
    return Path(cfg["run"]["root"]) / cfg["experiment"] / run_name(cfg)


def run_dir_of(cfg: dict[str, Any]) -> Path:
    return Path(cfg["run"]["dir"]) if cfg["run"].get("dir") else default_run_dir(cfg)


def store_root(cfg: dict[str, Any]) -> Path:
    """``store.root``; else ``<run.root>/store`` for a default run folder; else (``run.dir`` given, as ``lnull run
    --from`` does) ``store/`` beside the run folder, or beside its experiment folder when the run folder sits in
    one (``<root>/<experiment>/<name>``, the default layout) and no ``store/`` is beside it."""
    if cfg.get("store", {}).get("root"):
        return Path(cfg["store"]["root"])
    if not cfg["run"].get("dir"):
        return Path(cfg["run"]["root"]).resolve() / "store"
    parent = Path(cfg["run"]["dir"]).resolve().parent
    if parent.name == cfg.get("experiment") and not (parent / "store").is_dir():
        return parent.parent / "store"
    return parent / "store"


class RunLayout:
    """One run: its folder, its store, the keys of its stages and the paths of their outputs."""

    def __init__(self, cfg: dict[str, Any]):
        self.dir = run_dir_of(cfg)
        self.cfg = {**cfg, "run": {**cfg["run"], "dir": str(self.dir)}}
        self.store = Store(store_root(cfg))
        self.keys = StageKeys(self.cfg, complete=lambda stage: BY_NAME[stage].stored and self.is_complete(stage))

    @classmethod
    def create(cls, cfg: dict[str, Any], from_file: bool = False) -> "RunLayout":
        """The layout with its folder made (checked writable), ``config.yaml`` written and the run registered in
        the store (its id). A ``config.yaml`` edited by hand is never overwritten silently: ConfigError naming
        ``lnull run --from``, unless this config was read from that file (``from_file``)."""
        layout = cls(cfg)
        try:
            layout.dir.mkdir(parents=True, exist_ok=True)
            probe = layout.dir / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"run.dir '{layout.dir}' is not writable: {exc.strerror or exc}") from None
        text = yaml.safe_dump(layout.cfg, sort_keys=False)
        if not from_file:
            layout.check_config_unedited(text)
        atomic_write_text(layout.dir / "config.yaml", text)
        atomic_write_text(layout.dir / CONFIG_DIGEST, stable_hash(text, 64) + "\n")
        layout.store.register(layout.dir)
        return layout

    def check_config_unedited(self, new_text: str) -> None:
        """ConfigError when the run's ``config.yaml`` differs from what lnull last wrote there (edited by hand)
        and from ``new_text`` (what this command would write): its edits would be lost."""
        path, digest = self.dir / "config.yaml", self.dir / CONFIG_DIGEST
        if not (path.exists() and digest.exists()):
            return
        text = path.read_text(errors="replace")
        if stable_hash(text, 64) not in (digest.read_text().strip(), stable_hash(new_text, 64)):
            raise ConfigError(f"{path} was edited by hand and this command would overwrite it: run the edited "
                              f"config with `lnull run --from {self.dir}`, or delete the file to run this command's "
                              "config")

    # ------------------------------------------------------------------ paths

    def view(self, stage: str) -> Path:
        """The stage's folder as the run shows it (a view of the store entry, or the run-local folder)."""
        return self.dir / BY_NAME[stage].folder

    def partial(self, stage: str) -> Path:
        """Work folder of a run-local stage (stored stages work in the store's partial folder)."""
        return self.dir / f"{BY_NAME[stage].folder}.partial"

    def entry(self, stage: str) -> Path:
        """The store entry of this run's key of a stored stage."""
        return self.store.entry(BY_NAME[stage].folder, self.keys[stage])

    def marker(self, stage: str) -> Optional[dict[str, Any]]:
        """complete.json of a stored stage's entry for this run's key (None when not complete)."""
        return self.store.marker(BY_NAME[stage].folder, self.keys[stage])

    def is_complete(self, stage: str) -> bool:
        """A stored stage: its entry for this run's key is complete. A run-local one: its folder was computed
        for this run's key (``complete.json``) and every link in it into the store still resolves."""
        s = BY_NAME[stage]
        if s.stored:
            return self.store.marker(s.folder, self.keys[stage]) is not None
        marker = try_read_json(self.view(stage) / MARKER)
        if not (isinstance(marker, dict) and marker.get("key") == self.keys[stage]):
            return False
        # its links into the store (e.g. eval/<model>/<benchmark>.json) must still resolve to intact files: a
        # gc'd, deleted, truncated or hand-edited record makes the stage incomplete, so it is redone (the record
        # re-scored) instead of reported
        for link in (p for p in self.view(stage).rglob("*") if p.is_symlink()):
            target = link.resolve()
            if not target.exists():
                return False
            if target.parent == self.store.root / RECORDS and target.suffix == ".json":
                if self.store.read_record(target.stem) is None:
                    return False
            elif link.suffix == ".json" and try_read_json(link) is None:
                return False
        return True

    def input(self, stage: str) -> Path:
        """The completed output folder of an upstream stage (store entry or run-local folder)."""
        if not self.is_complete(stage):
            raise ConfigError(f"stage '{stage}' is not complete for this config: run `lnull {stage}` or `lnull run`")
        return self.entry(stage) if BY_NAME[stage].stored else self.view(stage)

    def maybe_input(self, stage: str) -> Optional[Path]:
        return self.input(stage) if self.is_complete(stage) else None

    # ------------------------------------------------------------------ views

    def link(self, stage: str) -> None:
        """Point the run's view of a stored stage at this run's entry (a relative symlink when possible)."""
        view, target = self.view(stage), self.entry(stage)
        try:
            rel = os.path.relpath(target, self.dir.resolve())
        except ValueError:  # another drive
            rel = str(target)
        if view.is_symlink() and os.readlink(view) == rel:
            return
        tmp = view.with_name(f".{view.name}.link")
        tmp.unlink(missing_ok=True)
        os.symlink(rel, tmp)
        if view.exists() and not view.is_symlink():  # a folder from before views existed
            shutil.rmtree(view)
        os.replace(tmp, view)

    def drop_stale_views(self, log: Callable[[str], None] = print) -> list[str]:
        """Unlink views (and run-local folders) computed for other keys than this config's: a changed config
        invalidates that stage and everything after it in this run (the store keeps the old entries)."""
        dropped = []
        for stage in STAGES:
            view = self.view(stage.name)
            if not (view.exists() or view.is_symlink()):
                continue
            try:
                fresh = self.is_complete(stage.name) and (not stage.stored or view.resolve() == self.entry(stage.name))
            except ConfigError:  # its key needs inputs that are missing now: leave the view alone
                continue
            if not fresh:
                if view.is_symlink():
                    view.unlink()
                else:
                    shutil.rmtree(view)
                dropped.append(stage.folder)
        if dropped:
            log(f"[run] config changed: dropped {', '.join(dropped)} from {self.dir} (the store keeps them)")
        return dropped

    def used(self) -> dict[str, Any]:
        """The store keys this run's views point at (for the store's refs)."""
        entries = {}
        for stage in STAGES:
            view = self.view(stage.name)
            if stage.stored and view.is_symlink() and view.exists():
                entries[stage.folder] = view.resolve().name
        records = try_read_json(self.view("evaluate") / "results.json") or {}
        return {"entries": entries, "records": [r["key"] for r in records.get("results", [])]}
