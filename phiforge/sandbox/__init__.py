"""Run untrusted Python (model-written code) in a throw-away sandbox; grade it with checks that cannot be fooled
by how it exits or by what it returns.

Two entry points:
  check_program / check_programs   grading (eval's HumanEval and MBPP, `phiforge run`'s held-out exercises,
      synth's "keep code only if its tests pass"). The trusted harness (harness.py) runs the program, then its
      tests; a sample passes only when the harness reports, on a channel keyed by a per-run random token, that
      the checks ran to their end. Exit status alone never passes: exit()/sys.exit()/os._exit(0)/atexit/
      excepthook tricks fail, with a reason. `if __name__ == "__main__":` blocks do not run.
      Strict values (default): every value a program's callable hands back to the checks must be plain built-in
      data, recursively: None, bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset (exact
      types: no subclasses), plus the types a task's reference solution itself returns (`Check.allow_types`);
      else the sample fails with "non-builtin value". An object whose __eq__ says True to everything, a str
      subclass that equals anything, ... cannot pass. `strict=False` turns it off.
  run_program / run_programs   run a program as `__main__` and report how it ended (passed = exit status 0
      within the timeout, nothing killed by the memory limit). Not a verdict on code: graders use check_program.

Labels come from what the parent saw, never from what the program printed: "passed" (the harness's token, or
exit 0 for run_program), "timeout" (the parent's wall clock, or a CPU-limit kill after that much CPU time was
really used), "oom" (the run's cgroup recorded an OOM kill), "error" (the sandbox itself failed, as reported by
its own setup channel) and "failed" (anything else); `ExecResult.reason` says why in words.

The strongest isolation the host allows is picked once per process (`sandbox_mode()`, recorded by `sandbox_info()`
in eval results, `phiforge run`'s report and synth's stats):

"namespace" (root, or any user where the kernel allows unprivileged user namespaces, as bubblewrap uses them)
  Programs are forked from a fork server (zygote.py: a long-lived `python -I -S` helper per parallel run slot,
  started on first use, restarted if it dies) that has already imported the modules most programs use
  (`PRELOAD`), which saves the interpreter start and those imports (~15 ms a run). Each run gets fresh user, pid,
  mount, network and IPC namespaces:
  * no network at all (only a down loopback; abstract unix sockets are per network namespace); the run's pid 1
    and the program cannot see, signal or read /proc/<pid>/environ of any host process (the zygote included);
    when the program exits or is killed, pid 1 exits and the kernel kills every process left behind;
  * no nested namespaces: the run's user namespace may create no user namespace of its own, and the program has
    no capability in any namespace, so it cannot mount anything (no private tmpfs outside the run's limits);
  * one private tmpfs of disk_mb for /tmp, /var/tmp, /dev/shm and /run/lock together; the working dir is in it;
    dirs other users cannot enter (e.g. /root with pyenv) are replaced by an empty read-only tmpfs with just the
    interpreter's dirs bind-mounted back;
  * as root: the program runs as a fresh, unused uid/gid (no supplementary groups): it cannot write any host file
    that is not world-writable; as another user: the program is that user without any capability, every mount is
    read-only, and $HOME and the user's runtime dir (/run/user/<uid>: D-Bus and agent sockets) are hidden;
  * RLIMIT_NPROC counts only the run's own processes (per user namespace);
  * the program process has only its stdio (plus the harness's two fds for a check) and no_new_privs (setuid
    binaries give nothing); the zygote started with a scrubbed environment and never reads program text;
  * if the evaluating process dies, its zygotes exit and every run in flight is killed.
  Differences from a fresh interpreter, by design: the preloaded modules are already in sys.modules, and all
  programs of one zygote share its str hash seed (`random` is reseeded in every fork).
"uid" (root, but no namespaces): each program is a fresh `python -I -S` process with the unused uid, rlimits and
  a new session; afterwards every process of that uid is killed. NOT covered: network, writes to world-writable
  dirs, nested namespaces (a run's cgroup, if any, still counts their memory).
"basic" (no isolation possible: not root and no user namespaces): a fresh `python -I -S` process with rlimits and
  a new session killed as a whole, then any process carrying this run's marker variable. NOT covered: network,
  files the user can read or write, fork bombs beyond the user's own process limit, children that re-exec with a
  new environment after setsid, nested namespaces. One warning line says so; `require_isolation()`
  (`--require-isolation`) refuses to run instead.

Whole-run limits (cgroup.py): memory (tmpfs writes included) and the process count bound all of a run's
processes together in a cgroup (v2, else v1) where the host allows it: its zygote's, which hosts one run at a
time and whose limits are set before each (every fork is born in it: no per-run migration), or one of its own
in the 'uid' and 'basic' modes. An OOM kill there is what labels a run "oom". Else RLIMIT_AS bounds each
process alone (`sandbox_info()["limits"]` says which). Always:
a scrubbed environment (PATH, LANG and the run marker), no site-packages unless `site_packages=True`, rlimits on
CPU time, file size, core dumps and open files, a wall-clock timeout after which the whole run is SIGKILLed,
stdout/stderr captured through files in a host-side run dir (on /dev/shm when roomy; bounded by RLIMIT_FSIZE,
not our memory).
Never covered: reading world-readable host files (the repo, /etc) and world-connectable unix sockets (the system
D-Bus), CPU contention between runs, kernel exploits, and code written to attack the check harness itself from
inside its process (the checks run where the program runs, as in every execution grader: it can find the token
pipe or patch the harness through gc/ctypes). Nothing else relies on in-process guards: `__subclasses__` tricks
have nothing to escape from, the limits live in the kernel.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import secrets
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
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from phiforge.errors import PhiforgeError
from phiforge.sandbox import cgroup

MAX_CAPTURE = 1 << 20  # bytes of stdout/stderr kept in an ExecResult (the files themselves are capped by fsize)
_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable dirs: the run's own tmpfs
# modules the zygote imports once so that forked programs get them for free (the imports HumanEval/MBPP-style
# programs use most; `typing` alone is ~9 ms per fresh interpreter)
PRELOAD = ("typing", "collections", "math", "re", "itertools", "functools", "string", "heapq", "bisect",
           "random", "copy", "hashlib", "fractions", "decimal", "statistics", "operator", "json", "types",
           "dataclasses", "traceback", "io", "enum")
# the programs that run inside the sandbox, by path (`python -I -S FILE`: nothing of phiforge on the program's
# sys.path): the fork server of 'namespace' mode, and the harness, which is also the launcher of the others
_HERE = os.path.dirname(os.path.abspath(__file__))
_ZYGOTE = os.path.join(_HERE, "zygote.py")
_HARNESS = os.path.join(_HERE, "harness.py")
_ISOLATION = {"namespace": "user, pid, mount, network and IPC namespaces", "uid": "a fresh uid, no namespaces",
              "basic": "none"}


class SandboxError(PhiforgeError):
    """The sandbox cannot run as asked (e.g. --require-isolation on a host that allows no isolation)."""


@dataclass
class ExecResult:
    passed: bool  # check_program: the checks ran to their end; run_program: exit 0 in time, no OOM kill
    status: str  # 'passed' | 'failed' | 'timeout' | 'oom' | 'error' (the sandbox itself failed)
    stdout: str
    stderr: str
    returncode: int | None  # None when killed at the timeout; negative = killed by that signal
    duration: float  # wall seconds
    reason: str = ""  # why it did not pass, in words ("" when it passed)


@dataclass(frozen=True)
class Check:
    """One sample to grade: the program (model code), then its tests. HumanEval style: the tests define
    `check(candidate)` and `entry_point` names the function it gets; else the tests are module-level asserts
    (MBPP, procedural exercises). `allow_types`: "module.qualname" of non-builtin types the task's reference
    solution itself returns (collections.Counter; solution.Node for a class the program defines)."""

    program: str
    tests: str
    entry_point: str | None = None
    allow_types: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------- modes


_no_isolation_why = ""  # why sandbox_mode() came out 'basic'


@lru_cache(maxsize=1)
def sandbox_mode() -> str:
    """The isolation level this host allows: 'namespace', 'uid' or 'basic' (see the module docstring); 'basic'
    prints one warning line.

    PHIFORGE_SANDBOX_MODE=uid|basic asks for a weaker mode (tests use it to exercise the fallbacks); 'uid' still
    becomes 'basic' where another uid could not read the interpreter (e.g. pyenv under /root)."""
    global _no_isolation_why
    forced = os.environ.get("PHIFORGE_SANDBOX_MODE")
    if forced == "basic":
        _no_isolation_why = "PHIFORGE_SANDBOX_MODE=basic"
        return "basic"
    cgroup.available()  # first: a cgroup v2 split must happen before any zygote exists
    whys = []
    if forced != "uid":
        # probe with the real thing: a trivial program through the zygote (namespaces, mounts, ids, caps)
        probe = _run({"kind": "main", "program": "pass"}, "namespace", timeout=30, memory_mb=1024, stdin=None,
                     disk_mb=1, max_procs=8, site_packages=False, mkdtemp=_mkdtemp)
        if probe.passed:
            return "namespace"
        whys.append(f"no user namespaces: {probe.reason or probe.stderr.strip()[-200:]}")
    if os.geteuid() == 0:
        blocked = _blocked_ancestors(_interpreter_dirs(False))
        if not blocked:  # dropping to another uid needs that uid to reach the interpreter's files
            return "uid"
        whys.append(f"another uid cannot reach the interpreter under {blocked[0]}")
    _no_isolation_why = "; ".join(whys) or "not root"
    if forced != "uid":
        print(f"phiforge: warning: the code sandbox has no isolation on this host ({_no_isolation_why}); programs "
              "it runs can read and write your files and use the network (--require-isolation refuses instead)",
              file=sys.stderr)
    return "basic"


def sandbox_info() -> dict[str, str]:
    """What programs run under on this host: mode, user, isolation, limits (and why no isolation, in 'basic')."""
    mode = sandbox_mode()
    kind, _, why_not = cgroup.available()
    info = {"mode": mode, "user": "root" if os.geteuid() == 0 else "unprivileged", "isolation": _ISOLATION[mode],
            "limits": f"whole run ({kind})" if kind else f"per process (rlimits; {why_not})"}
    if mode == "basic":
        info["why"] = _no_isolation_why
    return info


def require_isolation() -> None:
    """Raise SandboxError when programs would run without isolation ('basic' mode)."""
    if sandbox_mode() == "basic":
        raise SandboxError(f"--require-isolation: the code sandbox has no isolation on this host "
                           f"({_no_isolation_why}); run as root or where unprivileged user namespaces are "
                           "allowed (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1)")


_mkdtemp = tempfile.mkdtemp  # for the probe (tests patch tempfile.mkdtemp to make runs fail, not the probe)


# -------------------------------------------------------------------------------------------------- API


def run_program(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, stdin: str | None = None,
                disk_mb: int = 64, max_procs: int = 64, site_packages: bool = False) -> ExecResult:
    """Run `code` as `__main__` in a fresh sandbox; passed = exit status 0 within `timeout` seconds.

    memory_mb caps the run's memory, disk_mb each written file and the run's private /tmp, max_procs its
    processes/threads; stdin is fed to the program (else /dev/null)."""
    return _run({"kind": "main", "program": code}, sandbox_mode(), timeout=timeout, memory_mb=memory_mb,
                stdin=stdin, disk_mb=disk_mb, max_procs=max_procs, site_packages=site_packages,
                mkdtemp=tempfile.mkdtemp)


def check_program(program: str, tests: str, entry_point: str | None = None, *, strict: bool = True,
                  allow_types: Sequence[str] = (), timeout: float = 10.0, memory_mb: int = 1024,
                  stdin: str | None = None, disk_mb: int = 64, max_procs: int = 64,
                  site_packages: bool = False) -> ExecResult:
    """Grade `program` with `tests` (see Check) through the check harness; passed = the checks ran to their end.
    strict=False lets the program's callables return any value. The limits are as for run_program."""
    job = {"kind": "check", "program": program, "tests": tests, "entry_point": entry_point or "",
           "strict": "1" if strict else "0", "allow_types": ",".join(allow_types)}
    return _run(job, sandbox_mode(), timeout=timeout, memory_mb=memory_mb, stdin=stdin, disk_mb=disk_mb,
                max_procs=max_procs, site_packages=site_packages, mkdtemp=tempfile.mkdtemp)


