"""The store's generic keyed items (`Store.item_path` / `write_item` / `inspect_item` / `read_item` /
`item_work`): one JSON document per key with its digest beside it, under the same per-key lock as a stage
entry; result records are the items of kind `eval`, and `lnull store ls|du|gc` treat items through them."""
from __future__ import annotations

import json
import os
import time

import pytest

from lnull import store as store_module
from lnull.records import record_digest
from lnull.store import RECORDS, Store


def _item(key: str, value: float = 1.5) -> dict:
    return {"key": key, "value": value, "nested": {"b": [1, 2], "a": None}}


def _age(store: Store, seconds: float = 3600.0) -> None:
    """Make everything under the store look written an hour ago (gc keeps what a live process may write)."""
    old = time.time() - seconds
    for path in store.root.rglob("*"):
        os.utime(path, (old, old), follow_symlinks=False)


def test_an_item_is_its_json_its_digest_and_its_work_folder_at_the_records_paths(tmp_path):
    store = Store(tmp_path / "store")
    key = "k1"
    assert store.item_path(RECORDS, key) == store.root / "eval" / "k1.json" == store.record(key)
    assert store.item_digest(RECORDS, key) == store.root / "eval" / "k1.sha256" == store.record_digest(key)
    assert store.item_work(RECORDS, key) == store.root / "eval" / "k1.work" == store.record_work(key)
    assert store.item_files(RECORDS, key) == [store.record(key), store.record_digest(key), store.record_work(key)]
    with store.lock(RECORDS, key):
        digest = store.write_item(RECORDS, key, _item(key))
    assert digest == record_digest(_item(key)) == store.item_digest(RECORDS, key).read_text().strip()
    assert json.loads(store.item_path(RECORDS, key).read_text()) == _item(key)
    assert store.read_item(RECORDS, key) == store.read_record(key) == _item(key)
    assert store.inspect_item(RECORDS, key) == store.inspect_record(key) == (_item(key), None)
    assert store.write_record("k2", _item("k2")) == record_digest(_item("k2"))  # the record calls are the same
    assert store.inspect_item(RECORDS, "k2") == (_item("k2"), None)
    assert not list(store.root.rglob(".*"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("damage, why", [
    (lambda s, k: s.item_path(RECORDS, k).unlink(), "is missing"),
    (lambda s, k: s.item_path(RECORDS, k).write_text("{not json"), "is damaged"),
    (lambda s, k: s.item_path(RECORDS, k).write_text(json.dumps(_item("other"))), "is damaged"),
    (lambda s, k: s.item_digest(RECORDS, k).unlink(), "has no digest"),
    (lambda s, k: s.item_path(RECORDS, k).write_text(json.dumps(_item(k, 99.9))), "does not match its digest"),
])
def test_an_item_that_was_changed_or_lost_does_not_count_and_says_why(tmp_path, damage, why):
    store = Store(tmp_path / "store")
    store.write_item(RECORDS, "k", _item("k"))
    damage(store, "k")
    data, reason = store.inspect_item(RECORDS, "k")
    assert data is None and why in reason and str(store.item_path(RECORDS, "k")) in reason
    told: list[str] = []
    assert store.read_item(RECORDS, "k", warn=told.append) is None
    assert len(told) == (0 if why == "is missing" else 1)  # only an item that exists is reported
    if told:
        assert why in told[0] and "re-scored" in told[0]
    store.write_item(RECORDS, "k", _item("k"))  # written again: it counts again
    assert store.read_item(RECORDS, "k") == _item("k")


def test_gc_ls_and_du_treat_any_item_kind_through_the_item_calls(tmp_path, monkeypatch):
    monkeypatch.setitem(store_module.ITEM_KINDS, "judged", ("judged", "judged again"))
    store = Store(tmp_path / "store")
    run = tmp_path / "run"
    run.mkdir()
    for kind in (RECORDS, "judged"):
        for key in ("used", "unused"):
            store.write_item(kind, key, _item(key))
            store.item_work(kind, key).mkdir(parents=True)
            (store.item_work(kind, key) / "cache.jsonl").write_text("x" * 100)
    store.item_work("judged", "orphan").mkdir(parents=True)  # a work folder whose item never came
    store.register(run, records=["used"])
    data, why = store.inspect_item("judged", "used")
    assert data == _item("used") and why is None
    store.item_path("judged", "used").write_text(json.dumps(_item("used", 2.0)))
    assert "changed after it was judged" in store.inspect_item("judged", "used")[1]
    store.write_item("judged", "used", _item("used"))

    rows = {(r["folder"], r["key"]): r for r in store.ls()}
    assert set(rows) == {(k, n) for k in (RECORDS, "judged") for n in ("used", "unused")}
    item_bytes = sum(f.stat().st_size for f in store.item_files(RECORDS, "used")[:2]) + 100
    assert rows[(RECORDS, "used")]["bytes"] == item_bytes and rows[(RECORDS, "used")]["runs"] == ["run"]
    du = store.du()
    assert {s["folder"]: s["entries"] for s in du["stages"]} == {RECORDS: 2, "judged": 2}
    assert du["runs"][0]["entries"] == 1 and du["runs"][0]["bytes"] == item_bytes

    _age(store)
    with store.lock("judged", "unused"):  # an item being written under its key's lock is kept
        remove, keep = store.gc_plan()
    assert [(r["folder"], r["key"]) for r in keep] == [("judged", "unused")]
    assert {(r["folder"], r["key"]) for r in remove} == {(RECORDS, "unused"), ("judged", "used"),
                                                        ("judged", "orphan")}  # the run lists eval/used only
    removed = store.gc()
    assert {(r["folder"], r["key"]) for r in removed} == {(RECORDS, "unused"), ("judged", "used"),
                                                         ("judged", "unused"), ("judged", "orphan")}
    for kind, key in [(RECORDS, "unused"), ("judged", "used"), ("judged", "unused"), ("judged", "orphan")]:
        assert not any(f.exists() for f in store.item_files(kind, key))  # the item, its digest, its work
    assert all(f.exists() for f in store.item_files(RECORDS, "used"))
    assert store.read_record("used") == _item("used")

