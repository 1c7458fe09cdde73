"""`lnull store gc` never deletes live work: renamed, moved and copied run folders keep their entries, a running
process keeps what it reads and writes, and gc lists before it deletes (--dry-run, confirmation, --yes)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import REPO, lnull
from lnull.cli import compose
from lnull.layout import RunLayout
from lnull.pipeline import run_pipeline
from lnull.runrefs import RUN_FILE
from lnull.store import Store

TINY = ["+experiment=tiny", "progress=false", "method=lora_null_v1", "train.max_steps=4"]


def _run(root: Path, name: str = "run", *extra: str) -> Path:
    cfg = compose([*TINY, f"run.root={root}", f"run.dir={root / name}", *extra])
    return run_pipeline(cfg, log=lambda _: None).dir


def _entries(store: Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in store.glob("*/*") if p.parent.name not in ("locks", "refs", "procs")}


def _gc(root: Path, *flags: str) -> subprocess.CompletedProcess:
    return lnull("store", "gc", *flags, f"run.root={root}", f"store.root={root / 'store'}")


def test_a_renamed_run_keeps_everything_it_uses(tmp_path):
    run = _run(tmp_path)
    before = _entries(tmp_path / "store")
    run.rename(tmp_path / "my-best-run")
    proc = _gc(tmp_path, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert _entries(tmp_path / "store") == before, proc.stdout
    assert "nothing to remove" in proc.stdout


def test_moving_the_whole_runs_folder_with_its_store_keeps_everything(tmp_path):
    _run(tmp_path / "runs")
    before = _entries(tmp_path / "runs" / "store")
    shutil.move(str(tmp_path / "runs"), str(tmp_path / "moved"))
    proc = _gc(tmp_path / "moved", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert _entries(tmp_path / "moved" / "store") == before
    # and the moved run still runs from its stored stages (nothing recomputed), re-registering its new place
    cfg = compose([*TINY, f"run.root={tmp_path / 'moved'}", f"run.dir={tmp_path / 'moved' / 'run'}"])
    logs: list[str] = []
    run_pipeline(cfg, log=logs.append)
    assert all("cached" in line for line in logs if line.startswith("[")), logs
    ref = json.loads((tmp_path / "moved" / "run" / RUN_FILE).read_text())
    assert ref["run"] == str((tmp_path / "moved" / "run").resolve())


def test_a_deleted_run_releases_its_entries_but_a_dry_run_deletes_nothing(tmp_path):
    keep = _run(tmp_path, "v1")
    gone = _run(tmp_path, "v2", "method=lora_null_v2")
    gone_init = (gone / "init").resolve()
    shutil.rmtree(gone)
    before = _entries(tmp_path / "store")
    dry = _gc(tmp_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    line = next(li for li in dry.stdout.splitlines() if f"init/{gone_init.name}" in li)
    assert line.startswith("would remove") and "MiB" in line, dry.stdout
    assert _entries(tmp_path / "store") == before  # nothing deleted by a dry run
    refused = _gc(tmp_path)  # not a terminal, no --yes: refuses in one line
    assert refused.returncode != 0 and refused.stderr.count("lnull: error:") == 1 and "--yes" in refused.stderr
    assert _entries(tmp_path / "store") == before
    proc = _gc(tmp_path, "--yes")
    assert proc.returncode == 0 and not gone_init.exists(), proc.stdout
    assert (keep / "train" / "complete.json").exists() and (keep / "init" / "complete.json").exists()


def test_a_copied_run_takes_its_own_id_and_both_keep_their_entries(tmp_path):
    run = _run(tmp_path)
    shutil.copytree(run, tmp_path / "copy", symlinks=True)
    copy = _run(tmp_path, "copy", "method=lora_null_v2")  # the copy runs another method in its own folder
    ids = {json.loads((p / RUN_FILE).read_text())["id"] for p in (run, copy)}
    assert len(ids) == 2
    assert _gc(tmp_path, "--yes").returncode == 0
    for folder in (run, copy):
        for stage in ("calibration", "init", "train"):
            assert (folder / stage / "complete.json").exists(), (folder, stage)


def test_gc_keeps_locked_and_young_entries_and_what_a_running_process_may_use(tmp_path):
    run = _run(tmp_path)
    store = Store(tmp_path / "store")
    init_key = (run / "init").resolve().name
    shutil.rmtree(run)  # nothing uses the entries now
    with store.lock("init", init_key):  # a process computing or reading under the key's lock
        remove, keep = store.gc_plan()
    assert any(r["key"] == init_key and "lock" in r["why"] for r in keep)
    assert all(r["key"] != init_key for r in remove)
    time.sleep(1.1)
    with store.session():  # a running lnull process: what was written before it started may go
        (tmp_path / "store" / "train" / "young.partial").mkdir()  # written after it started: kept
        remove, keep = store.gc_plan()
    assert any(r["key"] == "young" and "running" in r["why"] for r in keep), keep
    assert any(r["key"] == init_key for r in remove)
    assert any(r["key"] == "young" for r in store.gc(dry_run=True))  # no process runs now: it may go


def test_gc_while_a_run_is_training_leaves_it_to_finish_equal_to_an_undisturbed_one(tmp_path):
    """The run is held at the start of its training (this test holds the train key's lock, as a process training
    the same key would), its calibration and init done; gc runs then; the run goes on and ends as one that gc never
    met (before: its calibration and init were deleted and it died with "needs 'init' first")."""
    undisturbed = _run(tmp_path / "a")
    root = tmp_path / "b"
    cfg = compose([*TINY, f"run.root={root}", f"run.dir={root / 'run'}"])
    args = [sys.executable, "-m", "lnull", "run", *TINY, f"run.root={root}", f"run.dir={root / 'run'}"]
    store = Store(root / "store")
    with store.lock("train", RunLayout(cfg).keys["train"]):
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:  # until the run waits for the train key, its calibration and init complete
            lines.append(line)
            if line.startswith("[train] waiting for another process"):
                break
        assert proc.poll() is None, "".join(lines)
        gc = _gc(root, "--yes")
        assert gc.returncode == 0 and proc.poll() is None, gc.stdout + gc.stderr
    out = "".join(lines) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out + gc.stdout
    assert "nothing to remove" in gc.stdout, gc.stdout
    a = load_file(str(undisturbed / "train" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(root / "run" / "train" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gc_deletes_only_the_listed_entries_a_user_confirmed(tmp_path):
    run = _run(tmp_path)
    shutil.rmtree(run)
    store = Store(tmp_path / "store")
    listed, _ = store.gc_plan()
    later = tmp_path / "store" / "train" / "later.partial"  # unused too, but appeared after the list was shown
    later.mkdir()
    removed = store.gc(confirmed=listed)
    assert {r["path"] for r in removed} == {r["path"] for r in listed} and later.exists()


def test_an_old_named_run_folder_is_still_listed_kept_by_gc_and_runs_from_its_folder(tmp_path):
    """A run folder of the older layout (`<run.root>/<experiment>-<hash>`, beside the store) stays a user of its
    entries: `lnull store ls` names it, gc keeps what it uses, `lnull run --from` runs it on the same store."""
    old = _run(tmp_path, "tiny-0123456789")
    assert (tmp_path / "store").is_dir() and not (tmp_path / "tiny").exists()
    used = _entries(tmp_path / "store")
    listed = lnull("store", "ls", f"run.root={tmp_path}", check=True).stdout
    assert "init/" in listed and "tiny-0123456789" in listed and "(unused)" not in listed, listed
    new = run_pipeline(compose([*TINY, f"run.root={tmp_path}", "method.rank=2"]), log=lambda _: None).dir
    assert new.parent == tmp_path / "tiny" and new.name.startswith("lora_null_v1-r2-")  # the new layout, one store
    shutil.rmtree(new)
    proc = lnull("store", "gc", "--yes", f"run.root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert _entries(tmp_path / "store") >= used and "lora_null_v1-r2" not in _entries(tmp_path / "store")
    again = lnull("run", "--from", str(old), "progress=false", check=True)
    assert "[train] cached" in again.stdout and not (old / "store").exists() and not (tmp_path / "store.partial").exists()
    assert used <= _entries(tmp_path / "store")


def test_a_new_layout_run_from_its_folder_uses_the_store_of_its_run_root(tmp_path):
    """`lnull run --from <run.root>/<experiment>/<name>` finds `<run.root>/store`, not a new store in the
    experiment folder."""
    run = run_pipeline(compose([*TINY, f"run.root={tmp_path}", "train.log_every=2"]), log=lambda _: None).dir
    assert run.parent == tmp_path / "tiny"
    same = run_pipeline(compose([*TINY, f"run.root={tmp_path}", "train.log_every=3"]), log=lambda _: None).dir
    assert same == run  # a knob that enters no key keeps the folder
    again = lnull("run", "--from", str(run), "progress=false", check=True)
    assert "[train] cached" in again.stdout and not (tmp_path / "tiny" / "store").exists()