def _parallel(fn, items: Sequence, workers: int | None, desc: str) -> list[ExecResult]:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from phiforge.progress import progress

    results: list[ExecResult | None] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool, \
            progress(total=len(items), desc=desc, unit="prog") as bar:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results  # type: ignore[return-value]


def run_programs(codes: Sequence[str], *, workers: int | None = None, progress_desc: str | None = None,
                 **kw) -> list[ExecResult]:
    """run_program over many programs on `workers` parallel sandboxes (default: CPU count); order preserved."""
    return _parallel(lambda c: run_program(c, **kw), codes, workers, progress_desc or "sandbox")


def check_programs(checks: Sequence[Check], *, workers: int | None = None, progress_desc: str | None = None,
                   strict: bool = True, **kw) -> list[ExecResult]:
    """check_program over many samples on `workers` parallel sandboxes (default: CPU count); order preserved."""
    def one(c: Check) -> ExecResult:
        return check_program(c.program, c.tests, c.entry_point, strict=strict, allow_types=c.allow_types, **kw)

    return _parallel(one, checks, workers, progress_desc or "sandbox")


# ------------------------------------------------------------------------------------------------ one run


def _run(job: dict[str, str], mode: str, *, timeout: float, memory_mb: int, stdin: str | None, disk_mb: int,
         max_procs: int, site_packages: bool, mkdtemp) -> ExecResult:
    tmp = group = None
    token = secrets.token_hex(16)
    cpu_limit = max(1, int(timeout) + 1)
    try:
        tmp = mkdtemp(prefix="phiforge-sbx-", dir=_run_dir_base())
        env = _base_env()
        env["PHIFORGE_SANDBOX_RUN"] = os.path.basename(tmp)  # the run marker ('basic' mode kills by it)
        uid = _new_uid() if os.geteuid() == 0 and mode in ("namespace", "uid") else -1
        rlimits = [("RLIMIT_CPU", cpu_limit), ("RLIMIT_FSIZE", disk_mb << 20), ("RLIMIT_CORE", 0),
                   ("RLIMIT_NOFILE", 256)]
        if not cgroup.available()[0]:  # per process: the best there is without a cgroup
            rlimits.append(("RLIMIT_AS", memory_mb << 20))
        if uid >= 0 or mode == "namespace":  # a fresh uid / user namespace owns no process yet: a per-run limit
            rlimits.append(("RLIMIT_NPROC", max_procs))
        _write_job(tmp, job, stdin)
        if mode == "namespace":
            returncode, cpu, timed_out, setup, oom, duration = _run_forked(
                tmp, uid, env, rlimits, timeout, disk_mb, site_packages, token, memory_mb, max_procs)
        else:
            if cgroup.available()[0]:
                group = cgroup.Cgroup("run")
                group.set_limits(memory_mb << 20, max_procs + 2)  # + the launcher's own
            returncode, cpu, timed_out, setup, duration = _run_exec(
                tmp, mode, uid, env, rlimits, timeout, site_packages, token, group.procs if group else [], job)
            oom = group is not None and group.oom_kills() > 0
        stdout = _read_capped(os.path.join(tmp, "stdout"))
        stderr = _read_capped(os.path.join(tmp, "stderr"))
        verdict = b""
        with contextlib.suppress(OSError), open(os.path.join(tmp, "verdict"), "rb") as f:
            verdict = f.read(8192)
    except OSError as e:  # the host could not start the sandbox (e.g. no disk space): not the program's fault
        return ExecResult(False, "error", "", "", None, 0.0, f"the sandbox could not start: {e}")
    finally:
        if group is not None:
            group.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    status, reason = _label(job["kind"] == "check", token, verdict, returncode, cpu, cpu_limit, timed_out, oom,
                            setup, timeout, memory_mb, disk_mb)
    return ExecResult(status == "passed", status, stdout, stderr, returncode, duration, reason)


