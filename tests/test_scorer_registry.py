"""The scorer registry: every benchmark kind is one ``Scorer`` registered by its own module, and adding a kind is
one module plus one eval config (a fake kind, written as a module of a temporary folder on ``lnull.evaluate``'s
path, with its ``configs/eval/short.yaml`` in a copy of the config folder, is composed, checked and scored on the
tiny model by the evaluate stage)."""
from __future__ import annotations

import ast
import json
import shutil
import sys
import textwrap

import pytest

from conftest import REPO
from lnull.errors import ConfigError

FAKE_MODULE = "lnull_fake_kind"
FAKE_SCORER = '''
    """Fake benchmark kind ``fake_short``: the share (%) of records whose first answer has under 5 characters,
    with two greedy tokens per question generated to show the model was loaded for it."""
    from lnull.errors import ConfigError
    from lnull.evaluate.base import Scorer, loads_always, register

    CHECKED = []


    def score(name, bench, ctx):
        assert ctx.model is not None, "needs_weights=loads_always: the weights are loaded here"
        rows = ctx.records(bench, [bench["question_field"], bench["answer_field"]])
        sample = ctx.generate([r[bench["question_field"]] for r in rows], bench["max_new_tokens"], desc=name)
        short = [len(r[bench["answer_field"]][0]) < 5 for r in rows]
        return {"metric": "short_answers", "value": 100.0 * sum(short) / len(short), "n": len(short),
                "settings": ctx.settings(), "sample": sample}


    def check_config(name, bench, ev):
        if bench["max_new_tokens"] > 8:
            raise ConfigError(f"eval.benchmarks.{name}.max_new_tokens: fake_short generates at most 8")


    def check_machine(name, bench, cache_dir, ev):
        CHECKED.append(name)


    register(Scorer(kind="fake_short", score=score, version="7", needs_weights=loads_always,
                    key_settings=lambda cfg: {"fake": {"max_length": cfg["train"]["max_length"]}},
                    check=check_config, check_inputs=check_machine, proportion=True))
'''
FAKE_CONFIG = """
    # Fake short-answer share: `lnull evaluate eval=short`.
    benchmarks:
      short:
        kind: fake_short
        dataset: "synthetic:facts:8"
        max_new_tokens: {max_new_tokens}
"""


@pytest.fixture
def fake_kind(tmp_path, monkeypatch):
    """The fake scorer module in a folder added to ``lnull.evaluate.__path__``, and the config folder copied with
    ``eval/short.yaml`` (``max_new_tokens`` 2) and ``eval/short_bad.yaml`` (9) added; removed afterwards."""
    import lnull.compose
    import lnull.evaluate as evaluate
    from lnull.evaluate.base import REGISTRY

    folder = tmp_path / "scorers"
    folder.mkdir()
    (folder / f"{FAKE_MODULE}.py").write_text(textwrap.dedent(FAKE_SCORER))
    monkeypatch.setattr(evaluate, "__path__", [*evaluate.__path__, str(folder)])
    configs = shutil.copytree(lnull.compose.CONFIG_DIR, tmp_path / "configs")
    for name, tokens in (("short", 2), ("short_bad", 9)):
        (configs / "eval" / f"{name}.yaml").write_text(textwrap.dedent(FAKE_CONFIG.format(max_new_tokens=tokens)))
    monkeypatch.setattr(lnull.compose, "CONFIG_DIR", configs)
    yield f"lnull.evaluate.{FAKE_MODULE}"
    REGISTRY.pop("fake_short", None)
    sys.modules.pop(f"lnull.evaluate.{FAKE_MODULE}", None)


