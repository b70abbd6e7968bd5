"""Sandbox launcher: run ONE untrusted program under kernel isolation and report how it ended.

Executed as ``python -I -S -B _bootstrap.py`` by :class:`lmx.evals.sandbox.Sandbox` (stdlib only,
never imported by the library): a long-lived launcher reading one JSON spec per line on stdin and
answering one JSON report line per spec on stdout; every sample runs in a process forked for it
(a "supervisor"), which forks the program.

Layers, in the order the supervisor and the program's process set them up:

1. Memory: the supervisor creates a cgroup for the sample (v2 ``memory.max`` or v1
   ``memory.limit_in_bytes``, when the evaluator may write one) holding the whole process tree;
   the program joins it before anything else runs. Without a writable cgroup the per-process
   RLIMIT_AS is the budget divided by the process cap, so the tree's total stays in the budget.
2. Namespaces mode: ``unshare(NEWNS | NEWNET | NEWIPC | NEWUTS | NEWPID)`` (plus NEWUSER with
   a map of its own uid/gid when not root; every capability is dropped before the program runs);
   a fresh root (``pivot_root`` into a tmpfs) holding only the interpreter, its shared libraries,
   the allowed import directories and four device nodes, all read-only, plus a private
   size-capped ``/tmp`` (the working directory is ``/tmp/sample``). No ``/proc``, no ``/var/tmp``,
   no host socket files, a network stack with only a downed loopback. The program's driver is
   PID 1 of its PID namespace: when it ends the kernel kills everything the candidate left behind.
3. Bwrap mode: the program's process, after the layers of 4, execs bubblewrap, which builds the
   same root from ``--ro-bind`` s (plus ``--dev`` and a ``--proc`` of its own PID namespace) in
   namespaces it creates as the sample's unprivileged uid, loads the same filter (``--seccomp``)
   and execs a fresh interpreter running the driver as PID 1 (``--as-pid-1``).
4. Every mode: rlimits (AS, CPU, NPROC, FSIZE, NOFILE, CORE), a fresh unprivileged uid when
   started as root, no-new-privs, a parent-death SIGKILL and a seccomp filter (classic BPF) that
   refuses every socket family but the allowed ones (none by default), ptrace, mount, keyctl,
   bpf, namespace creation, io_uring, cross-process memory access and other kernel-admin calls.
5. Guard mode (no namespaces, explicit opt-in): the supervisor is a child subreaper and kills every
   leftover descendant; the host file system is visible, so the driver's audit hook refuses writes
   outside the working directory and any access to ``/proc`` (defence in depth, see the driver).

The program reports its result on fd 3 as a Python literal carrying a per-sample nonce (fd 4)
that only the driver holds; the candidate runs in a worker process forked before the nonce is
read (see ``_driver.py``), and the evaluator re-counts the tests against the job it sent.
"""
import ctypes
import importlib.util
import json
import marshal
import os
import select
import signal
import struct
import sys
import time

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, \
    0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_libc.capset.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
SYS_PIVOT_ROOT = 155  # x86_64; the filter table below is x86_64-only too (checked by the evaluator)


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731 - local shorthand
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
           f"mount {src} -> {target}")


def _prctl(option, arg, arg2=0):
    _check(_libc.prctl(option, arg, arg2, 0, 0), f"prctl({option})")


# -- seccomp ------------------------------------------------------------------------------------
AUDIT_ARCH_X86_64 = 0xC000003E
RET_ALLOW, RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
# x86_64 numbers of the calls a program under test never needs: tracing and other processes'
# memory, mounts and namespaces, kernel keyrings, BPF / perf / io_uring (io_uring would bypass
# this filter's socket rule), modules, reboot, clock and host-name changes, handle-based opens.
DENIED = {"ptrace": 101, "syslog": 103, "uselib": 134, "personality": 135, "ustat": 136,
          "sysfs": 139, "vhangup": 153, "modify_ldt": 154, "pivot_root": 155, "_sysctl": 156,
          "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165,
          "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
          "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175,
          "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "clock_settime": 227,
          "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
          "migrate_pages": 256, "unshare": 272, "move_pages": 279, "perf_event_open": 298,
          "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304,
          "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
          "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
          "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
          "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
          "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_getfd": 438,
          "mount_setattr": 442, "quotactl_fd": 443}