def _label(check: bool, token: str, verdict: bytes, returncode: int | None, cpu: float, cpu_limit: int,
           timed_out: bool, oom: bool, setup: str, timeout: float, memory_mb: int, disk_mb: int) -> tuple[str, str]:
    """(status, reason) from what the parent saw: the verdict file against the token, the wait status and CPU
    time, the wall clock, the cgroup's OOM count, the sandbox's own setup channel. Never the program's output."""
    if check and verdict == b"PASS " + token.encode():
        return "passed", ""
    if not check and returncode == 0 and not timed_out and not oom:
        return "passed", ""
    if setup:
        return "error", f"the sandbox failed: {setup}"
    if timed_out:
        return "timeout", f"no result within {timeout:g} s"
    if returncode == -signal.SIGXCPU and cpu >= cpu_limit - 0.5:
        return "timeout", f"used its {cpu_limit} s of CPU time"
    if oom:
        return "oom", f"exceeded the run's {memory_mb} MB memory limit"
    if returncode is None:
        return "error", "the sandbox's pid 1 died without recording how the program ended"
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        if returncode == -signal.SIGXFSZ:
            return "failed", f"wrote a file past the {disk_mb} MB limit ({sig})"
        return "failed", f"killed by {sig}"
    if check:
        if b"PASS " + token.encode() in verdict:
            return "failed", "the program wrote into the check harness's verdict channel"
        if verdict.startswith(b"FAIL ") and b"PASS " not in verdict:
            return "failed", verdict[5:].decode("utf-8", "replace")  # the harness's words (the label is ours)
        if returncode == 0:
            return "failed", "the program exited (status 0) before the checks finished"
    return "failed", f"exit status {returncode}"


