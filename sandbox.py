"""The execution sandbox: run untrusted Python, many programs at once, each sealed from the host and the others.

K2's agentic data and its RL stage score code by running it (K2 §3.1.1: coding tasks are verified in a real
execution sandbox; §3.2.1: coding rewards at scale need many sandboxes at once). Chapter 5 checks synthesised
tasks with it, chapter 6 scores many rollouts in parallel. The program is hostile by assumption: a fork bomb,
a memory bomb, a write anywhere, a connection to anything, an attack on the sandbox running next to it.

One sandbox, as root with bubblewrap (`bwrap`), is this process tree:

    sh (joins the slot's pids + memory cgroups) -> prlimit (rlimits) -> bwrap (namespaces, mounts, seccomp)
      -> setpriv (slot uid, every capability gone) -> python -I -S -B main.py    (in /work, a bounded tmpfs)

Guarantees (as root with bwrap; `SandboxResult.isolation` lists what was applied, `degraded` what was not):
- own PID, IPC, network, UTS and cgroup namespaces: the program sees only its own processes (its own /proc),
  no network but a loopback of its own, and SysV/POSIX IPC objects vanish with it;
- its own root: an empty read-only tmpfs holding only the Python install and the shared libraries (both
  read-only), a minimal /dev, its own /proc and /work. No host socket file, no /tmp, no /run, no home;
- /work is the only writable place: a fresh tmpfs of `disk_mb` MiB and `disk_files` inodes (nosuid, nodev,
  noexec), unmounted afterwards, so nothing written survives and cleanup cannot fail whatever the tree
  inside looks like; `disk_full` / `too_many_files` say that the program hit a bound;
- a uid of its own per concurrent slot (61000 + slot, owning no host file) and, per slot, a pids cgroup
  (max_procs) and a memory cgroup (tree_memory_mb, the work dir's pages included) below the caller's own
  cgroups, so the caller's limits still hold and one sandbox's fork or memory bomb cannot starve another;
- every capability dropped (bounding set empty), no_new_privs (setuid binaries do nothing), a new session;
- a seccomp filter (`SECCOMP_RULES`; `python sandbox.py --seccomp` prints it): no kernel keyring (add_key,
  request_key, keyctl), no ptrace or process_vm_*, no new namespaces (unshare, setns, clone with CLONE_NEW*;
  clone3 answers ENOSYS so libc falls back to clone), no bpf, perf_event_open, userfaultfd or io_uring;
- rlimits (CPU seconds, address space = memory_mb, file size, processes, open files, no core dumps) and a
  wall-clock timeout; afterwards every process left in the slot's cgroups is killed: nothing survives;
- configuration passed privately: bwrap reads its options (`env=` included) from a memfd (`--args FD`), so
  the host's `ps` shows `bwrap --args N -- setpriv ... main.py` only; the program's environment is
  PATH/LANG/HOME/TMPDIR plus `env`;
- stdout/stderr capped at max_output bytes each; a flood beyond that kills the program (output_truncated).

Not protected against (a process sandbox shares the kernel: it is not a VM):
- kernel exploits through the syscalls still allowed (the filter is a short deny list, not gVisor);
- reading the Python install and the shared libraries (read-only, the same files on every such machine);
- CPU contention (no CPU cgroup share), timing and other side channels;
- a caller killed with SIGKILL mid-run: bwrap's --die-with-parent still kills the program, but that slot's
  tmpfs stays mounted (and its cgroups stay, empty) under /run/k2-sandbox until the slot is next used.

Degraded, and `degraded` says so: without root there is no slot uid, no cgroup and no tmpfs work dir (bwrap
runs unprivileged in a user namespace; the work dir is a host temp dir, bounded per file by RLIMIT_FSIZE, and
RLIMIT_NPROC is the user's process count + max_procs); without a writable cgroup the process budget is the
slot uid's RLIMIT_NPROC and memory is capped per process only. Without bwrap the program runs as a plain
subprocess with rlimits, a scrubbed environment and, as root, the slot cgroups and the slot uid (when it can
reach the interpreter): no namespaces, so it sees the host's file system and network. Install bubblewrap:
`apt-get install bubblewrap` (Debian, Ubuntu), `dnf install bubblewrap` (Fedora); .ci/run does.

Design choices
- Compose a well-kept tool (bubblewrap, the sandbox under Flatpak) instead of hand-writing mount code;
  everything it is told is in `_bwrap_args`, readable top to bottom.
- bwrap runs privileged (as root, no user namespace) so that the program gets a real host uid per slot:
  setpriv drops to it last. In a user namespace every sandbox would be host root without capabilities.
- A slot is a lock file: `flock` on /run/k2-sandbox/slot-N.lock, exclusive across threads and processes
  (two test runs at once never share a uid, a cgroup or a work dir); the lock files are all that remains.
- The pool is threads (each waits on one subprocess): the sandboxes run in parallel, the GIL is not in the way.

Simplified vs K2: K2 runs Kubernetes-scale containers across machines; this is one machine's process trees.

References: bubblewrap (github.com/containers/bubblewrap, bwrap(1)); seccomp filters:
Documentation/userspace-api/seccomp_filter.rst; cgroup pids and memory controllers: Documentation/admin-guide/cgroup-v1/.

Run:
    python sandbox.py --help
    python sandbox.py              # hostile programs at once, pool throughput, start-up overhead (~20 s)
    python sandbox.py --seccomp    # the seccomp filter as BPF instructions
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import functools
import math
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cli

SLOT_UID_BASE = 61000      # slot n runs as uid 61000 + n (no host file belongs to these uids)
MAX_SLOTS = 256            # concurrent sandboxes per machine
STATE_DIR = "/run/k2-sandbox"   # root only: slot lock files and work-dir mount points
WORK = "/work"             # the work dir as the program sees it


@dataclass
class SandboxResult:
    ok: bool                  # exited 0, in time, within limits
    exit_code: int | None     # -N: the sandbox killed it with signal N; under bwrap a program that dies of
                              # signal N by itself reports 128 + N (as a shell does)
    timed_out: bool
    killed_for_memory: bool
    output_truncated: bool
    stdout: str
    stderr: str
    wall_s: float
    isolation: tuple = ()     # the layers actually applied
    degraded: str = ""        # why a layer is missing, "" when all were applied
    disk_full: bool = False   # the work dir ran out of bytes (disk_mb)
    too_many_files: bool = False  # the work dir ran out of inodes (disk_files)
    error: str = ""           # the sandbox itself could not run the program (bad arguments, setup failure)


def _failed(error: str) -> SandboxResult:
    return SandboxResult(False, None, False, False, False, "", "", 0.0, error=error)


# ---- what this machine offers (probed once) ----

@dataclass(frozen=True)
class _Host:
    root: bool
    bwrap: str | None       # path of a bwrap that works here, else None
    setpriv: str | None
    prlimit: str | None
    why: tuple              # reasons for each missing layer


@functools.lru_cache(maxsize=None)
def _host() -> _Host:
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    why = []
    if not sys.platform.startswith("linux"):
        return _Host(False, None, None, None, ("not Linux: a plain subprocess with a timeout only",))
    bwrap, setpriv, prlimit = (shutil.which(t) for t in ("bwrap", "setpriv", "prlimit"))
    if bwrap:
        probe = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--ro-bind", "/", "/", "true"]
        r = subprocess.run(probe, capture_output=True)
        if r.returncode != 0:
            why.append(f"bwrap does not work here ({r.stderr.decode(errors='replace').strip()})")
            bwrap = None
    else:
        why.append("bubblewrap (bwrap) not installed: no namespaces, the host file system and network are "
                   "visible (apt-get install bubblewrap)")
    if not root:
        why.append("not root: no slot uid, no pids cgroup, no tmpfs work dir (bounded per file only)")
    elif bwrap and not setpriv:
        why.append("setpriv (util-linux) not found: bwrap runs in a user namespace as host root without "
                   "capabilities instead of a slot uid")
    return _Host(root, bwrap, setpriv, prlimit, tuple(why))


# ---- slots: a uid, a pids cgroup and a work dir per concurrent sandbox ----

class _Slot:
    """Exclusive use of slot n across threads and processes: an flock on STATE_DIR/slot-n.lock."""

    def __init__(self):
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        st = os.lstat(STATE_DIR)
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise RuntimeError(f"{STATE_DIR} must be a directory owned by root, mode 0700")
        for n in range(MAX_SLOTS):
            fd = os.open(os.path.join(STATE_DIR, f"slot-{n}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.n, self.fd, self.uid = n, fd, SLOT_UID_BASE + n
            self.workdir = os.path.join(STATE_DIR, f"work-{n}")
            return
        raise RuntimeError(f"all {MAX_SLOTS} sandbox slots are busy")

    def release(self):
        os.close(self.fd)  # closing the only descriptor releases the flock


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
MS_NOSUID, MS_NODEV, MS_NOEXEC, MNT_DETACH = 2, 4, 8, 2


def _mount_tmpfs(path: str, size_mb: int, n_inodes: int, uid: int) -> None:
    """A fresh tmpfs of size_mb MiB and n_inodes inodes at `path`, owned by uid (root only)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.path.ismount(path):  # left mounted by a caller that was killed mid-run
        _libc.umount2(path.encode(), MNT_DETACH)
    opts = f"size={size_mb}m,nr_inodes={n_inodes},mode=0711,uid={uid},gid={uid}"
    if _libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts.encode()) != 0:
        err = ctypes.get_errno()
        os.rmdir(path)
        raise OSError(err, os.strerror(err))


