"""Sandbox launcher: run ONE untrusted program under kernel isolation and report how it ended.

Executed as ``python -I -S -B _bootstrap.py`` by :class:`lmx.evals.sandbox.Sandbox` (stdlib only,
never imported by the library): a long-lived launcher reading one JSON spec per line on stdin and
answering one JSON report line per spec on stdout; every sample runs in a process forked for it.

Namespace mode (root or CAP_SYS_ADMIN; spec section C.8 items 2-5):

1. ``unshare(NEWNS | NEWNET | NEWIPC | NEWUTS | NEWPID)``: a private mount table, a network stack
   with only a downed loopback (every connect fails), and a PID namespace whose init is the program,
   so when it exits or is killed the kernel kills every process it left behind.
2. A size-capped tmpfs over ``/tmp``; the program's working directory is ``/tmp/work`` in it, owned
   by a fresh unprivileged uid. Interpreter prefixes below a non-traversable directory (``/root``
   on pyenv installs) are re-exposed read-only through a small tmpfs that hides everything else.
3. Every other mount is re-mounted read-only, so the only writable place is the private tmpfs.
4. The child mounts a fresh ``/proc`` (host processes invisible), sets RLIMIT_AS/CPU/NPROC/FSIZE/
   NOFILE/CORE, drops to the unique uid (RLIMIT_NPROC only binds non-root uids), sets
   no-new-privs and a parent-death SIGKILL, and execs a fresh interpreter on the driver.

Guard mode (no namespaces): same process tree, rlimits, scrubbed environment and wall-clock kill,
the launcher becomes a child subreaper and kills every leftover descendant; containment of the
network and file system then rests on the driver's audit hook (weaker, reported as such).
"""
import ctypes
import json
import os
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 32, 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
_OPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
              "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731 - local shorthand
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
           f"mount {src} -> {target}")


