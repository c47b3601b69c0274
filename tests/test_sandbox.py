"""The execution sandbox (sandbox.py): hostile programs, escapes between sandboxes and to the host, the pool.

Every hostile test runs inside a guard: the whole test process sits in a pids cgroup of its own (as root),
so even a sandbox bug could not let a fork bomb take more than GUARD_PIDS processes from the machine. Every
test also checks that nothing survives: no process carrying its marker, no work dir, no slot cgroup.
"""

import os
import socket
import sys
import time
import uuid

import pytest

import sandbox

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux /proc")
GUARD_PIDS = 1200  # 16 sandboxes x (max_procs 32 + 3) plus this process's threads, with room to spare


def full_isolation():
    """Skip unless the sandbox applies every layer here (root, bwrap, setpriv, prlimit, a pids cgroup)."""
    h = sandbox._host()
    if not sys.platform.startswith("linux") or h.why or sandbox._pids_cgroup_parent() is None:
        pytest.skip("full isolation unavailable here: " + ("; ".join(h.why) or "no writable pids cgroup"))


@pytest.fixture(scope="module", autouse=True)
def guard():
    """Move this test process into a pids cgroup of its own for the module (root with a pids cgroup only)."""
    parent = sandbox._pids_cgroup_parent() if sys.platform.startswith("linux") else None
    if parent is None or os.geteuid() != 0:
        yield
        return
    g = os.path.join(parent, f"k2-test-guard-{os.getpid()}")
    os.mkdir(g)
    with open(os.path.join(g, "pids.max"), "w") as f:
        f.write(str(GUARD_PIDS))
    with open(os.path.join(g, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        with open(os.path.join(parent, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        sandbox._remove_cgroup(g)


def _procs_with(marker: str) -> list[int]:
    """PIDs whose command line or environment contains `marker`."""
    hits = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{p}/{what}", "rb") as f:
                    if marker.encode() in f.read():
                        hits.append(int(p))
            except OSError:
                pass
    return hits


def _leftovers() -> list[str]:
    """Work dirs, mounts and slot cgroups a finished run left on the host. Another process's live sandbox
    holds its slot's lock, so an entry counts only if its slot can be locked now (then nobody is using it)."""
    import fcntl
    left = []
    if not os.path.isdir(sandbox.STATE_DIR):
        return left
    parent = sandbox._pids_cgroup_parent()
    cgroups = [n for n in os.listdir(parent) if n.startswith("k2-sandbox-")] if parent else []
    for n in range(sandbox.MAX_SLOTS):
        lock = os.path.join(sandbox.STATE_DIR, f"slot-{n}.lock")
        if not os.path.exists(lock):
            continue
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.exists(os.path.join(sandbox.STATE_DIR, f"work-{n}")) or f"k2-sandbox-{n}" in cgroups:
                left.append(f"slot {n}")
        except BlockingIOError:
            pass  # in use right now by a live sandbox
        finally:
            os.close(fd)
    return left


@pytest.fixture
def marker():
    m = f"k2sbx-{uuid.uuid4().hex}"
    yield m
    assert _procs_with(m) == [], "a sandboxed process survived"
    assert _leftovers() == [], "a run left state behind"


def _run(code, marker, **kw):
    t0 = time.monotonic()
    r = sandbox.run_sandboxed(code, env={"MARKER": marker, **kw.pop("env", {})}, **kw)
    return r, time.monotonic() - t0


# ---- one sandbox: the basic promises ----

@linux_only
def test_runs_code_and_cleans_up(marker):
    r, _ = _run("import os\nprint(os.getcwd())\nopen('out.txt', 'w').write('x')\n", marker, timeout_s=5,
                files={"data/in.txt": "hello"})
    assert r.ok and r.exit_code == 0 and not r.timed_out and not r.error, r
    r, _ = _run("print(open('data/in.txt').read())", marker, files={"data/in.txt": "hello"})
    assert r.ok and r.stdout == "hello\n"
    r, _ = _run("import sys\nsys.exit(3)", marker)
    assert not r.ok and r.exit_code == 3
    for bad in ({"timeout_s": 0}, {"disk_mb": 0}, {"max_procs": 0}, {"memory_mb": 8}, {"uid": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sandbox.run_sandboxed("pass", **bad)
    with pytest.raises(ValueError, match="files"):
        sandbox.run_sandboxed("pass", files={"../x": "y"})


@linux_only
def test_infinite_loop_times_out(marker):
    r, wall = _run("while True:\n    pass", marker, timeout_s=1.0)
    assert r.timed_out and not r.ok and wall < 4


@linux_only
def test_fork_bomb(marker):
    if os.geteuid() == 0 and sandbox._pids_cgroup_parent() is None and not sandbox._host().bwrap:
        pytest.skip("root without a pids cgroup or bwrap: nothing would bound a fork bomb, never run one")
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r, wall = _run(code, marker, timeout_s=1.5, max_procs=16)
    assert not r.ok and r.timed_out and wall < 5


@linux_only
def test_memory_bomb(marker):
    r, wall = _run("x = []\nwhile True:\n    x.append(bytearray(10**7))", marker, timeout_s=5, memory_mb=128)
    assert r.killed_for_memory and not r.ok and wall < 6


@linux_only
def test_output_flood_is_truncated(marker):
    r, wall = _run("while True:\n    print('y' * 1000)", marker, timeout_s=5, max_output=10_000)
    assert r.output_truncated and not r.ok and len(r.stdout) <= 10_000 and wall < 6


@linux_only
def test_background_child_does_not_outlive_parent(marker):
    if not sandbox._host().bwrap:
        pytest.skip("without a PID namespace a setsid daemon can escape the process group")
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\nprint('parent exits')\n")
    r, wall = _run(code, marker, timeout_s=5)
    assert r.ok and "parent exits" in r.stdout and wall < 4
    time.sleep(0.2)
    assert _procs_with(marker) == []


@linux_only
def test_cannot_read_the_parent_environment(monkeypatch, marker):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("K2_TEST_SECRET", secret)
    code = ("import os\nprint(dict(os.environ))\nfor p in os.listdir('/proc'):\n    try:\n"
            "        print(open(f'/proc/{p}/environ', 'rb').read())\n    except OSError:\n        pass\n")
    r, _ = _run(code, marker, timeout_s=5)
    assert r.exit_code == 0 and "PATH" in r.stdout
    if sandbox._host().bwrap or os.geteuid() != 0:
        assert secret not in r.stdout and secret not in r.stderr
    else:
        assert "K2_TEST_SECRET" not in r.stdout.split("\n")[0]


@linux_only
def test_network_is_denied(marker):
    if not sandbox._host().bwrap:
        pytest.skip("no network namespace without bwrap")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    r, _ = _run(code, marker, timeout_s=5)
    assert not r.ok and "connected" not in r.stdout  # its own loopback: nothing listens there
    assert "ConnectionRefusedError" in r.stderr or "Network is unreachable" in r.stderr, r.stderr
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()


@linux_only
def test_degraded_mode_still_enforces_timeout(marker):
    r, wall = _run("while True:\n    pass", marker, timeout_s=1.0, namespaces=False)
    assert r.timed_out and "bwrap" not in r.isolation and r.degraded and wall < 4


# ---- the pool ----

@linux_only
def test_run_many_keeps_order_applies_defaults_and_isolates_bad_programs(marker):
    env = {"MARKER": marker}
    progs = ["print(1)", {"code": "print(open('f').read())", "files": {"f": "two"}}, 42,
             {"code": "pass", "timeout_s": -1}, {"code": "import os; print(os.environ['V'])", "env": {"V": "v",
                                                                                                   **env}},
             {"nocode": 1}, "import sys; sys.exit(7)"]
    st: dict = {}
    rs = sandbox.run_many(progs, max_workers=3, stats=st, env=env, timeout_s=5)
    assert [r.stdout for r in rs] == ["1\n", "two\n", "", "", "v\n", "", ""]
    assert [r.ok for r in rs] == [True, True, False, False, True, False, False]
    assert "programs" in rs[2].error and "timeout_s" in rs[3].error and "programs" in rs[5].error
    assert rs[6].exit_code == 7 and not rs[6].error
    assert st["n"] == len(progs) and st["per_s"] > 0 and st["max_workers"] == 3
    with pytest.raises(ValueError, match="max_workers"):
        sandbox.run_many(["pass"], max_workers=0)
    assert sandbox.run_many([]) == []
