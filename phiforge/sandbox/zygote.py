"""The sandbox's fork server ("zygote") of 'namespace' mode: `python -I -S zygote.py SOCKET_FD PRELOAD PROCS`.

A long-lived helper of the evaluating process, running as its user (root or not), one per parallel run slot. It
has loaded harness.py and imported PRELOAD (comma-joined: the modules programs use most) once, so that a run
costs a few forks instead of an interpreter start. Then it joins its cgroup (PROCS: newline-joined cgroup.procs
files, maybe none), whose limits the host sets before each run, so that every run is born inside it. It serves
one request at a time on the SOCK_SEQPACKET socket SOCKET_FD: a request names a host-side run dir (job, main.py,
tests.py, stdin in it; stdout, stderr, verdict and status are written there) and the run's settings; the answer
is b"ok" carrying a pidfd of the run's pid 1, or b"E <why>".

One run, by process (Z: the zygote):
  A  forked by Z: unshare()s new user, mount, pid, network and IPC namespaces and waits while Z writes its
     uid/gid maps (root: 0 and the run's fresh uid map to themselves; any other user: inside uid 0 is that
     user). It sets the new user namespace's own limit of user namespaces to 0 (so nothing in the run can make a
     namespace of its own, hence no mounts either), forks pid 1 and exits. Z is a subreaper, so pid 1 becomes
     Z's child; Z sends the host a pidfd of it and only then lets it go.
  pid 1  of the run's pid namespace: dies with Z (PR_SET_PDEATHSIG); is, with the program, the OOM killer's
     first choice (oom_score_adj 1000), not Z; opens the run dir's files, then builds the run's filesystem view:
     for a non-root user every mount read-only and $HOME (and the user's runtime dir) hidden; a fresh /proc;
     one tmpfs of disk_mb shared by /tmp, /var/tmp, /dev/shm and /run/lock (so disk_mb bounds the run as a
     whole); dirs other users cannot enter (/root of a pyenv) hidden behind an empty read-only tmpfs with the
     interpreter's own dirs bind-mounted back. It forks the program process, reaps everything until that one
     exits and writes its wait status and CPU seconds to run dir/status (or "E <why>" when setup failed). When
     pid 1 exits the kernel kills whatever is left in the namespace.
  the program process: stdio (and for a check, the harness's token pipe and verdict file as fds 3 and 4), no
     other fd, rlimits, no_new_privs, then root's run drops to the run's fresh uid (the kernel clears every
     capability) and a non-root run drops every capability; it reports on fd 5 that setup is done and runs
     harness.run(job): everything after that is the program's.
"""

import ctypes
import fcntl
import os
import re
import resource
import select
import socket
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and sys.path[0] == HERE:  # Python < 3.11 puts a script's own dir first even under -I
    del sys.path[0]
harness = types.ModuleType("phiforge_sandbox_harness")  # not importable by that name: programs cannot shadow it
harness.__file__ = os.path.join(HERE, "harness.py")
with open(harness.__file__, encoding="utf-8") as _f:
    exec(compile(_f.read(), harness.__file__, "exec"), harness.__dict__)

libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
# statvfs flag -> mount flag: a read-only remount must repeat the flags a mount already has (some are locked)
KEEP_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
              (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21))
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWIPC = 0x20000, 0x10000000, 0x8000000
CLONE_NEWNET, CLONE_NEWPID = 0x40000000, 0x20000000
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 36, 38, 47
# kernel filesystems a non-root user cannot write anyway: a failed read-only remount of one is no hole
PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "securityfs", "debugfs", "tracefs", "bpf",
             "pstore", "configfs", "fusectl", "binfmt_misc", "autofs", "hugetlbfs", "nsfs", "efivarfs", "selinuxfs"}
with open("/proc/sys/kernel/cap_last_cap") as _f:
    CAP_LAST = int(_f.read())


def check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), target)


def why(e: BaseException) -> bytes:
    """An error as the b"E ..." answer / status line the host reports."""
    return f"E {type(e).__name__}: {e}".encode(errors="replace")


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def parse(req: bytes) -> dict:
    keys = ("dir", "uid", "disk_mb", "site", "tmpfs", "hide", "keep", "rlimits", "env", "token", "readonly")
    cfg = dict(zip(keys, req.decode().split("\0")))

    def lines(a: str) -> list[str]:
        return [x for x in a.split("\n") if x]

    cfg.update(uid=int(cfg["uid"]), site=cfg["site"] == "1", tmpfs=lines(cfg["tmpfs"]), hide=lines(cfg["hide"]),
               keep=lines(cfg["keep"]), readonly=cfg["readonly"] == "1",
               rlimits=[(r.split("=")[0], int(r.split("=")[1])) for r in lines(cfg["rlimits"])],
               env=dict(x.split("=", 1) for x in lines(cfg["env"])))
    return cfg


# ------------------------------------------------------------------------------------------------- zygote


