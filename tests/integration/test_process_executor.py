"""ProcessExecutor against real subprocesses: inputs, results, limits, timeouts, pause, env."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import psutil
import pytest

from helpers.sandbox_pids import host_pid
from hivemind_worker.engine.executors import limits
from hivemind_worker.engine.executors.base import ExecutorError
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.engine.executors.workspace import TRASH_DIR, wait_for_discards
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import (
    MiB,
    Resources,
    TaskResult,
    TaskSpec,
    TaskSpecError,
    TaskStatus,
)

pytestmark = pytest.mark.slow


def make_task(
    source: str,
    *,
    task_id: str = "t1",
    lease_id: str = "l1",
    timeout: int = 30,
    files: dict[str, bytes] | None = None,
    archive: bytes = b"",
    memory: int = 0,
    env: dict[str, str] | None = None,
    argv: Iterable[str] = (),
    max_result_bytes: int = 0,
) -> TaskSpec:
    msg = pb.TaskSpec(
        task_id=task_id,
        lease_id=lease_id,
        kind=pb.TASK_KIND_PYTHON,
        source=source,
        timeout_seconds=timeout,
        input_files=[pb.InputFile(path=p, content=c) for p, c in (files or {}).items()],
        input_archive=archive,
        resources=pb.Resources(memory_bytes=memory),
        env=env or {},
        argv=list(argv),
        max_result_bytes=max_result_bytes,
    )
    return TaskSpec.from_proto(msg, require_lease=True)


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path / "work"


@pytest.fixture
async def executor(work_dir: Path) -> AsyncIterator[ProcessExecutor]:
    ex = ProcessExecutor(work_dir)
    yield ex
    await ex.close()


async def run_task(ex: ProcessExecutor, task: TaskSpec, **kwargs: object) -> TaskResult:
    await ex.prepare(task)
    return await ex.run(task, **kwargs)  # type: ignore[arg-type]


def archive_members(result: TaskResult) -> dict[str, bytes | None]:
    """name -> content (None for folders) of a result archive."""
    assert result.archive is not None
    out: dict[str, bytes | None] = {}
    with tarfile.open(result.archive, "r:gz") as tar:
        for m in tar:
            assert m.isfile() or m.isdir(), m.name
            f = tar.extractfile(m) if m.isfile() else None
            out[m.name] = f.read() if f else None
    return out


async def wait_gone(token: str) -> bool:
    """Whether the task's process is gone, waiting a little for the kernel to end a killed
    namespace (a hang guard, not a timing assertion)."""
    for _ in range(200):
        if is_gone(token):
            return True
        await asyncio.sleep(0.05)
    return False


def is_gone(token: str) -> bool:
    pid = host_pid(token)
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def read_if_present(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def listdir(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def exists(path: str) -> bool:
    return os.path.lexists(path)


async def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    """The text of a file the task writes (atomically, by rename) once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text := read_if_present(path):
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


# ------------------------------------------------------------------------- basics


@pytest.mark.timeout(60)
async def test_input_to_results_roundtrip(executor: ProcessExecutor, work_dir: Path) -> None:
    payload = bytes(range(256)) * 10
    source = (
        "import os, sys\n"
        "data = open('data/in.bin', 'rb').read()\n"
        "open('results/out.txt', 'wb').write(data[::-1])\n"
        "os.makedirs('results/sub')\n"
        "open(os.path.join(os.environ['HIVEMIND_RESULTS_DIR'], 'sub', 'argv.txt'), 'w')"
        ".write(' '.join(sys.argv[1:]))\n"
        "print('done', len(data))\n"
    )
    task = make_task(source, files={"data/in.bin": payload}, argv=["a", "b c"])
    result = await run_task(executor, task)

    assert result.status is TaskStatus.SUCCEEDED, result
    assert result.exit_code == 0 and result.error == ""
    assert result.log_tail == f"done {len(payload)}\n".encode()
    assert result.started_at <= result.finished_at
    assert result.archive == work_dir / "_archives" / "t1-l1.tar.gz"
    data = result.archive.read_bytes()
    assert result.archive_size == len(data)
    assert result.archive_sha256 == hashlib.sha256(data).hexdigest()
    assert archive_members(result) == {
        "results": None,
        "results/out.txt": payload[::-1],
        "results/sub": None,
        "results/sub/argv.txt": b"a b c",
    }

    workspace = executor.workspace("t1")
    assert workspace == work_dir / "t1-l1" and workspace.is_dir()
    await executor.cleanup("t1")
    assert not workspace.exists()
    await executor.cleanup("t1")  # safe twice
    assert result.archive.exists()  # the engine owns and deletes it


