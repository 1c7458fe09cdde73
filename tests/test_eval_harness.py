"""``kind: lm_eval`` (lnull.evaluate.harness): lm-eval's built-in tasks on local files, offline, on tiny
models built in code.  Integration tests at the end use the real assets and SmolLM2 when fetched."""
from __future__ import annotations

import json
import os
import socket
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from lnull.config import ConfigError
from lnull.data.synthetic import facts
from lnull.evaluate.base import EvalContext
from lnull.evaluate.harness import _explicit_bos_lm, builtin_task_yaml, score

NQ_PROMPT = "Answer these questions:\n\nQ: {q}?\nA:"  # lm-eval nq_open: description + doc_to_text
ARC_ROWS = [  # hub ARC layout; labels as on the hub, letters or digits
    {"id": "a1", "question": "Which is a planet?", "choices": {"text": ["Mars", "Moon", "Sun"],
                                                              "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "a2", "question": "What do plants need to grow?",
     "choices": {"text": ["light", "loud noise", "sand", "salt"], "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
    {"id": "a3", "question": "What melts ice?", "choices": {"text": ["cold", "heat"], "label": ["A", "B"]},
     "answerKey": "B"},
    {"id": "a4", "question": "Which animal can fly?", "choices": {"text": ["dog", "fish", "bird", "cow"],
                                                                 "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from lnull.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def no_network(monkeypatch):
    """Offline env vars, and any socket connect fails the test (attempts are recorded too)."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise RuntimeError(f"network access attempted: {address}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ctx(cfg: dict, model, tokenizer, tmp_path: Path) -> EvalContext:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return EvalContext(model, tokenizer, cfg, "base", "tiny", work)


def _bench(task: str, dataset: str) -> dict:
    return {"kind": "lm_eval", "task": task, "dataset": dataset, "num_fewshot": 0}


def _memorise(model, tokenizer, rows: list[dict], steps: int = 150) -> None:
    """Teach ``model`` the answers (loss on ' <answer>\\n' only) in exactly lm-eval's nq_open prompt, with BOS."""
    pairs = []
    for r in rows:
        ctx = [tokenizer.bos_token_id] + tokenizer.encode(NQ_PROMPT.format(q=r["question"]), add_special_tokens=False)
        ans = tokenizer.encode(f" {r['answer'][0]}\n", add_special_tokens=False)
        pairs.append((ctx + ans, [-100] * len(ctx) + ans))
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in pairs])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in pairs])
    mask = (torch.arange(width)[None] < torch.tensor([len(x) for x, _ in pairs])[:, None]).long()
    torch.manual_seed(0)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    assert loss.item() < 0.1, f"tiny model did not memorise the facts (loss {loss.item():.3f})"


def test_offline_nq_open_on_a_local_file_records_versions_and_bos(tiny_cfg, tmp_path, tokenizer, no_network):
    from lnull.tiny import build_model

    from lm_eval.tasks._yaml_loader import load_yaml

    rows = facts(5)
    data = _jsonl(tmp_path / "nq.jsonl", rows)
    ctx = _ctx(tiny_cfg("eval.limit=3"), build_model(tokenizer), tokenizer, tmp_path)
    rec = score("nq", _bench("nq_open", str(data)), ctx)
    assert rec["metric"] == "exact_match" and rec["n"] == 3 and rec["value"] == 0.0  # random tiny model, greedy
    assert rec["lm_eval_version"] == version("lm_eval")
    assert rec["task_version"] == load_yaml(builtin_task_yaml("nq_open"))["metadata"]["version"]
    assert rec["settings"]["add_bos"] is True and rec["settings"]["num_fewshot"] == 0
    assert rec["settings"]["doc_to_text"] == "Q: {{question}}?\nA:"
    assert rec["settings"]["generation_kwargs"]["until"] == ["\n", ".", ","]
    assert rec["settings"]["max_gen_toks"] == 256  # lm-eval's default, as the paper ran it
    assert rec["lm_eval_dataset"] == "json" and rec["data"] == str(data)
    assert [e["prompt"] for e in rec["examples"]] == [NQ_PROMPT.format(q=r["question"]) for r in rows[:3]]
    assert len((ctx.work_dir / "nq_open.jsonl").read_text().splitlines()) == 3  # eval.limit applied
    assert sorted(p.name for p in ctx.work_dir.iterdir()) == ["lm_eval_tasks", "nq_open.jsonl"]  # no Arrow cache
    json.dumps(rec)  # the record must be writable as results.json
    assert no_network == []


def test_eval_max_new_tokens_caps_lm_evals_generation_too(tiny_cfg, tmp_path, tokenizer, monkeypatch):
    """`+scale=demo` promises at most eval.max_new_tokens new tokens per answer: lm-eval's tasks keep their
    prompts and stop strings but generate no more than that (lm-eval's own default, 256, otherwise)."""
    from lm_eval.models.huggingface import HFLM

    from lnull.tiny import build_model

    seen = []
    original = HFLM._model_generate

    def spy(self, context, max_length, stop, **kwargs):
        out = original(self, context, max_length, stop, **kwargs)
        seen.append((max_length - context.shape[1], out.shape[1] - context.shape[1]))
        return out

    monkeypatch.setattr(HFLM, "_model_generate", spy)
    data = _jsonl(tmp_path / "nq.jsonl", facts(2))
    rec = score("nq", _bench("nq_open", str(data)), _ctx(tiny_cfg("eval.max_new_tokens=5"), build_model(tokenizer),
                                                          tokenizer, tmp_path))
    assert seen and all(allowed == 5 and made <= 5 for allowed, made in seen)
    assert rec["settings"]["max_gen_toks"] == 5 and rec["settings"]["max_new_tokens_cap"] == 5


def test_bos_handling_is_explicit(tokenizer):
    from lnull.tiny import build_model

    model, bos = build_model(tokenizer), tokenizer.bos_token_id
    plain = tokenizer.encode("Q: what?", add_special_tokens=False)
    with_bos = _explicit_bos_lm(model, tokenizer, 2, add_bos=True)
    without = _explicit_bos_lm(model, tokenizer, 2, add_bos=False)
    assert with_bos.tok_encode("Q: what?") == [bos] + plain
    assert with_bos.tok_encode("Q: what?", add_special_tokens=False) == plain  # continuations never get BOS
    assert without.tok_encode("Q: what?") == plain
    ids, mask = with_bos.tok_batch_encode(["Q: what?", "Q: what is the capital of Doranbel?"])
    assert ids.shape == mask.shape and mask[0, 0] == 0 and mask.sum(1)[0] == len(plain) + 1
    assert ids[0, -len(plain) - 1] == bos and ids[1, 0] == bos  # BOS first after the left padding


def test_memorised_facts_score_high_and_untrained_near_zero(tiny_cfg, tmp_path, tokenizer, no_network):
    from lnull.tiny import build_model

    rows = facts(8)
    data = _jsonl(tmp_path / "facts.jsonl", rows)
    cfg = tiny_cfg("eval.limit=null", "eval.batch_size=8")
    untrained = score("facts", _bench("nq_open", str(data)), _ctx(cfg, build_model(tokenizer), tokenizer, tmp_path))
    model = build_model(tokenizer)
    _memorise(model, tokenizer, rows)
    trained = score("facts", _bench("nq_open", str(data)), _ctx(cfg, model, tokenizer, tmp_path))
    assert trained["n"] == untrained["n"] == 8
    assert trained["value"] >= 75.0, trained["examples"]
    assert untrained["value"] <= 12.5, untrained["examples"]
    assert trained["examples"][0]["prediction"] == rows[0]["answer"][0]
    assert no_network == []


def _choice_logprobs(model, tokenizer, context: str, choices: list[str], add_bos: bool) -> list[float]:
    """Sum of log-probabilities of ' <choice>' after ``context``, computed here without lm-eval."""
    prefix = [tokenizer.bos_token_id] if add_bos else []
    ctx_ids = prefix + tokenizer.encode(context, add_special_tokens=False)
    out = []
    for choice in choices:
        whole = prefix + tokenizer.encode(f"{context} {choice}", add_special_tokens=False)
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx_ids), len(whole))))
    return out


