"""The execution sandbox (sandbox.py): hostile programs, escapes between sandboxes and to the host, the pool.

Every hostile test runs inside a guard: the whole test process sits in a pids cgroup of its own (as root),
so even a sandbox bug could not let a fork bomb take more than GUARD_PIDS processes from the machine. Every
test also checks that nothing survives: no process carrying its marker, no work dir, no slot cgroup.
"""

import ast
import os
import socket
import sys
import tempfile
import time
import uuid

import pytest

import sandbox

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux /proc")
GUARD_PIDS = 1200  # 16 sandboxes x (max_procs 32 + 3) plus this process's threads, with room to spare


def full_isolation():
    """Skip unless the sandbox applies every layer here (root, bwrap, setpriv, prlimit, a pids cgroup)."""
    h = sandbox._host()
    if not sys.platform.startswith("linux") or h.why or sandbox._cgroup_parent("pids") is None:
        pytest.skip("full isolation unavailable here: " + ("; ".join(h.why) or "no writable pids cgroup"))


@pytest.fixture(scope="module", autouse=True)
def guard():
    """Move this test process into a pids cgroup of its own for the module (root with a pids cgroup only)."""
    parent = sandbox._cgroup_parent("pids") if sys.platform.startswith("linux") else None
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
    cgroups = []
    for controller in ("pids", "memory"):
        parent = sandbox._cgroup_parent(controller)
        cgroups += [n for n in os.listdir(parent) if n.startswith("k2-sandbox-")] if parent else []
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
    if os.geteuid() == 0 and sandbox._cgroup_parent("pids") is None and not sandbox._host().bwrap:
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
    import subprocess
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("K2_TEST_SECRET", secret)  # what a child would inherit
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],  # a host process with
                              env={"K2_TEST_SECRET": secret})                        # it in /proc/<pid>/environ
    code = ("import os\nprint('K2_TEST_SECRET' in os.environ)\nhits = 0\nfor p in os.listdir('/proc'):\n"
            "    try:\n        hits += b'K2_TEST_SECRET=' in open(f'/proc/{p}/environ', 'rb').read()\n"
            "    except OSError:\n        pass\nprint(hits)\n")
    try:
        r, _ = _run(code, marker, timeout_s=5)
    finally:
        holder.kill()
        holder.wait()
    assert r.ok, r
    own, hits = r.stdout.split()
    assert own == "False" and secret not in r.stdout + r.stderr
    if "bwrap" in r.isolation or any(x.startswith("uid=") for x in r.isolation):
        assert hits == "0"  # its own /proc, or another uid: no host process's environment is readable
    else:
        assert "uid" in r.degraded or "not root" in r.degraded  # same uid as the host: said so


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


# ---- escapes: to the host ----

def _world_writable_host_dirs(max_depth: int = 3) -> list[str]:
    """World-writable directories on this host, up to max_depth levels below / (no /proc, /sys)."""
    found, stack = [], [("/", 0)]
    while stack:
        d, depth = stack.pop()
        try:
            with os.scandir(d) as it:
                subs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for s in subs:
            if s in ("/proc", "/sys"):
                continue
            try:
                if os.stat(s).st_mode & 0o002:
                    found.append(s)
            except OSError:
                continue
            if depth + 1 < max_depth:
                stack.append((s, depth + 1))
    return sorted(found)


@linux_only
def test_nothing_but_the_work_dir_is_writable(marker):
    full_isolation()
    host_dirs = _world_writable_host_dirs()
    assert "/tmp" in host_dirs  # the probe must be able to find what it looks for
    name = f"k2-escape-{marker}"
    code = f"""
import os
writable, sockets = [], []
for top, dirs, files in os.walk("/"):
    if top == "/proc":
        dirs[:] = []
        continue
    try:
        fd = os.open(os.path.join(top, {name!r}), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(os.path.join(top, {name!r}))
        writable.append(top)
    except OSError:
        pass
    for f in files:
        try:
            if os.stat(os.path.join(top, f), follow_symlinks=False).st_mode & 0o170000 == 0o140000:
                sockets.append(os.path.join(top, f))
        except OSError:
            pass
escaped = []
for d in {host_dirs!r}:
    try:
        open(os.path.join(d, {name!r}), "w").write("x")
        escaped.append(d)
    except OSError:
        pass
print(writable, sockets, escaped)
"""
    r, _ = _run(code, marker, timeout_s=20)
    assert r.ok, r.stderr
    assert r.stdout.strip() == "['/work'] [] []", r.stdout  # only /work; no socket file in view; no host dir
    for d in host_dirs:
        assert not os.path.exists(os.path.join(d, name)), d