@pytest.mark.timeout(60)
async def test_empty_results_give_an_archive_with_only_the_folder(
    executor: ProcessExecutor,
) -> None:
    result = await run_task(executor, make_task("pass"))
    assert result.status is TaskStatus.SUCCEEDED
    assert archive_members(result) == {"results": None}


@pytest.mark.timeout(60)
async def test_nonzero_exit_and_signal(executor: ProcessExecutor) -> None:
    result = await run_task(executor, make_task("import sys; print('bye'); sys.exit(3)"))
    assert result.status is TaskStatus.FAILED
    assert result.exit_code == 3
    assert result.error == "exited with code 3"
    assert result.log_tail == b"bye\n"
    assert result.archive is not None  # results of a failed task still come back

    task = make_task("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", task_id="t2")
    result = await run_task(executor, task)
    assert result.status is TaskStatus.FAILED
    assert result.exit_code == 128 + signal.SIGKILL
    assert result.error == "killed by signal SIGKILL"


@pytest.mark.timeout(30)
async def test_container_task_is_refused(executor: ProcessExecutor) -> None:
    msg = pb.TaskSpec(
        task_id="c1", lease_id="l1", kind=pb.TASK_KIND_CONTAINER, image="alpine", argv=["true"]
    )
    task = TaskSpec.from_proto(msg, require_lease=True)
    with pytest.raises(ExecutorError, match="container tasks need Docker"):
        await executor.prepare(task)


@pytest.mark.timeout(30)
async def test_input_named_main_py_is_refused(executor: ProcessExecutor) -> None:
    task = make_task("pass", files={"main.py": b"print('other')"})
    with pytest.raises(TaskSpecError, match="given twice"):
        await executor.prepare(task)


# ------------------------------------------------------------------------- hostile inputs


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../x", "leaves the workspace"),
        ("/etc/x", "is an absolute path"),
        ("C:/x", "is an absolute path"),
        ("a/../../x", "leaves the workspace"),
    ],
)
def test_escaping_input_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(TaskSpecError, match=message) as info:
        make_task("pass", files={name: b"x"})
    assert info.value.field == "input_files"


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special_member(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (tar_bytes(special_member("evil", tarfile.SYMTYPE, "/etc/passwd")), "is a link"),
        (tar_bytes(special_member("hard", tarfile.LNKTYPE, "/etc/passwd")), "is a link"),
        (tar_bytes(file_member("../escape.txt", b"x")), "leaves the workspace"),
        (tar_bytes(file_member("ok/../../escape.txt", b"x")), "leaves the workspace"),
        (tar_bytes(file_member("/tmp/hivemind-abs-escape.txt", b"x")), "is an absolute path"),
        (tar_bytes(special_member("dev", tarfile.CHRTYPE)), "device, fifo"),
        (tar_bytes(special_member("fifo", tarfile.FIFOTYPE)), "device, fifo"),
        (
            tar_bytes(*(file_member(f"f{i}", b"") for i in range(10_001)), gz=True),
            "more than 10000 entries",
        ),
        (tar_bytes(file_member("big", bytes(17 * MiB)), gz=True), "unpacks to more than"),
        (b"not a tar at all" * 100, "cannot unpack"),
    ],
    ids=["symlink", "hardlink", "dotdot", "nested-dotdot", "absolute", "device", "fifo",
         "too-many", "too-big", "garbage"],
)  # fmt: skip
async def test_hostile_input_archives_are_refused(
    executor: ProcessExecutor, tmp_path: Path, work_dir: Path, archive: bytes, message: str
) -> None:
    before = tree(tmp_path)
    task = make_task("pass", archive=archive)
    with pytest.raises(TaskSpecError, match=message) as info:
        await executor.prepare(task)
    assert info.value.field == "input_archive"
    # Nothing written anywhere: not outside, and the half-made workspace is gone too.
    assert tree(tmp_path) - before <= {work_dir}
    assert not exists("/tmp/hivemind-abs-escape.txt")
    await executor.cleanup("t1")