@pytest.mark.parametrize("add_bos", [True, False])
def test_multiple_choice_task_on_a_hand_made_file(tiny_cfg, tmp_path, tokenizer, no_network, add_bos):
    from lnull.tiny import build_model

    model = build_model(tokenizer, seed=3)
    data = _jsonl(tmp_path / "arc.jsonl", ARC_ROWS)
    cfg = tiny_cfg("eval.limit=null", f"model.add_bos={str(add_bos).lower()}")
    rec = score("arc", _bench("arc_easy", str(data)), _ctx(cfg, model, tokenizer, tmp_path))
    assert rec["n"] == 4 and rec["metric"] == "acc_norm" and set(rec["metrics"]) == {"acc", "acc_norm"}
    assert rec["settings"]["add_bos"] is add_bos
    hits = hits_norm = 0
    for i, row in enumerate(ARC_ROWS):
        context = f"Question: {row['question']}\nAnswer:"
        lls = _choice_logprobs(model, tokenizer, context, row["choices"]["text"], add_bos)
        gold = row["choices"]["label"].index(row["answerKey"])
        norm = [ll / len(c) for ll, c in zip(lls, row["choices"]["text"])]
        hits += lls.index(max(lls)) == gold
        hits_norm += norm.index(max(norm)) == gold
        if i < len(rec["examples"]):
            assert rec["examples"][i]["prompt"] == context and rec["examples"][i]["target"] == gold
            assert rec["examples"][i]["loglikelihoods"] == pytest.approx(lls, abs=1e-3)
    assert rec["metrics"]["acc"] == pytest.approx(100.0 * hits / 4)
    assert rec["value"] == rec["metrics"]["acc_norm"] == pytest.approx(100.0 * hits_norm / 4)
    assert no_network == []


