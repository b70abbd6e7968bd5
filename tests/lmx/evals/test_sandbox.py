"""The sandbox contains hostile programs (spec C.6 weaknesses, C.8 sandbox tests).

Every bomb here is bounded by small rlimits (256 MiB address space, 8 processes, 1 MiB files,
1 s timeout) so it cannot hurt the shared host even if an isolation layer failed; the network
test only targets a listener of this test on 127.0.0.1. Hostile programs run with the driver's
audit-hook guard OFF in namespace mode, so the kernel isolation alone is what is tested there.
"""
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from lmx.evals import Job, Sandbox, SandboxConfig, SandboxError, run_jobs
from lmx.evals import sandbox as sandbox_mod

LIMITS = dict(timeout=1.0, kill_grace=0.5, memory_bytes=256 << 20, processes=8,
              file_bytes=1 << 20, tmp_bytes=8 << 20)


def _make(isolation):
    try:
        return Sandbox(isolation=isolation, python_guard=False, **LIMITS)
    except SandboxError as e:
        pytest.skip(f"{isolation} isolation unavailable here: {e}")


@pytest.fixture(scope="module")
def ns():
    sb = _make("namespace")
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def guard():
    sb = _make("guard")
    yield sb
    sb.close()


@pytest.fixture(params=["namespace", "guard"])
def sb(request):
    return request.getfixturevalue("ns" if request.param == "namespace" else "guard")


def _leftovers(marker: str, timeout: float = 3.0) -> list[int]:
    """Host pids whose command line contains ``marker`` (polled: kernel teardown is async)."""
    end = time.monotonic() + timeout
    while True:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if marker.encode() in pathlib.Path(f"/proc/{entry}/cmdline").read_bytes():
                        pids.append(int(entry))
                except OSError:
                    pass
        if not pids or time.monotonic() > end:
            return pids
        time.sleep(0.05)


def _sandbox_uid_procs() -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                for line in pathlib.Path(f"/proc/{entry}/status").read_text().splitlines():
                    if line.startswith("Uid:"):
                        if sandbox_mod._UID_LOW <= int(line.split()[1]) < sandbox_mod._UID_HIGH:
                            out.append(int(entry))
                        break
            except OSError:
                pass
    return out


def _healthy(sb):
    r = sb.run(Job("def f(x):\n    return x * 2\n", ("assert f(2) == 4",)))
    assert r.passed, r


def test_pass_fail_and_per_test_details(sb):
    r = sb.run(Job("def f(x):\n    return x + 1\n", ("assert f(1) == 2", "assert f(2) == 4",
                                                      "assert f(3) == 4")))
    assert r.status == "failed" and not r.passed
    assert [t["ok"] for t in r.tests] == [True, False, True]
    assert "AssertionError" in r.tests[1]["error"]
    assert r.isolation == sb.isolation
    r = sb.run(Job("def f(:\n", ("assert True",)))
    assert r.status == "failed" and "SyntaxError" in r.error and r.tests == ()
    _healthy(sb)


def test_early_exit_and_output_flood_do_not_pass(sb):
    for prog in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "exit()\n"):
        assert not sb.run(Job(prog, ("assert True",))).passed, prog
    r = sb.run(Job("import os\nprint('x' * 10**6)\nos.write(1, b'y' * 10**6)\n", ("assert True",)))
    assert r.passed and len(r.output_tail) <= sb.config.output_bytes


def test_infinite_loops_time_out(sb):
    t0 = time.monotonic()
    r = sb.run(Job("while True:\n    pass\n"))
    assert r.status == "timed out"
    # A loop that swallows the driver's alarm is killed at timeout + kill_grace.
    r2 = sb.run(Job("while True:\n    try:\n        while True:\n            pass\n"
                    "    except BaseException:\n        pass\n"))
    assert r2.status == "timed out" and "deadline" in r2.error
    assert time.monotonic() - t0 < 2 * (LIMITS["timeout"] + LIMITS["kill_grace"]) + 6
    _healthy(sb)


