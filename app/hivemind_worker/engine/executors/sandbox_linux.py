"""What the process sandbox can build on this Linux machine, probed once by a real launch.

The probe runs the launcher (launcher.py) in its "try" mode on an empty task and reads back
which walls it built, so what `doctor` and the log say is what a task really gets. Tasks are
then launched requiring exactly those walls: a wall that stops working later fails the task
with a clear reason rather than letting it run behind fewer.

Two ways to make the namespaces and the mount view: the launcher itself (unshare, mounts,
pivot_root), or bubblewrap (`bwrap`, Debian/Ubuntu package bubblewrap), with the launcher
inside it adding what bwrap does not (Landlock, seccomp, the per-namespace process cap). The
launcher's own way comes first: it needs nothing installed (the one-file binary on any
desktop) and it can wait, before it forks, until the worker has put it in its cgroup. Where
it cannot make a user namespace but bwrap can (Ubuntu 23.10+ allows unprivileged user
namespaces only to programs with an AppArmor profile, and bwrap ships one), tasks go through
bwrap. HIVEMIND_SANDBOX=bwrap or =builtin chooses one way only (troubleshooting, tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hivemind_worker.engine.executors import launcher, seccomp
from hivemind_worker.engine.executors import limits as plimits

log = logging.getLogger(__name__)

NOBODY = 65534
# The process-count cap of one task's tree (threads count too), as Docker's pids_limit.
MAX_PROCESSES = 256
PROBE_TIMEOUT = 30.0
# Where an interpreter may live without an extra bind: these are in every task's view.
_SYSTEM_DIRS = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/lib32/", "/libx32/")


@dataclass(frozen=True)
class Confinement:
    """The walls the process sandbox builds here, and how tasks are launched behind them."""

    walls: str  # letters of launcher.WALLS that the probe built
    python: str  # the interpreter tasks run with
    binds: tuple[str, ...]  # extra read-only folders in the task's view (the interpreter's)
    run_as: tuple[int, int] | None  # (uid, gid) tasks run as; None: the worker's own
    process_cap: bool  # RLIMIT_NPROC counts per user namespace (Linux 5.14+)
    landlock_abi: int
    seccomp_filter: bytes
    problem: str = ""  # why the namespaces could not be made; "" when they were
    bwrap: str = ""  # bubblewrap's path when tasks are launched through it
    bwrap_features: frozenset[str] = frozenset()  # options of this bwrap (--size)

    @property
    def usable(self) -> bool:
        """Whether tasks can run at all (the namespaces are the wall that is never skipped)."""
        return "N" in self.walls

    def lines(self) -> list[tuple[str, bool, str]]:
        """(wall, built, what it means) for doctor and the log, one per wall."""
        w = self.walls
        who = f"as uid {self.run_as[0]}, not root" if self.run_as else "as the worker's user"
        return [
            (
                "namespaces",
                "N" in w,
                f"user, PID, network (none at all), IPC and UTS namespaces; tasks run {who}"
                if "N" in w
                else self.problem or "not available",
            ),
            (
                "mount view",
                "M" in w,
                "a minimal read-only root: /usr, /etc essentials, /workspace, private /tmp"
                + (", fresh /proc" if "P" in w else ", no /proc (this kernel refused a new one)")
                + (f" (made by {self.bwrap})" if self.bwrap else "")
                if "M" in w
                else "not available: tasks see every file the worker's user can read",
            ),
            (
                "landlock",
                "L" in w,
                f"writes only in /workspace and /tmp (Landlock ABI {self.landlock_abi})"
                if "L" in w
                else "not available (needs Linux 5.13+ with Landlock enabled)",
            ),
            (
                "seccomp",
                "S" in w,
                f"{len(seccomp.DENIED)} kernel calls refused (ptrace, mount, bpf, keyctl, ...)"
                if "S" in w
                else f"not available on this {platform.machine()} kernel",
            ),
            (
                "process cap",
                self.process_cap and "N" in w,
                f"at most {MAX_PROCESSES} processes per task (per-namespace RLIMIT_NPROC)"
                if self.process_cap
                else "none: Linux older than 5.14 counts RLIMIT_NPROC per user, not per task",
            ),
        ]

    def summary(self) -> str:
        """One line for the log."""
        built = [name for name, ok, _ in self.lines() if ok]
        missing = [name for name, ok, _ in self.lines() if not ok]
        text = "process sandbox walls: " + (", ".join(built) or "none")
        if missing:
            text += "; missing: " + ", ".join(missing)
        if self.run_as:
            text += f"; tasks run as uid {self.run_as[0]} because the worker runs as root"
        return text


def task_identity() -> tuple[int, int] | None:
    """(uid, gid) for tasks when the worker runs as root (never root on the host), else None."""
    if os.geteuid() != 0:
        return None
    import pwd  # POSIX-only, and this module is Linux-only

    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return NOBODY, NOBODY


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than the owner can run `path` (every folder on the way searchable)."""
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        while parent and parent != "/":
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(parent)
    except OSError:
        return False
    return True