@linux_only
def test_host_socket_files_are_unreachable(marker):
    full_isolation()
    servers, paths = [], []
    for d in ("/tmp", "/run/lock", "/dev/shm"):
        if not os.path.isdir(d):
            continue
        p = os.path.join(d, f"k2-sock-{marker[-8:]}")
        s = socket.socket(socket.AF_UNIX)
        s.bind(p)
        os.chmod(p, 0o777)
        s.listen(4)
        s.setblocking(False)
        servers.append(s)
        paths.append(p)
    code = (f"import socket\nfor p in {paths!r}:\n    s = socket.socket(socket.AF_UNIX)\n    try:\n"
            "        s.connect(p)\n        print('connected', p)\n    except OSError as e:\n"
            "        print(type(e).__name__)\n")
    try:
        r, _ = _run(code, marker, timeout_s=5)
        assert r.ok and "connected" not in r.stdout
        assert r.stdout.split() == ["FileNotFoundError"] * len(paths)  # the paths do not exist in its root
        for s in servers:
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s, p in zip(servers, paths):
            s.close()
            os.unlink(p)


@linux_only
def test_privileges_are_gone_and_the_filter_holds(marker):
    full_isolation()
    code = r"""
import ctypes, errno, os
st = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
print({k: st[k].strip() for k in ("NoNewPrivs", "Seccomp", "CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh")})
print(os.getuid(), os.getgid(), os.getgroups())
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    r = libc.syscall(nr, *args)
    return errno.errorcode.get(ctypes.get_errno(), "?") if r == -1 else r
print(call(272, 0x10000000), call(101, 0), call(250, 0, -3), call(248, b"user", b"k", b"v", 1, -3),
      call(435, 0, 0), call(56, 0x10000000 | 17, 0, 0, 0, 0), call(321, 0, 0, 0))
pid = os.fork()
if pid == 0:
    os._exit(0)
print(os.waitpid(pid, 0)[1])
"""
    r, _ = _run(code, marker, timeout_s=5)
    assert r.ok, r.stderr
    caps, ids, calls, fork = r.stdout.splitlines()
    assert caps == str({"NoNewPrivs": "1", "Seccomp": "2", "CapEff": "0" * 16, "CapPrm": "0" * 16,
                        "CapBnd": "0" * 16, "CapAmb": "0" * 16, "CapInh": "0" * 16})
    uid = int(ids.split()[0])
    assert sandbox.SLOT_UID_BASE <= uid < sandbox.SLOT_UID_BASE + sandbox.MAX_SLOTS
    assert ids == f"{uid} {uid} []"
    # unshare(NEWUSER), ptrace, keyctl, add_key: EPERM; clone3: ENOSYS (libc falls back); clone(NEWUSER): EPERM
    assert calls.split() == ["EPERM", "EPERM", "EPERM", "EPERM", "ENOSYS", "EPERM", "EPERM"]
    assert fork == "0"  # a plain fork still works


@linux_only
def test_config_never_appears_on_a_command_line(marker):
    full_isolation()
    secret = f"env-secret-{uuid.uuid4().hex}"
    import threading
    out = {}
    t = threading.Thread(target=lambda: out.update(r=_run("import time\ntime.sleep(1.5)\nprint('done')",
                                                          marker, env={"TOKEN": secret}, timeout_s=10)[0]))
    t.start()
    seen_running = in_argv = 0
    while t.is_alive():
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    argv = f.read()
                with open(f"/proc/{p}/environ", "rb") as f:
                    seen_running += marker.encode() in f.read()
            except OSError:
                continue
            in_argv += secret.encode() in argv or marker.encode() in argv
        time.sleep(0.05)
    t.join()
    assert out["r"].ok and out["r"].stdout == "done\n"
    assert seen_running > 0, "the scan never saw the sandboxed program running"
    assert in_argv == 0, "the environment given to the sandbox appeared on a command line"