def _rmtree(path: str) -> None:
    """Delete a tree of any depth: no recursion and no long paths (one directory fd at a time). Never raises."""
    names: list[str] = []                   # the path from `path` down to the directory fd is in
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    while True:
        sub = None
        try:
            with os.scandir(fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        sub = e.name
                        break
                    try:
                        os.unlink(e.name, dir_fd=fd)
                    except OSError:
                        pass
        except OSError:
            pass
        if sub is not None:                 # go down into the first subdirectory
            try:
                child = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                sub = None
            else:
                os.close(fd)
                fd = child
                names.append(sub)
                continue
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd) if names else None
        os.close(fd)
        if parent is None:                  # back at the top: the tree is empty
            try:
                os.rmdir(path)
            except OSError:
                pass
            return
        try:
            os.rmdir(names.pop(), dir_fd=parent)
        except OSError:
            os.close(parent)
            return                          # something we cannot delete: give up rather than loop
        fd = parent


def _cgroup_parent(controller: str) -> str | None:
    """The caller's own cgroup directory for `controller` ("pids", "memory"; cgroup v1 or v2), if this process
    may create children in it. Sandbox cgroups go below it, so limits set on the caller still hold."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for _, ctrls, path in lines:  # cgroup v1: one hierarchy per controller
        if controller in ctrls.split(","):
            d = f"/sys/fs/cgroup/{controller}{path}".rstrip("/")
            return d if os.access(d, os.W_OK) else None
    for hid, ctrls, path in lines:  # cgroup v2: the controller must be enabled for the children
        if hid == "0" and ctrls == "":
            d = ("/sys/fs/cgroup" + path).rstrip("/")
            try:
                with open(os.path.join(d, "cgroup.subtree_control")) as f:
                    if controller in f.read().split() and os.access(d, os.W_OK):
                        return d
            except OSError:
                pass
    return None


def _make_cgroup(parent: str, slot: _Slot, limits: dict) -> str:
    """cgroup k2-sandbox-<slot> below `parent`, with limits {file: value} (pids.max, memory.limit_in_bytes...)."""
    d = os.path.join(parent, f"k2-sandbox-{slot.n}")
    if os.path.isdir(d):  # left behind by a killed caller: empty it
        _kill_cgroup(d)
    else:
        os.mkdir(d)
    for name, value in limits.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(str(value))
    return d


def _slot_cgroups(slot: _Slot, max_pids: int, memory_bytes: int, why: list) -> dict:
    """{controller: cgroup dir} for the slot: a pids budget and a memory cap for the whole process tree."""
    made = {}
    for controller, v1, v2, value, missing in (
            ("pids", "pids.max", "pids.max", max_pids, "the process budget is RLIMIT_NPROC of the slot uid only"),
            ("memory", "memory.limit_in_bytes", "memory.max", memory_bytes,
             "memory is capped per process (RLIMIT_AS), not per sandbox")):
        parent = _cgroup_parent(controller)
        if parent is None:
            why.append(f"no writable {controller} cgroup: {missing}")
            continue
        v2_layout = os.path.exists(os.path.join(parent, "cgroup.controllers"))
        try:
            made[controller] = _make_cgroup(parent, slot, {v2 if v2_layout else v1: value})
        except OSError as e:  # e.g. a read-only cgroup file system in a container
            _remove_cgroup(os.path.join(parent, f"k2-sandbox-{slot.n}"))
            why.append(f"cannot make a {controller} cgroup ({e.strerror}): {missing}")
    return made


def _oom_kills(d: str) -> int:
    """How many processes the kernel's OOM killer took from cgroup d (v1 memory.oom_control, v2 memory.events)."""
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(d, name)) as f:
                for line in f:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except OSError:
            pass
    return 0