def task_python(python: str, run_as: tuple[int, int] | None) -> str:
    """The interpreter for tasks: `python` itself (resolved), or, when tasks run as another
    user who cannot reach it (an interpreter under /root), the system's python3."""
    real = os.path.realpath(python)
    if run_as is None or _reachable_by_others(real):
        return real
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        candidate = shutil.which("python3", path=folder)
        if candidate and _reachable_by_others(os.path.realpath(candidate)):
            log.info("tasks run with %s: %s cannot be run by uid %d", candidate, real, run_as[0])
            return os.path.realpath(candidate)
    return real


def interpreter_binds(python: str) -> tuple[str, ...]:
    """The interpreter's installation, when it is outside the folders every task sees."""
    if python.startswith(_SYSTEM_DIRS):
        return ()
    prefix = os.path.dirname(os.path.dirname(python))  # .../bin/python3 -> ...
    if not prefix or prefix == "/" or "\n" in prefix:
        return ()
    return (prefix,)


def process_cap_supported() -> bool:
    """Linux 5.14+ counts RLIMIT_NPROC per user namespace (ucounts), so it caps one task."""
    release = platform.release().split(".")
    try:
        major, minor = int(release[0]), int("".join(c for c in release[1] if c.isdigit()))
    except (IndexError, ValueError):
        return False
    return (major, minor) >= (5, 14)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 without Landlock."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        abi = int(libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1)))
    except (OSError, AttributeError):
        return 0
    return max(abi, 0)


@dataclass
class Launch:
    """A task's command and the descriptors it inherits; `owned` (pipes made for it) are
    closed by close() once it has started, the others belong to the caller."""

    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    owned: tuple[int, ...] = ()

    def close(self) -> None:
        for fd in self.owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.owned = ()


def launch(
    conf: Confinement,
    limits: plimits.ProcessLimits,
    script: str,
    argv: tuple[str, ...],
    *,
    walls: str,
    tmp_bytes: int,
    workspace_fd: int,
) -> Launch:
    """The command that runs `script` in the current folder (the workspace, also open as
    `workspace_fd`) behind `walls`; "T" tries each wall and reports, "G" waits on stdin."""
    if not conf.bwrap:
        return Launch(
            plimits.launch_argv(
                conf.python, limits, script, argv, walls=walls, tmp_bytes=tmp_bytes,
                binds=conf.binds, seccomp_filter=conf.seccomp_filter if "S" in walls else b"",
            )
        )  # fmt: skip
    inner = "B" + "".join(w for w in walls if w in "TLS")
    command = plimits.launch_argv(
        conf.python, limits, script, argv, walls=inner, tmp_bytes=tmp_bytes,
        seccomp_filter=conf.seccomp_filter if "S" in walls else b"",
    )  # fmt: skip
    prefix, fds = _bwrap_prefix(conf, tmp_bytes, workspace_fd)
    full = [*prefix, "--", *command]
    if "G" in walls:
        # bwrap forks at once; a shell waits for the go byte, then becomes bwrap (exec), so
        # bwrap and everything under it start inside the task's cgroup.
        full = ["/bin/sh", "-c", 'head -c 1 >/dev/null; exec "$@"', "sh", *full]
    return Launch(full, (*fds, workspace_fd), tuple(fds))


