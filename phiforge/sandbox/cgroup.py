"""Whole-run limits: a cgroup bounds the memory and the process count of all of a sandbox run's processes
together (files it writes to a tmpfs count as memory too), and tells the parent that the memory limit killed
something.

Where the host allows it (`available()`):
  cgroup v2  when the evaluating process's own cgroup may have children with the memory and pids controllers
             (another user: inside a delegated cgroup, `systemd-run --user --scope -p Delegate=yes phiforge
             ...`). A cgroup that holds only the evaluating process is split (we move into a `phiforge` leaf) so
             that its children can have controllers; root otherwise uses a `phiforge` cgroup at the top of the
             hierarchy.
  cgroup v1  the memory hierarchy (and pids, when mounted) where we can create cgroups: root on hybrid hosts.
  neither    rlimits alone then bound each process of a run on its own; `available()` says why.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import time
from functools import lru_cache

_names = itertools.count()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mounts(fstype: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, root inside the hierarchy, super options) of every mount of `fstype`."""
    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        fields, _, tail = line.partition(" - ")
        parts, tail_parts = fields.split(), tail.split()
        if tail_parts and tail_parts[0] == fstype:
            out.append((parts[4], parts[3], set(tail_parts[2].split(",")) if len(tail_parts) > 2 else set()))
    return out


def _own_path(controller: str | None) -> str:
    """Our cgroup's path in the v2 hierarchy (controller None) or in the v1 one holding `controller`."""
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller in controllers.split(",")):
            return path
    raise OSError(f"not in a cgroup with {controller or 'cgroup v2'}")


def _join(mount: str, root: str, path: str) -> str:
    if root != "/" and path.startswith(root):
        path = path[len(root):]
    return os.path.join(mount, path.lstrip("/"))


def _probe(base: str) -> None:
    """Raise unless we may create cgroups under `base`. Tried three times, 50-100 ms apart: creating or removing a
    memory cgroup can fail for a moment (seen once in the test suite, on a busy cgroup v1 memory hierarchy, where
    the next try passed); a lasting refusal still raises."""
    probe = os.path.join(base, f"phiforge-probe-{os.getpid()}")
    for attempt in range(3):
        try:
            with contextlib.suppress(FileExistsError):  # left by a try whose rmdir failed
                os.mkdir(probe)
            os.rmdir(probe)
            return
        except OSError:
            if attempt == 2:
                raise
            time.sleep(0.05 * (attempt + 1))


NEED = {"memory", "pids"}


def _v2_base(base: str) -> str:
    """`base` once its children may have the memory and pids controllers (raises OSError saying why not)."""
    if not set(_read(os.path.join(base, "cgroup.controllers")).split()) >= NEED:
        raise OSError(f"cgroup v2 {base} lacks the memory and pids controllers")
    control = os.path.join(base, "cgroup.subtree_control")
    if not set(_read(control).split()) >= NEED:
        try:
            _write(control, "+memory +pids")
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise OSError(f"cannot enable memory and pids for children of {base}: {e.strerror}") from e
            # "no internal processes": a cgroup with processes cannot give its children controllers
            if _read(os.path.join(base, "cgroup.procs")).split() != [str(os.getpid())]:
                raise OSError(f"cgroup v2 {base} holds other processes; run phiforge in a cgroup of its own, e.g. "
                              "systemd-run --user --scope -p Delegate=yes phiforge ...") from e
            leaf = os.path.join(base, "phiforge")
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf)
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
            _write(control, "+memory +pids")
    _probe(base)
    return base


def _v2() -> list[str]:
    mounts = _mounts("cgroup2")
    if not mounts:
        raise OSError("no cgroup v2 hierarchy is mounted")
    mount, root, _ = mounts[0]
    own = _join(mount, root, _own_path(None))
    try:
        return [_v2_base(own)]
    except OSError:
        if os.geteuid() != 0 or os.path.samefile(own, mount):
            raise
    # root whose own cgroup cannot have children with controllers: a `phiforge` cgroup at the top of the
    # hierarchy (as container runtimes do; the top may have processes and enable controllers all the same)
    with contextlib.suppress(OSError):
        if not set(_read(os.path.join(mount, "cgroup.subtree_control")).split()) >= NEED:
            _write(os.path.join(mount, "cgroup.subtree_control"), "+memory +pids")
    top = os.path.join(mount, "phiforge")
    with contextlib.suppress(FileExistsError):
        os.mkdir(top)
    return [_v2_base(top)]