def serve(sock: socket.socket) -> None:
    """The zygote's loop: one run per request. Only the runs' processes leave it (by exiting)."""
    check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")
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
        try:
            pid1, go = spawn(sock, parse(req))
        except BaseException as e:
            sock.send(why(e))
            continue
        try:
            pidfd = os.pidfd_open(pid1)
            try:
                socket.send_fds(sock, [b"ok"], [pidfd])
            finally:
                os.close(pidfd)
            os.write(go, b"go")  # only now: a pid 1 nobody waits for must not run a program
        except BaseException as e:
            os.kill(pid1, 9)  # our unreaped child: the pid cannot have been reused
            sock.send(why(e))
        finally:
            os.close(go)


def spawn(sock: socket.socket, cfg: dict) -> tuple[int, int]:
    """Start one run (see the module docstring): (pid 1's pid, the pipe that lets it go)."""
    go_r, go_w = os.pipe()
    to_a, a_in = os.pipe()
    a_out, from_a = os.pipe()
    a = os.fork()
    if a == 0:
        for fd in (go_w, a_in, a_out):
            os.close(fd)
        first_child(sock, cfg, to_a, from_a, go_r)
    for fd in (go_r, to_a, from_a):
        os.close(fd)
    try:
        msg = os.read(a_out, 4096)
        if msg != b"u":
            raise OSError(msg.decode(errors="replace") or "the sandbox's first child died")
        if os.geteuid() == 0:  # pid 1 stays root (of its namespace); the program runs as the fresh uid
            ids = f"0 0 1\n{cfg['uid']} {cfg['uid']} 1\n"
            write_file(f"/proc/{a}/uid_map", ids)
            write_file(f"/proc/{a}/gid_map", ids)
        else:  # an unprivileged user may map just itself
            write_file(f"/proc/{a}/setgroups", "deny")
            write_file(f"/proc/{a}/uid_map", f"0 {os.geteuid()} 1\n")
            write_file(f"/proc/{a}/gid_map", f"0 {os.getegid()} 1\n")
        os.write(a_in, b"m")
        msg = os.read(a_out, 4096)
        if not msg.startswith(b"p"):
            raise OSError(msg.decode(errors="replace") or "the sandbox's first child died")
        return int(msg[1:]), go_w
    except BaseException:
        os.close(go_w)  # a pid 1 that was forked reads EOF and exits
        raise
    finally:
        os.close(a_in)
        os.close(a_out)
        os.waitpid(a, 0)


def first_child(sock: socket.socket, cfg: dict, to_a: int, from_a: int, go: int) -> None:
    """A: into the run's cgroups and new namespaces, then fork pid 1 and exit."""
    try:
        check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC), "unshare")
        os.write(from_a, b"u")
        if os.read(to_a, 1) != b"m":
            os._exit(1)
        write_file("/proc/sys/user/max_user_namespaces", "0")  # this namespace's own limit: no nesting
        pid1 = os.fork()
    except BaseException as e:
        os.write(from_a, why(e))
        os._exit(1)
    if pid1 == 0:
        os.close(to_a)
        os.close(from_a)
        init_process(sock, cfg, go)
    os.write(from_a, b"p%d" % pid1)
    os._exit(0)


# -------------------------------------------------------------------------------------------------- pid 1


