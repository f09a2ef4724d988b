"""The process sandbox's launcher: Python source run as `python -E -s -c LAUNCHER ...`.

It runs in the interpreter that then runs the task, and walls the task in before running
main.py: rlimits, new user/mount/PID/network/UTS/IPC namespaces, a minimal read-only root
made with pivot_root (the way bubblewrap builds one), no capabilities, Landlock and a seccomp
filter. Applied after exec rather than in a preexec_fn between fork and exec: the worker has
gRPC threads, and Python code in a forked child of a threaded process can deadlock or crash
(it did: at-fork handlers segfaulted under load).

Arguments (plain text, not JSON: importing json would add ~15 ms to every task's start):
  1 rlimits as NAME=value,...       2 nice         3 the worker's pid (for PR_SET_PDEATHSIG)
  4 walls to build, letters of WALLS; with "T" each is tried and what was built is reported
    on stderr as "hivemind-walls: <letters>" (the probe), without it a wall that cannot be
    built ends the task with ISOLATION_FAILED and a line starting with ISOLATION_MARKER
  5 size of the private /tmp in bytes   6 extra read-only binds, one path per line
  7 seccomp filter program as hex (empty: none)   8 the script, then its arguments.
"""

from __future__ import annotations

ISOLATION_FAILED = 125
ISOLATION_MARKER = b"hivemind: cannot isolate the task"
# N: namespaces (user, PID, network, UTS, IPC; always built), M: the minimal mount view,
# P: a fresh /proc for the task's PID namespace, L: Landlock, S: seccomp. Not probed: G, wait
# for one byte on stdin before anything else (the worker is putting the task in its cgroup).
WALLS = "NMPLS"
WORKSPACE = "/workspace"