def _etc_files(uid: int, gid: int) -> dict[str, str]:
    return {
        "passwd": "root:x:0:0:root:/root:/bin/sh\n"
        f"task:x:{uid}:{gid}:task:/tmp:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "group": f"root:x:0:\ntask:x:{gid}:\nnogroup:x:65534:\n",
        "hosts": "127.0.0.1 localhost hivemind\n::1 localhost\n",
        "hostname": "hivemind\n",
    }


_BWRAP_ETC = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates", "pki",
    "crypto-policies", "localtime", "timezone", "alternatives", "mime.types",
    "nsswitch.conf", "gai.conf",
)  # fmt: skip


def _bwrap_prefix(
    conf: Confinement, tmp_bytes: int, workspace_fd: int
) -> tuple[list[str], list[int]]:
    """bubblewrap's arguments for the same view the launcher builds; the generated /etc
    files come through pipes (--ro-bind-data), returned to be closed after the start."""
    args = [
        conf.bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
        "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--hostname", "hivemind",
        "--cap-drop", "ALL",
    ]  # fmt: skip
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", *conf.binds):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for name in _BWRAP_ETC:
        path = "/etc/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            args += ["--ro-bind", path, path]
    size = ["--size", str(tmp_bytes)] if "--size" in conf.bwrap_features else []
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += [*size, "--perms", "1777", "--tmpfs", "/tmp"]
    args += [*size, "--perms", "1777", "--tmpfs", "/dev/shm"]
    # By path (open_work_dir_to_tasks makes it reachable under a root worker).
    args += ["--bind", os.readlink(f"/proc/self/fd/{workspace_fd}"), launcher.WORKSPACE]
    args += ["--chdir", launcher.WORKSPACE]
    fds: list[int] = []
    uid, gid = conf.run_as or (os.getuid(), os.getgid())
    for name, text in _etc_files(uid, gid).items():
        r, w = os.pipe()
        os.write(w, text.encode())
        os.close(w)
        fds.append(r)
        args += ["--ro-bind-data", str(r), "/etc/" + name]
    args += ["--remount-ro", "/"]
    return args, fds


def _bwrap() -> tuple[str, frozenset[str]]:
    """(bubblewrap's path or "", which of the options used here it knows)."""
    path = shutil.which("bwrap") or ""
    if not path:
        return "", frozenset()
    try:
        text = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "", frozenset()
    return path, frozenset(o for o in ("--size",) if o in text.split())


@functools.lru_cache(maxsize=4)
def probe(python: str) -> Confinement:
    """Launch an empty task with every wall tried, and see which were built (cached)."""
    run_as = task_identity()
    interpreter = task_python(python, run_as)
    binds = interpreter_binds(interpreter)
    filter_ = seccomp.build_filter() if seccomp.supported_machine() else b""
    process_cap = process_cap_supported()
    base = Confinement("", interpreter, binds, run_as, process_cap, landlock_abi(), filter_)
    choice = os.environ.get("HIVEMIND_SANDBOX", "").strip().lower()
    builtin = base if choice != "bwrap" else None
    if builtin is not None:
        builtin = _probe_with(builtin)
        if builtin.usable or choice == "builtin":
            return builtin
    bwrap, features = _bwrap()
    if not bwrap:
        return builtin or replace(base, problem=isolation_problem("bubblewrap is not installed"))
    through_bwrap = _probe_with(replace(base, bwrap=bwrap, bwrap_features=features))
    if through_bwrap.usable or builtin is None:
        return through_bwrap
    return builtin