@linux_only
def test_ipc_objects_and_keys_do_not_survive_or_leak(marker):
    full_isolation()
    key = int(marker[-6:], 16) | 0x10000000
    qname = f"/k2q-{marker[-8:]}"
    make = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print(libc.shmget({key}, 4096, 0o1600) >= 0, libc.msgget({key}, 0o1600) >= 0, libc.semget({key}, 1, 0o1600) >= 0,
      libc.mq_open({qname.encode()!r}, os.O_CREAT | os.O_RDWR, 0o600, None) >= 0,
      libc.syscall(248, b"user", b"k2", b"v", 1, -3) >= 0)
"""
    look = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print(libc.shmget({key}, 0, 0) >= 0, libc.msgget({key}, 0) >= 0, libc.semget({key}, 0, 0) >= 0,
      libc.mq_open({qname.encode()!r}, os.O_RDONLY) >= 0)
"""
    ipc_before = _sysvipc()
    r1, _ = _run(make, marker, timeout_s=5)
    assert r1.ok and r1.stdout.split() == ["True", "True", "True", "True", "False"], r1  # add_key: refused
    assert _sysvipc() == ipc_before and not any(f"{key:10d}" in line for line in ipc_before)
    r2, _ = _run(look, marker, timeout_s=5)
    assert r2.ok and r2.stdout.split() == ["False"] * 4, r2  # the next sandbox sees none of them
    with open("/proc/key-users") as f:
        users = [int(line.split(":")[0]) for line in f]
    assert not [u for u in users if sandbox.SLOT_UID_BASE <= u < sandbox.SLOT_UID_BASE + sandbox.MAX_SLOTS]


def _sysvipc() -> list[str]:
    lines = []
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            lines += [f"{kind} {line}" for line in f.read().splitlines()[1:]]
    return lines


# ---- escapes: between sandboxes ----

@linux_only
def test_a_sandbox_cannot_reach_a_concurrent_one(marker, tmp_path):
    full_isolation()
    secret = f"victim-{uuid.uuid4().hex}"
    host_file = tmp_path / f"host-{marker}"
    host_file.write_text("host")
    os.chmod(tmp_path, 0o755)
    victim = ("import os, time\nverdict = 'PASS'\nopen('verdict', 'w').write('PASS')\ntime.sleep(2.5)\n"
              "print(verdict, open('verdict').read(), os.environ['SECRET'] == " + repr(secret) + ")\n")
    attacker = f"""
import glob, os, time
time.sleep(0.5)
found = []
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
for p in set(pids) - {{os.getpid()}}:
    for what in ("environ", "cmdline"):
        try:
            if b"victim-" in open(f"/proc/{{p}}/{{what}}", "rb").read():
                found.append((p, what))
        except OSError:
            pass
    for what in ("mem", "root/work/verdict", "cwd/verdict", "root/tmp", "cwd"):
        try:
            open(f"/proc/{{p}}/{{what}}", "r+b").close()
            found.append((p, what, "opened rw"))
        except OSError:
            pass
found += glob.glob("/proc/*/root{host_file}") + glob.glob("/proc/*/root/proc/*/root{host_file}")
found += glob.glob("{sandbox.STATE_DIR}/*") + glob.glob("/proc/*/root{sandbox.STATE_DIR}/*")
print(len(pids), found)
"""
    rs = sandbox.run_many([{"code": victim, "env": {"SECRET": secret, "MARKER": marker}}, attacker],
                          max_workers=2, env={"MARKER": marker}, timeout_s=10)
    assert rs[0].ok and rs[0].stdout == "PASS PASS True\n", rs[0]
    assert rs[1].ok and rs[1].stdout == "2 []\n", rs[1]  # sees bwrap's PID 1 and itself, nothing else
    assert secret not in rs[1].stdout + rs[1].stderr


# ---- what the program leaves: a tree that breaks cleanup, a full work dir ----

@linux_only
@pytest.mark.parametrize("namespaces", [True, False])
def test_a_deep_tree_cannot_break_cleanup(marker, namespaces):
    code = "import os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')\n"
    r, _ = _run(code, marker, timeout_s=20, namespaces=namespaces, disk_files=4000)
    assert r.ok and r.stdout == "deep\n", r.stderr