@pytest.mark.timeout(60)
async def test_input_archive_unpacks(executor: ProcessExecutor) -> None:
    root = tarfile.TarInfo(".")
    root.type = tarfile.DIRTYPE
    folder = tarfile.TarInfo("./pkg")
    folder.type = tarfile.DIRTYPE
    archive = tar_bytes(
        (root, None), (folder, None), file_member("./pkg/data.txt", b"from the archive"), gz=True
    )
    source = "open('results/copy.txt', 'wb').write(open('pkg/data.txt', 'rb').read())"
    result = await run_task(executor, make_task(source, archive=archive))
    assert result.status is TaskStatus.SUCCEEDED, result
    assert archive_members(result)["results/copy.txt"] == b"from the archive"


# ------------------------------------------------------------------------- hostile results


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("os.symlink('/etc/passwd', 'results/passwd')", "results/passwd is a symbolic link"),
        ("os.mkfifo('results/pipe')", "results/pipe is a fifo"),
        (
            "import shutil; shutil.rmtree('results'); os.symlink('/etc', 'results')",
            "results is a symbolic link",
        ),
        ("open('results/big', 'wb').write(bytes(2000))", "larger than the task's limit of 1000"),
        (
            "[open(f'results/f{i}', 'w').close() for i in range(20)]",
            "more than 10 files and folders",
        ),
    ],
    ids=["symlink", "fifo", "folder-symlink", "too-big", "too-many"],
)
async def test_bad_results_fail_the_task(work_dir: Path, source: str, message: str) -> None:
    executor = ProcessExecutor(work_dir, max_result_files=10)
    source = "import os\nopen('results/ok.txt', 'w').write('fine')\n" + source
    result = await run_task(executor, make_task(source, max_result_bytes=1000))
    assert result.status is TaskStatus.FAILED
    assert message in result.error
    assert result.archive is None
    assert result.archive_sha256 == "" and result.archive_size == 0
    assert list((work_dir / "_archives").iterdir()) == []  # no partial archive left behind
    await executor.cleanup("t1")
    assert not (work_dir / "t1-l1").exists()
    assert exists("/etc/passwd")


# ------------------------------------------------------------------------- stopping tasks


# Tasks run in their own PID namespace with a /proc of their own; each process names itself
# as sandbox_pids.TASK_PID does (namespace, pid, start time), which host_pid() maps back.
GRANDCHILD = (
    "import os, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', \"import os, time; "
    "open('child.tmp', 'w').write(os.readlink('/proc/self/ns/pid') + '@' + "
    "os.readlink('/proc/self') + '@' + "
    "open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]); "
    "os.rename('child.tmp', 'child.pid'); time.sleep(60)\"])\n"
    "while not os.path.exists('child.pid'): time.sleep(0.01)\n"
    "open('pids.tmp', 'w').write(os.readlink('/proc/self/ns/pid') + '@' + "
    "os.readlink('/proc/self') + '@' + "
    "open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19] + ' ' + "
    "open('child.pid').read())\n"
    "os.rename('pids.tmp', 'pids.txt')\n"
)


@pytest.mark.timeout(60)
async def test_timeout_kills_the_whole_group(executor: ProcessExecutor, work_dir: Path) -> None:
    # Long enough for two interpreters to start at the sandbox's lowest CPU weight on a busy
    # machine (the person's programs, here other tests, come first).
    task = make_task(GRANDCHILD + "while True: pass\n", timeout=6)
    started = time.monotonic()
    result = await run_task(executor, task)
    elapsed = time.monotonic() - started

    assert result.status is TaskStatus.TIMED_OUT
    assert result.error == "killed after 6 s timeout"
    assert elapsed >= 6  # not before its timeout (a loaded machine only makes it later)
    leader, grandchild = (work_dir / "t1-l1" / "pids.txt").read_text().split()
    assert await wait_gone(leader)
    assert await wait_gone(grandchild)
    assert result.cpu_seconds > 0  # sampled while it spun