LAUNCHER = r"""
def _hivemind():
    import os, resource, signal, sys
    A = sys.argv
    if "G" in A[4]:
        # Wait until the worker has put this process in the task's cgroup (one byte on stdin).
        os.read(0, 1)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    for item in filter(None, A[1].split(",")):
        name, value = item.split("=")
        which, value = getattr(resource, name), int(value)
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
    if int(A[2]):
        os.nice(int(A[2]))
    if not sys.platform.startswith("linux"):
        sys.argv = A[8:]
        with open(A[8], "rb") as f:
            return compile(f.read(), A[8], "exec")
    import ctypes
    F, trying = A[4], "T" in A[4]
    got = "N"
    libc = ctypes.CDLL(None, use_errno=True)
    L = ctypes.c_ulong
    libc.prctl.argtypes = (ctypes.c_int, L, L, L, L)
    cp = ctypes.c_char_p
    libc.mount.argtypes = (cp, cp, cp, L, cp)
    libc.umount2.argtypes = (cp, ctypes.c_int)

    def fail(what):
        err = os.strerror(ctypes.get_errno())
        os.write(2, b"hivemind: cannot isolate the task (%s: %s)\n" % (what.encode(), err.encode()))
        os._exit(125)

    def sysc(*args):
        return libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])

    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL: die with the worker
    def namespaces(got):
        # Namespaces and the mount view built here (bubblewrap builds them in "B" mode).
        if os.getppid() != int(A[3]):
            os._exit(137)
        uid, gid = os.getuid(), os.getgid()
        # New user, mount, PID, network, UTS and IPC namespaces: no network at all (not even the
        # host's loopback), and the task's tree gets a PID namespace of its own, so when it ends
        # the kernel ends every process it left behind, daemonised or not.
        if libc.unshare(0x10000000 | 0x20000 | 0x20000000 | 0x40000000 | 0x04000000 | 0x08000000):
            fail("unshare")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        # The launcher waits outside; inside, a small init (PID 1) builds the mount view, waits
        # for the task and then exits, which ends the namespace. The task itself is not PID 1,
        # so it keeps ordinary signal semantics. The verdict comes back through a pipe.
        r, w = os.pipe()
        if os.fork():
            os.close(w)
            while True:
                try:
                    os.wait()
                    break
                except InterruptedError:
                    continue
                except ChildProcessError:
                    break
            verdict = os.read(r, 16).decode() or "E125"
            if verdict[0] == "S":
                try:
                    signal.signal(int(verdict[1:]), signal.SIG_DFL)
                except (OSError, ValueError):  # SIGKILL and SIGSTOP keep their default anyway
                    pass
                os.kill(os.getpid(), int(verdict[1:]))  # die the same death as the task
            os._exit(int(verdict[1:]) if verdict[0] == "E" else 128 + int(verdict[1:]))
        os.close(r)
        libc.prctl(1, 9, 0, 0, 0)

        RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC = 1, 2, 4, 8, 32, 4096, 16384
        if "M" in F:
            ok = [True]

            def mnt(src, dst, fs, flags, data, what):
                if libc.mount(src, dst.encode() if dst else None, fs, flags, data) == 0:
                    return True
                if not trying:
                    fail(what)
                ok[0] = False
                return False

            def bind(fd, dst, ro, nodev=True):
                if not mnt(b"/proc/self/fd/%d" % fd, dst, None, BIND | REC, None, "bind " + dst):
                    return
                # A remount must keep the flags the host locked on the source mount.
                fl = os.statvfs(dst).f_flag
                keep = fl & (RDONLY | NODEV | NOEXEC | 1024 | 2048)
                keep |= (1 << 21) if fl & 4096 else 0  # relatime
                flags = BIND | REMOUNT | NOSUID | keep | (RDONLY if ro else 0)
                flags |= NODEV if nodev else 0
                mnt(None, dst, None, flags, None, "remount " + dst)

            mnt(None, "/", None, REC | (1 << 18), None, "make / private")
            # Every source is opened before the new root covers /tmp (a source may live there).
            here = os.open(".", os.O_PATH | os.O_CLOEXEC)
            system = []
            for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
                if os.path.islink(path):
                    system.append((path, os.readlink(path), None))
                elif os.path.isdir(path):
                    system.append((path, None, os.open(path, os.O_PATH | os.O_CLOEXEC)))
            etc = []
            for name in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates",
                         "pki", "crypto-policies", "localtime", "timezone", "alternatives",
                         "mime.types", "nsswitch.conf", "gai.conf"):
                path = "/etc/" + name
                if os.path.islink(path):
                    etc.append((path, os.readlink(path), None))
                elif os.path.exists(path):
                    etc.append((path, None, os.open(path, os.O_PATH | os.O_CLOEXEC)))
            for path in filter(None, A[6].split("\n")):
                if os.path.isdir(path):
                    system.append((path, None, os.open(path, os.O_PATH | os.O_CLOEXEC)))
            devices = []
            for name in ("null", "zero", "full", "random", "urandom", "tty"):
                try:
                    devices.append((name, os.open("/dev/" + name, os.O_PATH | os.O_CLOEXEC)))
                except OSError:
                    pass
            R = "/tmp"
            tmpfs = b"tmpfs"
            root_opts = b"mode=0755,size=1m,nr_inodes=4096"
            if mnt(tmpfs, R, tmpfs, NOSUID | NODEV, root_opts, "new root"):
                for path, link, fd in system + etc:
                    dst = R + path
                    os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
                    if link is not None:
                        os.symlink(link, dst)
                        continue
                    if os.path.isdir("/proc/self/fd/%d" % fd):
                        os.makedirs(dst, 0o755, exist_ok=True)
                    else:
                        open(dst, "w").close()
                    bind(fd, dst, True)
                os.mkdir(R + "/workspace", 0o755)
                bind(here, R + "/workspace", False)
                os.mkdir(R + "/dev", 0o755)
                small = b"mode=0755,size=64k,nr_inodes=64"
                mnt(tmpfs, R + "/dev", tmpfs, NOSUID | NOEXEC, small, "/dev")
                for name, fd in devices:
                    open(R + "/dev/" + name, "w").close()
                    bind(fd, R + "/dev/" + name, False, nodev=False)
                for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                    os.symlink(target, R + "/dev/" + name)
                size = b"size=%d" % int(A[5])
                os.mkdir(R + "/dev/shm", 0o755)
                mnt(tmpfs, R + "/dev/shm", tmpfs, NOSUID | NODEV, b"mode=1777," + size, "/dev/shm")
                os.mkdir(R + "/tmp", 0o755)
                mnt(tmpfs, R + "/tmp", tmpfs, NOSUID | NODEV, b"mode=1777," + size, "/tmp")
                os.mkdir(R + "/proc", 0o555)
                proc = (R + "/proc").encode()
                if libc.mount(b"proc", proc, b"proc", NOSUID | NODEV | NOEXEC, None) == 0:
                    got += "P"
                elif "P" in F and not trying:
                    fail("/proc")
                os.makedirs(R + "/etc", 0o755, exist_ok=True)
                for name, text in (
                    ("passwd", "root:x:0:0:root:/root:/bin/sh\n"
                               f"task:x:{uid}:{gid}:task:/tmp:/bin/sh\n"
                               "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
                    ("group", f"root:x:0:\ntask:x:{gid}:\nnogroup:x:65534:\n"),
                    ("hosts", "127.0.0.1 localhost hivemind\n::1 localhost\n"),
                    ("hostname", "hivemind\n"),
                ):
                    if not os.path.lexists(R + "/etc/" + name):
                        with open(R + "/etc/" + name, "w") as f:
                            f.write(text)
                os.chdir(R)
                pivot = {"x86_64": 155, "aarch64": 41, "armv7l": 218, "i686": 217}
                pivot = pivot.get(os.uname().machine)
                if ok[0] and pivot and sysc(pivot, b".", b".") == 0 and libc.umount2(b".", 2) == 0:
                    os.chdir("/")
                    flags = BIND | REMOUNT | RDONLY | NOSUID | NODEV
                    mnt(None, "/", None, flags, None, "read-only root")
                    os.chdir("/workspace")
                    if ok[0]:
                        got += "M"
                elif not trying:
                    fail("pivot_root")
                else:
                    got = got.replace("P", "")
            for _, _, fd in system + etc:
                if fd is not None:
                    os.close(fd)
            for _, fd in devices:
                os.close(fd)
            os.close(here)
        libc.sethostname(b"hivemind", 8)
        task = os.fork()
        if task:
            while True:
                try:
                    _, status = os.waitpid(task, 0)
                    break
                except InterruptedError:
                    continue
            if os.WIFSIGNALED(status):
                os.write(w, b"S%d" % os.WTERMSIG(status))
            else:
                os.write(w, b"E%d" % os.WEXITSTATUS(status))
            os._exit(0)
        os.close(w)
        libc.prctl(1, 9, 0, 0, 0)  # the task dies with its init too
        return got

    if "B" in F:
        # Inside bubblewrap, which made the namespaces and the view (sandbox_linux); its
        # reaper is PID 1 and ends the namespace when this process exits.
        got += "M" + ("P" if os.path.isdir("/proc/self") else "")
    else:
        got = namespaces(got)
    # No new privileges, and no capabilities left in the task's user namespace.
    libc.prctl(38, 1, 0, 0, 0)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (EINVAL past the last one)
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    if libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()) != 0:
        fail("drop capabilities")
    if "L" in F:
        # Landlock: read and run anything in the (already minimal) view, write only in the
        # workspace, /tmp, /dev/shm and to the device files; no TCP at all (ABI 4+); no
        # signals or abstract sockets outside the task (ABI 6+).
        abi = sysc(444, None, 0, 1)
        fs = 0
        if abi >= 1:
            fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
            fs |= 1 << 15 if abi >= 5 else 0
            attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
            ruleset = sysc(444, attr, 8 if abi < 4 else 16 if abi < 6 else 24, 0)

            class Rule(ctypes.Structure):
                _pack_ = 1
                _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

            done = ruleset >= 0
            read, write = 1 | 4 | 8, fs & ~(1 << 6 | 1 << 11)
            for path, access in (("/", read), ("/workspace", write), ("/tmp", write),
                                 ("/dev/shm", write), ("/dev", read | 2 | (fs & (3 << 14)))):
                if done and os.path.isdir(path):
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                    done = sysc(445, ruleset, 1, ctypes.byref(Rule(access & fs, fd)), 0) == 0
                    os.close(fd)
            if done and sysc(446, ruleset, 0) == 0:
                got += "L"
            if ruleset >= 0:
                os.close(ruleset)
        if "L" not in got and not trying:
            fail("landlock")
    if "S" in F and A[7]:
        program = ctypes.create_string_buffer(bytes.fromhex(A[7]))

        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        prog = Prog(len(A[7]) // 16, ctypes.addressof(program))
        if libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) == 0:  # PR_SET_SECCOMP, filter
            got += "S"
        elif not trying:
            fail("seccomp")
    if trying:
        os.write(2, b"hivemind-walls: %s\n" % got.encode())
    sys.argv = A[8:]
    with open(sys.argv[0], "rb") as f:
        return compile(f.read(), sys.argv[0], "exec")


__file__ = "main.py"
exec(globals().pop("_hivemind")())
"""
