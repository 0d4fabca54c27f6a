"""What runs inside the sandbox, in the program's own process, once the sandbox around it is set up.

It has two jobs (the run dir's `job` file says which):

main   `run_program`: the program runs as `__main__` and the process exits as a fresh interpreter would (exit
       status, tracebacks, atexit, non-daemon threads, flushing). Its exit status is all it reports.
check  `check_program`, the trusted check harness; a pass is proof that the checks ran to their end:
       1. the program runs as module `solution`: its `if __name__ == "__main__":` block does not run. exit() /
          sys.exit() there fails the sample ("called exit() before the checks ran"); so does any exception.
       2. the tests run in a namespace of their own: a copy of the program's, in which every callable the program
          bound (not a library function or class it imported) is wrapped so that each value it returns is checked
          to be plain built-in data (`plain`), unless strict values are off. The program's own calls (recursion,
          helpers) are not wrapped. HumanEval-style tests define `check`, which the harness calls with the
          wrapped entry point; MBPP-style tests are module-level asserts.
       3. only if the tests returned, no value was refused, no trace/profile hook is installed and the builtins
          are the ones the program started with, the harness writes `PASS <token>` to fd 4, where the token is
          the run's random one that the harness read from fd 3 and closed before any program code ran; any failure writes
          `FAIL <reason>`; then the process exits at once (no atexit, no waiting for the program's threads).
          The parent passes a sample only when fd 4's file holds exactly `PASS <token>`: exit status never
          passes anything, so os._exit(0), sys.exit(0), atexit or excepthook tricks all fail.

The checks share the program's process, as in every execution grader: code written to attack this harness in
particular (finding the token in the harness's frame or through gc, or patching the harness with ctypes) can
still forge a pass. What
this closes are the generic ways real model output passes without being right (see the issues in the package
docstring).

Run as a script (`python -I -S harness.py UID SITE RLIMITS CGROUP_PROCS FDS`, in the run dir) it is the launcher
of the 'uid' and 'basic' modes: it joins the run's cgroups, sets the rlimits, drops to UID (when >= 0), reports
on fd 5 that setup is done and runs the job in the same interpreter. Standard library only, and only cheap
imports before the program runs.
"""

import os
import sys

# bound before any program code runs: the program may replace os.read / os.write / sys.gettrace ...
_read, _write, _exit, _gettrace, _getprofile = os.read, os.write, os._exit, sys.gettrace, sys.getprofile
TOKEN_FD, VERDICT_FD, SETUP_FD = 3, 4, 5
PLAIN = (type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset)
_CONTAINERS = (list, tuple, set, frozenset)
_MISSING = object()


class NonBuiltinValue(BaseException):
    """A wrapped callable returned something other than plain built-in data (BaseException: tests that catch
    Exception cannot swallow it; it is recorded before it is raised anyway)."""