@pytest.mark.timeout(60)
async def test_processes_left_behind_are_killed_at_exit(
    executor: ProcessExecutor, work_dir: Path
) -> None:
    # One straggler stays in the group and holds the output pipe; one leaves the group
    # with setsid. Neither may outlive the task, nor keep run() waiting.
    source = GRANDCHILD + (
        "import time\n"
        "escaped = subprocess.Popen([sys.executable, '-c', \"import os, time; "
        "open('escaped.tmp', 'w').write(os.readlink('/proc/self/ns/pid') + '@' + "
        "os.readlink('/proc/self') + '@' + "
        "open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]); "
        "os.rename('escaped.tmp', 'escaped.txt'); time.sleep(60)\"],\n"
        "                           start_new_session=True, stdout=subprocess.DEVNULL)\n"
        "while not os.path.exists('escaped.txt'): time.sleep(0.01)\n"
        "time.sleep(2.5)  # long enough for a usage sample to see it\n"
    )
    # The escaped process sleeps 60 s: had run() waited for it, the test's timeout would end it.
    result = await run_task(executor, make_task(source))
    assert result.status is TaskStatus.SUCCEEDED, result
    workspace = work_dir / "t1-l1"
    _, grandchild = (workspace / "pids.txt").read_text().split()
    escaped = (workspace / "escaped.txt").read_text()
    assert await wait_gone(grandchild)
    assert await wait_gone(escaped)


@pytest.mark.timeout(60)
async def test_cancel_mid_run(executor: ProcessExecutor, work_dir: Path) -> None:
    task = make_task(GRANDCHILD + "import time\ntime.sleep(60)\n")
    await executor.prepare(task)
    running = asyncio.create_task(executor.run(task))
    pids = await wait_for_file(work_dir / "t1-l1" / "pids.txt")
    await executor.cancel("t1")
    result = await asyncio.wait_for(running, 10)
    assert result.status is TaskStatus.CANCELLED
    assert result.archive is None
    assert all([await wait_gone(pid) for pid in pids.split()])
    assert executor.usage() == {}


@pytest.mark.timeout(30)
async def test_cancel_before_run(executor: ProcessExecutor) -> None:
    task = make_task("open('results/ran', 'w').close()")
    await executor.prepare(task)
    await executor.cancel("t1")
    result = await executor.run(task)
    assert result.status is TaskStatus.CANCELLED
    assert not (executor.workspace("t1") / "results" / "ran").exists()  # type: ignore[operator]