def _probe_with(conf: Confinement) -> Confinement:
    folder = tempfile.mkdtemp(prefix="hivemind-probe-")
    run_as = conf.run_as
    try:
        Path(folder, "main.py").write_text("pass\n")
        if run_as is not None:
            for path in (folder, os.path.join(folder, "main.py")):
                os.chown(path, *run_as)
        workspace_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        started = launch(
            conf,
            plimits.ProcessLimits(max_processes=MAX_PROCESSES if conf.process_cap else None),
            "main.py",
            (),
            walls="T" + launcher.WALLS,
            tmp_bytes=16 << 20,
            workspace_fd=workspace_fd,
        )
        try:
            proc = subprocess.run(
                started.argv,
                cwd=folder,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=PROBE_TIMEOUT,
                check=False,
                env={"PATH": os.defpath, "LANG": "C.UTF-8"},
                pass_fds=started.pass_fds,
                **identity_kwargs(run_as),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return replace(conf, problem=f"the sandbox launcher could not start: {exc}")
        finally:
            started.close()
            os.close(workspace_fd)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
    walls = ""
    for line in proc.stderr.decode(errors="replace").splitlines():
        if line.startswith("hivemind-walls: "):
            walls = line.split(": ", 1)[1].strip()
    if not walls:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = detail[-1] if detail else f"exit code {proc.returncode}"
        how = f"through {conf.bwrap}" if conf.bwrap else "with the built-in launcher"
        log.warning("the process sandbox cannot isolate tasks here %s: %s", how, reason)
        return replace(conf, problem=isolation_problem(reason))
    return replace(conf, walls=walls)


def isolation_problem(reason: str) -> str:
    """One sentence for a machine where the namespaces cannot be made."""
    return (
        "this computer does not allow the process sandbox's isolation (unprivileged user "
        "namespaces are off or restricted, e.g. by AppArmor); install Docker, or allow user "
        f"namespaces ({reason})"
    )


def identity_kwargs(run_as: tuple[int, int] | None) -> dict[str, Any]:
    """Popen arguments that start the launcher as `run_as` (set in C between fork and exec)."""
    if run_as is None:
        return {}
    return {"user": run_as[0], "group": run_as[1], "extra_groups": []}


def open_work_dir_to_tasks(conf: Confinement, work_dir: Path) -> str:
    """Let bubblewrap, started as nobody under a root worker, reach the workspaces: it finds
    them by path (even with --bind-fd, bwrap 0.8 resolves the path). The work folder gets
    o+x (search, not listing); the workspaces themselves stay 0700 and nobody's. Returns
    why that cannot be done ("" when done or not needed)."""
    if not conf.bwrap or conf.run_as is None:
        return ""
    closed = _closed_parent(work_dir)
    if closed is not None:
        return (
            f"tasks run through bubblewrap as nobody, who cannot reach the work folder "
            f"{work_dir} ({closed} is closed to other users): {_WAY_OUT}"
        )
    mode = work_dir.stat().st_mode
    if not mode & stat.S_IXOTH:
        os.chmod(work_dir, stat.S_IMODE(mode) | stat.S_IXOTH)
    return ""


def reachable_by_tasks(folder: Path) -> str:
    """Why tasks running as nobody (under a root worker) cannot reach `folder`, which their
    view binds read-only (a runner's environment), or "" when they can."""
    closed = _closed_parent(folder)
    if closed is None:
        return ""
    return (
        f"tasks run as nobody (the worker runs as root), who cannot reach {folder} ({closed} "
        f"is closed to other users): {_WAY_OUT}"
    )


_WAY_OUT = (
    "set work_dir to a folder other users can pass through (e.g. /var/lib/hivemind-worker), "
    "or run the worker as an ordinary user"
)


def _closed_parent(folder: Path) -> Path | None:
    """The outermost folder above `folder` that other users cannot pass through, if any."""
    parents = [p for p in folder.resolve().parents if str(p) != "/"]
    return next((p for p in reversed(parents) if not _searchable_by_others(p)), None)


def passable_by_others(folder: Path) -> None:
    """Let others pass through `folder` (o+x, no listing or reading added), when it is ours."""
    try:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
    except OSError as exc:  # not ours, or gone: reachable_by_tasks says what is wrong
        log.debug("cannot open %s to tasks: %s", folder, exc)


def _searchable_by_others(folder: Path) -> bool:
    try:
        return bool(folder.stat().st_mode & stat.S_IXOTH)
    except OSError:
        return False


def chown_tree(root: Path, owner: tuple[int, int]) -> None:
    """Give a freshly prepared workspace to the task's uid, never following a symlink."""
    os.lchown(root, *owner)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), *owner)
