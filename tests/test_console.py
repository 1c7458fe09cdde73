"""The console shows lnull's own lines, progress bars and warnings; library chatter (lm-eval's messages, other
packages' warnings, progress bars per request batch) goes to the run's log files, ``<run>/logs/<stage>.log``."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import lnull
from lnull.data.synthetic import facts

LM_EVAL_CHATTER = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model",
                   "Running generate_until requests", "Running loglikelihood requests")


def test_a_tiny_runs_console_keeps_lnull_and_its_log_files_keep_the_libraries(tmp_path):
    data = tmp_path / "nq.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in facts(4)))
    proc = lnull("run", "+experiment=tiny", "method=lora_null_v1", f"run.root={tmp_path}", "train.max_steps=1",
                 "eval=knowledge", f"eval.benchmarks.nq_open.dataset={data}", "~eval.benchmarks.triviaqa",
                 "~eval.benchmarks.webqs", "eval.limit=2", "eval.models=[trained]", check=True,
                 cwd=tmp_path)  # outside a git repository: lm-eval's `git describe` would print "fatal: ..."
    console = proc.stdout + proc.stderr
    # "it/s]": a bare tqdm bar, as lm-eval's "Building contexts" one (lnull's bars count layers, steps, ...)
    for chatter in (*LM_EVAL_CHATTER, "FutureWarning", "Loading weights", "DeprecationWarning", "fatal:", "it/s]"):
        assert chatter not in console, (chatter, console)
    # lnull's own: its lines, one progress bar per stage, and its warnings
    assert "[evaluate] trained/nq_open: scored" in proc.stdout and "run folder:" in proc.stdout
    assert "train lora_null_v1" in proc.stderr and "init lora_null_v1" in proc.stderr
    assert "RankDeficientWarning" in proc.stderr, proc.stderr
    (run,) = (p for p in (tmp_path / "tiny").iterdir())
    logs = {p.name: p.read_text() for p in (run / "logs").glob("*.log")}
    assert {"init.log", "train.log", "evaluate.log"} <= set(logs), logs
    assert "[lm_eval" in logs["evaluate.log"] and "Passed an already-initialized model" in logs["evaluate.log"]
    assert "RankDeficientWarning" in logs["init.log"]  # lnull's warnings are in the log too


def test_lnull_warnings_reach_the_console_and_library_warnings_only_the_log(tmp_path):
    """In one process: :func:`lnull.console.raised_by_lnull` tells who raised a warning by the frame that called
    ``warnings.warn``, whatever ``stacklevel`` says (a library's FutureWarning blamed on lnull's line included)."""
    script = textwrap.dedent(f"""
        import warnings, logging
        from pathlib import Path
        from lnull.console import quiet_libraries, stage_log
        quiet_libraries()
        import lnull.methods.base as own  # any lnull module: its warnings are lnull's
        exec(compile("import warnings\\ndef warn(m, c):\\n    warnings.warn(m, c, stacklevel=2)\\n",
                     own.__file__, "exec"), own.__dict__)
        with stage_log(Path({str(tmp_path / "x.log")!r})):
            own.warn("ours", UserWarning)
            warnings.warn_explicit("theirs", FutureWarning, "lib.py", 1, module="somelib")
            logging.getLogger("transformers.modeling_utils").warning("library line")
            logging.getLogger("some.other.package").warning("other line")
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ours" in proc.stderr and "theirs" not in proc.stderr and "line" not in proc.stderr, proc.stderr
    log = (tmp_path / "x.log").read_text()
    assert all(text in log for text in ("ours", "theirs", "library line", "other line")), log


def test_training_workers_send_their_library_chatter_to_the_train_log(tmp_path):
    """A 2-process launch (``accelerate launch`` workers): the workers' warnings go to ``<run>/logs/train.log``
    as the parent's do, and the console keeps lnull's progress bar."""
    proc = lnull("run", "+experiment=tiny", "accelerate=cpu_ddp", "train.micro_batch_size=4", "train.max_steps=2",
                 "eval.models=[base]", f"run.root={tmp_path}", check=True, cwd=tmp_path)
    console = proc.stdout + proc.stderr
    for chatter in ("FutureWarning", "[DeepSpeed]", "real_accelerator", "warnings.warn("):
        assert chatter not in console, (chatter, console)
    assert "train lora" in proc.stderr and "[train] done" in proc.stdout
    (run,) = (p for p in (tmp_path / "tiny").iterdir())
    assert "Setting accelerator to CPU" in (run / "logs" / "train.log").read_text()