def test_memory_bomb_is_capped(sb):
    r = sb.run(Job("blocks = []\nwhile True:\n    blocks.append(bytearray(8 << 20))\n"))
    # Filling 256 MiB can outlast the timer on a loaded machine: either way it is stopped.
    assert r.status == "timed out" or (r.status == "failed" and "MemoryError" in r.error), r
    assert 0 < r.max_rss_kb * 1024 <= LIMITS["memory_bytes"]
    r = sb.run(Job("x = ' ' * (1 << 34)\n"))
    assert r.status == "failed" and "MemoryError" in r.error
    _healthy(sb)


def test_fork_bomb_is_contained(sb):
    if sb.isolation == "namespace" and os.geteuid() != 0:
        pytest.skip("RLIMIT_NPROC only binds the sandbox's dropped uid when launched as root")
    before = set(_sandbox_uid_procs())
    r = sb.run(Job("import os\nwhile True:\n    try:\n        os.fork()\n"
                   "    except OSError:\n        pass\n"))
    assert not r.passed
    if sb.isolation == "guard":
        r = sb.run(Job("import os\nos.fork()\n"))
        assert r.status == "failed" and "refused" in r.error
    time.sleep(0.2)
    assert set(_sandbox_uid_procs()) - before == set()
    _healthy(sb)


def test_busy_children_left_running_are_killed(sb):
    marker = f"lmx-busy-{secrets.token_hex(4)}"
    prog = ("import os, sys\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        os.execv(sys.executable,\n"
            f"                 [sys.executable, '-c', 'while True: pass', '{marker}'])\n"
            f"    os.execv('/bin/sleep', ['sleep', '1000', '{marker}'])\n")
    r = sb.run(Job(prog, ("assert True",)))
    if sb.isolation == "guard":
        assert r.status == "failed" and "refused" in r.error
    assert _leftovers(marker) == []
    _healthy(sb)


def test_writes_and_deletes_outside_are_contained(sb, tmp_path):
    dirs = [tmp_path]
    if os.path.isdir("/var/tmp"):  # outside /tmp: exercises the read-only root, not the tmpfs
        dirs.append(pathlib.Path(tempfile.mkdtemp(prefix="lmx-victim-", dir="/var/tmp")))
    try:
        for d in dirs:
            (d / "victim.txt").write_text("precious")
        escape = f"/tmp/lmx-escape-{secrets.token_hex(4)}"
        lines = ["import os, shutil"]
        for d in dirs:
            for stmt in (f"os.remove({str(d / 'victim.txt')!r})",
                         f"open({str(d / 'new.txt')!r}, 'w').write('x')",
                         f"shutil.rmtree({str(d)!r})"):
                lines.append(f"try:\n    {stmt}\nexcept BaseException:\n    pass")
        lines.append(f"try:\n    open({escape!r}, 'w').write('x')\nexcept BaseException:\n    pass")
        lines.append("open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'")
        r = sb.run(Job("\n".join(lines), ("assert True",)))
        assert r.passed, r  # writing inside its own directory works
        for d in dirs:
            assert (d / "victim.txt").read_text() == "precious"
            assert not (d / "new.txt").exists()
        assert not os.path.exists(escape)
        # A fresh directory per sample: the previous sample's file is gone.
        r = sb.run(Job("import os\nassert not os.path.exists('mine.txt')\n", ("assert True",)))
        assert r.passed, r
    finally:
        for d in dirs[1:]:
            for f in d.iterdir():
                f.unlink()
            d.rmdir()


def test_network_connection_fails(sb):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # control: it is reachable
            server.accept()[0].close()
        prog = ("import socket\n"
                f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "s.sendall(b'escaped')\n")
        r = sb.run(Job(prog, ("assert True",)))
        assert r.status == "failed"
        assert any(w in r.error for w in ("unreachable", "refused", "Errno"))
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()