def init_process(sock: socket.socket, cfg: dict, go: int) -> None:
    """pid 1 of the run's namespaces: the filesystem view, then reap until the program exits. Never returns
    (the program process, forked here, runs the job and exits)."""
    status = None
    try:
        if os.read(go, 2) != b"go":
            os._exit(0)
        check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "PR_SET_PDEATHSIG")  # our parent is the zygote now
        write_file("/proc/self/oom_score_adj", "1000")  # over the memory limit, the run dies, not the zygote
        os.close(go)
        os.close(sock.detach())
        os.setsid()
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted in here propagates to the host
        d = cfg["dir"]
        j = os.path.join
        if cfg["readonly"]:  # the run dir's files, open for writing, on a mount of their own: all others can turn
            mount(d, d, None, MS_BIND)  # read-only (a mount with writers cannot)
        status = os.open(j(d, "status"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(j(d, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fds = [os.open(j(d, "stdin") if os.path.exists(j(d, "stdin")) else "/dev/null", os.O_RDONLY),
               os.open(j(d, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), err]
        job = harness.read_job(d)
        if job.get("kind") == "check":
            token_r, token_w = os.pipe()
            os.write(token_w, cfg["token"].encode())
            os.close(token_w)
            fds += [token_r, os.open(j(d, "verdict"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
        if cfg["readonly"]:
            remount_readonly(cfg["tmpfs"] + cfg["hide"] + [d])
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        work = filesystem_view(cfg, d)
        harness.write_sources(job, work)
        setup_r, setup_w = os.pipe()
        child = os.fork()
    except BaseException as e:
        if status is not None:
            os.write(status, why(e))
        os._exit(125)
    if child == 0:
        os.close(setup_r)
        program_process(cfg, fds, setup_w, work, job)
    for fd in fds + [setup_w]:
        os.close(fd)
    setup = b""
    while chunk := os.read(setup_r, 4096):  # the program process closes it just before the job starts
        setup += chunk
    while True:  # reap everything until the program exits; exiting then kills whatever is left
        pid, st, usage = os.wait4(-1, 0)
        if pid == child:
            break
    if setup != b"ok":
        os.write(status, b"E " + (setup[2:] if setup.startswith(b"E ") else b"the program process died in setup"))
    else:
        os.write(status, b"%d %.3f" % (st, usage.ru_utime + usage.ru_stime))
    os._exit(0)


def remount_readonly(shadowed: list[str]) -> None:
    """Make every mount read-only: a non-root run's files are the user's own, so its uid protects nothing. Not
    those at or under `shadowed` dirs (about to be covered; the run dir, open for writing, is in one)."""
    with open("/proc/self/mountinfo") as f:
        mounts = [(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]),
                   line.split(" - ", 1)[1].split()[0]) for line in f]
    for path, fstype in mounts:
        if any(path == d or path.startswith(d + "/") for d in shadowed):
            continue
        try:
            st = os.statvfs(path)
        except OSError:
            continue  # under a mount we cannot enter: the program cannot either
        if st.f_flag & os.ST_RDONLY:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for st_flag, ms_flag in KEEP_FLAGS:
            if st.f_flag & st_flag:
                flags |= ms_flag
        try:
            mount(None, path, None, flags)
        except OSError:
            if fstype not in PSEUDO_FS:
                raise


def filesystem_view(cfg: dict, run_dir: str) -> str:
    """Mount the run's scratch tmpfs and hide what must be hidden (the host-side run dir too, where the scratch
    tmpfs does not cover it); returns the program's working dir."""
    j = os.path.join
    keep = [(p, os.open(p, os.O_PATH)) for p in cfg["keep"]]  # held open: we mount over their ancestors
    scratch = cfg["tmpfs"]  # world-writable dirs, /tmp first: one tmpfs, so disk_mb bounds all of them
    hide = cfg["hide"] + [run_dir] * (not any(run_dir.startswith(t + "/") for t in scratch))
    mount("tmpfs", scratch[0], "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,mode=755")
    for t in scratch:
        sub = j(scratch[0], t.strip("/").replace("/", "-"))
        os.mkdir(sub)
        os.chmod(sub, 0o1777)
    for t in scratch[1:] + scratch[:1]:  # /tmp last: its bind hides the other dirs' sources
        mount(j(scratch[0], t.strip("/").replace("/", "-")), t, None, MS_BIND)
    for t in hide:
        mount("tmpfs", t, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for p, fd in keep:
        os.makedirs(p, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        os.close(fd)
    for t in hide:
        mount(None, t, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    work = j(scratch[0], os.path.basename(run_dir))
    os.mkdir(work, 0o700)
    if cfg["uid"] >= 0:
        os.chown(work, cfg["uid"], cfg["uid"])
    return work


# ------------------------------------------------------------------------------------------ program process


def program_process(cfg: dict, fds: list[int], setup: int, work: str, job: dict) -> None:
    """Drop everything, then run the job (never returns)."""
    try:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds + [setup]]  # out of the targets' way
        for target, fd in enumerate(high[:-1]):
            os.dup2(fd, target)
        os.dup2(high[-1], harness.SETUP_FD)
        os.closerange(harness.SETUP_FD + 1, 1 << 30)  # pid 1's status file, the zygote's socket, ...
        if len(fds) == 3:  # a plain run sees only its stdio
            os.closerange(3, harness.SETUP_FD)
        os.chdir(work)
        for name, value in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (value, value))
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")  # no setuid binaries
        if cfg["uid"] >= 0:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])  # every uid leaves 0: the kernel clears all capabilities
        else:
            drop_capabilities()
        os.environ.clear()
        os.environ.update(cfg["env"])
        os.write(harness.SETUP_FD, b"ok")
        os.close(harness.SETUP_FD)
    except BaseException as e:
        os.write(harness.SETUP_FD, why(e))
        os._exit(125)
    if cfg["site"]:
        import site

        site.main()
    harness.run(job, work)


def drop_capabilities() -> None:
    """A non-root run stays uid 0 of its namespace (the only uid it may map): take every capability away, for
    good (bounding and ambient sets too, so no exec gives any back)."""
    for cap in range(CAP_LAST + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    check(libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")


if __name__ == "__main__":
    import gc

    for _name in sys.argv[2].split(","):
        try:
            __import__(_name)
        except ImportError:
            continue
    _sock = socket.socket(fileno=int(sys.argv[1]))
    for _path in filter(None, sys.argv[3].split("\n")):  # our cgroup, once: every run is forked inside it
        write_file(_path, str(os.getpid()))  # (after the imports: their memory stays charged to our parent's)
    gc.freeze()  # the preloaded objects stay shared: gc in a fork would otherwise touch (copy) their pages
    serve(_sock)
