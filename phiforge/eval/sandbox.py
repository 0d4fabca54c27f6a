"""Run untrusted Python programs (model-written code) in a throw-away subprocess and report pass/fail.

Every program runs in a fresh `python -I -S` process (isolated mode: no PYTHON* variables, no user site, no
script dir on sys.path; `-S`: no site-packages, because HumanEval/MBPP solutions need only the standard library
and `site` costs ~20 ms per program here — pass `site_packages=True` for programs that import numpy & co.).
The strongest isolation the host allows is picked once per process (`sandbox_mode()`):

"namespace" (we are root and `unshare` works — this machine and CI)
  * fresh network, pid, mount and IPC namespaces (`unshare --net --pid --ipc --mount --fork --kill-child
    --mount-proc`): no network at all (only a down loopback); the program runs under a root-owned pid 1 of its
    own pid namespace, so it cannot see, signal or read /proc/<pid>/environ of any host process, and when it
    exits or is killed, pid 1 exits and the kernel kills every process left behind (setsid daemons included);
  * private tmpfs mounts on every world-writable host directory (/tmp, /var/tmp, /dev/shm, /run/lock), so writes
    there land in memory that vanishes with the namespace; the working directory is a fresh dir in that tmpfs;
    directories on the interpreter's path that an unprivileged user cannot enter (e.g. /root with pyenv) are
    replaced by an empty tmpfs with just the interpreter bind-mounted back, which also hides the rest of them;
  * the program runs as a fresh, unused uid/gid (no supplementary groups), so it cannot write or delete any
    host file that is not world-writable, and RLIMIT_NPROC (which the kernel ignores for root) stops fork bombs
    without touching other sandboxes (each run has its own uid).
"uid" (root, but unshare is not permitted): the unused uid, rlimits, a new session; afterwards every process of
  that uid is killed (`kill -9 -1` run as that uid). NOT covered: network, writes to world-writable dirs.
"basic" (not root): rlimits, a new session killed as a whole, and any process still carrying this run's
  marker variable in its environment is killed afterwards. NOT covered: network, files the user can write,
  reading the user's files, fork bombs beyond the user's own process limit, children that re-exec with a new
  environment after calling setsid.

Always: a scrubbed environment (only PATH, LANG and the run marker), rlimits on CPU time, address space, file
size, core dumps and open files, a wall-clock timeout after which the whole process group / namespace is
SIGKILLed, stdout/stderr captured through files (so their size is bounded by RLIMIT_FSIZE, not our memory).
Never covered: reading world-readable host files (the repo, /etc), CPU/memory contention between runs beyond
the rlimits, kernel exploits. Nothing relies on in-process guards (no patched builtins), so `__subclasses__`
tricks have nothing to escape from: the limits live in the kernel.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache

MAX_CAPTURE = 1 << 20  # bytes of stdout/stderr kept in an ExecResult (the files themselves are capped by fsize)
_SETUP_EXIT = 125  # launcher exit code when the sandbox itself could not be set up
_SETUP_TAG = "phiforge-sandbox: setup failed:"
_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable dirs to shadow with tmpfs


@dataclass
class ExecResult:
    passed: bool  # exit code 0 within the timeout
    status: str  # 'passed' | 'failed' | 'timeout' | 'oom' | 'error' (the sandbox itself failed)
    stdout: str
    stderr: str
    returncode: int | None  # None when killed at the timeout; negative = killed by that signal
    duration: float  # wall seconds


# The launcher runs inside the sandbox (as root inside the namespaces, when there are namespaces), sets the
# namespace up, drops privileges and then runs the program in the same interpreter, as `__main__`, so each
# program costs one interpreter start. It only imports os, sys, resource (+ ctypes for mount).
# With namespaces it forks once: the root parent stays pid 1 of the namespace (pid 1 ignores signals it has
# no handler for, which would change how programs that signal themselves behave), reaps orphans, and records
# the program's wait status in a file of the host-side run dir that the program itself cannot reach.
_LAUNCHER = r'''
import os, resource, sys
# argv: dir uid mounts disk_mb site tmpfs hide keep rlimits (lists are newline-joined; no json: it imports re)
lines = lambda a: [x for x in a.split("\n") if x]
cfg = dict(zip(("dir", "uid", "mounts", "disk_mb", "site", "tmpfs", "hide", "keep", "rlimits"), sys.argv[1:]))
cfg.update(uid=int(cfg["uid"]), mounts=cfg["mounts"] == "1", site=cfg["site"] == "1",
           tmpfs=lines(cfg["tmpfs"]), hide=lines(cfg["hide"]), keep=lines(cfg["keep"]),
           rlimits=[(r.split("=")[0], int(r.split("=")[1])) for r in lines(cfg["rlimits"])])
try:
    with open(os.path.join(cfg["dir"], "main.py"), "rb") as f:
        src = f.read()
    uid = cfg["uid"]
    if cfg["mounts"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        def mount(source, target, fstype, flags, data):
            if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                          data and data.encode()) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), target)
        MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384
        status = os.open(os.path.join(cfg["dir"], "status"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # hold the interpreter's dirs open: we are about to mount over one of their ancestors
        keep = [(p, os.open(p, os.O_PATH)) for p in cfg["keep"]]
        for d in cfg["tmpfs"]:
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%sm,mode=1777" % cfg["disk_mb"])
        for d in cfg["hide"]:
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for p, fd in keep:
            os.makedirs(p, exist_ok=True)
            mount("/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC, None)
            os.close(fd)
        work = os.path.join("/tmp", os.path.basename(cfg["dir"]))
        os.mkdir(work, 0o700)
        os.chown(work, uid, uid)
        with open(os.path.join(work, "main.py"), "wb") as f:  # for tracebacks that show source lines
            f.write(src)
        child = os.fork()
        if child:  # pid 1: reap everything until the program exits; exiting then kills whatever is left
            while True:
                pid, st = os.wait()
                if pid == child:
                    break
            os.write(status, b"%d" % st)
            code = os.waitstatus_to_exitcode(st)
            os._exit(code if code >= 0 else 128 - code)
        os.close(status)
    else:
        work = cfg["dir"]
    os.chdir(work)
    for name, value in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (value, value))
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
except Exception as e:
    sys.stderr.write("phiforge-sandbox: setup failed: %r\n" % (e,))
    sys.stderr.flush()
    os._exit(125)
if cfg["site"]:
    import site
    site.main()
import types
main = types.ModuleType("__main__")
main.__file__ = os.path.join(work, "main.py")
main.__builtins__ = __builtins__
sys.modules["__main__"] = main
sys.argv = [main.__file__]
del cfg, f, uid, work, lines, resource
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
    unshare = shutil.which("unshare")
    if unshare and forced != "uid":
        probe = subprocess.run([unshare, *_UNSHARE_FLAGS, "true"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_base_env(), timeout=30)
        if probe.returncode == 0:
            return "namespace"
    # dropping to another uid only works if that uid can still reach the interpreter's files
    return "uid" if not _blocked_ancestors(_interpreter_dirs(False)) else "basic"


_UNSHARE_FLAGS = ("--net", "--pid", "--ipc", "--mount", "--fork", "--kill-child", "--mount-proc")


def _base_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _interpreter_dirs(site_packages: bool) -> list[str]:
    """Directories the program's interpreter must be able to read (stdlib, extension modules, site-packages)."""
    import sysconfig

    paths = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
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