def _kill_cgroup(d: str) -> None:
    """SIGKILL every process in cgroup `d` until it is empty (a fork bomb cannot outrun pids.max)."""
    for _ in range(1000):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


def _remove_cgroup(d: str) -> None:
    for _ in range(200):  # rmdir fails with EBUSY until the last killed task is reaped
        _kill_cgroup(d)
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)


# ---- the seccomp filter: a deny list, compiled to classic BPF for bwrap --seccomp FD ----

# syscall numbers: (x86_64, aarch64). EPERM unless noted; clone3 gets ENOSYS so that libc falls back to clone,
# whose flags the filter can read (clone3 passes them in memory a filter cannot see).
SECCOMP_RULES = {
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),      # the kernel keyring
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),  # other processes
    "unshare": (272, 97), "setns": (308, 268),                                    # new or other namespaces
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),  # kernel attack surface
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
}
CLONE = (56, 220)
CLONE3 = (435, 435)
CLONE_NEW_ANY = 0x7E020080  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
RET_KILL, RET_ALLOW, RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
LD_W_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06   # BPF opcodes (classic BPF, as seccomp takes)
NR, ARCH, ARG0 = 0, 4, 16      # offsets in struct seccomp_data (arg0's low 32 bits on little-endian)


def seccomp_program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions; jt/jf = instructions to skip when true/false."""
    machine = machine or platform.machine()
    if machine not in AUDIT_ARCH:
        raise ValueError(f"machine: no syscall table for {machine!r} (have {sorted(AUDIT_ARCH)})")
    a = 0 if machine == "x86_64" else 1
    prog = [(LD_W_ABS, 0, 0, ARCH),
            (JEQ, 1, 0, AUDIT_ARCH[machine]),          # another ABI (e.g. 32-bit calls): kill
            (RET, 0, 0, RET_KILL),
            (LD_W_ABS, 0, 0, NR)]
    if machine == "x86_64":                            # x32 ABI numbers alias the x86_64 ones: refuse them
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, RET_ERRNO | errno.EPERM)]
    for nrs in SECCOMP_RULES.values():                 # if nr == rule: return -EPERM
        prog += [(JEQ, 0, 1, nrs[a]), (RET, 0, 0, RET_ERRNO | errno.EPERM)]
    prog += [(JEQ, 0, 1, CLONE3[a]), (RET, 0, 0, RET_ERRNO | errno.ENOSYS)]
    prog += [(JEQ, 0, 3, CLONE[a]),                    # clone: refuse any CLONE_NEW* flag
             (LD_W_ABS, 0, 0, ARG0),
             (JSET, 0, 1, CLONE_NEW_ANY),
             (RET, 0, 0, RET_ERRNO | errno.EPERM),
             (RET, 0, 0, RET_ALLOW)]
    return prog


def _memfd(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding `data`, rewound: private configuration for bwrap (never argv)."""
    fd = os.memfd_create(name, 0)  # not CLOEXEC: it is passed to bwrap with pass_fds
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# ---- the bwrap command line ----