def _prctl(option, arg):
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def _mounts():
    """Mount points with their per-mount flags, parsed from /proc/self/mountinfo (octal escapes)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            flags = 0
            for opt in fields[5].split(","):
                flags |= _OPT_FLAGS.get(opt, 0)
            out.append((point, flags))
    return out


def _setup_mounts(spec):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={spec['tmp_bytes']},nr_inodes=4096,mode=1777")
    for hidden, keep in spec["expose"]:
        stages = []
        for i, path in enumerate(keep):
            stage = f"/tmp/.stage{i}"
            os.mkdir(stage)
            _mount(path, stage, None, MS_BIND | MS_REC)
            stages.append((stage, path))
        _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        for stage, path in stages:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(stage, path, None, MS_MOVE)
            os.rmdir(stage)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    # The work dir becomes its own (writable) mount so the rest of the tmpfs can go read-only.
    _mount(work, work, None, MS_BIND)
    for point, flags in _mounts():
        if point in (work, "/dev"):
            continue
        try:
            _mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)
        except OSError:
            # A mount shadowed by a later mount on the same point is unreachable from inside.
            if os.path.ismount(point):
                raise
    if not spec["fork_driver"]:
        _write_files(work, spec)
    uid = spec["uid"]
    if uid is not None:
        os.chown(work, uid, uid)
    return work


_DRIVER_SRC = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_driver.py")).read()
_DRIVER = {"__name__": "lmx_sandbox_driver"}
exec(compile(_DRIVER_SRC, "driver.py", "exec"), _DRIVER)


def _write_files(work, spec):
    """driver.py and job.py (the job as a Python literal, read by the driver without json)."""
    files = {"driver.py": _DRIVER_SRC, "job.py": repr(spec["job"])}
    for name, text in files.items():
        path = os.path.join(work, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o444)


def _limits(spec):
    import resource

    lim = spec["limits"]
    pairs = [(resource.RLIMIT_AS, lim["memory_bytes"]),
             (resource.RLIMIT_CPU, lim["cpu_seconds"]),
             (resource.RLIMIT_FSIZE, lim["file_bytes"]),
             (resource.RLIMIT_NOFILE, lim["open_files"]),
             (resource.RLIMIT_CORE, 0)]
    if spec["uid"] is not None:
        pairs.append((resource.RLIMIT_NPROC, lim["processes"]))
    for what, value in pairs:
        # CPU: SIGXCPU at the soft limit, SIGKILL one second later if the program ignores it.
        hard = value + 1 if what == resource.RLIMIT_CPU else value
        resource.setrlimit(what, (value, hard))


def _child(spec, work, out_w, res_w, namespaced):
    try:
        os.setpgid(0, 0)
        if namespaced:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.dup2(res_w, 3)
        os.closerange(4, 1 << 16)
        os.chdir(work)
        _limits(spec)
        uid = spec["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        # Set after the uid change: a credential change clears the parent-death signal.
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if not namespaced and os.getppid() != spec["launcher_pid"]:
            os._exit(125)  # the launcher died before the death signal was armed
        if spec["fork_driver"]:
            # Zygote path: this process was forked from the clean launcher (never the evaluator),
            # so the preloaded driver runs here directly, saving an interpreter start-up.
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update(spec["env"])
            _DRIVER["run"](spec["job"])
        py = spec["python"]
        flags = ["-I", "-B"] if spec["site"] else ["-I", "-S", "-B"]
        os.execve(py, [py, *flags, "driver.py"], spec["env"])
    except BaseException as e:  # noqa: BLE001 - report any setup failure through the pipe
        try:
            os.write(2, f"sandbox child setup failed: {e!r}\n".encode())
        finally:
            os._exit(126)


def _reap_all():
    """Kill and reap every remaining child (orphans re-parent here as we are a subreaper)."""
    me = os.getpid()
    while True:
        try:
            child, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if child:
            continue
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == me:
                    os.kill(int(entry), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.005)


def run_one(spec):
    """Supervise one sample (in a process forked per sample) and return the report dict."""
    namespaced = spec["mode"] == "namespace"
    t0 = time.monotonic()
    if namespaced:
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
        _check(_libc.unshare(flags), "unshare")
        work = _setup_mounts(spec)
    else:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        work = spec["workdir"]
        _write_files(work, spec)
        if spec["uid"] is not None:
            os.chown(work, spec["uid"], spec["uid"])
    spec["launcher_pid"] = os.getpid()
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    # SIGCHLD wakes select() through this pipe, so a finished program is noticed at once even when
    # a left-over descendant still holds its output pipe open (guard mode).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    pid = os.fork()
    if pid == 0:
        for fd in (out_r, res_r, wake_r, wake_w):
            os.close(fd)
        _child(spec, work, out_w, res_w, namespaced)
    os.close(out_w)
    os.close(res_w)
    deadline = t0 + spec["timeout"] + spec["kill_grace"]
    out, res = bytearray(), bytearray()
    open_fds = {out_r: out, res_r: res}
    status = usage = None
    killed_on_deadline = False
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            killed_on_deadline = status is None
            break
        ready, _, _ = select.select([*open_fds, wake_r], [], [], left)
        for fd in ready:
            if fd == wake_r:
                os.read(wake_r, 4096)
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                del open_fds[fd]
                continue
            buf = open_fds[fd]
            buf += chunk
            if fd == out_r and len(buf) > spec["output_bytes"]:
                del buf[: len(buf) - spec["output_bytes"]]  # keep the tail of stdout/stderr
            elif fd == res_r and len(buf) > spec["result_bytes"]:
                del buf[spec["result_bytes"]:]  # a cut result fails to parse: reported, not trusted
        if status is None:
            done, st, ru = os.wait4(pid, os.WNOHANG)
            if done == pid:
                status, usage = st, ru
                # Pipes still open now belong to left-overs; give them a moment to flush, no more.
                deadline = min(deadline, time.monotonic() + 0.2)
    if status is None:
        if killed_on_deadline:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _, status, usage = os.wait4(pid, 0)
    if not namespaced:
        _reap_all()
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "killed_on_deadline": killed_on_deadline,
        "wall_s": time.monotonic() - t0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_kb": usage.ru_maxrss,
        "output_tail": out.decode("utf-8", "replace"),
        "result": res.decode("utf-8", "replace"),
    }


def main():
    """Serve specs, one JSON line each on stdin, answering one JSON report line each on stdout.

    Each sample runs in a process forked from this long-lived launcher, so the per-sample cost is
    a fork plus the program's own interpreter, not a second interpreter start-up.
    """
    # Die with the evaluator's thread that started us; each sample process re-arms the same.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                report = run_one(spec)
            except BaseException as e:  # noqa: BLE001 - reported to the evaluator, never hidden
                report, code = {"launcher_error": repr(e)}, 1
            data = (json.dumps(report) + "\n").encode()
            while data:
                data = data[os.write(1, data):]
            os._exit(code)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