def read_job(d: str) -> dict:
    """The job in run dir `d`: `job` holds key=value lines, main.py the program and tests.py the tests."""
    job = {}
    with open(os.path.join(d, "job"), encoding="utf-8") as f:
        for line in f.read().splitlines():
            key, _, value = line.partition("=")
            job[key] = value
    for key, name in (("program", "main.py"), ("tests", "tests.py")):
        path = os.path.join(d, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                job[key] = f.read()
    return job


def write_sources(job: dict, work: str) -> None:
    """Copies of the code in the working dir, for tracebacks that show source lines."""
    for key, name in (("program", "main.py"), ("tests", "tests.py")):
        if job.get(key):
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write(job[key])


def run(job: dict, work: str) -> None:
    """Run the job and exit the process (never returns)."""
    if job.get("kind") == "check":
        run_check(job, work)
    run_main(job["program"], work)


# ------------------------------------------------------------------------------------------------ main


def _exit_code(e: SystemExit) -> int:
    """The exit status Python gives an uncaught SystemExit."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    sys.stderr.write(f"{e.code}\n")
    return 1


def _finish(code: int) -> int:
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


def run_main(src: str, work: str) -> None:
    """Run `src` as `__main__`, then exit as the interpreter would, minus its final teardown: tearing down
    modules inherited from a fork server would write to (and copy) every page shared with it (~10 ms), and
    Python never promised __del__ runs for objects still alive at exit."""
    import types

    main = types.ModuleType("__main__")
    main.__file__ = os.path.join(work, "main.py")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [main.__file__]
    try:
        exec(compile(src, main.__file__, "exec"), main.__dict__)
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException as e:
        e.__traceback__ = e.__traceback__.tb_next  # from the program's own frame on, as `python FILE` shows it
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
        if isinstance(e, KeyboardInterrupt):  # Python exits "killed by SIGINT" then
            _finish(code)
            import signal

            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    _exit(_finish(code))


# ----------------------------------------------------------------------------------------------- check


def type_ids(extra: str = "") -> frozenset[int]:
    """ids of the types `plain` accepts: PLAIN plus `extra`, comma-separated "module.qualname" names of types a
    task's reference solution itself returns (collections.Counter; solution.Node for a class the program must
    define). A name that does not resolve adds nothing. By id: a metaclass cannot fake it."""
    ids = {id(t) for t in PLAIN}
    for name in filter(None, extra.split(",")):
        module, _, qualname = name.strip().rpartition(".")
        try:
            obj = __import__(module or "builtins", fromlist=["_"])
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except Exception:
            continue
        if isinstance(obj, type):
            ids.add(id(obj))
    return frozenset(ids)


def plain(value: object, allowed: frozenset[int]) -> type | None:
    """None when `value` is plain data (recursively only types in `allowed`), else the first other type found.

    Exact types, never isinstance: an int or str subclass can override __eq__ as easily as any class. Walking
    exact lists, tuples, sets, frozensets and dicts runs no code of the program's."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        t = type(v)
        if id(t) not in allowed:
            return t
        if id(v) in seen:
            continue
        if t is list or t is tuple or t is set or t is frozenset:
            seen.add(id(v))
            stack.extend(v)
        elif t is dict:
            seen.add(id(v))
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            for base in (dict, *_CONTAINERS):  # an allowed library container (Counter, OrderedDict, ...)
                if base in t.__mro__:
                    seen.add(id(v))
                    stack.extend(base.__iter__(v))
                    if base is dict:
                        stack.extend(dict.values(v))
                    break
    return None


def _type_name(t: type) -> str:
    try:
        return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__
    except BaseException:
        return "?"


def _library_object(value: object, own: str) -> bool:
    """True for a function or class importable under its own name from a module other than the program's (a
    library function or class the program imported: `from collections import Counter`)."""
    try:
        module = value.__module__
        obj = sys.modules.get(module) if module != own else None
        for part in value.__qualname__.split("."):
            obj = getattr(obj, part)
        return obj is value
    except BaseException:
        return False


def _guard(fn, name: str, allowed: frozenset[int], refused: list[str]):
    """`fn` as the tests see it: every value it returns must be plain data."""
    def guarded(*args, **kwargs):
        value = fn(*args, **kwargs)
        bad = plain(value, allowed)
        if bad is not None:
            why = f"non-builtin value: {name}() returned a {_type_name(bad)}"
            refused.append(why)
            raise NonBuiltinValue(why)
        return value

    guarded.__name__ = guarded.__qualname__ = name
    return guarded


def _tampering(builtins_before: dict) -> str | None:
    """Why the process can no longer be trusted to run checks, or None."""
    import builtins

    threading = sys.modules.get("threading")
    if _gettrace() is not None or _getprofile() is not None or (
            threading is not None and (getattr(threading, "_trace_hook", None) is not None
                                       or getattr(threading, "_profile_hook", None) is not None)):
        return "the program installed a trace or profile hook (sys.settrace / sys.setprofile)"
    changed = [k for k, v in builtins_before.items() if builtins.__dict__.get(k, _MISSING) is not v]
    if changed:
        return "the program replaced builtins: " + ", ".join(sorted(changed)[:5])
    return None


def _failure(stage: str, e: BaseException) -> str:
    """A one-line reason for an exception raised while `stage` ran."""
    if isinstance(e, NonBuiltinValue):
        return str(e.args[0])
    if isinstance(e, SystemExit):
        return f"the program called exit() {stage}"
    try:
        where = ""
        tb = e.__traceback__
        while tb is not None:  # the innermost line of the tests, for a failed assert
            if tb.tb_frame.f_code.co_filename.endswith("tests.py"):
                where = f" at tests.py line {tb.tb_lineno}"
            tb = tb.tb_next
        text = str(e)
        return f"{type(e).__name__}{': ' + text[:200] if text else ''}{where} {stage}"
    except BaseException:
        return f"an exception {stage}"


