"""README's "Using it" commands, literally and in order, as a person types them: log in to a pool,
run headless (no --node-pool again), ask the doctor, and see a task through."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.harness import PASSWORD, USER
from hivemind_worker.demo import LocalPool
from hivemind_worker.paths import default_paths
from hivemind_worker.pool.client import TaskQueueClient
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = pytest.mark.timeout(240)

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE_POOL = "pool.example.org:50051"


def readme_commands() -> list[list[str]]:
    """The `hivemind-worker` lines of the first code block under '## Using it'."""
    text = README.read_text()
    section = text[text.index("## Using it") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Using it section has no bash block"
    commands = []
    for line in block.group(1).splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "hivemind-worker":
            commands.append(words[1:])
    return commands


def person_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "HIVEMIND_HOME": str(home), "DOCKER_ENABLED": "false"}
    for name in ("NODE_ID", "NODE_POOL_ADDRESS", "HIVEMIND_ACCOUNT", "MAX_CPU_CORES"):
        env.pop(name, None)
    return env


async def test_the_readme_using_it_commands_work_in_order(tmp_path: Path) -> None:
    commands = readme_commands()
    assert [c[0] for c in commands[:3]] == ["login", "run", "doctor"], commands
    pool = LocalPool(tmp_path / "pool" / "pool.db")
    pool.db.parent.mkdir()
    pool.add_user(USER, PASSWORD)
    address = pool.start()
    home = tmp_path / "home"
    env = person_env(home)
    base = [sys.executable, "-m", "hivemind_worker"]
    runner: subprocess.Popen[bytes] | None = None
    try:
        # 1. login, as written, with the example pool replaced by ours and the password piped.
        login = [address if w == EXAMPLE_POOL else w for w in commands[0]]
        assert address in login and "--account" in login
        done = await asyncio.to_thread(
            subprocess.run,
            [*base, *login, "--password-stdin"], input=PASSWORD + "\n", env=env,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        # 2. run --headless, exactly as written: it must find the pool the login was for.
        assert commands[1] == ["run", "--headless"]
        log = (tmp_path / "worker.log").open("wb")
        runner = subprocess.Popen([*base, *commands[1]], env=env, stdout=log, stderr=log)  # noqa: ASYNC220
        queue = TaskQueueClient(address)
        try:
            await queue.login(USER, PASSWORD)
            task_id = await queue.submit(
                pb.TaskSpec(
                    kind=pb.TASK_KIND_PYTHON,
                    source="print('hello from the README')",
                    resources=pb.Resources(cpus=0.5, memory_bytes=128 << 20, disk_bytes=16 << 20),
                    timeout_seconds=60,
                )
            )
            info = (await queue.wait_done([task_id], timeout=120))[task_id]
        finally:
            await queue.close()
        assert info.status == pb.TASK_STATUS_SUCCEEDED, (tmp_path / "worker.log").read_text()
        assert b"hello from the README" in info.log_tail
        # 3. doctor, as written, while the worker runs: healthy, about the same pool.
        assert commands[2] == ["doctor"]
        doctor = await asyncio.to_thread(
            subprocess.run,
            [*base, *commands[2]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert address in doctor.stdout, doctor.stdout
        assert "unhealthy: pool" not in doctor.stdout and "unhealthy: login" not in doctor.stdout
    finally:
        if runner is not None:
            runner.send_signal(signal.SIGINT)
            try:
                runner.wait(60)
            except subprocess.TimeoutExpired:
                runner.kill()
                runner.wait(10)
        pool.stop()


def test_login_with_keep_pool_leaves_the_saved_pool_alone(tmp_path: Path) -> None:
    pool = LocalPool(tmp_path / "pool" / "pool.db")
    pool.db.parent.mkdir()
    pool.add_user(USER, PASSWORD)
    address = pool.start()
    env = person_env(tmp_path / "home")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hivemind_worker", "login", "--node-pool", address,
             "--account", USER, "--password-stdin", "--keep-pool"],
            input=PASSWORD + "\n", env=env, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "now contributes to" not in done.stdout
        settings_file = default_paths(tmp_path / "home").settings_file
        assert not settings_file.exists() or address not in settings_file.read_text()
    finally:
        pool.stop()