def _write_job(d: str, job: dict[str, str], stdin: str | None) -> None:
    """The run dir's inputs: `job` (key=value lines), main.py, tests.py, stdin."""
    with open(os.path.join(d, "job"), "w", encoding="utf-8") as f:
        f.write("".join(f"{k}={v}\n" for k, v in job.items() if k not in ("program", "tests")))
    for key, name in (("program", "main.py"), ("tests", "tests.py")):
        if key in job:
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                f.write(job[key])
    if stdin is not None:
        with open(os.path.join(d, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)


@lru_cache(maxsize=1)
def _run_dir_base() -> str | None:
    """Where run dirs go: /dev/shm when it is roomy (tmpfs: deleting a run dir on a disk with `discard` costs
    ~3 ms, more than a whole forked run), else /tmp, else the default temp dir. A run dir holds at most the job,
    stdin and stdout/stderr of up to disk_mb each. (In 'namespace' mode both are covered by the run's own tmpfs,
    so a non-root run, whose other mounts are made read-only, never sees its run dir.)"""
    with contextlib.suppress(OSError):
        st = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= 1 << 30:
            return "/dev/shm"
    return "/tmp" if os.access("/tmp", os.W_OK | os.X_OK) else None


def _base_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _new_uid() -> int:
    """An unused uid for one run: far above any real account, random so concurrent runs don't share one."""
    return random.randrange(1 << 20, 1 << 30)


def _read_capped(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CAPTURE + 1)
    except FileNotFoundError:
        return ""
    if len(data) > MAX_CAPTURE:
        data = data[:MAX_CAPTURE] + b"\n[... output truncated]"
    return data.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------ namespace mode


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


def _private_dirs() -> list[str]:
    """A non-root user's own dirs that a run must not see: $HOME, the runtime dir (D-Bus and agent sockets)."""
    dirs = [os.path.expanduser("~"), os.environ.get("XDG_RUNTIME_DIR", ""), f"/run/user/{os.geteuid()}"]
    return [os.path.realpath(d) for d in dirs if d and os.path.isdir(d) and os.path.realpath(d) != "/"]


def _under(p: str, dirs: list[str]) -> bool:
    return any(p == d or p.startswith(d.rstrip("/") + "/") for d in dirs)


@lru_cache(maxsize=2)
def _mount_plan(site_packages: bool) -> tuple[list[str], list[str], list[str]]:
    """(world-writable dirs for the run's tmpfs, dirs to hide behind an empty tmpfs, interpreter dirs to
    bind-mount back)."""
    tmpfs = [d for d in _WRITABLE_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    private = _blocked_ancestors(_interpreter_dirs(site_packages)) if os.geteuid() == 0 else _private_dirs()
    hide = [d for d in sorted(set(private)) if not _under(d, tmpfs)]
    hide = [d for d in hide if not _under(d, [h for h in hide if h != d])]  # the topmost of nested ones
    keep = [p for p in _interpreter_dirs(site_packages) if _under(p, tmpfs + hide)]
    keep = [p for p in keep if not _under(p, [q for q in keep if q != p])]  # binds are recursive
    return tmpfs, hide, keep


class _ZygoteGone(OSError):
    """The fork server died or stopped answering (it is replaced; the run is retried once)."""


class _Zygote:
    """One fork server process (zygote.py), our end of its socket and its cgroup (its runs' whole-run limits,
    set before each run: it serves one run at a time, from spawn until that run has ended)."""

    def __init__(self) -> None:
        self.cgroup = cgroup.Cgroup("zygote") if cgroup.available()[0] else None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _ZYGOTE, str(theirs.fileno()), ",".join(PRELOAD),
                 "\n".join(self.cgroup.procs if self.cgroup else [])],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=_base_env(), cwd="/", start_new_session=True)
        except OSError:
            if self.cgroup:
                self.cgroup.close()
            raise
        finally:
            theirs.close()
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
            if self.cgroup:
                self.cgroup.close()


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