def test_bad_input_fails_before_the_model_is_used(tiny_cfg, tmp_path):
    ctx = _ctx(tiny_cfg(), None, None, tmp_path)  # a model would only be touched after these checks
    with pytest.raises(ConfigError, match="unknown lm-eval task 'nq_opn'.*nq_open"):
        score("x", _bench("nq_opn", "asset:nq_open/test"), ctx)
    with pytest.raises(ConfigError, match="'arc_easy' missing: run `lnull assets`"):
        score("x", _bench("arc_easy", "asset:arc_easy/test"), ctx)  # LNULL_CACHE is an empty temp dir
    with pytest.raises(ConfigError, match="unknown asset 'nope'"):
        score("x", _bench("arc_easy", "asset:nope/test"), ctx)
    with pytest.raises(ConfigError, match="eval.benchmarks.x.dataset is not set"):
        score("x", _bench("arc_easy", ""), ctx)


def test_hub_dataset_runs_the_builtin_task_as_shipped(tiny_cfg, tmp_path, tokenizer, monkeypatch):
    """``dataset: hub``: the built-in YAML itself, lm-eval applies eval.limit; nothing is written locally."""
    import lm_eval
    from lnull.tiny import build_model

    seen = {}

    def fake_simple_evaluate(**kwargs):
        seen.update(kwargs)
        cfg = {"metric_list": [{"metric": "exact_match"}], "output_type": "generate_until", "dataset_path": "x/nq"}
        return {"results": {"nq_open": {"alias": "nq_open", "exact_match,remove_whitespace": 0.25,
                                         "exact_match_stderr,remove_whitespace": 0.1}},
                "configs": {"nq_open": cfg}, "versions": {"nq_open": 4.0},
                "n-samples": {"nq_open": {"original": 3610, "effective": 4}}, "samples": {"nq_open": []}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    ctx = _ctx(tiny_cfg("eval.limit=4", "eval.seed=7"), build_model(tokenizer), tokenizer, tmp_path)
    rec = score("nq", _bench("nq_open", "hub"), ctx)
    assert seen["tasks"] == [str(builtin_task_yaml("nq_open"))] and seen["limit"] == 4
    assert seen["random_seed"] == seen["fewshot_random_seed"] == 7 and seen["num_fewshot"] == 0
    assert rec["value"] == 25.0 and rec["n"] == 4 and rec["data"] == "hub" and rec["metrics"] == {"exact_match": 25.0}
    assert not any(ctx.work_dir.iterdir())

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'google-research-datasets/nq_open' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(ConfigError, match="dataset 'hub' needs the hub .*OfflineModeIsEnabled.*lnull assets"):
        score("nq", _bench("nq_open", "hub"), ctx)


# ---------------------------------------------------------------- integration: real assets

def _assets_root() -> Path:
    return Path(os.environ.get("LNULL_ASSETS_CACHE") or Path.home() / ".cache" / "lnull")


OFFLINE_TASKS = [("nq_open", "nq_open", "test"), ("triviaqa", "triviaqa", "test"), ("webqs", "webqs", "test"),
                 ("arc_easy", "arc_easy", "test"), ("arc_challenge", "arc_challenge", "test"),
                 ("openbookqa", "openbookqa", "test"), ("boolq", "boolq", "validation"),
                 ("hellaswag", "hellaswag", "validation"), ("piqa", "piqa", "validation"),
                 ("social_iqa", "siqa", "validation"), ("winogrande", "winogrande", "validation")]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("task,asset,split", OFFLINE_TASKS)
def test_every_asset_row_renders_through_the_lm_eval_task(tmp_path, task, asset, split):
    """Field names of the converted assets are what lm-eval's YAML reads: every row gives a prompt, a
    target and (multiple choice) a gold index inside its choices."""
    from lm_eval.tasks import TaskManager

    from lnull.data.sources import read_jsonl
    from lnull.evaluate.harness import _local_task

    path = _assets_root() / "data" / asset / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not fetched; run `lnull assets`")
    rows = read_jsonl(path)
    name, folder = _local_task(task, builtin_task_yaml(task), rows, tmp_path, tmp_path / "hf")
    lm_task = TaskManager(include_path=str(folder), include_defaults=False).load([name])["tasks"][name]
    docs = list(lm_task.test_docs())
    assert len(docs) == len(rows)
    for doc in docs:
        text, target = lm_task.doc_to_text(doc), lm_task.doc_to_target(doc)
        if lm_task.config.doc_to_choice is None:
            assert isinstance(text, str) and isinstance(target, list) and target  # generative: gold aliases
            continue
        choices = lm_task.doc_to_choice(doc)
        gold = text if isinstance(text, int) else target  # winogrande: the text index is the gold
        golds = gold if isinstance(gold, list) else [gold]
        assert len(choices) >= (1 if task == "webqs" else 2), doc  # webqs: the choices are the gold aliases
        assert all(0 <= g < len(choices) for g in golds), doc


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_nq_open_offline(tiny_cfg, tmp_path, no_network):
    """Real model, real asset: 20 NQ-Open questions through lm-eval; prints items/s."""
    from lnull.modeling import load_model, load_tokenizer

    root = _assets_root()
    folder = root / "models" / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file() or not (root / "data/nq_open/test.jsonl").is_file():
        pytest.skip("SmolLM2 or NQ-Open asset not fetched; run `lnull assets`")
    cfg = tiny_cfg("model=smollm2_135m", "eval.limit=20", "eval.batch_size=20", f"cache_dir={root}")
    ctx = _ctx(cfg, load_model(str(folder)), load_tokenizer(str(folder)), tmp_path)
    start = time.perf_counter()
    rec = score("nq_open", _bench("nq_open", "asset:nq_open/test"), ctx)
    seconds = time.perf_counter() - start
    print(f"\nnq_open SmolLM2 n={rec['n']} EM={rec['value']:.1f} {rec['n'] / seconds:.2f} items/s")
    assert rec["n"] == 20 and rec["settings"]["add_bos"] is False and 0.0 <= rec["value"] <= 100.0
    assert no_network == []
