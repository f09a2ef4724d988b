"""A hostile task against the real process sandbox, with the worker as root and as a person.

Each test runs tasks through a real ProcessExecutor in a worker process of its own
(tests/helpers/sandbox_runner.py): once as root (as with `sudo`; tasks must then run as
nobody), and once as an ordinary user (`setpriv --reuid=nobody`, or the test's own user
when it is not root); each both with the built-in launcher and through bubblewrap
(HIVEMIND_SANDBOX=bwrap, the way taken where only bwrap may make user namespaces).
Every wall is checked against a control: the same uid, outside the sandbox, can do what the
task is refused (read the secret, write the open folder, connect to the socket).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import hivemind_worker
from hivemind_worker.engine.executors import sandbox_linux
from hivemind_worker.tasks import MiB

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process sandbox"),
]

RUNNER = Path(__file__).resolve().parents[1] / "helpers" / "sandbox_runner.py"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
NOBODY_SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"cannot run the sandbox tests under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _python_for_nobody() -> str | None:
    """An interpreter of this minor version that nobody can run (the venv's may be under
    /root), to which the venv's packages are given through PYTHONPATH."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (
        os.path.realpath(sys.executable),
        f"/usr/bin/{version}",
        f"/usr/local/bin/{version}",
    ):
        if os.path.exists(candidate) and sandbox_linux._reachable_by_others(candidate):
            return candidate
    return None


@dataclass
class Worker:
    """A worker process of one identity, and folders the tests share with it."""

    mode: str  # "root" or "user", then "-bwrap" when tasks go through bubblewrap
    command: list[str]
    env: dict[str, str]
    work_dir: Path
    task_uid: int  # whom tasks run as: nobody under a root worker, else the worker's user

    def run(self, *tasks: dict[str, Any]) -> list[dict[str, Any]]:
        proc = subprocess.run(
            [*self.command, str(RUNNER), str(self.work_dir)],
            input=json.dumps(list(tasks)),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results: list[dict[str, Any]] = json.loads(proc.stdout)
        for result in results:
            result["files"] = {k: base64.b64decode(v) for k, v in result["files"].items()}
        return results

    def as_task_user(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command outside the sandbox as the uid tasks run as (the control)."""
        prefix = NOBODY_SETPRIV if os.geteuid() == 0 and self.task_uid != 0 else []
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False)


def _open_dir(prefix: str) -> Path:
    """A fresh folder on the host that anyone may enter (under /tmp, not under pytest's 0700
    tmp_path), so that only the sandbox stands between a task and what is in it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(params=["root", "user", "root-bwrap", "user-bwrap"])
def worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    mode, _, how = str(request.param).partition("-")
    if how == "bwrap" and shutil.which("bwrap") is None:
        _unavailable("bubblewrap is not installed (Debian package bubblewrap)")
    base = _open_dir("hivemind-sandbox-")
    work_dir = base / "work"
    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "HOME": str(base)}
    env["HIVEMIND_SANDBOX"] = how or "builtin"
    app_dir = str(Path(hivemind_worker.__file__).resolve().parents[1])
    site = sysconfig.get_paths()["purelib"]
    try:
        if mode == "root":
            if os.geteuid() != 0:
                _unavailable("the worker-as-root case needs the tests to run as root")
            command = [sys.executable]
            task_uid = sandbox_linux.NOBODY
            owner = (0, 0)
        elif os.geteuid() == 0:
            python = _python_for_nobody()
            if python is None or shutil.which("setpriv") is None:
                _unavailable("no setpriv, or no Python nobody can run, for the ordinary-user case")
            assert python is not None
            command = [*NOBODY_SETPRIV, python]
            env["PYTHONPATH"] = os.pathsep.join([app_dir, site])
            task_uid = sandbox_linux.NOBODY
            owner = (sandbox_linux.NOBODY, sandbox_linux.NOBODY)
        else:
            command = [sys.executable]
            task_uid = os.getuid()
            owner = (os.getuid(), os.getgid())
        work_dir.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(work_dir, *owner)
        yield Worker(str(request.param), command, env, work_dir, task_uid)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _outcome(result: dict[str, Any]) -> str:
    return f"{result['status']}: {result['error']}\n{result['output'][-2000:]}"


# ---------------------------------------------------------------------------- the view


@pytest.mark.timeout(300)
def test_task_cannot_write_outside_its_workspace(worker: Worker) -> None:
    tag = uuid.uuid4().hex[:8]
    open_dir = _open_dir("hivemind-open-")
    open_dir.chmod(0o777)  # the task's uid may write here, were it not for the sandbox
    try:
        # Control: outside the sandbox the task's uid can write in the open folder.
        control = worker.as_task_user("touch", str(open_dir / "control"))
        assert control.returncode == 0, control.stderr
        targets = [
            f"/etc/hivemind-pwned-{tag}",
            f"/hivemind-escape-{tag}",
            f"/usr/hivemind-{tag}",
            f"{open_dir}/escape-{tag}",
            f"{worker.work_dir}/escape-{tag}",
            f"{worker.env['HOME']}/escape-{tag}",
        ]
        source = (
            "import os\n"
            f"for path in {targets!r}:\n"
            "    try:\n"
            "        with open(path, 'w') as f: f.write('x')\n"
            "        print('WROTE', path)\n"
            "    except OSError as exc:\n"
            "        print('DENIED', path, exc.errno)\n"
            # the host's /tmp is not the task's: 40 MiB there stay in the task's own tmpfs
            f"with open('/tmp/hivemind-escape-{tag}', 'wb') as f: f.write(bytes(40 << 20))\n"
            "open('results/ok.txt', 'w').write(os.getcwd())\n"
        )
        (result,) = worker.run({"source": source, "memory": 512 * MiB, "disk": 512 * MiB})
        assert result["status"] == "succeeded", _outcome(result)
        assert "WROTE" not in result["output"], result["output"]
        assert result["output"].count("DENIED") == len(targets)
        assert result["files"]["results/ok.txt"] == b"/workspace"
        for path in [*targets, f"/tmp/hivemind-escape-{tag}"]:
            assert not os.path.lexists(path), path
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)


