"""The sandbox run by an unprivileged user, the common case on laptops and shared clusters: isolated through
user namespaces where the kernel allows them, else one warning line (and --require-isolation refuses).

As root (CI), the test makes such a user itself: a fresh uid with no account, no groups and no capabilities,
which can reach the interpreter (dirs like /root that only root may enter are covered by an empty tmpfs with the
interpreter's dirs bind-mounted back, in a mount namespace of the test's own).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from phiforge import sandbox

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, socket, sys
from phiforge import sandbox
from phiforge.sandbox import check_program, run_program

def run(code, **kw):
    r = run_program(code, **kw)
    return {"passed": r.passed, "status": r.status, "stdout": r.stdout, "stderr": r.stderr[-300:], "reason": r.reason}

secret, victim = sys.argv[1], sys.argv[2]
out = {"uid": os.geteuid(), "mode": sandbox.sandbox_mode(), "info": sandbox.sandbox_info()}
out["ids"] = run("import os\nprint(os.getuid(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])")
out["nested"] = run("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                    "print(libc.unshare(0x10000000 | 0x20000), ctypes.get_errno())")
out["home"] = run(f"import os\nprint(os.path.exists({secret!r}))")
out["write"] = run(f"open({victim!r}, 'w').write('pwned')")
out["net"] = run("import socket\nprint(sorted(n for _, n in socket.if_nameindex()))")
out["fork_bomb"] = run("import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                       "        time.sleep(0.01)", timeout=3, max_procs=32)
out["after_bomb"] = run("print('alive')")
import tempfile
sandbox._run_dir_base = lambda: tempfile.mkdtemp(dir="/tmp")  # run dirs on /tmp, maybe the root filesystem
out["run_dir_on_tmp"] = run("print('ok')")
out["right"] = check_program("def f():\n    return 1\n", "assert f() == 1\n").passed
out["exit"] = check_program("def f():\n    return 0\nimport os\nos._exit(0)\n", "assert f() == 1\n").reason
out["always_equal"] = check_program("class A:\n    __eq__ = lambda *a: True\ndef f():\n    return A()\n",
                                    "assert f() == 1\n").reason
try:
    sandbox.require_isolation()
    out["require"] = "ok"
except sandbox.SandboxError as e:
    out["require"] = str(e)
print(json.dumps(out))
'''


def _userns_allowed() -> bool:
    """Whether this kernel lets unprivileged users create user namespaces (the distro knobs, where present)."""
    for path, bad in (("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                      ("/proc/sys/user/max_user_namespaces", "0"),
                      ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1")):
        try:
            if Path(path).read_text().strip() == bad:
                return False
        except OSError:
            continue
    return True


def _as_unprivileged(args: list[str], uid: int, home: Path) -> subprocess.CompletedProcess:
    """Run `python args...` as uid (when we are root), in a mount namespace where that uid reaches the
    interpreter and this checkout; else as ourselves."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)}
    if os.geteuid() != 0:
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    needed = sandbox._interpreter_dirs(True) + [str(REPO)]
    blocked = sandbox._blocked_ancestors(needed)
    keep = [p for p in needed if sandbox._under(p, blocked)]
    keep = [p for p in keep if not sandbox._under(p, [q for q in keep if q != p])]
    helper = textwrap.dedent(f"""
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        def ok(ret, what):
            if ret != 0:
                raise OSError(ctypes.get_errno(), what)
        ok(libc.unshare(0x20000), "unshare")  # a mount namespace of our own
        ok(libc.mount(None, b"/", None, 16384 | (1 << 18), None), "private")
        fds = [(p, os.open(p, os.O_PATH)) for p in {keep!r}]
        for b in {blocked!r}:
            ok(libc.mount(b"tmpfs", b.encode(), b"tmpfs", 0, b"mode=755,size=1m"), b)
        for p, fd in fds:
            os.makedirs(p, exist_ok=True)
            ok(libc.mount(f"/proc/self/fd/{{fd}}".encode(), p.encode(), None, 4096 | 16384, None), p)
            os.close(fd)
        os.setgroups([])
        os.setgid({uid})
        os.setuid({uid})
        os.execve(sys.executable, [sys.executable] + sys.argv[1:], os.environ)
    """)
    return subprocess.run([sys.executable, "-c", helper, *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def unprivileged():
    """(uid, home, a dir outside home that the uid owns) for a run as an unprivileged user."""
    uid = os.geteuid() if os.geteuid() != 0 else 60000 + uuid.uuid4().int % 5000
    base = Path(tempfile.mkdtemp(prefix="sandbox-unpriv-", dir=REPO / "tests"))  # not under /tmp: not shadowed
    home, owned = base / "home", base / "owned"
    for d in (base, home, owned):
        d.mkdir(exist_ok=True)
        os.chown(d, uid, uid)
    base.chmod(0o755)
    try:
        yield uid, home, owned
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unprivileged_user_gets_isolation_or_a_warning(unprivileged):
    uid, home, owned = unprivileged
    secret, victim = home / "secret.txt", owned / "precious.txt"
    for f in (secret, victim):
        f.write_text("keep me")
        os.chown(f, uid, uid)
    script = owned / "probe.py"
    script.write_text(SCRIPT)
    proc = _as_unprivileged([str(script), str(secret), str(victim)], uid, home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] == uid != 0 and out["info"]["user"] == "unprivileged"
    # grading is the same with or without isolation
    assert out["right"] and out["exit"] == "the program exited (status 0) before the checks finished"
    assert out["always_equal"].startswith("non-builtin value")
    assert victim.read_text() == "keep me"
    if out["mode"] == "basic":
        assert not _userns_allowed(), f"user namespaces look allowed, yet: {out['info']}"
        assert proc.stderr.count("phiforge: warning: the code sandbox has no isolation") == 1
        assert out["require"].startswith("--require-isolation")
        return
    assert out["mode"] == "namespace" and out["require"] == "ok" and "phiforge: warning" not in proc.stderr
    assert out["ids"]["stdout"] == "0 0000000000000000\n"  # uid 0 of its own namespace, without a capability
    assert out["nested"]["stdout"].split()[0] == "-1"  # no namespace of its own (no mounts either)
    assert out["home"]["stdout"] == "False\n"  # $HOME is hidden
    # the user's own file: read-only here (or not even there: under $HOME or /tmp, which the run does not see)
    assert not out["write"]["passed"]
    assert "Read-only file system" in out["write"]["stderr"] or "No such file" in out["write"]["stderr"]
    assert out["net"]["stdout"] == "['lo']\n"
    assert not out["fork_bomb"]["passed"] and out["after_bomb"]["stdout"] == "alive\n"
    assert out["run_dir_on_tmp"]["stdout"] == "ok\n", out["run_dir_on_tmp"]