def _bwrap_args(python: str, workdir: str, env: dict, uid: int | None, seccomp_fd: int | None) -> list[str]:
    """What the sandbox sees, in the order bwrap builds it. uid=None: unprivileged, in a user namespace."""
    args = ["--unshare-pid", "--unshare-ipc", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--hostname", "sandbox", "--cap-drop", "ALL"]
    if uid is None:                                    # uid 1000 inside, the caller's uid outside
        args += ["--unshare-user", "--disable-userns", "--uid", "1000", "--gid", "1000"]
    else:                                              # root: setpriv needs these three to drop to `uid`
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    args += ["--proc", "/proc", "--dev", "/dev"]       # its own /proc (its PID namespace), a minimal /dev
    made = set()

    def ro_bind(path):                                 # bwrap makes missing parents 0700: make them 0755 first
        nonlocal args
        for d in _ancestors(path):
            if d not in made:
                made.add(d)
                args += ["--perms", "0755", "--dir", d]
        args += ["--ro-bind", path, path]

    prefix = sys.base_prefix
    ro_bind(prefix)                                    # the Python install
    for d in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/lib32", "/usr/lib32"):  # libc, libffi, libssl...
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d) and not (d + "/").startswith(prefix + "/"):
            ro_bind(d)
    for f in [python, "/etc/ld.so.cache"] + ([_host().setpriv] if uid is not None else []):
        if os.path.isfile(f) and not f.startswith(prefix + "/"):
            ro_bind(f)
    args += ["--bind", workdir, WORK, "--chdir", WORK, "--remount-ro", "/", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args


def _inner_command(python: str, uid: int | None) -> list[str]:
    """What bwrap executes (on its argv, so nothing secret): setpriv drops to the slot uid, then Python."""
    cmd = [python, "-I", "-S", "-B", "main.py"]
    if uid is None:
        return cmd
    return [_host().setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--"] + cmd


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


# ---- running one program ----

def run_sandboxed(code: str, timeout_s: float = 5.0, memory_mb: int = 256, *, files: dict | None = None,
                  max_output: int = 65536, max_procs: int = 32, max_files: int = 64, file_mb: int = 16,
                  disk_mb: int = 32, disk_files: int = 512, tree_memory_mb: int | None = None,
                  env: dict | None = None, uid: int | None = None, namespaces: bool = True) -> SandboxResult:
    """Run untrusted Python `code` as main.py in a fresh work dir, sealed as far as this machine allows.

    memory_mb: address space per process; max_procs: processes (and threads) of the sandbox; max_files:
    open files per process; file_mb: largest file; disk_mb / disk_files: size and inodes of the work dir;
    tree_memory_mb: memory of the whole sandbox, work dir included (default 2 x memory_mb + disk_mb).
    files: {relative path: text} written into the work dir first. env: extra environment variables.
    uid: run as this host uid instead of the slot's own (root only; sandboxes sharing a uid share RLIMIT_NPROC).
    namespaces=False runs the degraded path on purpose (no bwrap). See the module docstring for what holds.
    """
    for name, v, lo in (("timeout_s", timeout_s, 0), ("max_output", max_output, 0), ("max_procs", max_procs, 0),
                        ("max_files", max_files, 7), ("file_mb", file_mb, 0), ("disk_mb", disk_mb, 0),
                        ("disk_files", disk_files, 1 + len(files or {}))):
        if not v > lo:
            raise ValueError(f"{name}: must be > {lo}, got {v}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb: must be >= 32 (the interpreter itself needs it), got {memory_mb}")
    if tree_memory_mb is not None and tree_memory_mb < 32:
        raise ValueError(f"tree_memory_mb: must be >= 32, got {tree_memory_mb}")
    if uid is not None and not (isinstance(uid, int) and uid > 0):
        raise ValueError(f"uid: must be a uid > 0 (never root), got {uid!r}")
    host = _host()
    why = list(host.why)
    use_bwrap = host.bwrap is not None and namespaces
    if host.bwrap and not namespaces:
        why.append("namespaces=False: no bwrap, the host file system and network are visible")
    slot = _Slot() if host.root else None
    cgroups, workdir, tmpfs = {}, None, False
    try:
        if slot is not None:
            slot.uid = uid or slot.uid
            if use_bwrap and not host.setpriv:  # the program is host root in a user namespace: its files too
                slot.uid = 0
            try:
                _mount_tmpfs(slot.workdir, disk_mb, disk_files, slot.uid)
                workdir, tmpfs = slot.workdir, True
            except OSError as e:  # e.g. a container without CAP_SYS_ADMIN
                why.append(f"cannot mount the work dir's tmpfs ({e.strerror}): a host temp dir, bounded per file only")
            # + sh/prlimit/bwrap and bwrap's PID 1; the memory cap holds the work dir's tmpfs pages too
            cgroups = _slot_cgroups(slot, max_procs + 3, (tree_memory_mb or 2 * memory_mb + disk_mb) << 20, why)
        if workdir is None:
            workdir = os.path.realpath(tempfile.mkdtemp(prefix="sandbox-"))
        return _run(code, timeout_s, memory_mb, files, max_output, max_procs, max_files, file_mb, env or {},
                    host, use_bwrap, slot, workdir, tmpfs, cgroups, why)
    finally:  # never raises: what the program did cannot crash the caller
        for d in cgroups.values():
            _remove_cgroup(d)
        if tmpfs:
            _libc.umount2(workdir.encode(), MNT_DETACH)  # the whole tree goes at once, however deep
            _rmtree(workdir)                             # the empty mount point
        elif workdir:
            _rmtree(workdir)
        if slot is not None:
            slot.release()


def _run(code, timeout_s, memory_mb, files, max_output, max_procs, max_files, file_mb, env, host, use_bwrap,
         slot, workdir, tmpfs, cgroups, why) -> SandboxResult:
    python = os.path.realpath(sys.executable)
    uid = slot.uid if slot else None
    seen_workdir = WORK if use_bwrap else workdir
    env = {"PATH": os.path.dirname(python), "LANG": "C.UTF-8", **env, "HOME": seen_workdir,
           "TMPDIR": seen_workdir}
    _write_files(workdir, {"main.py": code, **(files or {})}, uid)

    run_as_uid = uid  # the fallback switches uid with Popen(user=) only if the slot uid can reach python
    if not use_bwrap and uid is not None and not _others_can_run(python):
        run_as_uid = None
        why.append(f"{python} is not reachable by uid {uid}: the program runs as root (no RLIMIT_NPROC)")
    nproc = max_procs if host.root else _count_procs(os.getuid()) + max_procs  # RLIMIT_NPROC counts per uid
    rlimits = [f"--cpu={math.ceil(timeout_s) + 1}", f"--as={memory_mb << 20}", f"--fsize={file_mb << 20}",
               f"--nofile={max_files}", f"--nproc={nproc}", "--core=0"]
    cmd, fds = [], []
    if cgroups:  # join the cgroups before anything forks (children inherit them): sh -c ... procs... -- cmd
        cmd += ["/bin/sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"',
                "sh"] + [os.path.join(d, "cgroup.procs") for d in cgroups.values()] + ["--"]
    cmd += ([host.prlimit] if host.prlimit else [python, "-I", "-S", "-c", _PRLIMIT_PY]) + rlimits + ["--"]
    isolation = ["process", "env", "rlimits"]
    if use_bwrap:
        try:
            filt = b"".join(struct.pack("=HBBI", *ins) for ins in seccomp_program())
            fds.append(_memfd("seccomp", filt))
            isolation.append("seccomp")
        except ValueError as e:
            why.append(f"no seccomp filter ({e})")
        priv_uid = uid if host.setpriv else None
        args = _bwrap_args(python, workdir, env, priv_uid, fds[0] if fds else None)
        fds.append(_memfd("bwrap-args", "".join(a + "\0" for a in args).encode()))
        cmd += [host.bwrap, "--args", str(fds[-1]), "--"] + _inner_command(python, priv_uid)
        isolation += ["bwrap", "pidns", "ipcns", "netns", "utsns", "mountns", "ro-root", "caps-dropped",
                      "no_new_privs"] + ([f"uid={uid}"] if priv_uid is not None else ["userns"])
        popen_user = None
    else:
        cmd += [python, "-I", "-S", "-B", "main.py"]
        popen_user = run_as_uid
        if run_as_uid is not None:
            isolation.append(f"uid={run_as_uid}")
    isolation += [f"{c}-cgroup" for c in cgroups] + (["work-tmpfs"] if tmpfs else [])

    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env if not use_bwrap else {"PATH": "/usr/bin:/bin"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, pass_fds=fds, user=popen_user,
                                group=popen_user, extra_groups=[] if popen_user is not None else None)
    finally:
        for fd in fds:
            os.close(fd)
    flood = threading.Event()
    outs = {"stdout": bytearray(), "stderr": bytearray()}

    def kill():
        _kill_tree(proc.pid)
        for d in cgroups.values():
            _kill_cgroup(d)

    def reader(stream, buf):
        while chunk := stream.read1(65536):
            take = max(0, max_output - len(buf))
            buf.extend(chunk[:take])
            if len(chunk) > take and not flood.is_set():
                flood.set()
                kill()

    threads = [threading.Thread(target=reader, args=(getattr(proc, k), outs[k]), daemon=True) for k in outs]
    for t in threads:
        t.start()
    timed_out = False
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:  # exited, not reaped
        if time.monotonic() - t0 > timeout_s:
            timed_out = True
            kill()
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            break
        time.sleep(0.002)
    kill()  # leftovers; safe: the unreaped leader keeps the group id ours
    exit_code = proc.wait()
    for t in threads:
        t.join(timeout=2.0)
    proc.stdout.close()
    proc.stderr.close()
    wall = time.monotonic() - t0
    disk_full = too_many = False
    if tmpfs:
        st = os.statvfs(workdir)
        disk_full, too_many = st.f_bavail == 0, st.f_favail == 0
    out, err = (outs[k].decode("utf-8", "replace") for k in ("stdout", "stderr"))
    oom = any(s in err for s in ("MemoryError", "Cannot allocate memory", "std::bad_alloc")) or (
        "memory" in cgroups and _oom_kills(cgroups["memory"]) > 0)
    ok = exit_code == 0 and not (timed_out or flood.is_set() or oom)
    return SandboxResult(ok, exit_code, timed_out, oom, flood.is_set(), out, err, wall, tuple(isolation),
                         "; ".join(why), disk_full, too_many)


# prlimit's job in Python, for a machine without util-linux: python -c _PRLIMIT_PY --cpu=3 --nproc=32 -- cmd ...
_PRLIMIT_PY = """import os, resource, sys
end = sys.argv.index("--")
for arg in sys.argv[1:end]:
    name, value = arg[2:].split("=")
    resource.setrlimit(getattr(resource, "RLIMIT_" + name.upper()), (int(value), int(value)))
os.execv(sys.argv[end + 1], sys.argv[end + 1:])
"""


def _write_files(workdir: str, files: dict, uid: int | None) -> None:
    for name, text in files.items():
        path = os.path.realpath(os.path.join(workdir, name))
        if not path.startswith(workdir + "/"):
            raise ValueError(f"files: {name!r} would land outside the work dir")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    if uid is not None:
        os.chmod(workdir, 0o711)  # bwrap (root, no capabilities) must be able to enter it
        for top, dirs, fs in os.walk(workdir):
            for n in [""] + dirs + fs:
                os.chown(os.path.join(top, n), uid, uid)


def _count_procs(uid: int) -> int:
    n = 0
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            n += os.stat(f"/proc/{d}").st_uid == uid
        except OSError:
            pass
    return n


def _others_can_run(path: str) -> bool:
    """Can a uid with no special rights reach and execute `path` (every parent dir o+x, the file o+rx)?"""
    dirs = ["/"] + _ancestors(path)
    return all(os.stat(d).st_mode & 0o001 for d in dirs) and os.stat(path).st_mode & 0o005 == 0o005


def _kill_tree(pid: int) -> None:
    """SIGKILL the process group (bwrap's PID 1 then dies with its parent and takes its namespace along)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---- the pool: many sandboxes at once, as RL runs them ----

def run_many(programs, max_workers: int | None = None, *, stats: dict | None = None,
             **defaults) -> list[SandboxResult]:
    """Run many programs concurrently, each in its own sandbox; results in input order.

    programs: each a str (the code) or a dict of run_sandboxed keyword arguments including "code"; `defaults`
    (run_sandboxed keyword arguments) apply to every program unless it sets its own. A bad program (wrong
    type, bad argument) gets a result with `error` set and ok=False; it never raises here or affects the
    others. stats, if given, is filled with n, wall_s, per_s (sandboxes started and finished per second).
    """
    programs = list(programs)
    if max_workers is None:
        max_workers = min(32, 4 * (os.cpu_count() or 1))
    if not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers: must be an integer >= 1, got {max_workers!r}")

    def one(p) -> SandboxResult:
        try:
            if isinstance(p, str):
                p = {"code": p}
            if not isinstance(p, dict) or not isinstance(p.get("code"), str):
                raise ValueError(f"programs: each must be a str or a dict with a str 'code', got {type(p).__name__}")
            return run_sandboxed(**{**defaults, **p})
        except Exception as e:  # noqa: BLE001 -- one bad program must not take the batch down
            return _failed(f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sandbox") as pool:
        results = list(pool.map(one, programs))
    if stats is not None:
        wall = time.monotonic() - t0
        stats.update(n=len(programs), max_workers=max_workers, wall_s=wall, per_s=len(programs) / max(wall, 1e-9))
    return results


# ---- demo ----

HOSTILE = {
    "prints hello": "print('hello from the sandbox')",
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(10**7))",
    "output flood": "while True:\n    print('x' * 1000)",
    "disk filler": "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)",
    "file-count bomb": "i = 0\nwhile True:\n    open(f'f{i}', 'w').close()\n    i += 1",
    "write /run/lock/x": "open('/run/lock/x', 'w').write('pwned')",
    "connect to localhost:22": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
    "add a kernel key": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                         "r = libc.syscall(248, b'user', b'k', b'v', 1, -3)\n"
                         "raise SystemExit(f'add_key: {r}, errno {ctypes.get_errno()}')"),
}


def hostile_table(console, timeout_s: float = 2.0, memory_mb: int = 128, max_procs: int = 32) -> None:
    """Every hostile program at once through run_many, one row each."""
    from rich.table import Table
    names = list(HOSTILE)
    rs = run_many([HOSTILE[n] for n in names], max_workers=len(names), timeout_s=timeout_s,
                  memory_mb=memory_mb, max_procs=max_procs, disk_mb=16, disk_files=256)
    t = Table(title=f"run_many on hostile programs, all at once (timeout {timeout_s:g} s, {memory_mb} MiB, "
                    f"{max_procs} processes, work dir 16 MiB / 256 files)")
    for col in ("program", "ok", "exit / signal", "timed out", "memory", "truncated", "disk full", "files full",
                "wall s", "last output line"):
        t.add_column(col)
    for name, r in zip(names, rs):
        last = (r.stderr.strip().splitlines() or [r.stdout.strip()[:40]])[-1][:60]
        code = r.exit_code
        status = signal.Signals(-code).name if code is not None and code < 0 else str(code)  # killed by a signal
        t.add_row(name, str(r.ok), status, str(r.timed_out), str(r.killed_for_memory),
                  str(r.output_truncated), str(r.disk_full), str(r.too_many_files), f"{r.wall_s:.2f}", last)
    console.print(t)
    console.print(f"isolation: {', '.join(rs[0].isolation)}" + (f"; degraded: {rs[0].degraded}" if rs[0].degraded
                                                                 else ""))


def throughput_table(console, n: int = 64, workers: tuple = (1, 2, 4, 8), repeats: int = 10) -> None:
    """Sandboxes started and finished per second for a trivial program, and start-up cost against python -c."""
    from rich.table import Table
    t = Table(title=f"pool throughput: {n} x print(1) per row, {os.cpu_count()} CPU cores")
    for col in ("max_workers", "wall s", "sandboxes / s", "all ok"):
        t.add_column(col)
    for w in workers:
        st: dict = {}
        rs = run_many(["print(1)"] * n, max_workers=w, stats=st)
        t.add_row(str(w), f"{st['wall_s']:.2f}", f"{st['per_s']:.1f}", str(all(r.ok and r.stdout == "1\n"
                                                                               for r in rs)))
    console.print(t)
    python = os.path.realpath(sys.executable)
    plain, boxed = [], []
    for _ in range(repeats):  # interleaved, so machine load hits both alike
        t0 = time.monotonic()
        subprocess.run([python, "-I", "-S", "-B", "-c", "pass"], check=True)
        plain.append(time.monotonic() - t0)
        t0 = time.monotonic()
        r = run_sandboxed("pass")
        boxed.append(time.monotonic() - t0)
        assert r.ok, r
    p, b = sorted(plain)[len(plain) // 2], sorted(boxed)[len(boxed) // 2]
    console.print(f"start-up, median of {repeats}: plain `python -I -S -B -c pass` {1e3 * p:.1f} ms, "
                  f"run_sandboxed('pass') {1e3 * b:.1f} ms: overhead {1e3 * (b - p):.1f} ms per sandbox "
                  f"({b / p:.1f}x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--seccomp", action="store_true", help="print the seccomp filter's BPF instructions and exit")
    p.add_argument("--n", type=cli.positive_int, default=64, help="trivial programs per throughput row")
    p.add_argument("--workers", type=cli.positive_int_list, default=[1, 2, 4, 8], help="max_workers per row")
    p.add_argument("--repeats", type=cli.positive_int, default=10, help="start-up timing repeats")
    args = p.parse_args(argv)
    from rich.console import Console
    console = Console(width=None if sys.stdout.isatty() else 130)
    if args.seccomp:
        for i, ins in enumerate(seccomp_program()):
            console.print(f"{i:3d}  code={ins[0]:#04x} jt={ins[1]} jf={ins[2]} k={ins[3]:#x}")
        return
    t0 = time.time()
    hostile_table(console)
    throughput_table(console, args.n, tuple(args.workers), args.repeats)
    console.print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    cli.run(main)