@pytest.mark.timeout(300)
def test_task_cannot_read_home_or_shadow(worker: Worker) -> None:
    home = _open_dir("hivemind-home-")
    (home / ".ssh").mkdir(mode=0o755)
    secret = home / ".ssh" / "id_ed25519"
    secret.write_text("SECRET-KEY-" + uuid.uuid4().hex)
    secret.chmod(0o644)
    try:
        # Control: outside the sandbox the task's uid can read the secret.
        control = worker.as_task_user("cat", str(secret))
        assert control.returncode == 0 and control.stdout == secret.read_text(), control.stderr
        source = (
            "import os, shutil\n"
            f"for path in [{str(secret)!r}, '/etc/shadow', '/root/.bashrc']:\n"
            "    try:\n"
            "        print('READ', path, open(path).read())\n"
            "    except OSError as exc:\n"
            "        print('DENIED', path, exc.errno)\n"
            "for path in ['/etc/shadow', " + repr(str(secret)) + "]:\n"
            "    for how in (os.link, shutil.copy):\n"
            "        try:\n"
            "            how(path, 'results/' + os.path.basename(path) + how.__name__)\n"
            "        except OSError as exc:\n"
            "            print('NO', how.__name__, path, exc.errno)\n"
            "print('ROOT', sorted(os.listdir('/')))\n"
            "print('HOME', os.path.exists(" + repr(str(home)) + "), os.path.exists('/home'))\n"
        )
        (result,) = worker.run({"source": source})
        assert result["status"] == "succeeded", _outcome(result)
        output = result["output"]
        assert "SECRET-KEY" not in output and "READ" not in output, output
        assert not any(secret.read_bytes() in data for data in result["files"].values())
        assert [name for name in result["files"] if name != "results"] == []
        assert "HOME False False" in output
        root_line = next(line for line in output.splitlines() if line.startswith("ROOT"))
        assert set(eval(root_line[5:])) <= {
            "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp",
            "usr", "workspace",
        }, root_line  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.timeout(300)