def _verdict(record: bytes) -> None:
    try:
        _write(VERDICT_FD, record[:4000])
    except OSError:  # the program closed fd 4: no verdict fails the sample anyway
        return


def _fail(reason: str, e: BaseException | None = None) -> None:
    _verdict(b"FAIL " + reason.encode("utf-8", "replace"))
    if e is not None:
        try:
            import traceback

            tb = e.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename == __file__:  # the harness's own frames
                tb = tb.tb_next
            sys.stderr.write("".join(traceback.format_exception(type(e), e, tb)))
        except BaseException:
            pass
    _flush()
    _exit(1)


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:  # the program's own replacement for sys.stdout
            continue


def run_check(job: dict, work: str) -> None:
    """The check harness (see the module docstring); exits the process."""
    import builtins
    import types

    # The token is taken, and its pipe closed, before any program code runs: the program cannot read it from
    # fd 3 and write its own `PASS <token>`.
    try:
        token = _read(TOKEN_FD, 256)
        os.close(TOKEN_FD)
    except OSError:
        token = b""
    strict = job.get("strict", "1") == "1"
    entry = job.get("entry_point") or None
    tests = job.get("tests", "")
    if not tests.strip() and entry is None:
        _fail("there are no checks to run")
    module = types.ModuleType("solution")
    module.__file__ = os.path.join(work, "main.py")
    module.__builtins__ = builtins
    sys.modules["solution"] = sys.modules["__main__"] = module
    sys.argv = [module.__file__]
    ns = module.__dict__
    before = dict(ns)
    builtins_before = dict(builtins.__dict__)
    try:
        exec(compile(job["program"], module.__file__, "exec"), ns)
    except BaseException as e:
        _fail(_failure("before the checks ran", e), e)
    why = _tampering(builtins_before)
    if why:
        _fail(why)

    # the tests' namespace: the program's names, its own callables wrapped
    refused: list[str] = []
    allowed = type_ids(job.get("allow_types", ""))  # after the program: it may name the program's own class
    checks = dict(ns)
    checks["__builtins__"] = builtins  # the program may have rebound its own __builtins__
    checks["__name__"] = "checks"
    if strict:
        for name, value in ns.items():
            if (name not in before or before[name] is not value) and callable(value) \
                    and not _library_object(value, "solution"):
                checks[name] = _guard(value, name, allowed, refused)
    if entry is not None and entry not in checks:
        _fail(f"the program does not define {entry}()")
    try:
        exec(compile(tests, os.path.join(work, "tests.py"), "exec"), checks)
        if entry is not None:
            checks["check"](checks[entry])
    except BaseException as e:
        _fail(refused[0] if refused else _failure("during the checks", e), e)
    why = refused[0] if refused else _tampering(builtins_before)
    if why:
        _fail(why)
    _verdict(b"PASS " + token)
    _flush()
    _exit(0)


# -------------------------------------------------------------------------------------- launcher (exec modes)


def launch(argv: list[str]) -> None:
    """'uid' / 'basic' mode: set up this fresh interpreter (cwd: the run dir), then run the job.

    argv: uid, site ("1": load site-packages), rlimits (newline-joined NAME=VALUE), the run's cgroup.procs files
    (newline-joined), the inherited fds of the setup pipe[, token pipe, verdict file] (comma-joined), which move
    to SETUP_FD[, TOKEN_FD, VERDICT_FD]."""
    import fcntl
    import resource

    uid, site = int(argv[1]), argv[2] == "1"
    inherited = [int(fd) for fd in argv[5].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in inherited]  # out of the targets' way
    for fd in inherited:
        os.close(fd)
    for target, fd in zip((SETUP_FD, TOKEN_FD, VERDICT_FD), high):
        os.dup2(fd, target, inheritable=False)
        os.close(fd)
    try:
        for path in filter(None, argv[4].split("\n")):  # into the run's cgroups before anything else runs
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        job = read_job(".")
        for r in filter(None, argv[3].split("\n")):
            name, _, value = r.partition("=")
            resource.setrlimit(getattr(resource, name), (int(value), int(value)))
        if uid >= 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _write(SETUP_FD, b"ok")
        os.close(SETUP_FD)
    except BaseException as e:
        _write(SETUP_FD, f"E {type(e).__name__}: {e}".encode(errors="replace"))
        _exit(125)
    if site:
        import site as site_module

        site_module.main()
    run(job, os.getcwd())


if __name__ == "__main__":
    launch(sys.argv)
