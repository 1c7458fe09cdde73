"""Bad input gives exactly one line `lnull: error: <message naming the value>` and exit code 2, before any model
loads: nonsensical train values, broken task data, unusable paths, Hydra's own multi-line errors (wrong types,
unknown keys, `+` keys outside the schema), ranks a layer cannot hold; plus the stale temp folders of a killed
`lnull assets` and the resumed-training notice."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import lnull
from lnull.cli import main
from lnull.errors import ConfigError

TINY = ["+experiment=tiny", "progress=false"]


@pytest.fixture(autouse=True)
def _keep_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv for Hydra


@pytest.fixture(scope="module", autouse=True)
def _tiny_model_built(isolated_cache):
    """The tiny model exists before the tests (building it shows progress bars on stderr)."""
    from lnull.modeling import resolve_model

    resolve_model("lnull:tiny")


def _error(capsys, *args: str, progress: bool = False) -> str:
    """``lnull *args`` in this process failed with exit code 2 and exactly one `lnull: error:` line on stderr
    (``progress``: besides progress bars of work that ran before the error)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "real_accelerator" not in line
             and not (progress and "it/s]" in line)]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("lnull: error: "), err
    assert "HYDRA_FULL_ERROR" not in err and "Traceback" not in err, err
    return lines[0][len("lnull: error: "):]


def _nothing_ran(root: Path) -> None:
    store = root / "store"
    assert not any((store / f).exists() for f in ("calibration", "init", "train")), "work started before the error"


@pytest.mark.parametrize("override, expected", [
    # nonsensical numbers (compose time)
    ("train.lr=-1", ["train.lr", "-1"]),
    ("train.lr=0", ["train.lr", "0"]),
    ("train.epochs=0", ["train.epochs", "0"]),
    ("train.warmup_ratio=1.5", ["train.warmup_ratio", "1.5"]),
    ("train.log_every=0", ["train.log_every", "0"]),
    ("train.weight_decay=-0.1", ["train.weight_decay", "-0.1"]),
    ("train.scheduler=cosine_typo", ["train.scheduler", "cosine_typo"]),
    ("method.alpha=-2", ["method.alpha", "-2"]),
    ("method.dropout=1.5", ["method.dropout", "1.5"]),
    ("task.max_examples=0", ["task.max_examples", "0"]),
    # Hydra's multi-line errors
    ("method.rank=1.5", ["method.rank=1.5: expected an integer"]),
    ("method.alpha=abc", ["method.alpha=abc: expected a number"]),
    ("progress=maybe", ["progress=maybe: expected true or false"]),
    ("train.lr=null", ["train.lr=null", "null"]),
    ("eval.models=3", ["eval.models=3", "list"]),
    ("foo=1", ["unknown key 'foo'"]),
    ("method.rnak=8", ["unknown key 'method.rnak' (did you mean method.rank?)"]),
    ("method.rank=2,4", ["method.rank=2,4", "-m"]),
    ("method.rank=[1", ["method.rank=[1"]),
    # silently accepted before: a `+` key outside the schema
    ("+train.lrr=1", ["unknown key 'train.lrr' (did you mean train.lr?)"]),
    ("+foo=1", ["unknown key 'foo'"]),
    ("+method.rnak=1", ["method.rnak"]),
    # empty paths
    ("run.root=", ["run.root", "empty"]),
    ("run.dir=", ["run.dir", "empty"]),
    ("store.root=", ["store.root", "empty"]),
    ("cache_dir=", ["cache_dir", "empty"]),
])
def test_bad_value_is_one_line_at_compose_time(override, expected, capsys, tmp_path):
    root = [] if override.startswith("run.root") else [f"run.root={tmp_path}"]
    message = _error(capsys, "run", *TINY, *root, override)
    for text in expected:
        assert text in message, message
    _nothing_ran(tmp_path)


@pytest.mark.parametrize("overrides, expected", [
    # tiny: q/o 64 x 64, k/v 32 x 64, gate/up 128 x 64, down 64 x 128 (from its config alone: nothing is built)
    (["method.rank=40"], ["method.rank=40 exceeds min(d_out, d_in)=32 of k_proj"]),
    (["method=oplora", "method.rank=4", "method.k=30"], ["k=30 + r=4 > 32", "k_proj"]),
])
def test_a_rank_too_large_for_a_layer_is_found_from_the_config_before_calibration(overrides, expected, tmp_path,
                                                                                   monkeypatch):
    import lnull.modeling
    from lnull.cli import compose
    from lnull.modeling import check_shapes

    monkeypatch.setattr(lnull.modeling, "load_model", None)  # nothing may load a model
    cfg = compose([*TINY, f"cache_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError) as info:
        check_shapes(cfg)
    for text in expected:
        assert text in str(info.value), info.value
    assert not list(tmp_path.iterdir()), "the tiny model was built"
    check_shapes(compose([*TINY, "method.rank=32"]))  # fits every layer
    check_shapes(compose([*TINY, "method=full", "method.rank=1000"]))  # no adapter: no rank
    check_shapes(compose([*TINY, "method.rank=1000", "model.name_or_path=org/not-downloaded"]))  # no config here


def test_a_model_folders_config_json_gives_the_shapes(tmp_path):
    from lnull.cli import compose
    from lnull.modeling import check_shapes

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536,
                                                      "num_attention_heads": 9, "num_key_value_heads": 3}))
    check_shapes(compose([*TINY, f"model.name_or_path={tmp_path}", "method.rank=192"]))
    with pytest.raises(ConfigError, match="=192 of k_proj"):
        check_shapes(compose([*TINY, f"model.name_or_path={tmp_path}", "method.rank=193"]))