def test_task_cannot_reach_a_unix_socket_or_a_loopback_port(worker: Worker) -> None:
    sock_dir = _open_dir("hivemind-sock-")
    sock_path = sock_dir / "docker.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(sock_path))
    sock_path.chmod(0o777)  # as /var/run/docker.sock is to the docker group
    unix.listen(8)
    tcp = socket.create_server(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    accepted: list[str] = []

    def serve(server: socket.socket, name: str) -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(name)
            conn.close()

    stop = threading.Event()
    threads = [
        threading.Thread(target=serve, args=(unix, "unix"), daemon=True),
        threading.Thread(target=serve, args=(tcp, "tcp"), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        # Control: outside the sandbox the task's uid can connect to the socket.
        control = worker.as_task_user(
            "/usr/bin/python3",
            "-c",
            f"import socket; socket.socket(socket.AF_UNIX).connect({str(sock_path)!r})",
        )
        assert control.returncode == 0, control.stderr
        # The server thread takes the connection when it next wakes (bounded wait, not a race).
        for _ in range(100):
            if accepted:
                break
            stop.wait(0.1)
        assert accepted == ["unix"]
        accepted.clear()
        source = (
            "import socket\n"
            f"for path in [{str(sock_path)!r}, '/var/run/docker.sock', '/run/docker.sock']:\n"
            "    try:\n"
            "        socket.socket(socket.AF_UNIX).connect(path); print('CONNECTED', path)\n"
            "    except OSError as exc:\n"
            "        print('BLOCKED', path, exc.errno)\n"
            "for host in ['127.0.0.1', 'localhost']:\n"
            "    try:\n"
            f"        socket.create_connection((host, {port}), timeout=2); print('CONNECTED', host)\n"  # noqa: E501
            "    except OSError as exc:\n"
            "        print('BLOCKED', host, exc)\n"
        )
        (result,) = worker.run({"source": source})
        assert result["status"] == "succeeded", _outcome(result)
        assert "CONNECTED" not in result["output"], result["output"]
        assert result["output"].count("BLOCKED") == 5
        stop.wait(0.5)  # a connection that got through would be taken by now
        assert accepted == []
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        unix.close()
        tcp.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.timeout(300)
def test_kernel_calls_a_computation_never_needs_are_refused(worker: Worker) -> None:
    source = (
        "import ctypes, errno, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def call(name, *args):\n"
        "    rc = getattr(libc, name)(*args)\n"
        "    print(name, rc, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))\n"
        "call('mount', b'none', b'/tmp', b'tmpfs', 0, None)\n"
        "call('umount2', b'/usr', 2)\n"
        "call('unshare', 0x10000000)\n"
        "call('ptrace', 16, 1, 0, 0)\n"  # PTRACE_ATTACH to the sandbox's init
        "call('syscall', 250, 0, 0, 0, 0)\n"  # keyctl
        "call('syscall', 321, 0, 0, 0)\n"  # bpf
        "print('uid_map', open('/proc/self/uid_map').read().split())\n"
        "print('caps', [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')])\n"  # noqa: E501
        "print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
    )
    (result,) = worker.run({"source": source})
    assert result["status"] == "succeeded", _outcome(result)
    lines = {line.split()[0]: line.split()[1:] for line in result["output"].splitlines()}
    for call in ("mount", "umount2", "unshare", "ptrace", "syscall"):
        assert lines[call] == ["-1", "EPERM"], result["output"]
    inside, outside, count = eval(" ".join(lines["uid_map"]))
    # One uid only, the unprivileged one; the built-in launcher maps it to itself, bubblewrap
    # through a namespace of its own (so its outer side reads 0 from inside).
    assert int(inside) == worker.task_uid != 0 and int(count) == 1
    if not worker.mode.endswith("bwrap"):
        assert int(outside) == worker.task_uid  # never root on the host
    assert lines["caps"] == ["['0000000000000000']"]
    assert eval(" ".join(lines["pids"])) == [1, 2]
    assert set("NMPLS") <= set(result["walls"]), result["walls"]


# ---------------------------------------------------------------------------- limits


@pytest.mark.timeout(300)
def test_fork_bomb_ends_at_the_process_cap(worker: Worker) -> None:
    source = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 5000:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "    print('UNCAPPED', n)\n"
        "except OSError as exc:\n"
        "    print('CAPPED', n, exc.errno)\n"
    )
    (result,) = worker.run({"source": source, "timeout": 120})
    assert result["status"] == "succeeded", _outcome(result)
    words = result["output"].split()
    assert words[0] == "CAPPED", result["output"]
    assert int(words[1]) < sandbox_linux.MAX_PROCESSES
    assert result["run_ticks"] > 0  # the worker's loop kept going


@pytest.mark.timeout(300)
def test_disk_limit_stops_a_task_that_writes_past_it(worker: Worker) -> None:
    writer = (
        "import time\n"
        "for i in range({n}):\n"
        "    with open(f'out{{i}}.bin', 'wb') as f: f.write(bytes(1 << 20))\n"
        "    time.sleep(0.05)\n"
        "print('wrote all')\n"
    )
    over, within = worker.run(
        {"source": writer.format(n=200), "disk": 8 * MiB},
        {"source": writer.format(n=3), "disk": 8 * MiB},
    )
    assert over["status"] == "failed", _outcome(over)
    assert over["error"] == "used more than its 8 MiB disk limit"
    assert "wrote all" not in over["output"]
    assert within["status"] == "succeeded", _outcome(within)


@pytest.mark.timeout(600)
def test_a_hundred_thousand_result_files_are_refused_promptly(worker: Worker) -> None:
    source = (
        "for i in range(100_000):\n"
        "    open(f'results/f{i}', 'w').close()\n"
        "print('END-OF-TASK', flush=True)\n"
    )
    (result,) = worker.run({"source": source, "timeout": 300})
    assert result["status"] == "failed", _outcome(result)
    assert "more than 10000 files" in result["error"]
    # A heartbeat-like ticker on the worker's loop kept ticking after the task's last words,
    # while its results were looked at (off the loop, and only up to the cap); the cleanup
    # returned with the workspace gone at once (moved aside), and its 100,000 files were
    # deleted in the background while the ticker went on.
    assert result["ticks_after_task"] > 0
    assert result["workspace_gone_at_cleanup"]
    assert result["ticks_while_deleting"] > 0
    assert result["trash_emptied"]


@pytest.mark.timeout(300)
def test_result_entries_follow_the_one_rule(worker: Worker) -> None:
    (result,) = worker.run({"source": "open('results/..\\\\..\\\\escape', 'w').write('x')\n"})
    assert result["status"] == "failed", _outcome(result)
    assert "backslashes" in result["error"]
    assert result["files"] == {}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("worker", ["root", "root-bwrap"], indirect=True)  # cgroups need root
def test_memory_cap_holds_for_the_whole_tree(worker: Worker) -> None:
    # Two children of 100 MiB each: each is under the per-process address-space limit
    # (cap + 256 MiB), together they are over the 128 MiB cap of the tree.
    source = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(2):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(100 << 20)\n"
        "        for i in range(0, len(block), 4096): block[i] = 1\n"
        "        time.sleep(5); os._exit(0)\n"
        "    kids.append(pid)\n"
        "codes = [os.waitpid(pid, 0)[1] for pid in kids]\n"
        "print('children', codes)\n"
        "raise SystemExit(1 if any(codes) else 0)\n"
    )
    (result,) = worker.run({"source": source, "memory": 128 * MiB})
    assert result["status"] == "out_of_memory", _outcome(result)
    assert result["error"] == "ran out of memory (limit 128 MiB)"
