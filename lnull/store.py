"""The content-addressed store: every stage output once per key, shared by all runs.

Layout (``store.root``, default ``store/`` beside the run folder, i.e. ``<run.root>/store``)::

    calibration/<key>/        a stage entry: the stage's files + complete.json (key, inputs, upstream keys,
    init/<key>/                 summary, provenance); present only when complete
    train/<key>/  export/<key>/
    <folder>/<key>.partial/   work in progress of that key (kept when killed: the next attempt resumes in it)
    eval/<key>.json           one result record (lnull.records); eval/<key>.work/ is its scorer's scratch (cached
                                generations, MT-Bench answers), kept and removed with the record
    locks/<folder>.<key>.lock one file lock per key: one process computes, the others wait and reuse
    refs/<run>.json           which keys a run folder uses (its views), read by `lnull store ls` / `gc`

Keys come from ``lnull.stages`` (the hash of exactly what a stage reads). A run folder holds views
(symlinks) of its entries, so deleting a run deletes nothing shared; ``lnull store gc`` drops entries no run
uses.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from lnull.io import atomic_write_json, drop_stale_temps, stable_hash, try_read_json

MARKER = "complete.json"
RECORDS = "eval"


def tree_size(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder; symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def manifest(folder: Path) -> dict[str, int]:
    """{relative path: bytes} of every file under ``folder`` (symlinks and the marker excluded)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != MARKER}