@linux_only
def test_rmtree_deletes_any_depth_without_recursion(tmp_path):
    from pathlib import Path
    base = Path(tempfile.mkdtemp(dir="/dev/shm")) if os.path.isdir("/dev/shm") else tmp_path  # fast rmdir
    top = base / "tree"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(3000):  # deeper than PATH_MAX allows to name and than Python's recursion limit
        os.mkdir("d", dir_fd=fd)
        if i % 500 == 0:
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
            os.symlink("/etc", "link", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    sandbox._rmtree(str(top))
    assert not top.exists() and os.path.isdir("/etc")
    sandbox._rmtree(str(base))


@linux_only
def test_work_dir_is_bounded_in_bytes_and_files(marker):
    if os.geteuid() != 0 or not sandbox._host().root:
        pytest.skip("the bounded tmpfs work dir needs root (mount)")
    fill = "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)\n"
    files = "i = 0\nwhile True:\n    open(f'f{i}', 'w').close()\n    i += 1\n"
    r, _ = _run(fill, marker, timeout_s=10, disk_mb=8, file_mb=64)
    assert r.disk_full and not r.too_many_files and not r.ok and "No space left" in r.stderr
    r, _ = _run(files, marker, timeout_s=10, disk_files=100)
    assert r.too_many_files and not r.disk_full and not r.ok and "f98" in r.stderr  # main.py and / use 2
    r, _ = _run("open('small', 'w').write('x' * 1000)", marker, disk_mb=8, disk_files=100)
    assert r.ok and not r.disk_full and not r.too_many_files


# ---- many at once, as RL runs them ----

@linux_only
@pytest.mark.slow
def test_sixteen_at_once_with_a_fork_bomb_and_a_memory_bomb(marker):
    full_isolation()
    fork_bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    memory_bomb = "x = []\nwhile True:\n    x.append(bytearray(10**7))\n"
    normal = ("import os\nk = {k}\nopen('n', 'w').write(str(k))\npid = os.fork()\nif pid == 0:\n"
              "    print(sum(i * i for i in range(k * 1000)), flush=True)\n    os._exit(0)\n"
              "os.waitpid(pid, 0)\nprint(open('n').read(), os.getpid())\n")
    programs = [{"code": fork_bomb, "timeout_s": 3.0}, {"code": memory_bomb, "memory_mb": 128}]
    programs += [normal.format(k=k) for k in range(2, 16)]
    ipc_before = _sysvipc()
    rs = sandbox.run_many(programs, max_workers=16, env={"MARKER": marker}, timeout_s=30, max_procs=32)
    assert rs[0].timed_out and not rs[0].ok
    assert rs[1].killed_for_memory and not rs[1].ok
    for k, r in zip(range(2, 16), rs[2:]):
        assert r.ok and r.stdout == f"{sum(i * i for i in range(k * 1000))}\n{k} 2\n", (k, r)
    uids = {next(x for x in r.isolation if x.startswith("uid=")) for r in rs}
    assert len(uids) == 16 and all("pids-cgroup" in r.isolation for r in rs)  # a uid and a budget each
    assert _sysvipc() == ipc_before


@linux_only
def test_memory_is_capped_for_the_whole_tree(marker):
    full_isolation()
    if sandbox._cgroup_parent("memory") is None:
        pytest.skip("no writable memory cgroup: memory is capped per process only")
    code = ("import os, time\nkids = []\nfor _ in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
            "        x = b'x' * (60 << 20)\n        time.sleep(3)\n        os._exit(0)\n    kids.append(pid)\n"
            "print([os.waitpid(k, 0)[1] for k in kids])\n")
    # each process stays under RLIMIT_AS (128 MiB); six of them together pass the 200 MiB tree cap
    r, _ = _run(code, marker, timeout_s=10, memory_mb=128, max_procs=8, tree_memory_mb=200)
    assert r.killed_for_memory and not r.ok and "memory-cgroup" in r.isolation, r
    statuses = ast.literal_eval(r.stdout)  # the parent survives and reports its children: some were OOM-killed
    assert 9 in statuses and len(statuses) == 6