def _checkout_zygote() -> _Zygote:
    """An idle, live zygote (a new one if none is idle); it serves one run until handed back."""
    while True:
        with _zygote_lock:
            z = _idle_zygotes.pop() if _idle_zygotes else None
        if z is None:
            return _Zygote()
        if z.proc.poll() is None:
            return z
        z.close()


def _run_forked(tmp: str, uid: int, env: dict[str, str], rlimits: list[tuple[str, int]], timeout: float,
                disk_mb: int, site_packages: bool, token: str, memory_mb: int,
                max_procs: int) -> tuple[int | None, float, bool, str, bool, float]:
    """'namespace' mode: the run is forked by a zygote; we wait on (and at the timeout kill) its pid 1.
    Returns (returncode, CPU seconds, timed out, setup failure or "", OOM-killed, wall seconds)."""
    tmpfs, hide, keep = _mount_plan(site_packages)
    request = "\0".join([tmp, str(uid), str(disk_mb), str(int(site_packages)), "\n".join(tmpfs), "\n".join(hide),
                         "\n".join(keep), "\n".join(f"{k}={v}" for k, v in rlimits),
                         "\n".join(f"{k}={v}" for k, v in env.items()), token,
                         "0" if os.geteuid() == 0 else "1"]).encode()
    z = _checkout_zygote()
    try:
        t0 = time.perf_counter()
        for attempt in range(2):  # a zygote that died is replaced and the run retried once
            kills = 0
            if z.cgroup:  # the zygote's own memory stays outside the run's budget
                z.cgroup.set_limits((memory_mb << 20) + z.cgroup.anon_bytes(), max_procs + 4)
                kills = z.cgroup.oom_kills()
            try:
                pidfd = z.spawn(request)
                break
            except _ZygoteGone:
                z.close()
                if attempt:
                    raise
                z = _Zygote()
        try:
            timed_out = not _wait_fd(pidfd, timeout)
            if timed_out:
                # pid 1's death tears the namespace down; the pidfd turns readable once everything in it is gone
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                _wait_fd(pidfd, None)
        finally:
            os.close(pidfd)
        duration = time.perf_counter() - t0
        oom = z.cgroup is not None and z.cgroup.oom_kills() > kills
    finally:
        if z.sock.fileno() >= 0:
            with _zygote_lock:
                _idle_zygotes.append(z)
    text = ""
    with contextlib.suppress(OSError), open(os.path.join(tmp, "status")) as f:
        text = f.read().strip()
    if text.startswith("E "):
        return None, 0.0, timed_out, text[2:], oom, duration
    if not text:  # pid 1 died before the program ended: the timeout, or the memory limit killed it
        return None, 0.0, timed_out, "", oom, duration
    st, cpu = text.split()
    return os.waitstatus_to_exitcode(int(st)), float(cpu), timed_out, "", oom, duration