NR_SOCKET, NR_SOCKETPAIR, NR_CLONE, NR_CLONE3, NR_KILL, NR_PRLIMIT64 = 41, 53, 56, 435, 62, 302
AF_UNIX = 1
NS_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
            | CLONE_NEWPID | CLONE_NEWNET)
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16  # struct seccomp_data (low word of args[0])


def _errno(e):
    return 0x00050000 | e


def seccomp_program(socket_families):
    """Classic-BPF instructions ``(code, jt, jf, k)``; default action ALLOW, see ``DENIED``."""
    prog = [(LD_W_ABS, 0, 0, _OFF_ARCH), (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            (RET_K, 0, 0, RET_KILL_PROCESS), (LD_W_ABS, 0, 0, _OFF_NR),
            # The x32 ABI aliases every call above 0x40000000: refuse it wholesale.
            (JGE_K, 0, 1, 0x40000000), (RET_K, 0, 0, _errno(ENOSYS))]

    def arg0_block(nr, allowed, deny):
        # if nr == NR: A = args[0]; return ALLOW if A in allowed else deny (A is reloaded after).
        body = [(LD_W_ABS, 0, 0, _OFF_ARG0)]
        for value in allowed:
            body += [(JEQ_K, 0, 1, value), (RET_K, 0, 0, RET_ALLOW)]
        body.append((RET_K, 0, 0, deny))
        return [(JEQ_K, 0, len(body), nr)] + body

    prog += arg0_block(NR_SOCKET, sorted(socket_families), _errno(EAFNOSUPPORT))
    prog += arg0_block(NR_SOCKETPAIR, [AF_UNIX], _errno(EAFNOSUPPORT))  # an unreachable pair
    # clone(): refuse new namespaces; clone3 hides its flags in memory, so make libc fall back.
    prog += [(JEQ_K, 0, 3, NR_CLONE), (LD_W_ABS, 0, 0, _OFF_ARG0), (JSET_K, 0, 1, NS_FLAGS),
             (RET_K, 0, 0, _errno(EPERM)), (LD_W_ABS, 0, 0, _OFF_NR)]
    prog += [(JEQ_K, 0, 1, NR_CLONE3), (RET_K, 0, 0, _errno(ENOSYS))]
    # kill(-1, sig) would reach every process of the uid; prlimit64 only on itself (pid 0).
    prog += [(JEQ_K, 0, 3, NR_KILL), (LD_W_ABS, 0, 0, _OFF_ARG0), (JEQ_K, 0, 1, 0xFFFFFFFF),
             (RET_K, 0, 0, _errno(EPERM)), (LD_W_ABS, 0, 0, _OFF_NR)]
    prog += [(JEQ_K, 0, 3, NR_PRLIMIT64), (LD_W_ABS, 0, 0, _OFF_ARG0), (JEQ_K, 1, 0, 0),
             (RET_K, 0, 0, _errno(EPERM)), (LD_W_ABS, 0, 0, _OFF_NR)]
    for nr in sorted(DENIED.values()):
        prog += [(JEQ_K, 0, 1, nr), (RET_K, 0, 0, _errno(EPERM))]
    prog.append((RET_K, 0, 0, RET_ALLOW))
    return prog


def seccomp_bytes(socket_families):
    """The filter as an array of ``struct sock_filter`` (what ``bwrap --seccomp FD`` reads)."""
    return b"".join(struct.pack("=HBBI", *ins) for ins in seccomp_program(socket_families))


def install_seccomp(socket_families):
    """Load the filter into this (single-threaded) process; needs no-new-privs set first."""
    raw = seccomp_bytes(socket_families)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(raw) // 8, ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
           "seccomp filter")