def damage(entry: Path, files: Optional[dict[str, int]]) -> Optional[str]:
    """Why ``entry`` no longer matches its marker's manifest (a file missing or resized, a safetensors file whose
    header does not parse or does not match its size), or None. Entries written before manifests: None."""
    for name, size in (files or {}).items():
        path = entry / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
        if path.suffix == ".safetensors":
            try:
                with open(path, "rb") as fh:
                    (length,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if 8 + length + end != size:
                    return f"{path} does not load (its tensors do not fill the file)"
            except (OSError, ValueError, KeyError, TypeError, struct.error):
                return f"{path} does not load (unreadable safetensors header)"
    return None


class Store:
    """One store root (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------ paths

    def entry(self, folder: str, key: str) -> Path:
        return self.root / folder / key

    def partial(self, folder: str, key: str) -> Path:
        return self.root / folder / f"{key}.partial"

    def record(self, key: str) -> Path:
        return self.root / RECORDS / f"{key}.json"

    def record_work(self, key: str) -> Path:
        return self.root / RECORDS / f"{key}.work"

    # ------------------------------------------------------------------ state

    def _inspect(self, folder: str, key: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """(the entry's complete.json, None) when it counts; (None, why not) otherwise."""
        path = self.entry(folder, key) / MARKER
        data = try_read_json(path)
        if not isinstance(data, dict):
            return None, f"{path} is missing or unreadable"
        if data.get("key") != key:
            return None, f"{path} names another key"
        why = damage(self.entry(folder, key), data.get("files"))
        return (None, why) if why else (data, None)

    def marker(self, folder: str, key: str) -> Optional[dict[str, Any]]:
        """The entry's complete.json when the entry is complete, its marker names this key and its files are
        intact (:func:`damage`); else None (a missing, truncated or foreign marker, a missing, resized or
        unreadable file: the entry does not count and is recomputed)."""
        return self._inspect(folder, key)[0]

    def read_record(self, key: str) -> Optional[dict[str, Any]]:
        data = try_read_json(self.record(key))
        return data if isinstance(data, dict) and data.get("key") == key else None

    @contextlib.contextmanager
    def lock(self, folder: str, key: str, log: Callable[[str], None] = print) -> Iterator[None]:
        """Exclusive lock of one key across processes (released when the holder exits, even by SIGKILL)."""
        path = self.root / "locks" / f"{folder}.{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"[{folder}] waiting for another process computing {folder}/{key}")
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def compute(self, folder: str, key: str, produce: Callable[[Path], dict[str, Any]], identity: dict[str, Any],
                log: Callable[[str], None] = print) -> tuple[Path, Optional[dict[str, Any]]]:
        """The entry of ``key``, computing it with ``produce(partial_dir) -> summary`` unless it is complete.

        Under the key's lock: a process that finds the entry complete (maybe after waiting for another one to
        finish it) returns ``(entry, None)``; otherwise ``produce`` runs in ``<key>.partial/`` (kept from a
        killed attempt, so it can resume), the marker is written and the folder renamed into place:
        ``(entry, marker)``."""
        final = self.entry(folder, key)
        with self.lock(folder, key, log):
            done, why = self._inspect(folder, key)
            if done is not None:
                return final, None
            if final.exists():  # a damaged entry: recompute it
                log(f"[{folder}] {why}; recomputing {folder}/{key}")
                shutil.rmtree(final)
            partial = self.partial(folder, key)
            partial.mkdir(parents=True, exist_ok=True)
            drop_stale_temps(partial)
            summary = produce(partial)
            marker = {**identity, "key": key, "summary": summary, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "files": manifest(partial)}
            atomic_write_json(partial / MARKER, marker)
            os.replace(partial, final)
            return final, marker

    # ------------------------------------------------------------------ runs using the store

    def add_ref(self, run_dir: Path, used: dict[str, Any]) -> None:
        """Record which keys ``run_dir`` uses now (``{"entries": {folder: key}, "records": [keys]}``)."""
        run_dir = Path(run_dir).resolve()
        atomic_write_json(self.root / "refs" / f"{run_dir.name}-{stable_hash(str(run_dir), 8)}.json",
                          {"run": str(run_dir), **used})

    def refs(self) -> list[dict[str, Any]]:
        """Refs of runs that still exist (a ref whose run folder was deleted is dropped)."""
        live = []
        for path in sorted((self.root / "refs").glob("*.json")):
            ref = try_read_json(path)
            if isinstance(ref, dict) and Path(ref.get("run", "")).is_dir():
                live.append(ref)
            else:
                path.unlink(missing_ok=True)
        return live

    def entries(self) -> list[tuple[str, str, Path]]:
        """Every complete entry and record: (folder, key, path)."""
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name not in ("locks", "refs")):
            for path in sorted(folder.iterdir()):
                if folder.name == RECORDS:
                    if path.suffix == ".json":
                        found.append((folder.name, path.stem, path))
                elif path.is_dir() and not path.name.endswith(".partial"):
                    found.append((folder.name, path.name, path))
        return found

    def users(self) -> dict[tuple[str, str], list[str]]:
        """{(folder, key): [run folder names]} from the live refs."""
        used: dict[tuple[str, str], list[str]] = {}
        for ref in self.refs():
            name = Path(ref["run"]).name
            for folder, key in ref.get("entries", {}).items():
                used.setdefault((folder, key), []).append(name)
            for key in ref.get("records", []):
                used.setdefault((RECORDS, key), []).append(name)
        return used

    def ls(self) -> list[dict[str, Any]]:
        """One row per entry: folder, key, bytes, the runs using it."""
        if not self.root.exists():
            return []
        used = self.users()
        rows = []
        for folder, key, path in self.entries():
            size = tree_size(path) + (tree_size(self.record_work(key)) if folder == RECORDS
                                      and self.record_work(key).exists() else 0)
            rows.append({"folder": folder, "key": key, "bytes": size, "runs": sorted(used.get((folder, key), []))})
        return rows

    def gc(self, log: Callable[[str], None] = print) -> list[str]:
        """Delete entries (and abandoned partial folders) no live run uses; return what was removed."""
        if not self.root.exists():
            return []
        used = self.users()
        removed = []
        for folder, key, path in self.entries():
            if (folder, key) in used:
                continue
            with self.lock(folder, key, log):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                shutil.rmtree(self.partial(folder, key), ignore_errors=True)
                shutil.rmtree(self.record_work(key) if folder == RECORDS else path, ignore_errors=True)
            removed.append(f"{folder}/{key}")
        for partial in self.root.glob("*/*.partial"):
            folder, key = partial.parent.name, partial.name[:-len(".partial")]
            if (folder, key) not in used and not self.entry(folder, key).exists():
                with self.lock(folder, key, log):  # waits for a process still working in it
                    shutil.rmtree(partial, ignore_errors=True)
                removed.append(f"{folder}/{partial.name}")
        return removed