def _v1() -> list[str]:
    bases = []
    for controller in ("memory", "pids"):
        mounts = [m for m in _mounts("cgroup") if controller in m[2]]
        if not mounts:
            if controller == "memory":
                raise OSError("no cgroup v1 memory hierarchy is mounted")
            continue
        mount, root, _ = mounts[0]
        base = _join(mount, root, _own_path(controller))
        _probe(base)
        bases.append(base)
    return bases


def _sweep(base: str) -> None:
    """Remove the (empty) cgroups that evaluating processes which died without cleaning up left under `base`."""
    for name in os.listdir(base):
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == "phiforge" and parts[2].isdigit():
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(base, name))
            except OSError:
                continue


@lru_cache(maxsize=1)
def available() -> tuple[str, list[str], str]:
    """("cgroup v2" | "cgroup v1" | "", the dirs runs get their cgroups under, why not when "")."""
    whys = []
    for kind, find in (("cgroup v2", _v2), ("cgroup v1", _v1)):
        try:
            bases = find()
        except OSError as e:
            whys.append(f"{kind}: {e}")
            continue
        for base in bases:
            _sweep(base)
        return kind, bases, ""
    return "", [], "; ".join(whys)


class Cgroup:
    """A cgroup (one per v1 hierarchy) for sandbox runs: one run's own ('uid' and 'basic' modes: the launcher
    joins it by writing its pid into each of `procs`), or a fork server's, which joins it once and hosts its runs
    one at a time (a fork is born in its parent's cgroup: no per-run migration, which costs ~15 ms of RCU grace
    period on some kernels)."""

    def __init__(self, kind: str = "run") -> None:
        self.kind, bases, _ = available()
        name = f"phiforge-{kind}-{os.getpid()}-{next(_names)}"
        self.dirs: list[str] = []
        self._set: dict[str, int] = {}
        try:
            for base in bases:
                d = os.path.join(base, name)
                os.mkdir(d)
                self.dirs.append(d)
        except OSError:
            self.close()
            raise
        self.files = {f: os.path.join(d, f) for d in self.dirs for f in os.listdir(d)}
        self.procs = [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def set_limits(self, memory: int, max_procs: int) -> None:
        """Bound memory (bytes; swap none) and tasks; only what changed is written."""
        v2 = self.kind == "cgroup v2"
        mem, memsw = ("memory.max", "memory.swap.max") if v2 else ("memory.limit_in_bytes",
                                                                    "memory.memsw.limit_in_bytes")
        # v1: memory+swap may never be below memory, so the order depends on the direction
        order = [(mem, memory), (memsw, 0 if v2 else memory)]
        if not v2 and mem in self.files and memory > self._set.get(mem, int(_read(self.files[mem]))):
            order.reverse()
        for key, value in order + [("pids.max", max_procs)]:
            if key in self.files and self._set.get(key) != value:
                _write(self.files[key], str(value))
                self._set[key] = value

    def anon_bytes(self) -> int:
        """Anonymous memory charged here now (a fork server's own, between runs)."""
        if "memory.stat" not in self.files:
            return 0
        stat = dict(line.split() for line in _read(self.files["memory.stat"]).splitlines())
        return int(stat.get("anon", stat.get("rss", 0)))

    def oom_kills(self) -> int:
        """How many processes the memory limit made the kernel kill here, ever."""
        for key in ("memory.events", "memory.oom_control"):
            if key in self.files:
                counts = dict(line.split() for line in _read(self.files[key]).splitlines())
                return int(counts.get("oom_kill", 0))
        return 0

    def kill(self) -> None:
        """SIGKILL everything in the cgroup (the process limit keeps a fork bomb finite)."""
        for d in self.dirs:
            with contextlib.suppress(OSError):
                _write(os.path.join(d, "cgroup.kill"), "1")
            for _ in range(100):
                try:
                    pids = [int(p) for p in _read(os.path.join(d, "cgroup.procs")).split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.01)

    def close(self) -> None:
        """Kill what is left and remove the cgroup."""
        self.kill()
        for d in self.dirs:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)  # the last processes are still exiting
