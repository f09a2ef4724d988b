"""DockerExecutor on a real engine: lockdown, limits, output cap, results, pause, housekeeping."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import tarfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import docker
import docker.errors
import psutil
import pytest

from helpers.containers import remove_container
from helpers.harness import archive_files, wait_for
from helpers.images import TEST_IMAGE
from hivemind_worker.config import load_settings
from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.engine.executors.base import ExecutorError
from hivemind_worker.engine.executors.choice import select_executor
from hivemind_worker.engine.executors.images import requirements_tag
from hivemind_worker.paths import default_paths
from hivemind_worker.tasks import (
    GiB,
    InputFile,
    MiB,
    Resources,
    TaskKind,
    TaskResult,
    TaskSpec,
    TaskSpecError,
    TaskStatus,
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]

MakeExecutor = Callable[..., dockerx.DockerExecutor]


def make_task(
    source: str,
    task_id: str = "t1",
    *,
    timeout: int = 60,
    resources: Resources | None = None,
    **fields: object,
) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        lease_id="lease-1",
        kind=TaskKind.PYTHON,
        resources=resources or Resources(0.5, 128 * MiB, 64 * MiB),
        timeout_seconds=timeout,
        source=source,
        **fields,  # type: ignore[arg-type]
    )


async def run_task(executor: dockerx.DockerExecutor, task: TaskSpec) -> tuple[TaskResult, bytes]:
    await executor.prepare(task)
    output = bytearray()
    result = await executor.run(task, lambda _id, chunk: output.extend(chunk))
    return result, bytes(output)


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def cpu_seconds(client: docker.DockerClient, container_id: str) -> float:
    stats = client.api.stats(container_id, stream=False, one_shot=True)
    return float(stats["cpu_stats"]["cpu_usage"]["total_usage"]) / 1e9


# What a task can see of its own sandbox, written where the test can read it while it runs.
PROBE = """
import os, time
facts = {"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd()}
try:
    open("/probe", "w")
    facts["root_writable"] = True
except OSError:
    facts["root_writable"] = False
with open("/tmp/probe", "w") as fh:
    fh.write("ok")
facts["tmp_writable"] = True
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
facts["cap_eff"] = status["CapEff"].strip()
facts["no_new_privs"] = status["NoNewPrivs"].strip()
facts["interfaces"] = sorted(os.listdir("/sys/class/net"))
facts["docker_sock"] = os.path.exists("/var/run/docker.sock") or os.path.exists("/run/docker.sock")
facts["input"] = open("in/data.txt").read()
with open("results/facts.txt", "w") as fh:  # python3-minimal has no json
    fh.write(repr(facts))
time.sleep(60)
"""


async def warm_up(executor: dockerx.DockerExecutor, resources: Resources) -> None:
    """Run a python task of this shape, so that a warm sandbox of it is made, and wait for it."""
    assert executor.warm is not None
    result, _ = await run_task(executor, make_task("pass", "warm-up", resources=resources))
    assert result.status is TaskStatus.SUCCEEDED, result.error
    await executor.cleanup("warm-up")
    await asyncio.wait_for(executor.settle(), 60)
    assert len(executor.warm) == 1, executor.warm.broken


@pytest.mark.parametrize("warm", [False, True], ids=["new-container", "warm-sandbox"])
async def test_running_container_shows_every_default(
    make_executor: MakeExecutor, docker_client: docker.DockerClient, node_id: str, warm: bool
) -> None:
    executor = make_executor(warm=warm)
    resources = Resources(0.5, 96 * MiB, 32 * MiB)
    task = make_task(
        PROBE,
        resources=resources,
        input_files=(InputFile(PurePosixPath("in/data.txt"), b"hello"),),
    )
    if warm:
        await warm_up(executor, resources)
    await executor.prepare(task)
    if warm:  # the probe runs in the sandbox made for it, not in a new container
        assert executor.warm is not None and executor.warm.taken == 1
    workspace = executor.workspace("t1")
    assert workspace is not None
    running = asyncio.create_task(executor.run(task))
    facts_file = workspace / "results" / "facts.txt"
    await wait_for(lambda: facts_file.exists() or running.done(), 30, "the probe's facts")
    assert not running.done(), running.result()
    container = executor.container("t1")
    assert container is not None
    attrs = docker_client.api.inspect_container(container.id)
    host, config = attrs["HostConfig"], attrs["Config"]

    assert attrs["State"]["Running"] is True
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    assert host["ReadonlyRootfs"] is True
    assert list(host["Tmpfs"]) == ["/tmp"]
    assert f"size={32 * MiB}" in host["Tmpfs"]["/tmp"]
    assert config["User"] == dockerx.worker_user()
    assert host["PidsLimit"] == dockerx.PIDS_LIMIT
    assert host["Memory"] == host["MemorySwap"] == 96 * MiB
    assert host["NanoCpus"] == 500_000_000
    assert host["CpuShares"] == dockerx.CPU_SHARES
    assert host["NetworkMode"] == "none"
    assert not host["Binds"]
    assert not host["Devices"]
    assert not host["VolumesFrom"]
    mounts = attrs["Mounts"]
    assert [(m["Type"], m["Source"], m["Destination"], m["RW"]) for m in mounts] == [
        ("bind", str(workspace), "/workspace", True)
    ]
    assert config["WorkingDir"] == "/workspace"
    assert config["Labels"][dockerx.LABEL_NODE] == node_id
    if warm:  # made before its task was known: the slot names it, a kept file the task
        assert set(config["Labels"]) == {dockerx.LABEL_NODE, dockerx.LABEL_SLOT}
        slot_file = (tmp_work(executor) / dockerx.SPECS_DIR / "t1-lease-1").with_suffix(".slot")
        assert slot_file.read_text() == config["Labels"][dockerx.LABEL_SLOT]
    else:
        assert config["Labels"][dockerx.LABEL_TASK] == "t1"
        assert config["Labels"][dockerx.LABEL_LEASE] == "lease-1"
    assert host["LogConfig"]["Type"] == "json-file"
    assert host["LogConfig"]["Config"]["max-size"] == dockerx.LOG_MAX_SIZE

    # The same lockdown seen from inside.
    facts = ast.literal_eval(facts_file.read_text())
    if dockerx.worker_user() == dockerx.NOBODY:
        assert (facts["uid"], facts["gid"]) == (65534, 65534)
    assert facts["uid"] != 0
    assert facts["cwd"] == "/workspace"
    assert facts["root_writable"] is False
    assert facts["tmp_writable"] is True
    assert facts["cap_eff"] == "0000000000000000"
    assert facts["no_new_privs"] == "1"
    assert facts["interfaces"] == ["lo"]
    assert facts["docker_sock"] is False
    assert facts["input"] == "hello"

    await executor.cancel("t1")
    result = await asyncio.wait_for(running, 30)
    assert result.status is TaskStatus.CANCELLED
    await executor.cleanup("t1")
    await asyncio.wait_for(executor.settle(), 60)  # the container is removed in the background
    assert not workspace.exists()
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)


def tmp_work(executor: dockerx.DockerExecutor) -> Path:
    return executor.archive_dir.parent


# Run twice in one warm slot: the first run leaves a file in the workspace and in /tmp and a
# process behind (in its own session, as a daemon would); the second looks for all three.
LEAVE_TRACES = """
import os, subprocess, sys
seen = {"pid": os.getpid(), "files": sorted(os.listdir(".")), "tmp": sorted(os.listdir("/tmp"))}
seen["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
with open("results/seen.txt", "w") as fh:
    fh.write(repr(seen))
open("secret.txt", "w").write("first task")
open("/tmp/secret.txt", "w").write("first task")
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
"""


async def test_a_task_never_sees_the_one_before_it_in_its_warm_slot(
    make_executor: MakeExecutor, docker_client: docker.DockerClient, node_id: str
) -> None:
    executor = make_executor(warm=True)
    assert executor.warm is not None
    resources = Resources(0.5, 96 * MiB, 32 * MiB)
    seen = []
    containers = []
    for task_id in ("first", "second"):
        task = make_task(LEAVE_TRACES, task_id, resources=resources)
        result, _ = await run_task(executor, task)
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.archive is not None
        files = archive_files(result.archive.read_bytes())
        seen.append(ast.literal_eval(files["results/seen.txt"].decode()))
        container = executor.container(task_id)
        assert container is not None
        containers.append(container.id)
        await executor.cleanup(task_id)
        await asyncio.wait_for(executor.settle(), 60)
    assert executor.warm.taken == 1  # the second ran in the slot made after the first
    assert containers[0] != containers[1]
    second = seen[1]
    assert second["files"] == ["main.py", "results", "tmp"]  # no secret, no start pipe
    assert second["tmp"] == []
    assert second["pid"] == 1 and second["pids"] == [1]  # no process of the first task
    for used in containers:  # each used container is removed after its task
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(used)
    # What is left is one fresh sandbox, waiting; close() removes it.
    left = docker_client.containers.list(
        filters={"label": f"{dockerx.LABEL_NODE}={node_id}"}, ignore_removed=True
    )
    assert [c.labels.get(dockerx.LABEL_SLOT, "") != "" for c in left] == [True]
    await executor.close()
    assert not docker_client.containers.list(
        all=True, filters={"label": f"{dockerx.LABEL_NODE}={node_id}"}, ignore_removed=True
    )


async def test_container_task_runs_image_and_argv(make_executor: MakeExecutor) -> None:
    executor = make_executor()
    task = TaskSpec(
        task_id="c1",
        lease_id="lease-1",
        kind=TaskKind.CONTAINER,
        image=TEST_IMAGE,
        argv=("sh", "-c", "echo made > results/out.txt; echo done $HIVEMIND_TASK_ID"),
        resources=Resources(0.5, 64 * MiB, 16 * MiB),
        timeout_seconds=60,
    )
    result, output = await run_task(executor, task)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert output == b"done c1\n"
    assert result.archive is not None
    assert archive_files(result.archive.read_bytes()) == {"results/out.txt": b"made\n"}


async def test_fork_bomb_is_held_by_the_pids_limit(make_executor: MakeExecutor) -> None:
    executor = make_executor(pids_limit=64)
    source = (
        "import os, time\n"
        "children = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "except OSError as exc:\n"
        "    print('held at', children, exc.strerror)\n"
    )
    result, output = await run_task(executor, make_task(source))
    assert result.status is TaskStatus.SUCCEEDED
    held_at = int(output.split()[2])
    assert 0 < held_at < 64


async def test_memory_hog_is_reported_out_of_memory(make_executor: MakeExecutor) -> None:
    executor = make_executor()
    source = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"
    result, _ = await run_task(
        executor, make_task(source, resources=Resources(0.5, 64 * MiB, 16 * MiB))
    )
    assert result.status is TaskStatus.OUT_OF_MEMORY
    assert "64 MiB" in result.error


async def test_busy_loop_past_timeout_is_killed(make_executor: MakeExecutor) -> None:
    executor = make_executor()
    result, _ = await run_task(executor, make_task("while True:\n    pass\n", timeout=2))
    assert result.status is TaskStatus.TIMED_OUT
    # and the executor takes the next task
    result, output = await run_task(executor, make_task("print('next')", "t2"))
    assert result.status is TaskStatus.SUCCEEDED
    assert output == b"next\n"


@pytest.mark.timeout(300)
async def test_gigabyte_of_output_keeps_worker_memory_bounded(make_executor: MakeExecutor) -> None:
    executor = make_executor(log_tail_bytes=64 * 1024)
    source = (
        "import sys\n"
        "line = b'x' * 1023 + b'\\n'\n"
        "write = sys.stdout.buffer.write\n"
        "for _ in range(1024 * 1024):\n"
        "    write(line)\n"
        "print('THE END')\n"
    )
    task = make_task(source, timeout=240, resources=Resources(1, 128 * MiB, 16 * MiB))
    await executor.prepare(task)
    me = psutil.Process()
    baseline = me.memory_info().rss
    peak = baseline
    received = 0

    def sink(_task_id: str, chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)

    running = asyncio.create_task(executor.run(task, sink))
    while not running.done():
        peak = max(peak, me.memory_info().rss)
        await asyncio.sleep(0.05)
    result = running.result()
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert len(result.log_tail) == 64 * 1024
    assert result.log_tail.endswith(b"THE END\n")
    assert 0 < received < 1024 * MiB  # the live stream is thinned, not buffered
    assert peak - baseline < 64 * MiB, f"worker grew by {(peak - baseline) / MiB:.0f} MiB"


SYMLINK_RESULT = "import os\nos.symlink('/etc/passwd', 'results/passwd')\n"
HARDLINK_RESULT = (
    "import os\nopen('results/a', 'w').write('a')\nos.link('results/a', 'results/b')\n"
)
RESULTS_IS_LINK = "import os\nos.rmdir('results')\nos.symlink('/etc', 'results')\n"


@pytest.mark.parametrize(
    ("source", "reason"),
    [(SYMLINK_RESULT, "link"), (RESULTS_IS_LINK, "not a folder")],
    ids=["symlink", "results-folder-is-a-link"],
)
async def test_links_in_results_are_refused(
    make_executor: MakeExecutor, tmp_path: Path, source: str, reason: str
) -> None:
    executor = make_executor()
    before = tree(tmp_path)
    result, _ = await run_task(executor, make_task(source))
    assert result.status is TaskStatus.FAILED
    assert reason in result.error
    assert result.archive is None
    workspace = executor.workspace("t1")
    assert workspace is not None
    # Nothing new outside the workspace: no archive, no unpacked file (only the kept spec).
    new = {p for p in tree(tmp_path) - before if workspace not in (p, *p.parents)}
    specs = tmp_path / "work" / dockerx.SPECS_DIR
    assert new <= {
        tmp_path / "work",
        executor.archive_dir,
        specs,
        specs / f"{workspace.name}{dockerx.SPEC_SUFFIX}",
    }


async def test_hardlinked_results_come_back_as_plain_files(make_executor: MakeExecutor) -> None:
    # A hard link can only name a file of the workspace itself (the one mount the container
    # shares with the host), so it is packed as the file it is; the archive holds no link.
    result, _ = await run_task(make_executor(), make_task(HARDLINK_RESULT))
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.archive is not None
    with tarfile.open(result.archive) as tar:
        assert {m.name: m.type for m in tar.getmembers()} == {
            "results": tarfile.DIRTYPE,
            "results/a": tarfile.REGTYPE,
            "results/b": tarfile.REGTYPE,
        }
    assert archive_files(result.archive.read_bytes()) == {"results/a": b"a", "results/b": b"a"}


async def test_pause_freezes_cpu_and_resume_finishes(
    make_executor: MakeExecutor, docker_client: docker.DockerClient
) -> None:
    executor = make_executor()
    source = (
        "import time\n"
        "open('results/started', 'w').close()\n"
        "total, deadline = 0, time.process_time() + 1.5\n"
        "while time.process_time() < deadline:\n"
        "    total += 1\n"
        "open('results/answer.txt', 'w').write(str(sum(range(1000))))\n"
    )
    task = make_task(source, timeout=30, resources=Resources(1, 128 * MiB, 16 * MiB))
    await executor.prepare(task)
    workspace = executor.workspace("t1")
    assert workspace is not None
    running = asyncio.create_task(executor.run(task))
    await wait_for((workspace / "results" / "started").exists, 30, "the task to start")
    container = executor.container("t1")
    assert container is not None

    await executor.pause()
    assert docker_client.api.inspect_container(container.id)["State"]["Status"] == "paused"
    frozen = cpu_seconds(docker_client, container.id)
    await asyncio.sleep(1.0)  # long enough for a running loop to burn ~1 s of CPU
    assert cpu_seconds(docker_client, container.id) - frozen < 0.05
    assert not running.done()

    await executor.resume()
    result = await asyncio.wait_for(running, 30)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.archive is not None
    assert archive_files(result.archive.read_bytes())["results/answer.txt"] == b"499500"


async def test_pull_policy_never_and_allowlist_refuse_with_reasons(
    make_executor: MakeExecutor,
) -> None:
    executor = make_executor(allowlist=("ghcr.io/hivemind/",))
    task = TaskSpec(
        task_id="c1",
        lease_id="lease-1",
        kind=TaskKind.CONTAINER,
        image=TEST_IMAGE,
        argv=("true",),
        resources=Resources(0.5, 64 * MiB, 16 * MiB),
        timeout_seconds=60,
    )
    with pytest.raises(TaskSpecError, match="not in this worker's image allowlist"):
        await executor.prepare(task)
    missing = TaskSpec(
        task_id="c2",
        lease_id="lease-1",
        kind=TaskKind.CONTAINER,
        image="ghcr.io/hivemind/not-here:1",
        argv=("true",),
        resources=Resources(0.5, 64 * MiB, 16 * MiB),
        timeout_seconds=60,
    )
    with pytest.raises(ExecutorError, match="not on this machine and the pull policy is 'never'"):
        await executor.prepare(missing)


async def test_leftover_containers_are_removed_at_start(
    docker_client: docker.DockerClient, tmp_path: Path, node_id: str
) -> None:
    work_dir = tmp_path / "work"
    stale = work_dir / "old-task-lease"
    stale.mkdir(parents=True)
    (stale / "main.py").write_text("pass\n")

    def leftover(node: str, **extra: object) -> str:
        container = docker_client.containers.create(
            TEST_IMAGE,
            ["sleep", "60"],
            labels={dockerx.LABEL_NODE: node, dockerx.LABEL_TASK: "old", dockerx.LABEL_LEASE: "x"},
            network_mode="none",
            **extra,  # type: ignore[arg-type]
        )
        container.start()
        return str(container.id)

    ours = leftover(node_id, volumes={str(stale): {"bind": "/workspace", "mode": "rw"}})
    theirs = leftover(node_id + "-other")
    try:
        paths = default_paths(tmp_path / "home")
        settings = load_settings(
            paths, env={}, overrides={"work_dir": str(work_dir), "docker_python_image": TEST_IMAGE}
        )
        executor = await asyncio.to_thread(select_executor, settings, node_id)
        assert isinstance(executor, dockerx.DockerExecutor)
        assert executor.capability == "docker"
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(ours)
        assert not stale.exists()
        assert docker_client.containers.get(theirs).status == "running"
    finally:
        for cid in (ours, theirs):
            remove_container(docker_client, cid)


async def test_a_restarted_executor_reattaches_containers_left_running_or_exited(
    make_executor: MakeExecutor, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """Containers whose spec was kept (beside the workspace) are adopted at start and
    followed to their results, whether they still run or exited meanwhile."""
    first = make_executor()
    slow = make_task(
        "import time\nprint('slow here')\ntime.sleep(5)\n"
        "open('results/out.txt', 'w').write('slow')\n",
        "slow",
    )
    quick = make_task("open('results/out.txt', 'w').write('quick')\n", "quick")
    ids: dict[str, str] = {}
    for spec in (slow, quick):
        await first.prepare(spec)
        workspace = first.workspace(spec.task_id)
        assert workspace is not None
        config = first.container_config(spec, workspace)
        container = await asyncio.to_thread(lambda c=config: docker_client.containers.create(**c))
        await asyncio.to_thread(container.start)
        ids[spec.task_id] = str(container.id)
    # `first` dies here without a word: nothing of it is cleaned up.

    def status(task_id: str) -> str:
        return str(docker_client.containers.get(ids[task_id]).status)

    await wait_for(lambda: status("quick") == "exited", 30, "quick task exited")
    assert status("slow") == "running"
    second = make_executor()
    assert await asyncio.to_thread(second.remove_leftovers) == 0
    adopted = {spec.task_id: spec for spec in second.adoptable()}
    assert adopted == {"slow": slow, "quick": quick}
    assert second.adoptable() == []  # offered once
    for task_id, expected in (("slow", b"slow"), ("quick", b"quick")):
        result = await second.reattach(adopted[task_id])
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.archive is not None
        assert archive_files(result.archive.read_bytes()) == {"results/out.txt": expected}
        if task_id == "slow":
            assert b"slow here" in result.log_tail
        await second.cleanup(task_id)
        await asyncio.wait_for(second.settle(), 60)
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(ids[task_id])
        assert not (
            tmp_path / "work" / dockerx.SPECS_DIR / f"{task_id}-lease-1{dockerx.SPEC_SUFFIX}"
        ).exists()
    with pytest.raises(ExecutorError):
        await second.reattach(slow)  # not offered any more


async def test_a_container_left_by_the_previous_spec_format_is_removed_as_an_orphan(
    make_executor: MakeExecutor, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """Versions before the JSON spec kept it in the wire format (`.pb`); such a container is
    not re-attached but removed with its workspace and kept spec, and its lease runs out."""
    first = make_executor()
    task = make_task("import time\ntime.sleep(60)\n", "old")
    await first.prepare(task)
    workspace = first.workspace("old")
    assert workspace is not None
    container = await asyncio.to_thread(
        lambda: docker_client.containers.create(**first.container_config(task, workspace))
    )
    await asyncio.to_thread(container.start)
    specs = tmp_path / "work" / dockerx.SPECS_DIR
    kept = specs / f"old-lease-1{dockerx.SPEC_SUFFIX}"
    old = kept.with_suffix(dockerx.OLD_SPEC_SUFFIX)
    kept.unlink()
    old.write_bytes(task.to_proto().SerializeToString())  # what the previous version wrote

    second = make_executor()
    assert await asyncio.to_thread(second.remove_leftovers) == 1
    assert second.adoptable() == []
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(str(container.id))
    assert not workspace.exists()
    assert not old.exists()


async def test_requirements_use_a_derived_image_cached_by_their_hash(
    make_executor: MakeExecutor, docker_client: docker.DockerClient
) -> None:
    executor = make_executor()
    requirements = ("hivemind-fake-package==1.0",)
    tag = requirements_tag(TEST_IMAGE, requirements)
    # No registry here, so the build cannot run pip; a derived image already present under
    # the requirements' tag (marked so the test can tell it ran) must be used as it is.
    marker = docker_client.containers.run(
        TEST_IMAGE, ["sh", "-c", "echo derived > /etc/hivemind-marker"], detach=True
    )
    try:
        marker.wait(timeout=30)
        repository, _, version = tag.partition(":")
        marker.commit(repository, version)
    finally:
        marker.remove()
    try:
        source = "open('results/marker.txt', 'w').write(open('/etc/hivemind-marker').read())\n"
        result, _ = await run_task(executor, make_task(source, requirements=requirements))
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.archive is not None
        assert archive_files(result.archive.read_bytes()) == {"results/marker.txt": b"derived\n"}
    finally:
        docker_client.images.remove(tag, force=True)


async def test_requirements_build_failure_and_pip_options_fail_with_reasons(
    make_executor: MakeExecutor, docker_client: docker.DockerClient
) -> None:
    executor = make_executor()
    with pytest.raises(TaskSpecError, match="is a pip option"):
        await executor.prepare(make_task("pass", requirements=("--index-url=http://x/",)))
    requirements = (f"hivemind-not-installable-{time.time_ns()}",)
    # The test image has no pip: the build fails, and the reason reaches the task.
    with pytest.raises(ExecutorError, match=r"installing the requirements failed.*pip"):
        await executor.prepare(make_task("pass", requirements=requirements))
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(requirements_tag(TEST_IMAGE, requirements))


async def test_images_it_pulled_are_pruned_least_recently_used_first(
    make_executor: MakeExecutor, docker_client: docker.DockerClient, node_id: str
) -> None:
    executor = make_executor()
    base = docker_client.images.get(TEST_IMAGE)
    refs = [f"hivemind-prune-{node_id}:{name}" for name in ("old", "new", "mine")]
    for ref in refs:
        base.tag(*ref.split(":"))
    try:
        # The worker pulled "old" then "new"; "mine" is the person's own and never pruned.
        ledger = executor.images.ledger
        ledger.touch(refs[0])
        ledger.touch(refs[1])
        size = int(base.attrs["Size"])
        removed = await asyncio.to_thread(executor.images.prune, size)  # room for one
        assert removed == [refs[0]]
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(refs[0])
        docker_client.images.get(refs[1])
        docker_client.images.get(refs[2])
        assert ledger.refs() == [refs[1]]
    finally:
        for ref in refs:
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(ref)


async def test_lower_cpu_caps_scale_running_containers_down_and_back(
    make_executor: MakeExecutor, docker_client: docker.DockerClient
) -> None:
    executor = make_executor()
    tasks = [
        make_task("import time\ntime.sleep(60)\n", f"t{i}", resources=Resources(1, 64 * MiB, MiB))
        for i in range(2)
    ]
    runs = []
    for task in tasks:
        await executor.prepare(task)
        runs.append(asyncio.create_task(executor.run(task)))

    def ceilings() -> list[int]:
        out = []
        for task in tasks:
            container = executor.container(task.task_id)
            assert container is not None
            out.append(docker_client.api.inspect_container(container.id)["HostConfig"]["NanoCpus"])
        return out

    try:
        await wait_for(
            lambda: all(executor.container(t.task_id) is not None for t in tasks), 30, "containers"
        )
        assert ceilings() == [1_000_000_000] * 2
        await executor.apply_caps(Resources(cpus=1, memory_bytes=GiB))
        assert ceilings() == [500_000_000] * 2  # two tasks share the one core left
        await executor.apply_caps(Resources(cpus=4, memory_bytes=GiB))
        assert ceilings() == [1_000_000_000] * 2  # never above what each task asked for
    finally:
        for task in tasks:
            await executor.cancel(task.task_id)
        await asyncio.gather(*runs)
