"""Small file helpers every stage uses: atomic writes, JSON reads that name a damaged file, stable hashes, file
locks."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from lnull.errors import ConfigError


def warn(message: str) -> None:
    """One line on stderr for a user (a result that is not used, a file that does not count)."""
    print(message, file=sys.stderr)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex sha256 prefix of a JSON-serialisable object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared like any written file
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # a write/fsync error (a full disk) names no file; the user needs the path
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_dir(dest: Path, write: Callable[[Path], None], keep_existing: bool = False) -> Path:
    """Fill a fresh temp folder beside ``dest`` with ``write(folder)`` and rename it to ``dest``, so ``dest`` is
    whole or absent. ``keep_existing``: a ``dest`` another process published first is kept (this copy is
    dropped); otherwise it is replaced. Modes are those of a normally made folder (mkdtemp and safetensors'
    writer make owner-only ones)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if keep_existing:
            try:
                os.replace(tmp, dest)
            except OSError:  # a non-empty dest: published by another process meanwhile
                if not dest.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return dest
        old = None
        if dest.exists():  # a folder can't be os.replace'd over a non-empty one
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def check_writable_dir(path: Path | str, key: str) -> None:
    """ConfigError naming ``key`` and ``path`` unless ``path`` is (or can be made as) a folder this process can
    write: not empty, no file on the way, the nearest existing folder writable. Makes nothing."""
    if not str(path).strip():
        raise ConfigError(f"{key} is empty: give a folder")
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key} '{path}' cannot be a folder: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be made: {probe} is not writable"
        raise ConfigError(f"{key} '{path}' {what}")


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Exclusive ``flock`` of ``path`` (made, with its folder, if missing) for the block; yields whether it was
    taken: always with ``wait``, only if nobody holds it without. Released when the holder exits, even by
    SIGKILL, so a lock held means a live process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def drop_stale_temps(folder: Path) -> None:
    """Delete the temp files of atomic writes a killed process left under ``folder`` (call only while holding
    the folder's lock: a live writer's temp file would go too)."""
    for tmp in Path(folder).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def save_png(fig: Any, path: Path, dpi: int = 130) -> Path:
    """Write a matplotlib figure as a PNG atomically (a killed run leaves the old file or none) and close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Parsed JSON of ``path``; a truncated or unparsable file is a ConfigError naming it (never a traceback)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is damaged ({exc.msg} at line {exc.lineno}); delete it and rerun") from None


def try_read_json(path: Path) -> Any:
    """Parsed JSON of ``path``, or None when it is missing or damaged (a marker that does not count)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