def _wait_fd(fd: int, timeout: float | None) -> bool:
    """Block until `fd` is readable (a pidfd: the process exited); False at the timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


# -------------------------------------------------------------------------------------- uid / basic modes


def _run_exec(tmp: str, mode: str, uid: int, env: dict[str, str], rlimits: list[tuple[str, int]], timeout: float,
              site_packages: bool, token: str, procs: list[str],
              job: dict[str, str]) -> tuple[int | None, float, bool, str, float]:
    """'uid' / 'basic' mode: a fresh interpreter runs harness.py as the launcher in a new session; leftovers are
    killed after. Returns as _run_forked."""
    if mode == "uid":  # the program's cwd must be writable by its uid
        os.chown(tmp, uid, uid)
    setup_r, setup_w = os.pipe()
    fds = [setup_w]
    if job["kind"] == "check":
        token_r, token_w = os.pipe()
        os.write(token_w, token.encode())
        os.close(token_w)
        fds += [token_r, os.open(os.path.join(tmp, "verdict"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
    argv = [sys.executable, "-I", "-S", _HARNESS, str(uid), str(int(site_packages)),
            "\n".join(f"{k}={v}" for k, v in rlimits), "\n".join(procs), ",".join(map(str, fds))]
    stdin_path = os.path.join(tmp, "stdin")
    t0 = time.perf_counter()
    timed_out = False
    try:
        with open(os.path.join(tmp, "stdout"), "wb") as out, open(os.path.join(tmp, "stderr"), "wb") as err, \
                open(stdin_path if os.path.exists(stdin_path) else os.devnull, "rb") as inp:
            proc = subprocess.Popen(argv, stdin=inp, stdout=out, stderr=err, cwd=tmp, env=env, pass_fds=fds,
                                    start_new_session=True)
    finally:
        for fd in fds:
            os.close(fd)
    try:
        if not _wait_pid(proc.pid, timeout):
            timed_out = True
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        _, st, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(st)
        duration = time.perf_counter() - t0
        _reap_leftovers(mode, uid, f"PHIFORGE_SANDBOX_RUN={env['PHIFORGE_SANDBOX_RUN']}", proc.pid)
        setup = os.read(setup_r, 4096)
    finally:
        os.close(setup_r)
    if setup != b"ok":
        return None, 0.0, timed_out, (setup[2:] if setup.startswith(b"E ") else b"the launcher died in setup"
                                      ).decode(errors="replace"), duration
    return (None if timed_out else proc.returncode), usage.ru_utime + usage.ru_stime, timed_out, "", duration


def _wait_pid(pid: int, timeout: float) -> bool:
    """Wait for child `pid` to exit without reaping it, blocking on a pidfd (no sleep-polling); False at the
    timeout."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # kernel < 5.3: poll
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.005)
        return False
    try:
        return _wait_fd(fd, timeout)
    finally:
        os.close(fd)


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


def _reap_leftovers(mode: str, uid: int, marker: str, pgid: int) -> None:
    """Kill whatever the program left behind ('uid' and 'basic' modes; the run's cgroup, if any, is emptied
    after this)."""
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
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
