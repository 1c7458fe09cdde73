"""The content-addressed store: every stage output once per key, shared by all runs.

Layout (``store.root``, default ``store/`` beside the run folder, i.e. ``<run.root>/store``)::

    calibration/<key>/        a stage entry: the stage's files + complete.json (key, inputs, upstream keys,
    init/<key>/                 summary, provenance); present only when complete
    train/<key>/  export/<key>/
    <folder>/<key>.partial/   work in progress of that key (kept when killed: the next attempt resumes in it)
    eval/<key>.json           a keyed item (item_path / read_item / write_item / inspect_item / item_work): one
                                JSON document per key with <key>.sha256 its content digest beside it (an item
                                changed after it was written does not count) and <key>.work/ its producer's
                                scratch, kept and removed with it; written under the same lock(folder, key) as a
                                stage entry. The result records (lnull.records) are the items of kind ``eval``
                                (record / read_record / write_record: re-scored when they do not count; the
                                scorer's cached generations and MT-Bench answers in the work folder)
    locks/<folder>.<key>.lock one file lock per key: one process computes, the others wait and reuse
    refs/<run id>.json        which keys a run folder uses, hard-linked to the run's own .lnull-ref.json
    procs/<pid>-<rand>.lock   the lnull processes running now (lnull.runrefs)

Keys come from ``lnull.stages`` (the hash of exactly what a stage reads). A run folder holds views
(symlinks) of its entries, so deleting a run deletes nothing shared; ``lnull store gc`` drops entries no run
uses, and never one a live run (renamed, moved or still running) uses (``lnull.runrefs``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from lnull import runrefs
from lnull.io import atomic_write_bytes, atomic_write_json, drop_stale_temps, file_lock, try_read_json
from lnull.records import record_digest as content_digest
from lnull.runrefs import RECORDS

MARKER = "complete.json"
# folders of keyed items (one JSON document per key, its digest and work folder beside it; Store.write_item) rather
# than of entry folders, so that ls / du / gc read them as items: {kind: (what writing one is called, what happens
# to one that does not count)}
ITEM_KINDS = {RECORDS: ("scored", "re-scored when its run evaluates again")}
NOT_ENTRIES = ("locks", "refs", "procs")


def tree_size(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder; symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units: 512 B, 1.5 KiB, 20.4 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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

    def item_path(self, kind: str, key: str) -> Path:
        """A keyed item (one JSON document, see :meth:`write_item`): ``<kind>/<key>.json``."""
        return self.root / kind / f"{key}.json"

    def item_digest(self, kind: str, key: str) -> Path:
        """The sha256 of the item's content, written beside it: ``<kind>/<key>.sha256``."""
        return self.root / kind / f"{key}.sha256"

    def item_work(self, kind: str, key: str) -> Path:
        """The item's producer's scratch (a cache that survives a killed attempt): ``<kind>/<key>.work/``."""
        return self.root / kind / f"{key}.work"

    def item_files(self, kind: str, key: str) -> list[Path]:
        """Everything one item is stored as (deleted and measured together): the item, its digest, its work."""
        return [self.item_path(kind, key), self.item_digest(kind, key), self.item_work(kind, key)]

    # result records (lnull.records) are the items of kind ``eval``
    def record(self, key: str) -> Path:
        return self.item_path(RECORDS, key)

    def record_work(self, key: str) -> Path:
        return self.item_work(RECORDS, key)

    def record_digest(self, key: str) -> Path:
        return self.item_digest(RECORDS, key)

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

    @staticmethod
    def _verbs(kind: str) -> tuple[str, str]:
        return ITEM_KINDS.get(kind, ("written", "written again when needed"))

    def inspect_item(self, kind: str, key: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """(the item ``kind``/``key``, None) when it is intact; (None, why not) when it is missing, unreadable,
        names another key, or its content no longer matches the digest written with it (edited by hand)."""
        path = self.item_path(kind, key)
        if not path.exists():
            return None, f"{path} is missing"
        data = try_read_json(path)
        if not isinstance(data, dict) or data.get("key") != key:
            return None, f"{path} is damaged (unreadable or another key)"
        digest = self.item_digest(kind, key)
        written = digest.read_text().strip() if digest.exists() else None
        if written != content_digest(data):
            why = "has no digest (written before digests)" if written is None else "does not match its digest"
            return None, f"{path} {why}: it was changed after it was {self._verbs(kind)[0]}"
        return data, None

    def read_item(self, kind: str, key: str, warn: Optional[Callable[[str], None]] = None
                  ) -> Optional[dict[str, Any]]:
        """The intact item (:meth:`inspect_item`) or None; ``warn`` is told in one line why an item that exists
        does not count (it is produced again the next time its stage runs)."""
        data, why = self.inspect_item(kind, key)
        if data is None and warn is not None and self.item_path(kind, key).exists():
            warn(f"lnull: {why}; not used ({self._verbs(kind)[1]})")
        return data

    def write_item(self, kind: str, key: str, data: dict[str, Any]) -> str:
        """Write an item (a JSON object naming its ``key``) and its digest atomically, the item first (a crash
        between leaves an item that does not count); return the digest. A producer writes it under ``lock(kind, key)``,
        the lock a stage entry's key is computed under."""
        digest = content_digest(data)
        self.item_digest(kind, key).unlink(missing_ok=True)
        atomic_write_json(self.item_path(kind, key), data)
        atomic_write_bytes(self.item_digest(kind, key), (digest + "\n").encode())
        return digest

    def inspect_record(self, key: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """:meth:`inspect_item` of the result record ``key``."""
        return self.inspect_item(RECORDS, key)

    def read_record(self, key: str, warn: Optional[Callable[[str], None]] = None) -> Optional[dict[str, Any]]:
        """:meth:`read_item` of the result record ``key`` (tables: a record that does not count is shown as
        missing, and re-scored when its row runs)."""
        return self.read_item(RECORDS, key, warn)

    def write_record(self, key: str, record: dict[str, Any]) -> str:
        """:meth:`write_item` of a result record; returns its digest (``lnull.records.record_digest``)."""
        return self.write_item(RECORDS, key, record)

    def lock_path(self, folder: str, key: str) -> Path:
        return self.root / "locks" / f"{folder}.{key}.lock"

    @contextlib.contextmanager
    def lock(self, folder: str, key: str, log: Callable[[str], None] = print) -> Iterator[None]:
        """Exclusive lock of one key across processes (released when the holder exits, even by SIGKILL)."""
        with file_lock(self.lock_path(folder, key), wait=False) as taken:
            if taken:
                yield
                return
        log(f"[{folder}] waiting for another process computing {folder}/{key}")
        with file_lock(self.lock_path(folder, key)):
            yield

    def compute(self, folder: str, key: str, produce: Callable[[Path], dict[str, Any]], made_by: dict[str, Any],
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
            marker = {**made_by, "key": key, "summary": summary, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "files": manifest(partial)}
            atomic_write_json(partial / MARKER, marker)
            os.replace(partial, final)
            return final, marker

    # ------------------------------------------------------------------ runs using the store

    def register(self, run_dir: Path, entries: Optional[dict[str, str]] = None, records: Optional[list[str]] = None,
                 replace: bool = False) -> str:
        """Record keys ``run_dir`` uses (:func:`lnull.runrefs.register`); returns the run's id."""
        return runrefs.register(self.root, run_dir, entries, records, replace)

    def session(self) -> contextlib.AbstractContextManager:
        """This process runs on the store until the block ends: gc keeps what it writes meanwhile."""
        return runrefs.session(self.root)

    def entries(self) -> list[tuple[str, str, Path]]:
        """Every complete entry and item (a record): (folder, key, path)."""
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name not in NOT_ENTRIES):
            for path in sorted(folder.iterdir()):
                if folder.name in ITEM_KINDS:
                    if path.suffix == ".json":
                        found.append((folder.name, path.stem, path))
                elif path.is_dir() and not path.name.endswith(".partial"):
                    found.append((folder.name, path.name, path))
        return found

    @staticmethod
    def _uses(ref: dict[str, Any]) -> list[tuple[str, str]]:
        """The (folder, key) pairs a run's ref names: its stage entries and its items (:func:`runrefs.uses`)."""
        return runrefs.uses(ref)

    def users(self) -> dict[tuple[str, str], list[str]]:
        """{(folder, key): [run folder names]} from the refs of runs that still exist (wherever they moved)."""
        used: dict[tuple[str, str], list[str]] = {}
        for ref in runrefs.live_refs(self.root):
            for pair in self._uses(ref):
                used.setdefault(pair, []).append(self.run_label(ref))
        return used

    def run_label(self, ref: dict[str, Any]) -> str:
        """How `lnull store ls|du` name a run: ``<experiment>/<name>`` for a run folder of the default layout
        (``<run.root>/<experiment>/<name>`` beside ``<run.root>/store``), else the folder's name (an older
        ``<experiment>-<hash>`` folder, a ``run.dir`` elsewhere)."""
        path = Path(ref.get("run", ""))
        return f"{path.parent.name}/{path.name}" if path.parent.parent == self.root.parent else path.name

    def _files(self, folder: str, key: str, path: Path) -> list[Path]:
        """What deleting an entry (or a partial / work folder at ``path``) removes; an item (a record) takes its
        digest and its work folder with it (:meth:`item_files`)."""
        return self.item_files(folder, key) if folder in ITEM_KINDS else [path]

    def _bytes(self, folder: str, key: str, path: Path) -> int:
        return sum(tree_size(f) for f in self._files(folder, key, path) if f.exists())

    def ls(self) -> list[dict[str, Any]]:
        """One row per entry: folder, key, bytes, the runs using it."""
        if not self.root.exists():
            return []
        used = self.users()
        rows = []
        for folder, key, path in self.entries():
            rows.append({"folder": folder, "key": key, "bytes": self._bytes(folder, key, path),
                         "runs": sorted(used.get((folder, key), []))})
        return rows

    def du(self) -> dict[str, Any]:
        """Bytes per stage folder and per run (``lnull store du``), from :meth:`ls`'s entries (complete entries and
        records; a record with its digest and scorer's work folder) and the refs of live runs.

        ``{"stages": [{"folder", "entries", "bytes"}], "runs": [{"run", "path", "entries", "bytes", "own",
        "shared", "local"}], "own", "shared", "unused", "used_entries", "unused_entries", "bytes"}``: per run,
        ``bytes`` is every entry its views use, ``own`` those no other run uses, ``shared`` those other runs use
        too, ``local`` the run folder's own files (its evaluation and analysis outputs; views not followed; None
        when the folder is not found). Totals count a shared entry once: ``own`` + ``shared`` + ``unused`` (no run
        uses it) = ``bytes``."""
        rows = self.ls()
        size = {(row["folder"], row["key"]): row["bytes"] for row in rows}
        stages: dict[str, dict[str, Any]] = {}
        for row in rows:
            stage = stages.setdefault(row["folder"], {"folder": row["folder"], "entries": 0, "bytes": 0})
            stage["entries"] += 1
            stage["bytes"] += row["bytes"]
        refs = runrefs.live_refs(self.root) if self.root.exists() else []
        uses = [{pair for pair in self._uses(ref) if pair in size} for ref in refs]
        count: dict[tuple[str, str], int] = {}
        for pairs in uses:
            for pair in pairs:
                count[pair] = count.get(pair, 0) + 1
        runs = []
        for ref, pairs in zip(refs, uses):
            folder = runrefs._found_at(ref, self.root)
            runs.append({"run": self.run_label(ref), "path": str(folder or ref["run"]), "entries": len(pairs),
                         "bytes": sum(size[p] for p in pairs),
                         "own": sum(size[p] for p in pairs if count[p] == 1),
                         "shared": sum(size[p] for p in pairs if count[p] > 1),
                         "local": tree_size(folder) if folder is not None else None})
        runs.sort(key=lambda run: (run["run"], run["path"]))
        return {"stages": sorted(stages.values(), key=lambda stage: stage["folder"]), "runs": runs,
                "own": sum(b for p, b in size.items() if count.get(p) == 1),
                "shared": sum(b for p, b in size.items() if count.get(p, 0) > 1),
                "unused": sum(b for p, b in size.items() if p not in count),
                "used_entries": len(count), "unused_entries": len(size) - len(count), "bytes": sum(size.values())}

    def _busy(self, folder: str, key: str) -> bool:
        """Whether a process holds the key's lock now (computing or scoring it)."""
        if not self.lock_path(folder, key).exists():
            return False
        with file_lock(self.lock_path(folder, key), wait=False) as taken:
            return not taken

    def gc_plan(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(what gc would remove, what it keeps although no run lists it, and why), each row ``{"path", "folder",
        "key", "bytes", "why"}``. Kept: an entry whose lock is held (being computed or read under it now), and
        anything written after the oldest running lnull process started (it may be about to record it)."""
        if not self.root.exists():
            return [], []
        used = self.users()
        since = runrefs.oldest_live_session(self.root)
        candidates = [(folder, key, path) for folder, key, path in self.entries() if (folder, key) not in used]
        for partial in sorted(self.root.glob("*/*.partial")):
            folder, key = partial.parent.name, partial.name[:-len(".partial")]
            if (folder, key) not in used and not self.entry(folder, key).exists():
                candidates.append((folder, key, partial))
        for kind in ITEM_KINDS:  # an item's work folder (a scorer's cache) whose item never came
            for work in sorted(self.root.glob(f"{kind}/*.work")):
                if (kind, work.stem) not in used and not self.item_path(kind, work.stem).exists():
                    candidates.append((kind, work.stem, work))
        remove, keep = [], []
        for folder, key, path in candidates:
            row = {"path": str(path), "folder": folder, "key": key, "bytes": self._bytes(folder, key, path)}
            written = max((f.stat().st_mtime for f in (path / MARKER, path) if f.exists()), default=0.0)
            if self._busy(folder, key):
                keep.append({**row, "why": "its lock is held by a running process"})
            elif since is not None and written >= since - 1.0:
                keep.append({**row, "why": "written after a running lnull process started"})
            else:
                remove.append({**row, "why": "no run uses it"})
        return remove, keep

    def gc(self, dry_run: bool = False, log: Callable[[str], None] = print,
           confirmed: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
        """Delete what :meth:`gc_plan` says no run uses (nothing with ``dry_run``); return the rows removed.
        ``confirmed``: the rows of an earlier plan a user agreed to: only those are deleted, and only if a fresh
        plan still removes them (a run that started using one while the user read the list keeps it). Each
        deletion re-checks under the key's lock, without waiting: a key taken meanwhile is kept."""
        remove, _ = self.gc_plan()
        if confirmed is not None:
            agreed = {row["path"] for row in confirmed}
            remove = [row for row in remove if row["path"] in agreed]
        if dry_run:
            return remove
        removed = []
        for row in remove:
            folder, key, path = row["folder"], row["key"], Path(row["path"])
            with file_lock(self.lock_path(folder, key), wait=False) as taken:
                if not taken:
                    log(f"[gc] kept {folder}/{key}: a process took it meanwhile")
                    continue
                for item in self._files(folder, key, path):
                    if item.is_dir():
                        shutil.rmtree(item, ignore_errors=True)
                    else:
                        item.unlink(missing_ok=True)
            removed.append(row)
        return removed