def _ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


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
    """Run `code` as `__main__` in a fresh sandboxed interpreter; passed = exit code 0 within `timeout` seconds.

    memory_mb caps the address space, disk_mb each written file (and the private /tmp), max_procs the number of
    processes/threads; stdin is fed to the program (else /dev/null).
    """
    mode = sandbox_mode()
    tmp = tempfile.mkdtemp(prefix="phiforge-sbx-")
    marker = f"PHIFORGE_SANDBOX_RUN={os.path.basename(tmp)}"
    uid = _new_uid() if mode in ("namespace", "uid") else -1
    rlimits = [("RLIMIT_CPU", max(1, int(timeout) + 1)), ("RLIMIT_AS", memory_mb << 20),
               ("RLIMIT_FSIZE", disk_mb << 20), ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", 256)]
    if uid >= 0:  # a fresh uid owns no process yet, so this is a per-run limit
        rlimits.append(("RLIMIT_NPROC", max_procs))
    tmpfs, hide, keep = _mount_plan(site_packages) if mode == "namespace" else ([], [], [])
    argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, tmp, str(uid), str(int(mode == "namespace")),
            str(disk_mb), str(int(site_packages)), "\n".join(tmpfs), "\n".join(hide), "\n".join(keep),
            "\n".join(f"{name}={value}" for name, value in rlimits)]
    if mode == "namespace":
        argv = [shutil.which("unshare") or "unshare", *_UNSHARE_FLAGS, *argv]
    env = _base_env()
    env["PHIFORGE_SANDBOX_RUN"] = marker.split("=", 1)[1]
    try:
        with open(os.path.join(tmp, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if mode == "uid":  # the program's cwd must be writable by its uid
            os.chown(tmp, uid, uid)
        stdin_file = None
        if stdin is not None:
            with open(os.path.join(tmp, "stdin"), "w", encoding="utf-8") as f:
                f.write(stdin)
            stdin_file = open(os.path.join(tmp, "stdin"), "rb")  # noqa: SIM115 (closed once Popen has it)
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        t0 = time.perf_counter()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(argv, stdin=stdin_file or subprocess.DEVNULL, stdout=out, stderr=err,
                                        cwd=tmp, env=env, start_new_session=True, close_fds=True)
            finally:
                if stdin_file is not None:
                    stdin_file.close()
            try:
                returncode = _wait(proc, timeout)
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
                if mode == "namespace":
                    # kill the namespace's pid 1 directly: its exit tears the namespace down, and unshare (which
                    # waits for it) returns only once every process inside is gone
                    init = _scan_procs(lambda pid: _ppid_of(pid) == proc.pid)
                    _kill(init)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5 if init else 0)
                with contextlib.suppress(OSError):  # unshare itself / the session in the other modes
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            duration = time.perf_counter() - t0
            _reap_leftovers(mode, uid, marker, proc.pid)
        status_path = os.path.join(tmp, "status")
        if not timed_out and os.path.exists(status_path):  # namespace mode: the program's own wait status
            with open(status_path) as f:
                text = f.read().strip()
            if text:
                returncode = os.waitstatus_to_exitcode(int(text))
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
    except OSError as e:  # the host could not start the sandbox (e.g. no disk space): not the program's fault
        return ExecResult(False, "error", "", f"{_SETUP_TAG} {e}", None, 0.0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    status = _classify(returncode, timed_out, stderr)
    return ExecResult(status == "passed", status, stdout, stderr, returncode, duration)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    """proc.wait(timeout) without its sleep-polling (which adds up to 50 ms per run): block on a pidfd."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:  # kernel < 5.3
            fd = None
        if fd is not None:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                if not poller.poll(timeout * 1000):
                    raise subprocess.TimeoutExpired(proc.args, timeout)
            finally:
                os.close(fd)
    return proc.wait(timeout=timeout)


def _reap_leftovers(mode: str, uid: int, marker: str, pgid: int) -> None:
    """Kill whatever the program left behind (in 'namespace' mode the kernel already did)."""
    if mode == "namespace":
        return
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