def test_a_new_kind_is_one_module_and_one_config(fake_kind, tiny_cfg):
    from lnull.data.sources import load_records
    from lnull.evaluate import record_key, scored_key
    from lnull.pipeline import run_pipeline

    cfg = tiny_cfg("eval=short", "eval.models=[base]", "eval.limit=3")
    logs: list[str] = []
    layout = run_pipeline(cfg, stages=["evaluate"], log=logs.append)
    assert sys.modules[fake_kind].CHECKED == ["short", "short"]  # before the first stage, and in the stage
    (rec,) = json.loads((layout.view("evaluate") / "results.json").read_text())["results"]
    rows = load_records("synthetic:facts:8", None, 3)
    want = 100.0 * sum(len(r["answer"][0]) < 5 for r in rows) / 3
    assert (rec["kind"], rec["metric"], rec["n"], rec["value"]) == ("fake_short", "short_answers", 3, want)
    assert rec["scorer"]["version"] == "7" and len(rec["details"]["sample"]) == 3
    assert rec["stderr"] == pytest.approx(100.0 * (want / 100 * (1 - want / 100) / 3) ** 0.5)  # proportion
    assert rec["key"] == record_key(cfg, scored_key(layout, "base"), "short", cfg["eval"]["benchmarks"]["short"])
    run_pipeline(cfg, stages=["evaluate"], log=logs.append)
    assert logs[-1].startswith("[evaluate] cached")  # the stage key covers the fake kind's record key

    # its key_settings enter its record key; the common settings do as for every kind
    bench = cfg["eval"]["benchmarks"]["short"]
    longer = {**cfg, "train": {**cfg["train"], "max_length": cfg["train"]["max_length"] + 1}}
    assert record_key(longer, "m", "short", bench) != record_key(cfg, "m", "short", bench)
    # its compose-time check runs at compose
    with pytest.raises(ConfigError, match="fake_short generates at most 8"):
        tiny_cfg("eval=short_bad")


def test_an_unknown_kind_names_every_registered_one(fake_kind, tiny_cfg):
    with pytest.raises(ConfigError, match=r"unknown benchmark kind 'nope' for eval.benchmarks.short; known: .*"
                                          r"fake_short.*text_nll"):
        tiny_cfg("eval=short", "eval.benchmarks.short.kind=nope")


def test_the_built_in_kinds_and_their_facts():
    from lnull.evaluate.registry import kinds, scorer_of

    assert kinds() == ["code", "lm_eval", "lm_eval_nll", "math", "mtbench", "qa_exact_match", "task_heldout",
                       "text_nll"]
    scorers = [scorer_of(k) for k in kinds()]
    assert {s.kind for s in scorers if s.proportion} == {"math", "code", "qa_exact_match"}
    assert {s.kind for s in scorers if s.lower_is_better} == {"lm_eval_nll", "text_nll"}
    assert {s.kind for s in scorers if s.packages == ("lm_eval",)} == {"lm_eval", "lm_eval_nll", "text_nll"}
    # protocol changes bump a kind's version (its stored records are re-scored): lm_eval 2 honours
    # eval.max_new_tokens, text_nll 2 keeps each text's token count
    assert {s.kind: s.version for s in scorers if s.version != "1"} == {"lm_eval": "2", "text_nll": "2"}
    ev = {"engine": "vllm", "code": {"backend": "builtin"}}
    assert {s.kind for s in scorers if s.needs_weights(ev)} == {"lm_eval", "lm_eval_nll", "text_nll",
                                                                 "task_heldout"}


def _names_kind(node: ast.AST) -> bool:
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "kind"
            or isinstance(node, ast.Attribute) and node.attr == "kind")


def _literal(node: ast.AST) -> bool:
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return bool(items) and all(isinstance(i, ast.Constant) and isinstance(i.value, str) for i in items)


def test_no_evaluate_module_compares_a_benchmark_kind():
    """Every kind fact is a field of its Scorer: no ``bench["kind"] == "..."`` (or ``in (...)``) in lnull/evaluate/."""
    for path in (REPO / "lnull" / "evaluate").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                assert not (any(map(_names_kind, sides)) and any(map(_literal, sides))), \
                    f"{path.name}:{node.lineno} compares a benchmark kind with a name"
