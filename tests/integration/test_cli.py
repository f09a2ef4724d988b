"""The command line as a person uses it: version, bad settings, login, doctor, demo, Ctrl-C."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from helpers.desktop import cpu_burners
from helpers.harness import PASSWORD, USER, python_task, queue_client, start_pool, worker_subprocess
from hivemind_worker import __version__
from hivemind_worker.config import load_settings, save_settings
from hivemind_worker.demo import LocalPool
from hivemind_worker.paths import default_paths
from hivemind_worker.pool.records import NodeNotFound
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = pytest.mark.timeout(180)


def cli(home: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    # DOCKER_ENABLED=false: the demo's Python image would otherwise be pulled from a registry.
    full_env = {
        **os.environ,
        "HIVEMIND_HOME": str(home),
        "DOCKER_ENABLED": "false",
        **(env or {}),
    }
    for name in ("NODE_ID", "NODE_POOL_ADDRESS", "MAX_CPU_CORES", "HIVEMIND_ACCOUNT"):
        if name not in (env or {}):
            full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "hivemind_worker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=150,
        check=False,
    )


@pytest.fixture
def local_pool(tmp_path: Path) -> Iterator[LocalPool]:
    pool = LocalPool(tmp_path / "pool" / "pool.db")
    pool.db.parent.mkdir()
    pool.add_user(USER, PASSWORD)
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()


def test_version(tmp_path: Path) -> None:
    done = cli(tmp_path, "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"hivemind-worker {__version__}"


def test_bad_setting_from_the_environment_names_key_source_and_range(tmp_path: Path) -> None:
    done = cli(tmp_path, "run", "--headless", env={"MAX_CPU_CORES": "lots"})
    assert done.returncode == 2
    message = done.stderr.strip()
    assert "max_cpu_cores" in message and "environment variable MAX_CPU_CORES" in message
    assert "expected a number from 0 to" in message
    assert len(message.splitlines()) == 1  # one clear line, no traceback


def test_bad_setting_from_a_flag_and_from_the_file(tmp_path: Path) -> None:
    done = cli(tmp_path, "run", "--headless", "--node-pool", "no-port-here")
    assert done.returncode == 2
    assert "command-line flag --node-pool" in done.stderr
    settings = tmp_path / "config" / "settings.toml"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text("max_concurrent_tasks = 0\n")
    done = cli(tmp_path, "run", "--headless")
    assert done.returncode == 2
    assert "max_concurrent_tasks" in done.stderr and str(settings) in done.stderr


def test_login_then_doctor_is_healthy(tmp_path: Path, local_pool: LocalPool) -> None:
    home = tmp_path / "home"
    pool_flag = ["--node-pool", local_pool.address]
    done = cli(home, "doctor", *pool_flag, "--account", USER)
    assert done.returncode == 1
    assert "not logged in" in done.stdout

    done = cli(home, "login", *pool_flag, "--account", USER, "--password-stdin", stdin="wrong\n")
    assert done.returncode == 1
    assert "wrong username or password" in done.stderr

    done = cli(
        home, "login", *pool_flag, "--account", USER, "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert done.returncode == 0, done.stderr
    assert f"Logged in to {local_pool.address} as {USER}" in done.stdout
    # The token is in the keyring (here the explicit plaintext fallback); never the password.
    assert PASSWORD not in "".join(p.read_text(errors="replace") for p in home.rglob("*.cfg"))

    done = cli(home, "doctor", *pool_flag)  # the account is remembered from the login
    assert done.returncode == 0, done.stdout
    assert "healthy" in done.stdout.splitlines()[-1]
    assert f"logged in as {USER}" in done.stdout
    # One line per wall of the process sandbox, as this machine builds it.
    walls = ("namespaces", "mount view", "landlock", "seccomp", "process cap", "cgroup")
    lines = {line[6:].split("  ")[0].strip(): line for line in done.stdout.splitlines()}
    for wall in walls:
        assert f"sandbox: {wall}" in lines, done.stdout
    if sys.platform.startswith("linux"):
        # This kernel (6.x, user namespaces on) gives every wall but maybe the cgroup.
        assert all(lines[f"sandbox: {w}"].startswith("ok") for w in walls[:5]), done.stdout
    if os.geteuid() == 0:
        assert "runs as root" in lines["sandbox: user"] and "ordinary user" in done.stdout


def test_doctor_reports_an_unreachable_pool(tmp_path: Path) -> None:
    done = cli(tmp_path, "doctor", "--node-pool", "127.0.0.1:9")
    assert done.returncode == 1
    assert "FAIL" in done.stdout and "127.0.0.1:9" in done.stdout
    assert "unhealthy: pool" in done.stdout


@pytest.mark.slow
def test_demo_completes_every_task(tmp_path: Path) -> None:
    # The ml and data samples turned off: test_runners.py runs them (their first use
    # downloads their environments); here the demo says why they are left out.
    off = {"HIVEMIND_ML_SCIKIT_LEARN": "false", "HIVEMIND_DATA_PROCESSING": "false"}
    done = cli(tmp_path, "demo", "--headless", "--tasks", "4", env=off)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "random forest on iris (scikit-learn): skipped, ml:scikit-learn tasks are off" in (
        done.stdout
    )
    assert "Done: 4 of 4 tasks succeeded." in done.stdout
    assert "17984 primes up to 200000" in done.stdout
    assert "[4/4]" in done.stdout


@pytest.mark.slow
def test_the_demo_runs_now_while_other_programs_keep_the_cpu_busy(tmp_path: Path) -> None:
    """The demo is a person asking for work now: the "other programs busy" rule (here as strict
    as it goes, with another program spinning) does not hold its tasks back. One core is left:
    tasks run at the lowest CPU weight, so with every core spinning they would (rightly) crawl.
    """
    strict = {
        "HIVEMIND_ML_SCIKIT_LEARN": "false",
        "HIVEMIND_DATA_PROCESSING": "false",
        "HIVEMIND_OTHER_CPU_PERCENT": "1",
        "HIVEMIND_OTHER_CPU_SUSPEND_SECONDS": "1",
    }
    with cpu_burners(max(1, (os.cpu_count() or 1) - 1)):
        done = cli(tmp_path, "demo", "--headless", "--tasks", "3", env=strict)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Done: 3 of 3 tasks succeeded." in done.stdout


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_with_one_line(tmp_path: Path) -> None:
    """Ctrl-C in a terminal reaches the whole foreground group: the worker finishes what runs
    and the demo says it was stopped, in one line (its pool is stopped after, not killed by
    the same Ctrl-C under the worker's feet)."""
    env = {
        **os.environ,
        "HIVEMIND_HOME": str(tmp_path),
        "DOCKER_ENABLED": "false",
        "HIVEMIND_ML_SCIKIT_LEARN": "false",
        "HIVEMIND_DATA_PROCESSING": "false",
    }
    demo = subprocess.Popen(
        [sys.executable, "-m", "hivemind_worker", "demo", "--headless", "--tasks", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # a terminal's foreground group of its own
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        seen = []
        for line in demo.stdout:  # bounded: the demo ends, and the test's timeout
            seen.append(line)
            if line.startswith("[1/200]"):
                break
        os.killpg(demo.pid, signal.SIGINT)
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 1, "".join(seen) + out + err
    assert "the demo was stopped before its tasks finished" in err
    assert "Traceback" not in err and "AioRpcError" not in err, err


@pytest.mark.slow
def test_a_killed_demo_leaves_no_pool_behind(tmp_path: Path) -> None:
    """However the demo ends (a closed terminal, a kill), the local pool it started stops."""
    env = {**os.environ, "HIVEMIND_HOME": str(tmp_path), "DOCKER_ENABLED": "false"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "hivemind_worker", "demo", "--headless", "--tasks", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # bounded: the demo ends, and the test's timeout
            if line.startswith("Submitted"):
                break
        (pool,) = [p for p in psutil.Process(demo.pid).children() if "serve" in p.cmdline()]
        demo.kill()
        demo.wait(30)
        pool.wait(30)  # psutil.TimeoutExpired if it runs on
        assert not pool.is_running()
    finally:
        if demo.poll() is None:
            demo.kill()


@pytest.mark.slow
async def test_ctrl_c_finishes_the_running_task_then_exits(
    tmp_path: Path, memory_keyring: object
) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    proc = await worker_subprocess(tmp_path / "node-a", pool.address)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                python_task(
                    "import time; time.sleep(2); open('results/r.txt', 'w').write('done')",
                    name="finish me",
                )
            )
            for _ in range(300):
                if (await queue.get(task_id)).status == pb.TASK_STATUS_RUNNING:
                    break
                await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            for _ in range(300):  # bounded wait for the process to drain and exit
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            assert proc.returncode == 0
            info = await queue.get(task_id)
            assert info.status == pb.TASK_STATUS_SUCCEEDED  # finished and delivered, not requeued
            assert info.attempt == 1
        log = (tmp_path / "node-a" / "stderr.log").read_text()
        assert "finishing running tasks" in log
    finally:
        if proc.poll() is None:
            proc.kill()
        await pool.stop()


async def test_the_headless_worker_takes_the_kinds_the_settings_file_turns_on(
    tmp_path: Path, memory_keyring: object
) -> None:
    """The file the settings dialog writes decides the headless worker's kinds of tasks too."""
    home = tmp_path / "node-a"
    paths = default_paths(home)
    save_settings(paths, dataclasses.replace(load_settings(paths, env={}), ml_pytorch=True))
    pool = await start_pool(tmp_path / "pool.db")
    # Offline uv with an empty cache: nothing is downloaded, whatever reaches this worker.
    offline = {"UV_OFFLINE": "1", "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    proc = await worker_subprocess(home, pool.address, env_overrides=offline)
    try:
        registered: frozenset[str] = frozenset()
        for _ in range(600):  # bounded wait for the registration
            try:
                registered = pool.store.get_node(home.name, USER).capabilities
                break
            except NodeNotFound:
                await asyncio.sleep(0.1)
        assert "ml:pytorch" in registered, (home / "stderr.log").read_text()
        assert "ml:tensorflow" not in registered and "ml:scikit-learn" in registered
    finally:
        proc.kill()
        proc.wait(30)
        await pool.stop()
