"""Which runs use which store keys, and which lnull processes are running: what `lnull store gc` must keep.

A run folder carries a stable id in ``<run>/.lnull-ref.json`` (``{"id", "run", "run_rel", "entries", "records"}``):
the keys it uses, recorded when each stage *starts* (not when the run ends), so a run killed or still training
keeps what it reads. The store holds the same file as ``refs/<id>.json`` — a **hard link** when both are on one
file system: while the run folder exists anywhere on that file system (renamed, moved, or moved together with
its store), the link count of the store's copy is 2, so gc needs no path at all to know the run is alive.
Deleting the run folder drops the count to 1. Where hard links are impossible (the store on another file
system) the store keeps a copy, and the run is found at its recorded absolute path or at its path relative to
the store.

A ref names two kinds of store keys: stage entries (``entries``: {folder: key}) and keyed items (``records``:
the keys of result records, the items of kind ``eval``; ``ITEM_FIELDS``); :func:`uses` lists both as
(folder, key) pairs, the way `lnull store ls|du|gc` read them.

A copied run folder (``cp -r``) carries its original's id; the first time it runs it takes an id of its own.

Running processes register a session (``procs/<pid>-<rand>.lock``, an ``flock`` held for the process's life, so
a killed process's session is seen as dead): gc keeps everything written after the oldest live session started,
because that process may be about to record it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from lnull.io import atomic_write_json, file_lock, stable_hash, try_read_json

RUN_FILE = ".lnull-ref.json"
RECORDS = "eval"  # the store folder (item kind) of result records
ITEM_FIELDS = {"records": RECORDS}  # a ref's field listing the keys it uses of each kind of keyed store item


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _found_at(ref: dict[str, Any], store_root: Path) -> Optional[Path]:
    """The run folder of ``ref`` at its recorded path or at its path relative to the store, if its id is there."""
    candidates = [Path(ref.get("run", ""))]
    if ref.get("run_rel"):
        candidates.append(store_root / ref["run_rel"])
    for folder in candidates:
        own = try_read_json(folder / RUN_FILE)
        if isinstance(own, dict) and own.get("id") == ref.get("id"):
            return folder
    return None


def register(store_root: Path, run_dir: Path, entries: Optional[dict[str, str]] = None,
             records: Optional[list[str]] = None, replace: bool = False) -> str:
    """Record that ``run_dir`` uses ``entries`` ({folder: key}) and ``records`` (record keys); return its run id.

    ``replace``: the run uses exactly these now (written when the run ends: a changed config's old keys are
    released); otherwise they are added to what it already uses (written when a stage starts)."""
    store_root, run_dir = Path(store_root).resolve(), Path(run_dir).resolve()
    own_path = run_dir / RUN_FILE
    with file_lock(store_root / "locks" / f"run-{stable_hash(str(run_dir), 12)}.lock"):
        own = try_read_json(own_path)
        if not isinstance(own, dict) or not isinstance(own.get("id"), str):
            own = {"id": uuid.uuid4().hex[:16], "entries": {}, "records": []}
        ref_path = store_root / "refs" / f"{own['id']}.json"
        ref = try_read_json(ref_path)
        if isinstance(ref, dict) and not _same_file(ref_path, own_path):
            original = _found_at(ref, store_root)
            elsewhere = original is not None and original.resolve() != run_dir
            if elsewhere or (ref_path.stat().st_nlink >= 2 and Path(ref.get("run", "")).resolve() != run_dir):
                own = {"id": uuid.uuid4().hex[:16], "entries": {}, "records": []}  # a copy: its own id
                ref_path = store_root / "refs" / f"{own['id']}.json"
        if replace:
            own["entries"], own["records"] = dict(entries or {}), sorted(set(records or []))
        else:
            own["entries"] = {**own.get("entries", {}), **(entries or {})}
            own["records"] = sorted(set(own.get("records", [])) | set(records or []))
        own.update(run=str(run_dir), run_rel=os.path.relpath(run_dir, store_root),
                   updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(own_path, own)
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref_path.with_name(f".{ref_path.name}.{os.getpid()}.link")
        try:
            tmp.unlink(missing_ok=True)
            os.link(own_path, tmp)
            os.replace(tmp, ref_path)
        except OSError:  # another file system, or no hard links: a copy, found by path
            tmp.unlink(missing_ok=True)
            atomic_write_json(ref_path, own)
        legacy = store_root / "refs" / f"{run_dir.name}-{stable_hash(str(run_dir), 8)}.json"
        legacy.unlink(missing_ok=True)  # refs before run ids were named by path
        return own["id"]


def uses(ref: dict[str, Any]) -> list[tuple[str, str]]:
    """The (store folder, key) pairs ``ref`` names: its stage entries and its keyed items (result records)."""
    return [*ref.get("entries", {}).items(),
            *((kind, key) for field, kind in ITEM_FIELDS.items() for key in ref.get(field, []))]


def live_refs(store_root: Path) -> list[dict[str, Any]]:
    """Refs of runs that still exist (moved or renamed ones included); a deleted run's ref is dropped."""
    live = []
    for path in sorted((Path(store_root) / "refs").glob("*.json")):
        ref = try_read_json(path)
        if not isinstance(ref, dict):
            path.unlink(missing_ok=True)
            continue
        if "id" not in ref:  # a ref from before run ids: alive while its path exists
            alive = Path(ref.get("run", "")).is_dir()
        else:
            alive = path.stat().st_nlink >= 2 or _found_at(ref, Path(store_root)) is not None
        if alive:
            live.append(ref)
        else:
            path.unlink(missing_ok=True)
    return live


@contextlib.contextmanager
def session(store_root: Path) -> Iterator[None]:
    """Mark this process as running on the store (see the module docstring) for the duration of the block."""
    folder = Path(store_root) / "procs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps({"pid": os.getpid(), "started": time.time(), "argv": sys.argv[:8]}))
        fh.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def oldest_live_session(store_root: Path) -> Optional[float]:
    """Start time (epoch s) of the oldest running lnull process on the store, or None; dead sessions are swept."""
    oldest = None
    for path in (Path(store_root) / "procs").glob("*.lock"):
        try:
            with file_lock(path, wait=False) as taken:
                if not taken:  # held: the process is alive
                    started = (try_read_json(path) or {}).get("started") or path.stat().st_mtime
                    oldest = started if oldest is None else min(oldest, started)
                    continue
            path.unlink(missing_ok=True)  # nobody holds it: its process died
        except OSError:
            continue
    return oldest