def test_killing_the_parent_fails(sb):
    victim = subprocess.Popen(["sleep", "60"])
    _healthy(sb)
    launchers = set(sb.launcher_pids)
    try:
        targets = [victim.pid, os.getpid(), *launchers]
        prog = ["import os, signal"]
        prog += [f"try:\n    os.kill({pid}, signal.SIGKILL)\nexcept BaseException:\n    pass"
                 for pid in targets]
        prog.append("try:\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                    "except BaseException:\n    pass")
        if sb.isolation == "namespace":
            # Only where the PID namespace confines it: outside one, a root kill(-1) is host-wide.
            prog.append("try:\n    os.kill(-1, signal.SIGKILL)\nexcept BaseException:\n    pass")
        sb.run(Job("\n".join(prog), ("assert True",)))
        time.sleep(0.1)
        assert victim.poll() is None
        assert launchers and launchers <= set(sb.launcher_pids)
        _healthy(sb)
    finally:
        victim.kill()
        victim.wait()


def test_parent_environment_secrets_are_not_readable(sb, monkeypatch):
    name = "LMX_EVALS_TEST_SECRET"
    monkeypatch.setenv(name, secrets.token_hex(8))
    _healthy(sb)
    prog = ("import os\n"
            f"found = [k for k in os.environ if k == {name!r}]\n"
            f"pids = set(os.listdir('/proc')) | {set(map(str, [os.getpid(), *sb.launcher_pids]))}\n"
            "pids |= {'self', '1'}\n"
            "for pid in pids:\n"
            "    try:\n"
            "        with open(f'/proc/{pid}/environ', 'rb') as f:\n"
            f"            if {name.encode()!r} in f.read():\n"
            "                found.append(pid)\n"
            "    except Exception:\n"
            "        pass\n"
            "assert not found, found\n")
    # Control: the same probe run as a plain child of this process finds the secret.
    control = subprocess.run([sys.executable, "-c", prog], capture_output=True)
    assert control.returncode != 0
    r = sb.run(Job(prog, ("assert True",)))
    assert r.passed, r


def test_hostile_and_normal_samples_in_parallel(sb):
    hostile = {"loop": "while True:\n    pass\n",
               "mem": "b = []\nwhile True:\n    b.append(bytearray(8 << 20))\n",
               "bigfile": "open('f', 'wb').write(b'x' * (4 << 20))\n"}
    items = [(k, Job(v, ("assert True",)), {"hostile": True}) for k, v in hostile.items()]
    items += [(f"ok{i}", Job(f"def f():\n    return {i}\n", (f"assert f() == {i}",)),
               {"hostile": False}) for i in range(6)]
    recs = run_jobs(sb, items, workers=2)
    assert [k for k, r in recs.items() if r["passed"]] == [f"ok{i}" for i in range(6)]
    assert recs["loop"]["status"] == "timed out"
    assert recs["bigfile"]["status"] == "failed"


def test_fresh_interpreter_mode(tmp_path):
    try:
        sb = Sandbox(isolation="namespace", python_guard=False, fresh_interpreter=True, **LIMITS)
    except SandboxError as e:
        pytest.skip(f"namespace isolation unavailable here: {e}")
    with sb:
        r = sb.run(Job("def f():\n    return 1\n", ("assert f() == 1", "assert f() == 2")))
        assert [t["ok"] for t in r.tests] == [True, False]
        (tmp_path / "victim.txt").write_text("precious")
        r = sb.run(Job(f"import os\nos.remove({str(tmp_path / 'victim.txt')!r})\n"))
        assert r.status == "failed" and (tmp_path / "victim.txt").exists()
        r = sb.run(Job("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"))
        assert r.status == "failed"


def test_site_packages_only_on_request():
    pytest.importorskip("numpy")
    job = Job("import numpy\n", ("assert numpy.arange(3).sum() == 3",))
    with Sandbox(timeout=10.0) as plain:
        r = plain.run(job)
        assert r.status == "failed" and "ModuleNotFoundError" in r.error
    with Sandbox(timeout=10.0, site_packages=True) as site:
        assert site.run(job).passed


def test_auto_mode_and_bad_input():
    sb = Sandbox(timeout=2.0)
    try:
        assert sb.isolation in ("namespace", "guard")
        with pytest.raises(TypeError):
            sb.run("print(1)")
        assert sb.run(Job("x = 1", ("assert x == 1",))).passed
    finally:
        sb.close()
    assert sb.launcher_pids == []
    with pytest.raises(RuntimeError, match="closed"):
        sb.run(Job("x = 1"))
    with pytest.raises(ValueError, match="timeout"):
        SandboxConfig(timeout=-1)
    with pytest.raises(ValueError, match="isolation"):
        SandboxConfig(isolation="docker")
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxConfig(memory_bytes=0)
    with pytest.raises(TypeError):
        Job(1)
    with pytest.raises(TypeError):
        Job("x", "assert x")