@pytest.mark.timeout(60)
async def test_cancel_while_the_task_is_being_started(
    executor: ProcessExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that lands after run() has looked for a cancel but before the process is
    registered (the sandbox being set up) still ends the task: it was lost, and the task
    ran on with the pool waiting for it (test_stop_gives_running_tasks_back_at_once)."""
    task = make_task("import time\ntime.sleep(60)\n")
    await executor.prepare(task)
    gate = asyncio.Event()
    reached = asyncio.Event()
    set_up = executor.tree_limiter

    async def held_set_up():  # type: ignore[no-untyped-def]
        reached.set()
        await gate.wait()  # the window, held open: the cgroup limiter is being set up
        return await set_up()

    monkeypatch.setattr(executor, "tree_limiter", held_set_up)
    running = asyncio.create_task(executor.run(task))
    await asyncio.wait_for(reached.wait(), 10)
    await executor.cancel("t1")
    gate.set()
    result = await asyncio.wait_for(running, 30)
    assert result.status is TaskStatus.CANCELLED
    assert executor.usage() == {}


# ------------------------------------------------------------------------- limits


@pytest.mark.timeout(60)
async def test_memory_limit_gives_out_of_memory(executor: ProcessExecutor) -> None:
    task = make_task("x = bytearray(2 * 1024**3)\nprint('allocated')", memory=256 * MiB)
    result = await run_task(executor, task)
    assert result.status is TaskStatus.OUT_OF_MEMORY, result
    assert result.error == "ran out of memory (limit 256 MiB)"
    assert b"MemoryError" in result.log_tail
    assert b"allocated" not in result.log_tail
    assert result.exit_code == 1


@pytest.mark.timeout(60)
async def test_memory_within_the_cap_works(executor: ProcessExecutor) -> None:
    task = make_task("x = bytearray(200 * 1024**2)\nprint(len(x))", memory=256 * MiB)
    result = await run_task(executor, task)
    assert result.status is TaskStatus.SUCCEEDED, result


@pytest.mark.timeout(120)
async def test_output_flood_keeps_only_the_tail(executor: ProcessExecutor) -> None:
    total = 200 * MiB
    source = (
        "import sys\n"
        "out = sys.stdout.buffer\n"
        "block = b'x' * (1024 * 1024 - 1) + b'\\n'\n"
        f"for _ in range({total // MiB}):\n"
        "    out.write(block)\n"
        "out.write(b'THE-END\\n')\n"
        "out.flush()\n"
    )
    me = psutil.Process()
    rss_before = me.memory_info().rss
    peak = rss_before
    received = 0
    calls = 0

    def on_log(task_id: str, chunk: bytes) -> None:
        nonlocal received, calls, peak
        assert task_id == "t1"
        received += len(chunk)
        calls += 1
        if calls % 64 == 0:
            peak = max(peak, me.memory_info().rss)

    result = await run_task(executor, make_task(source), on_log=on_log)
    peak = max(peak, me.memory_info().rss)

    assert result.status is TaskStatus.SUCCEEDED, result
    assert received == total + len(b"THE-END\n")
    assert len(result.log_tail) == 64 * 1024
    assert result.log_tail.endswith(b"x\nTHE-END\n")
    assert peak - rss_before < 50 * MiB


@pytest.mark.timeout(60)
async def test_worker_environment_is_not_inherited(
    executor: ProcessExecutor, work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVEMIND_SECRET_TEST", "x")
    source = "import json, os\njson.dump(dict(os.environ), open('results/env.json', 'w'))\n"
    task = make_task(source, env={"FOO": "bar", "PATH": "/evil", "HIVEMIND_TASK_ID": "spoofed"})
    result = await run_task(executor, task)
    assert result.status is TaskStatus.SUCCEEDED, result
    env = json.loads(archive_members(result)["results/env.json"] or b"")
    assert "HIVEMIND_SECRET_TEST" not in env
    assert env["FOO"] == "bar"
    assert env["PATH"] == os.defpath
    assert env["HIVEMIND_TASK_ID"] == "t1"
    # The task's own view (a mount namespace), the same as in a Docker container.
    assert env["HIVEMIND_RESULTS_DIR"] == "/workspace/results"
    assert env["HOME"] == "/tmp"
    assert env["TMPDIR"] == "/tmp"
    assert set(env) <= {
        "PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE", "FOO",
        "HIVEMIND_TASK_ID", "HIVEMIND_RESULTS_DIR", "LC_CTYPE",
    }  # fmt: skip


@pytest.mark.timeout(60)
async def test_task_runs_niced_with_rlimits(executor: ProcessExecutor) -> None:
    source = (
        "import os, resource as r\n"
        "limits = [r.RLIMIT_AS, r.RLIMIT_CPU, r.RLIMIT_FSIZE, r.RLIMIT_CORE]\n"
        "print(os.nice(0), *(r.getrlimit(which)[0] for which in limits))\n"
    )
    task = dataclasses.replace(
        make_task(source, timeout=10),
        resources=Resources(cpus=2.0, memory_bytes=256 * MiB, disk_bytes=100 * MiB),
    )
    await executor.prepare(task)
    result = await executor.run(task)
    assert result.status is TaskStatus.SUCCEEDED, result
    nice, mem, cpu, fsize, core = map(int, result.log_tail.split())
    assert nice >= 10
    assert mem == 512 * MiB  # the cap plus the 256 MiB address-space allowance
    assert cpu == 10 * 2 + 5
    assert fsize == 100 * MiB
    assert core == 0


# ------------------------------------------------------------------------- pause / resume


@pytest.mark.timeout(60)
async def test_pause_freezes_and_resume_finishes(executor: ProcessExecutor, work_dir: Path) -> None:
    loops = 30_000_000
    source = (
        "import os\n"
        "open('pid.tmp', 'w').write(os.readlink('/proc/self/ns/pid') + '@' + "
        "os.readlink('/proc/self') + '@' + "
        "open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])\n"
        "os.rename('pid.tmp', 'pid.txt')\n"
        "n = 0\n"
        f"for _ in range({loops}):\n"
        "    n += 1\n"
        "open('results/count.txt', 'w').write(str(n))\n"
    )
    task = make_task(source)
    await executor.prepare(task)
    running = asyncio.create_task(executor.run(task))
    pid = host_pid(await wait_for_file(work_dir / "t1-l1" / "pid.txt"))
    assert pid is not None
    await asyncio.sleep(0.3)
    assert "t1" in executor.usage()

    await executor.pause()
    await asyncio.sleep(0.1)
    proc = psutil.Process(pid)
    assert proc.status() == psutil.STATUS_STOPPED
    cpu_at_pause = sum(proc.cpu_times()[:2])
    await asyncio.sleep(1.5)
    assert proc.status() == psutil.STATUS_STOPPED
    assert sum(proc.cpu_times()[:2]) - cpu_at_pause < 0.05
    assert not running.done()

    await executor.resume()
    result = await asyncio.wait_for(running, 30)
    assert result.status is TaskStatus.SUCCEEDED, result
    assert archive_members(result)["results/count.txt"] == str(loops).encode()


@pytest.mark.timeout(60)
async def test_paused_time_does_not_count_against_the_timeout(
    executor: ProcessExecutor, work_dir: Path
) -> None:
    source = (
        "import os, time\n"
        "open('pid.tmp', 'w').write(os.readlink('/proc/self/ns/pid') + '@' + "
        "os.readlink('/proc/self') + '@' + "
        "open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])\n"
        "os.rename('pid.tmp', 'pid.txt')\n"
        "for _ in range(15):\n"
        "    time.sleep(0.1)\n"
    )
    task = make_task(source, timeout=3)
    await executor.prepare(task)
    started = time.monotonic()
    running = asyncio.create_task(executor.run(task))
    await wait_for_file(work_dir / "t1-l1" / "pid.txt")
    await executor.pause()
    await asyncio.sleep(3)
    await executor.resume()
    result = await asyncio.wait_for(running, 30)
    assert result.status is TaskStatus.SUCCEEDED, result
    assert time.monotonic() - started > 4  # well beyond the 3 s timeout on the wall clock


@pytest.mark.timeout(60)
async def test_task_started_while_paused_waits_for_resume(
    executor: ProcessExecutor,
) -> None:
    task = make_task("print('ran')", timeout=2)
    await executor.prepare(task)
    await executor.pause()
    running = asyncio.create_task(executor.run(task))
    await asyncio.sleep(2.5)
    assert not running.done()
    await executor.resume()
    result = await asyncio.wait_for(running, 10)
    assert result.status is TaskStatus.SUCCEEDED, result
    assert result.log_tail == b"ran\n"


# ------------------------------------------------------------------------- cleanup


@pytest.mark.timeout(30)
async def test_cleanup_removes_read_only_workspace(
    executor: ProcessExecutor, work_dir: Path
) -> None:
    source = (
        "import os\n"
        "os.makedirs('locked/inner')\n"
        "open('locked/inner/f', 'w').close()\n"
        "os.chmod('locked/inner/f', 0o400)\n"
        "os.chmod('locked/inner', 0o500)\n"
        "os.chmod('locked', 0o500)\n"
    )
    result = await run_task(executor, make_task(source))
    assert result.status is TaskStatus.SUCCEEDED, result
    await executor.cleanup("t1")
    assert not (work_dir / "t1-l1").exists()


@pytest.mark.timeout(30)
async def test_prepare_again_under_a_new_lease_replaces_the_workspace(
    executor: ProcessExecutor, work_dir: Path
) -> None:
    await executor.prepare(make_task("pass", lease_id="old"))
    await executor.prepare(make_task("pass", lease_id="new"))
    assert executor.workspace("t1") == work_dir / "t1-new"
    assert [name for name in listdir(work_dir) if name != TRASH_DIR] == ["t1-new"]
    await executor.cleanup("t1")
    assert [name for name in listdir(work_dir) if name != TRASH_DIR] == []
    assert wait_for_discards(30)
    assert listdir(work_dir / TRASH_DIR) == []


# ------------------------------------------------------------------------- portability


def test_frozen_worker_without_python_is_refused(
    work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ExecutorError, match="no Python interpreter was found"):
        ProcessExecutor(work_dir)
    monkeypatch.setattr(shutil, "which", lambda name: f"/opt/bin/{name}")
    assert ProcessExecutor(work_dir).python == "/opt/bin/python3"


@pytest.mark.timeout(30)
async def test_platform_without_limits_refuses_tasks(
    executor: ProcessExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "supported", lambda: False)
    with pytest.raises(ExecutorError, match="cannot enforce task memory and CPU limits"):
        await executor.prepare(make_task("pass"))


@pytest.mark.timeout(60)
async def test_task_has_no_network_not_even_loopback(executor: ProcessExecutor) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    source = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    print('CONNECTED')\n"
        "except OSError as exc:\n"
        "    print('blocked:', exc)\n"
    )
    try:
        result = await run_task(executor, make_task(source))
    finally:
        server.close()
        await server.wait_closed()
    assert result.status is TaskStatus.SUCCEEDED, result
    assert b"blocked:" in result.log_tail and b"CONNECTED" not in result.log_tail


@pytest.mark.timeout(60)
async def test_double_forked_daemon_dies_with_the_task(
    executor: ProcessExecutor, work_dir: Path
) -> None:
    source = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        open('daemon.tmp', 'w').write(os.readlink('/proc/self/ns/pid') + '@' + "
        "os.readlink('/proc/self') + '@' + "
        "open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])\n"
        "        os.rename('daemon.tmp', 'daemon.pid')\n"
        "        time.sleep(120)\n"
        "    os._exit(0)\n"
        "while not os.path.exists('daemon.pid'): time.sleep(0.01)\n"
    )
    result = await run_task(executor, make_task(source))
    assert result.status is TaskStatus.SUCCEEDED, result
    daemon = (work_dir / "t1-l1" / "daemon.pid").read_text()
    for _ in range(100):  # the kernel tears the namespace down right after the task's exit
        if is_gone(daemon):
            break
        await asyncio.sleep(0.05)
    assert is_gone(daemon)


@pytest.mark.timeout(120)
async def test_tasks_start_while_grpc_calls_are_in_flight(executor: ProcessExecutor) -> None:
    # The worker starts tasks while its gRPC threads talk to the pool. A worker running as
    # root starts them as nobody, so with a real fork (not vfork), which runs gRPC's fork
    # handlers in the child when gRPC's fork support is on: children then died before exec
    # (SIGSEGV, SIGBUS), seen as "could not limit the task's processes: No such process".
    # This module imports grpc before hivemind_worker, as test_runners did.
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()

    def call_repeatedly() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/hivemind.Test/Missing")
            while not stop.is_set():
                with contextlib.suppress(grpc.RpcError):
                    call(b"", timeout=1)

    callers = [threading.Thread(target=call_repeatedly) for _ in range(3)]
    for caller in callers:
        caller.start()
    try:
        for n in range(25):
            task = make_task(f"print('task {n} ran')", task_id=f"g{n}")
            result = await run_task(executor, task)
            await executor.cleanup(task.task_id)
            assert result.status is TaskStatus.SUCCEEDED, (n, result.error, result.log_tail)
            assert result.log_tail == f"task {n} ran\n".encode()
    finally:
        stop.set()
        for caller in callers:
            await asyncio.to_thread(caller.join)
        server.stop(None)