def test_a_bad_value_in_a_sweep_is_one_line_before_any_job(capsys, tmp_path):
    message = _error(capsys, "run", "-m", *TINY, f"run.root={tmp_path}", "method.rank=2,1.5")
    assert message == "method.rank=1.5: expected an integer", message
    assert not (tmp_path / ".multirun").exists()


def test_the_real_cli_prints_one_line_for_a_hydra_error(tmp_path):
    proc = lnull("run", *TINY, f"run.root={tmp_path}", "method.rnak=8")
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "real_accelerator" not in line]
    assert proc.returncode == 2 and lines == ["lnull: error: unknown key 'method.rnak' (did you mean method.rank?)"], \
        proc.stderr


def test_a_benchmark_left_without_its_kind_is_one_config_error():
    """An experiment giving a benchmark a limit while another eval config was chosen leaves the benchmark without
    its kind (README's demo example did); validate names it instead of OmegaConf's MissingMandatoryValue."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from lnull.compose import CONFIG_DIR, register_schema, validate
    from lnull.config import BenchmarkConfig

    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=TINY)
    with open_dict(cfg):
        cfg.eval.benchmarks["wiki_text"] = OmegaConf.structured(BenchmarkConfig(limit=32))
    with pytest.raises(ConfigError, match=r"^eval.benchmarks.wiki_text.kind is not set"):
        validate(cfg)


# ------------------------------------------------------------------ task data

BAD_ROWS = {
    "utf8": (b'{"query": "a", "response": "b"}\n{"query": "caf\xe9", "response": "b"}\n', "line 2", "UTF-8"),
    "json": (b'{"query": "a", "response": "b"}\n\n{"query": "a",\n', "line 3", "JSON"),
    "list": (b'{"query": "a", "response": "b"}\n[1, 2]\n', "line 2", "list"),
    "number": (b'{"query": "a", "response": "b"}\n7\n', "line 2", "number"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_broken_task_jsonl_is_one_line_naming_file_and_line_before_any_model_loads(case, capsys, tmp_path):
    data, where, what = BAD_ROWS[case]
    path = tmp_path / "task.jsonl"
    path.write_bytes(data)
    message = _error(capsys, "run", *TINY, f"run.root={tmp_path}", f"task.dataset={path}")
    assert f"{path} {where}" in message and what in message, message
    _nothing_ran(tmp_path)


@pytest.mark.parametrize("row, expected", [
    ({"query": None, "response": "b"}, "field 'query' is null"),
    ({"question": "a", "response": "b"}, "has no field 'query'"),
    ({"query": ["a"], "response": "b"}, "field 'query' is a list"),
    ({"query": "a", "response": {"text": "b"}}, "field 'response' is an object"),
])
def test_a_row_without_the_text_the_template_needs_is_one_line(row, expected, tmp_path):
    from lnull.data.sources import check_available, task_fields
    from lnull.training.data import build_examples

    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"query": "q", "response": "r"}) + "\n\n" + json.dumps(row) + "\n")
    task = {"dataset": str(path), "query_field": "query", "response_field": "response", "max_examples": None,
            "prompt": "alpaca"}
    with pytest.raises(ConfigError) as preflight:
        check_available(str(path), None, "task.dataset", fields=task_fields(task), limit=task["max_examples"])
    message = str(preflight.value)
    assert f"{path} line 3" in message and expected in message and "\n" not in message, message
    with pytest.raises(ConfigError) as loader:  # training's loader: the same error, never the text "None"
        build_examples({"task": task, "train": {"max_length": 64}, "model": {"add_bos": True}}, tokenizer=None)
    assert str(loader.value) == message
    # the rows past task.max_examples are not read for training, so not checked either
    check_available(str(path), None, "task.dataset", fields=task_fields(task), limit=1)


def test_a_null_query_never_trains_as_the_text_none(capsys, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"query": None, "response": "b"}) + "\n")
    # (once pipeline.check_inputs passes task_fields to check_available, this fails before init; until then, the
    # loader's error after init: progress bars of the init stage come first)
    message = _error(capsys, "run", *TINY, f"run.root={tmp_path}", f"task.dataset={path}", progress=True)
    assert f"{path} line 1" in message and "field 'query' is null" in message, message


# ------------------------------------------------------------------ unusable folders, full disk

def test_check_writable_dir_names_the_path(tmp_path):
    from lnull.io import check_writable_dir

    check_writable_dir(tmp_path / "new" / "folder", "store.root")  # not there yet: made later
    afile = tmp_path / "afile"
    afile.write_text("")
    for path in (afile, afile / "below"):
        with pytest.raises(ConfigError, match=f"store.root '{path}' .*{afile} is a file"):
            check_writable_dir(path, "store.root")
    with pytest.raises(ConfigError, match="is empty"):
        check_writable_dir("", "run.root")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match=f"store.root '{locked}' is not writable"):
            check_writable_dir(locked, "store.root")


def test_store_root_on_a_file_is_one_line_naming_it(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    message = _error(capsys, "run", *TINY, f"run.root={tmp_path}", f"store.root={afile}")
    assert str(afile) in message, message


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_an_os_error_in_a_stage_is_one_line_naming_the_path(code, capsys, tmp_path, monkeypatch):
    import lnull.calibrate

    target = tmp_path / "store" / "calibration" / "stats.safetensors"

    def full_disk(cfg, ctx):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(lnull.calibrate, "run", full_disk)
    message = _error(capsys, "calibrate", *TINY, "method=lora_null_v1", f"run.root={tmp_path}")
    assert message == f"cannot write {target}: {os.strerror(code)}", message


def test_a_full_disk_during_an_atomic_write_names_the_file(tmp_path, monkeypatch):
    from lnull import io

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", no_space)
    with pytest.raises(OSError) as info:
        io.atomic_write_text(tmp_path / "x.json", "{}")
    assert info.value.filename == str(tmp_path / "x.json") and info.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ lnull assets: stale temp folders

def _stale_temps(cache: Path) -> dict[str, Path]:
    temps = {"gguf": cache / ".gguf-abc123", "download": cache / "wheels" / ".dl-xyz",
             "model": cache / "models" / ".smollm2-135m-instruct.k2j3.tmp",
             "data": cache / "data" / "nq_open" / ".test.jsonl.8fj2.tmp",
             "manifest": cache / ".manifest.json.a1b2.tmp"}
    for name, path in temps.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in ("data", "manifest"):
            path.write_bytes(b"x" * 100)
        else:
            path.mkdir()
            (path / "blob").write_bytes(b"x" * 100)
    return temps


def test_assets_sweeps_the_temp_folders_a_killed_run_left(tmp_path):
    from lnull.assets import fetch_assets

    cache = tmp_path / "cache"
    temps = _stale_temps(cache)
    others = [cache / "models" / ".tiny-llama.q8w7.tmp", cache / "models" / "tiny-llama"]  # not lnull assets'
    for path in others:
        path.mkdir(parents=True)
    fetch_assets([], cache, progress=False)
    assert not [p for p in temps.values() if p.exists()]
    assert all(p.exists() for p in others)


def test_assets_leaves_the_temp_folders_of_a_live_run_alone(tmp_path):
    from lnull.assets import LOCK_FILE, fetch_assets

    cache = tmp_path / "cache"
    temps = _stale_temps(cache)
    with open(cache / LOCK_FILE, "a") as held:  # another `lnull assets` is at work
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=fetch_assets, args=([], cache), kwargs={"progress": False})
        worker.start()
        time.sleep(0.5)
        assert all(p.exists() for p in temps.values())
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(30)
    assert not worker.is_alive() and not [p for p in temps.values() if p.exists()]


# ------------------------------------------------------------------ resumed training says so

def test_a_resumed_training_says_from_which_step(tmp_path, capsys):
    from lnull.cli import compose
    from lnull.pipeline import run_pipeline
    from lnull.train import prepare_examples
    from lnull.training.loop import train_loop

    cfg = compose([*TINY, f"run.root={tmp_path}", f"run.dir={tmp_path / 'run'}", "train.max_steps=2",
                   "train.checkpoint_every=1", "train.batch_size=4", "train.micro_batch_size=4"])
    init_dir = run_pipeline(cfg, stages=["init"], log=lambda line: None).view("init")
    out = tmp_path / "train"
    out.mkdir()
    prepare_examples(cfg, out)
    train_loop(cfg, out, init_dir)  # leaves the step-1 checkpoint (the last step saves none)
    assert "resumed" not in capsys.readouterr().out
    train_loop(cfg, out, init_dir)
    assert f"[train] resumed from step 1 ({out / 'checkpoints' / 'step-1'})" in capsys.readouterr().out


def test_a_zero_calibration_activation_is_one_line_naming_the_module():
    """The per-sample max is checked once per group (no host sync per batch) and still names the module."""
    import torch

    from lnull.activations import collect_groups, probe_aliases
    from lnull.modeling import load_model, resolve_model, target_linears
    from lnull.tiny import TINY_ID

    model = load_model(resolve_model(TINY_ID))
    model.get_input_embeddings().weight.data.zero_()  # every input of layer 0's attention is 0
    linears = target_linears(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    windows = torch.randint(3, 200, (2, 8))
    alias = probe_aliases(model, linears, windows[:1])
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.[qkv]_proj: a calibration sample's max "
                                          r"activation is 0"):
        list(collect_groups(model, linears, windows, 2, alias, None, progress=False))