# -- memory cgroup --------------------------------------------------------------------------------
def _cgroup_create(spec):
    """A per-sample cgroup capping the whole tree's memory, or None.

    Returns ``(parent dir fd, name, cgroup.procs fd)``: everything later goes through these fds,
    because in namespaces mode the supervisor no longer sees ``/sys`` once it has pivoted.
    """
    cg = spec["cgroup"]
    if cg is None:
        return None
    parent = os.open(cg["parent"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    name = f"lmx-sbx-{os.getpid()}-{time.monotonic_ns()}"
    os.mkdir(name, dir_fd=parent)
    budget = str(spec["limits"]["memory_total"])
    if cg["kind"] == "v2":
        files = [("memory.max", budget), ("memory.swap.max", "0"),
                 ("pids.max", str(spec["limits"]["processes"]))]
    else:
        files = [("memory.limit_in_bytes", budget), ("memory.memsw.limit_in_bytes", budget)]
    for fname, value in files:
        try:
            fd = os.open(f"{name}/{fname}", os.O_WRONLY | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            continue  # e.g. no swap accounting
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    procs = os.open(f"{name}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=parent)
    return parent, name, procs


def _read_at(parent, path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=parent)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def _cgroup_finish(cg, kind):
    """Kill what is left in the cgroup, read its memory-limit hits and remove it."""
    parent, name, procs = cg
    os.close(procs)
    hits = 0
    try:
        if kind == "v2":
            events = dict(line.split() for line in _read_at(parent, f"{name}/memory.events")
                          .splitlines())
            hits = int(events.get("oom_kill", 0)) + int(events.get("max", 0))
        else:
            hits = int(_read_at(parent, f"{name}/memory.failcnt"))
    except (OSError, ValueError):
        pass
    # The sample's result goes back only once its cgroup is empty: a fork bomb's thousands of
    # killed processes can take seconds to die on a loaded machine, and returning earlier would
    # let them run on (and count against the next sample) after the report.
    deadline, pause = time.monotonic() + 30.0, 0.002
    while time.monotonic() < deadline:
        try:
            os.rmdir(name, dir_fd=parent)
            break
        except OSError:
            try:
                for pid in _read_at(parent, f"{name}/cgroup.procs").split():
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
    os.close(parent)
    return hits


# The sample's working directory inside its private /tmp (both namespace modes).
SAMPLE_DIR = "/tmp/sample"


# -- fresh root -----------------------------------------------------------------------------------
def _pivot(new_root, put_old):
    _check(_libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def _kept_flags(path):
    """Mount flags of ``path`` a remount must repeat: in a user namespace the kernel locks
    noexec/nodev and the atime mode of mounts inherited from the host (EPERM if dropped)."""
    f = os.statvfs(path).f_flag
    flags = (MS_NODEV if f & os.ST_NODEV else 0) | (MS_NOEXEC if f & os.ST_NOEXEC else 0)
    if f & os.ST_NOATIME:
        flags |= MS_NOATIME
    elif f & os.ST_RELATIME:
        flags |= MS_RELATIME
    else:
        flags |= MS_STRICTATIME
    if f & os.ST_NODIRATIME:
        flags |= MS_NODIRATIME
    return flags


def _enter_user_namespace(flags):
    """Non-root: ``unshare`` with a new user namespace owning the others, mapping only our own
    uid and gid (what an unprivileged process may map); the caller then holds capabilities in
    that namespace alone, enough to mount and pivot there, and the program drops them all."""
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare (user namespace)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _drop_capabilities():
    """Empty the bounding, ambient, effective, permitted and inheritable sets."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL: past the kernel's last capability
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)  # two zeroed {effective, permitted, inheritable}
    _check(_libc.capset(header, data), "capset")


def _setup_root(spec):
    """Pivot into a fresh read-only root built from ``spec['root']``; return the work dir."""
    plan = spec["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Staging (as bubblewrap does): a tmpfs base holding the new root, the host root under it.
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    os.chdir("/tmp")
    os.mkdir("newroot", 0o755)
    os.mkdir("oldroot", 0o755)
    _pivot(".", "oldroot")
    os.chdir("/")
    new, old = "/newroot", "/oldroot"
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=256k,nr_inodes=4096,mode=755")
    os.mkdir(new + "/tmp", 0o1777)
    _mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['tmp_bytes']},nr_inodes=4096,mode=1777")
    for kind, path, arg in plan:
        dst = new + path
        if kind == "link":
            os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
            if not os.path.lexists(dst):
                os.symlink(arg, dst)
            continue
        os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
        if kind == "mask":
            os.makedirs(dst, 0o755, exist_ok=True)
            _mount("tmpfs", dst, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "size=4k,mode=755")
            continue
        if arg:  # a directory
            os.makedirs(dst, 0o755, exist_ok=True)
        elif not os.path.exists(dst):
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
        _mount(old + path, dst, None, MS_BIND | MS_REC)
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | _kept_flags(dst)
        if kind != "dev":
            flags |= MS_NODEV
        _mount(None, dst, None, flags)
    work = SAMPLE_DIR
    os.mkdir(new + work, 0o700)
    if spec["uid"] is not None:
        os.chown(new + work, spec["uid"], spec["uid"])
    os.chdir(new)
    _pivot(".", ".")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return work


_DRIVER_SRC = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_driver.py")).read()
_DRIVER_CODE = compile(_DRIVER_SRC, "driver.py", "exec", dont_inherit=True)
_DRIVER = {"__name__": "lmx_sandbox_driver"}
exec(_DRIVER_CODE, _DRIVER)
# The same code as the bytes of a ``.pyc`` for bubblewrap mode, which starts a fresh interpreter
# per sample (the launcher's own, so the magic number matches): it runs the file directly instead
# of compiling ~400 lines each time (about 2 ms of a ~30 ms sample). Header: magic, flags 0, then
# the unchecked mtime and source size.
_DRIVER_PYC = importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(_DRIVER_CODE)


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
    file_bytes, processes = lim["file_bytes"], lim["processes"]
    if spec["mode"] == "bwrap":
        # bubblewrap writes the driver and the job into the sandbox under these limits, and its
        # monitor process counts for the uid; the driver lowers FSIZE and NPROC to the
        # configured values before any candidate code runs (``job["rlimits"]``).
        file_bytes = max(file_bytes, spec["data_bytes"] + (1 << 16))
        processes += 1
    pairs = [(resource.RLIMIT_AS, lim["memory_per_process"]),
             (resource.RLIMIT_CPU, lim["cpu_seconds"]),
             (resource.RLIMIT_FSIZE, file_bytes),
             (resource.RLIMIT_NOFILE, lim["open_files"]),
             (resource.RLIMIT_CORE, 0)]
    # RLIMIT_NPROC counts a uid's processes in one user namespace: it binds for a uid of the
    # sample's own (root) or inside the sample's own user namespace (not the evaluator's uid).
    if spec["uid"] is not None or (spec["userns"] and spec["mode"] == "namespaces"):
        pairs.append((resource.RLIMIT_NPROC, processes))
    for what, value in pairs:
        # CPU: SIGXCPU at the soft limit, SIGKILL one second later if the program ignores it.
        hard = value + 1 if what == resource.RLIMIT_CPU else value
        resource.setrlimit(what, (value, hard))


def _high(fd):
    """A copy of ``fd`` numbered >= 100, so dup2 onto 0..N never clobbers a source."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD, 100)


def _import_dir_fds():
    """``(host path, directory fd)`` of each ``sys.path`` entry (guard-mode re-pointing)."""
    out = []
    for entry in sys.path:
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        out.append((entry, _high(fd)))
        os.close(fd)
    return out


def _repoint_imports(entries, first_fd):
    """Point ``sys.path`` and every loaded package's ``__path__`` at ``/proc/self/fd/N``."""
    table = [(entry.rstrip("/") + "/", f"/proc/self/fd/{first_fd + i}/")
             for i, (entry, _) in enumerate(entries)]
    table.sort(key=lambda t: -len(t[0]))  # the longest (most specific) prefix wins

    def repoint(path):
        for old, new in table:
            if path + "/" == old:
                return new.rstrip("/")
            if path.startswith(old):
                return new + path[len(old):]
        return path

    sys.path[:] = [new.rstrip("/") for _, new in sorted(table, key=lambda t: t[1])]
    for mod in list(sys.modules.values()):
        paths = getattr(mod, "__path__", None)
        if isinstance(paths, list):
            paths[:] = [repoint(p) for p in paths]
    sys.path_importer_cache.clear()


def _child(spec, work, out_w, res_w, nonce_r, cg_fd, extra_fds=()):
    """The program's process: join the cgroup, set fds 0-4 (plus ``extra_fds`` from 5 on),
    limits, uid, no-new-privs and the filter, then run the driver (or exec bubblewrap)."""
    mode = spec["mode"]
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the supervisor's handler is not ours
        os.setpgid(0, 0)
        if cg_fd is not None:
            os.write(cg_fd, b"0")  # this process (and all it forks) joins the sample's cgroup
        # Guard mode, zygote: after the uid drop the interpreter may sit below a directory others
        # cannot traverse (a pyenv under /root). sys.path is re-pointed at directory fds through
        # /proc/self/fd/N: a magic link skips the permission checks of the ancestors.
        keep = _import_dir_fds() if spec["fork_driver"] and mode == "guard" else []
        sources = [_high(os.open("/dev/null", os.O_RDONLY)), _high(out_w), _high(out_w),
                   _high(res_w), _high(nonce_r)] + [_high(fd) for fd in extra_fds]
        for target, fd in enumerate(sources + [fd for _, fd in keep]):
            os.dup2(fd, target, inheritable=True)
        if keep:
            _repoint_imports(keep, len(sources))
        os.closerange(len(sources) + len(keep), 1 << 16)
        os.chdir(work)
        _limits(spec)
        uid = spec["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if keep:
                _prctl(PR_SET_DUMPABLE, 1)  # /proc/self/fd stays ours after the uid change
        elif spec["userns"] and mode == "namespaces":
            _drop_capabilities()  # held in our own user namespace since the unshare
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        # Set after the uid change: a credential change clears the parent-death signal.
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if mode != "namespaces" and os.getppid() != spec["launcher_pid"]:
            os._exit(125)  # the supervisor died before the death signal was armed
        if mode == "bwrap":
            # bubblewrap builds the namespaces and the root and loads the filter (fd 5) itself.
            os.execve(spec["bwrap_argv"][0], spec["bwrap_argv"], spec["env"])
        install_seccomp(spec["socket_families"])
        if spec["fork_driver"]:
            # Zygote path: this process was forked from the clean launcher (never the evaluator),
            # so the preloaded driver runs here directly, saving an interpreter start-up.
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update(spec["env"])
            _DRIVER["run"](spec["job"])
        py = spec["python"]
        os.execve(py, [py, *_flags(spec), "driver.py"], spec["env"])
    except BaseException as e:  # noqa: BLE001 - report any setup failure through the pipe
        try:
            os.write(2, f"sandbox child setup failed: {e!r}\n".encode())
        finally:
            os._exit(126)


def _flags(spec):
    return ["-I", "-B"] if spec["site"] else ["-I", "-S", "-B"]


# -- bubblewrap -----------------------------------------------------------------------------------
_SHM_BYTES = 1 << 20
_STAGED = {}  # the bind sources of this launcher's root plan, as its staging mounts expose them


def _bwrap_sources(spec):
    """``{path: source}`` for the plan's read-only binds.

    Started as root, the sample's uid runs bubblewrap and may be unable to traverse to the
    interpreter (a pyenv under a 0700 ``/root``). So this launcher, on its first bwrap sample,
    moves into a private mount namespace and binds every source (opened as root) below a tmpfs
    on ``/tmp`` there, each at a directory anyone may traverse; bubblewrap binds them from there
    to their own paths. Nothing changes on the host. Non-root: the paths themselves.
    """
    binds = [path for kind, path, _ in spec["root"] if kind == "bind"]
    if spec["uid"] is None:
        return {p: p for p in binds}
    key = tuple(binds)
    if not _STAGED:
        _check(_libc.unshare(CLONE_NEWNS), "unshare (staging mount namespace)")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        # Opened in the new namespace (a bind source must be a mount of the caller's own) and
        # before the tmpfs covers /tmp, where a venv may live.
        fds = [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in binds]
        try:
            _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
            staged = {}
            for i, (path, fd) in enumerate(zip(binds, fds)):
                dst = f"/tmp/{i}"
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.mkdir(dst, 0o755)
                else:
                    os.close(os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
                _mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND | MS_REC)
                staged[path] = dst
        finally:
            for fd in fds:
                os.close(fd)
        _STAGED[key] = staged
    if key not in _STAGED:  # a Sandbox has one interpreter, so its launchers have one plan
        raise OSError(22, "a second root plan in one launcher")
    return _STAGED[key]


def _bwrap_argv(spec, sources):
    """bubblewrap's command line; fd 5 holds the filter, 6 the compiled driver, 7 the job."""
    uid, gid = (os.getuid(), os.getgid()) if spec["uid"] is None else (spec["uid"], spec["uid"])
    a = [spec["bwrap"], "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
         "--as-pid-1", "--cap-drop", "ALL", "--uid", str(uid), "--gid", str(gid),
         "--hostname", "sandbox", "--clearenv"]
    for key, value in spec["env"].items():
        a += ["--setenv", key, value]
    # /tmp first: the interpreter of a venv under /tmp is then bound into the private /tmp.
    a += ["--size", str(spec["tmp_bytes"]), "--tmpfs", "/tmp"]
    for kind, path, arg in spec["root"]:
        if kind == "link":
            a += ["--symlink", arg, path]
        elif kind == "bind":
            a += ["--ro-bind", sources[path], path]
        elif kind == "mask":
            a += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
    # bubblewrap's /dev is a writable tmpfs without a size: read-only here, with a small sized
    # /dev/shm (POSIX semaphores of multiprocessing live there).
    a += ["--dev", "/dev", "--size", str(_SHM_BYTES), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
          "--proc", "/proc", "--perms", "0700", "--dir", SAMPLE_DIR,
          "--perms", "0444", "--ro-bind-data", "6", f"{SAMPLE_DIR}/driver.pyc",
          "--perms", "0444", "--ro-bind-data", "7", f"{SAMPLE_DIR}/job.py",
          "--remount-ro", "/", "--seccomp", "5", "--chdir", SAMPLE_DIR,
          "--", spec["python"], *_flags(spec), "driver.pyc"]
    return a


def _memfd(name, data):
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


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


def _orphaned(signum, frame):
    raise SystemExit("the launcher died")


def run_one(spec):
    """Supervise one sample (in a process forked per sample) and return the report dict."""
    t0 = time.monotonic()
    cg = _cgroup_create(spec)
    hits = 0
    try:
        report = _supervise(spec, t0, cg)
    finally:
        if cg:
            hits = _cgroup_finish(cg, spec["cgroup"]["kind"])
    report["memory_limit_hits"] = hits
    return report


def _supervise(spec, t0, cg):
    mode = spec["mode"]
    nonce = spec.pop("nonce")
    extra = []
    if mode == "namespaces":
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
        if spec["userns"]:
            _enter_user_namespace(flags)
        else:
            _check(_libc.unshare(flags), "unshare")
        work = _setup_root(spec)
    elif mode == "bwrap":
        work = "/"
        lim = spec["limits"]
        spec["job"]["rlimits"] = {"RLIMIT_FSIZE": lim["file_bytes"],
                                  "RLIMIT_NPROC": lim["processes"]}
        job = repr(spec["job"]).encode()
        spec["data_bytes"] = len(job) + len(_DRIVER_SRC)
        spec["bwrap_argv"] = _bwrap_argv(spec, spec["bwrap_sources"])
        extra = [_memfd("filter", seccomp_bytes(spec["socket_families"])),
                 _memfd("driver", _DRIVER_PYC), _memfd("job", job)]
    else:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        work = spec["workdir"]
        if spec["uid"] is not None:
            os.chown(work, spec["uid"], spec["uid"])
    if not spec["fork_driver"] and mode != "bwrap":
        _write_files(work, spec)  # an exec'd interpreter reads the driver and the job from files
    spec["launcher_pid"] = os.getpid()
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce.encode())
    os.close(nonce_w)
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
        _child(spec, work, out_w, res_w, nonce_r, cg[2] if cg else None, extra)
    for fd in (out_w, res_w, nonce_r, *extra):
        os.close(fd)
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
    if mode == "guard":
        _reap_all()
    code = os.waitstatus_to_exitcode(status)
    if mode == "bwrap" and 128 < code <= 128 + 64:
        code = 128 - code  # bubblewrap exits 128 + N when the driver died of signal N
    return {
        "exit_code": code,
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
    # Forked supervisors, programs and workers share the launcher's pages copy-on-write; a
    # collection would touch (and so copy) every tracked object, so the collector stays off.
    import gc

    gc.disable()
    gc.freeze()
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        spec = json.loads(line)
        if spec["mode"] == "bwrap":
            try:
                spec["bwrap_sources"] = _bwrap_sources(spec)
            except OSError as e:
                data = (json.dumps({"launcher_error": f"staging for bubblewrap: {e!r}"}) + "\n")
                sys.stdout.buffer.write(data.encode())
                sys.stdout.buffer.flush()
                continue
        launcher = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                # The launcher's death (the evaluator killed) reaches this supervisor as SIGTERM,
                # raised here as an exception, so run_one still kills the sample's whole cgroup:
                # a process of the sample may not have armed its own death signal yet (bwrap's
                # inner process, mid-setup, then waits for its dead parent forever).
                signal.signal(signal.SIGTERM, _orphaned)
                _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
                if os.getppid() != launcher:
                    raise SystemExit("the launcher died before the death signal was armed")
                report = run_one(spec)
            except BaseException as e:  # noqa: BLE001 - reported to the evaluator, never hidden
                report, code = {"launcher_error": repr(e)}, 1
            data = (json.dumps(report) + "\n").encode()
            try:
                while data:
                    data = data[os.write(1, data):]
            except OSError:
                code = 1  # nobody reads any more (the launcher died)
            os._exit(code)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
