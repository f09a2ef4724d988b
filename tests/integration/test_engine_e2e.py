"""The worker engine against the real reference pool: from registration to results, and faults."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
from pathlib import Path

import grpc
import psutil
import pytest

from helpers.harness import (
    archive_files,
    login_token,
    python_task,
    queue_client,
    run_checked_batch,
    start_pool,
    start_worker,
    wait_for,
    worker_subprocess,
)
from helpers.sandbox_pids import TASK_PID, host_pid, written
from hivemind_worker.config import Settings
from hivemind_worker.engine.events import (
    EngineState,
    ResultDelivered,
    SandboxChosen,
    StateChanged,
    TaskFinished,
    TaskStarted,
)
from hivemind_worker.engine.executors.base import Executor
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.pool.store import PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = [pytest.mark.usefixtures("memory_keyring"), pytest.mark.timeout(120)]


async def test_batch_of_tasks_end_to_end(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node-a", pool.address)
    try:
        async with queue_client(pool.address) as queue:
            await run_checked_batch(queue, "node-a", count=24, timeout=90)
        # Registration and heartbeats reached the pool's database.
        store = PoolStore(tmp_path / "pool.db")
        try:
            node = store.get_node("node-a", "alice")
            assert "process" in node.capabilities
            assert store.counters().get("heartbeats", 0) >= 1
        finally:
            store.close()
        finished = [e for e in worker.events if isinstance(e, TaskFinished)]
        assert len(finished) == 24
        delivered = [e for e in worker.events if isinstance(e, ResultDelivered)]
        assert len(delivered) == 24 and all(e.accepted for e in delivered)
        assert {"connecting", "idle", "busy"} <= set(worker.states())
    finally:
        await worker.stop()
        await pool.stop()


async def test_an_executor_chosen_when_the_engine_starts_runs_tasks(tmp_path: Path) -> None:
    """The desktop app's way: choosing the executor (a Docker ping) happens on the engine's
    loop thread's worker, not before the window; until then the engine says it has none."""
    pool = await start_pool(tmp_path / "pool.db")
    chosen_in: list[str] = []
    release = threading.Event()

    def slow_choice(settings: Settings) -> Executor:
        chosen_in.append(threading.current_thread().name)
        release.wait(30)  # as a wedged Docker engine would hold it
        return ProcessExecutor(settings.work_dir)

    worker = await start_worker(
        tmp_path / "node-a", pool.address, executor=slow_choice, choose_executor_at_start=True
    )
    try:
        await wait_for(lambda: bool(chosen_in), what="the choice to begin")
        # The engine's loop is not blocked by the choice, and says no executor yet.
        assert worker.engine.executor_ready is None
        with pytest.raises(RuntimeError, match="chosen when the engine starts"):
            _ = worker.engine.executor
        assert chosen_in != [threading.main_thread().name]
        release.set()
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task("print('after the choice')"))
            await wait_for(
                lambda: any(isinstance(e, ResultDelivered) for e in worker.events), what="result"
            )
            info = await queue.get(task_id)
        assert info.status == pb.TASK_STATUS_SUCCEEDED
        announced = [e for e in worker.events if isinstance(e, SandboxChosen)]
        assert announced == [SandboxChosen("process", "")]
        first_task = next(i for i, e in enumerate(worker.events) if isinstance(e, TaskStarted))
        assert worker.events.index(announced[0]) < first_task
    finally:
        release.set()
        await worker.stop()
        await pool.stop()


async def test_long_poll_picks_up_a_task_without_a_new_poll(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db", max_wait=60)
    # One slot: once the task is taken the worker has no reason to poll again until it ends.
    worker = await start_worker(tmp_path / "node-a", pool.address, max_concurrent_tasks=1)
    try:
        await wait_for(lambda: pool.stats.get_assigned_calls.get("node-a", 0) == 1, what="poll")
        await asyncio.sleep(0.3)  # the call is now parked in the pool
        polls_before = pool.stats.get_assigned_calls["node-a"]
        polls_at_start: list[int] = []
        worker.engine.subscribe(
            lambda e: (
                polls_at_start.append(pool.stats.get_assigned_calls["node-a"])
                if isinstance(e, TaskStarted)
                else None
            )
        )
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task("print('hello')"))
            await wait_for(lambda: bool(polls_at_start), what="start")
            # The task arrived on the call that was already waiting: no second poll was made.
            assert polls_at_start == [polls_before] == [1]
            info = (await queue.wait_done([task_id], timeout=30))[task_id]
            assert info.status == pb.TASK_STATUS_SUCCEEDED
    finally:
        await worker.stop()
        await pool.stop()


@pytest.mark.slow
async def test_killed_worker_loses_its_lease_and_another_finishes(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=3)
    proc = await worker_subprocess(tmp_path / "node-a", pool.address)
    other = None
    try:
        async with queue_client(pool.address) as queue:
            # Written in the task's workspace: the sandbox lets it write nowhere else.
            source = """
                import time
                open("started.txt", "w").close()
                time.sleep(3)
                open("results/done.txt", "w").write("finished")
            """
            task_id = await queue.submit(python_task(source, name="survivor"))

            async def running_on_a() -> bool:
                info = await queue.get(task_id)
                return info.status == pb.TASK_STATUS_RUNNING and info.node_id == "node-a"

            for _ in range(600):
                if await running_on_a() and written(tmp_path / "node-a", "started.txt"):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("worker A never started the task")
            first = await queue.get(task_id)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

            other = await start_worker(tmp_path / "node-b", pool.address)
            info = (await queue.wait_done([task_id], timeout=60))[task_id]
            assert info.status == pb.TASK_STATUS_SUCCEEDED
            assert info.node_id == "node-b"
            assert info.attempt == first.attempt + 1
            assert archive_files(await queue.download(task_id)) == {"results/done.txt": b"finished"}
            # Exactly one result: the killed worker never reported, the survivor once.
            assert pool.stats.reports_by_lease.get(first.spec.lease_id, 0) == 0
            delivered = [e for e in other.events if isinstance(e, ResultDelivered)]
            assert [e.task_id for e in delivered] == [task_id]
    finally:
        if proc.poll() is None:
            proc.kill()
        if other is not None:
            await other.stop()
        await pool.stop()


async def test_stale_lease_report_is_dropped_not_retried(tmp_path: Path) -> None:
    # Heartbeats far apart and a one-second lease: the lease expires while the task runs.
    pool = await start_pool(tmp_path / "pool.db", heartbeat_interval=60, lease_timeout=1)
    worker = await start_worker(tmp_path / "node-a", pool.address)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                python_task("import time; time.sleep(3)", max_attempts=1, name="too slow")
            )
            await wait_for(
                lambda: any(isinstance(e, ResultDelivered) for e in worker.events),
                timeout=60,
                what="delivery attempt",
            )
            dropped = [e for e in worker.events if isinstance(e, ResultDelivered)]
            assert dropped[0].task_id == task_id and not dropped[0].accepted
            assert "no longer current" in dropped[0].message
            lease = next(e.lease_id for e in worker.events if isinstance(e, TaskStarted))
            await asyncio.sleep(2)  # room for any retry to show up
            # Refused once (the archive's upload comes first), then dropped: no second attempt.
            refused = pool.stats.refused_uploads_by_lease.get(lease, 0)
            assert refused + pool.stats.reports_by_lease.get(lease, 0) == 1
            assert len([e for e in worker.events if isinstance(e, ResultDelivered)]) == 1
            info = await queue.get(task_id)
            assert info.status == pb.TASK_STATUS_FAILED  # the pool gave up at max_attempts
            assert worker.engine.state in (EngineState.IDLE, EngineState.BUSY)
    finally:
        await worker.stop()
        await pool.stop()


async def test_cancel_running_task(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node-a", pool.address)
    try:
        async with queue_client(pool.address) as queue:
            source = f"""
                import os, time
                open("pid.tmp", "w").write({TASK_PID})
                os.rename("pid.tmp", "pid")
                while True:
                    time.sleep(0.1)
            """
            task_id = await queue.submit(python_task(source, name="forever"))
            await wait_for(lambda: written(tmp_path / "node-a", "pid"), what="pid")
            pid = host_pid(written(tmp_path / "node-a", "pid")[0].read_text())
            assert pid is not None and psutil.pid_exists(pid)
            await queue.cancel(task_id)
            info = (await queue.wait_done([task_id], timeout=30))[task_id]
            assert info.status == pb.TASK_STATUS_CANCELLED
            await wait_for(lambda: not psutil.pid_exists(pid), timeout=10, what="process gone")
            finished = [e for e in worker.events if isinstance(e, TaskFinished)]
            assert finished[0].status.value == "cancelled"
    finally:
        await worker.stop()
        await pool.stop()


@pytest.mark.slow
async def test_pool_restart_while_worker_runs(tmp_path: Path) -> None:
    db = tmp_path / "pool.db"
    pool = await start_pool(db)
    listen = pool.address
    worker = await start_worker(tmp_path / "node-a", pool.address)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                python_task(
                    "import time; time.sleep(2); open('results/r.txt','w').write('kept')",
                    name="across restart",
                )
            )
            await wait_for(
                lambda: any(isinstance(e, TaskStarted) for e in worker.events), what="start"
            )
        await pool.stop()
        await wait_for(
            lambda: worker.engine.state is EngineState.CONNECTING, timeout=30, what="noticed"
        )
        await asyncio.sleep(1)
        pool = await start_pool(db, listen=listen)
        async with queue_client(pool.address) as queue:
            later = await queue.submit(python_task("print('after restart')", name="later"))
            infos = await queue.wait_done([task_id, later], timeout=90)
            assert infos[task_id].status == pb.TASK_STATUS_SUCCEEDED
            assert infos[task_id].attempt == 1  # the lease survived the restart
            assert archive_files(await queue.download(task_id)) == {"results/r.txt": b"kept"}
            assert infos[later].status == pb.TASK_STATUS_SUCCEEDED
    finally:
        await worker.stop()
        await pool.stop()


async def test_bad_token_gives_a_clear_error_state_not_a_crash_loop(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node-a", pool.address, token="not-a-real-token")
    try:
        await wait_for(lambda: worker.engine.state is EngineState.ERROR, what="error state")
        assert "sign in" in worker.engine.state_message
        await asyncio.sleep(3)
        errors = [
            e for e in worker.events if isinstance(e, StateChanged) and e.state is EngineState.ERROR
        ]
        assert len(errors) == 1  # it waits in the error state instead of retrying in a loop
        assert errors[0].retry_at is not None
        assert not worker.runner.done()  # type: ignore[union-attr]

        # Logging in again (another process would write the keyring) and pressing start recovers.
        worker.engine.credentials.set_token(pool.address, "alice", await login_token(pool.address))
        worker.engine.start()
        await wait_for(lambda: worker.engine.state is EngineState.IDLE, what="recovered")
    finally:
        await worker.stop()
        await pool.stop()


async def test_result_too_large_when_packed_fails_the_task_instead_of_hanging(
    tmp_path: Path,
) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node-a", pool.address)
    try:
        async with queue_client(pool.address) as queue:
            # Random bytes do not compress: just under the limit unpacked, over it packed.
            source = "import os; open('results/noise.bin', 'wb').write(os.urandom(99_990))"
            task_id = await queue.submit(python_task(source, max_result_bytes=100_000))
            info = (await queue.wait_done([task_id], timeout=60))[task_id]
            assert info.status == pb.TASK_STATUS_FAILED
            assert "over the task's limit of 100000 bytes" in info.error
    finally:
        await worker.stop()
        await pool.stop()


async def test_a_result_larger_than_the_pool_ever_takes_fails_the_task_with_the_reason(
    tmp_path: Path,
) -> None:
    """The task's own limit (the default 64 MiB) allows it, the pool's receiving cap does not:
    the worker must not read that as "busy, retry later" and keep the lease for ever."""
    cap = 256 << 10
    pool = await start_pool(tmp_path / "pool.db", max_upload_bytes_in_flight=cap)
    worker = await start_worker(tmp_path / "node-a", pool.address)
    try:
        async with queue_client(pool.address) as queue:
            source = "import os; open('results/noise.bin', 'wb').write(os.urandom(512 << 10))"
            task_id = await queue.submit(python_task(source))
            info = (await queue.wait_done([task_id], timeout=60))[task_id]
            assert info.status == pb.TASK_STATUS_FAILED
            assert f"more than this pool receives at once ({cap})" in info.error
            assert info.attempt == 1
            # Asking for more than the pool can receive is refused at submit, naming the field.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await queue.submit(python_task("pass", max_result_bytes=cap + 1))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (refused.value.details() or "").startswith("max_result_bytes:")
    finally:
        await worker.stop()
        await pool.stop()


async def test_stop_gives_running_tasks_back_at_once(tmp_path: Path) -> None:
    # A long lease: only the worker's own CANCELLED report can requeue the task in time.
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=300)
    worker = await start_worker(tmp_path / "node-a", pool.address)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task("import time; time.sleep(60)"))
            await wait_for(
                lambda: any(isinstance(e, TaskStarted) for e in worker.events), what="start"
            )
            worker.engine.stop()
            for _ in range(200):
                info = await queue.get(task_id)
                if info.status == pb.TASK_STATUS_QUEUED:
                    break
                await asyncio.sleep(0.1)
            assert info.status == pb.TASK_STATUS_QUEUED
            assert info.attempt == 2
            await wait_for(lambda: worker.engine.state is EngineState.STOPPED, what="stopped")
    finally:
        await worker.stop()
        await pool.stop()


async def test_drain_takes_no_new_work_from_the_poll_in_flight(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db", max_wait=60)
    worker = await start_worker(tmp_path / "node-a", pool.address, max_concurrent_tasks=2)
    try:
        async with queue_client(pool.address) as queue:
            first = await queue.submit(python_task("import time; time.sleep(2)", name="first"))
            await wait_for(
                lambda: any(isinstance(e, TaskStarted) for e in worker.events), what="start"
            )
            # A second slot is free, so a long-poll is parked in the pool right now.
            await wait_for(lambda: pool.stats.get_assigned_calls["node-a"] >= 2, what="poll")
            worker.engine.drain()
            await asyncio.sleep(0.2)
            second = await queue.submit(python_task("print('not here')", name="second"))
            await wait_for(lambda: worker.engine.state is EngineState.STOPPED, what="drained")
            assert (await queue.get(first)).status == pb.TASK_STATUS_SUCCEEDED
            assert (await queue.get(second)).status == pb.TASK_STATUS_QUEUED
            started = [e.name for e in worker.events if isinstance(e, TaskStarted)]
            assert started == ["first"]
    finally:
        await worker.stop()
        await pool.stop()


async def test_a_task_beyond_this_workers_limits_goes_to_another_worker(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    strict = await start_worker(tmp_path / "node-strict", pool.address, task_timeout=60)
    relaxed = None
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                python_task("print('long allowed')", timeout_seconds=600, name="long")
            )
            await wait_for(
                lambda: pool.stats.get_assigned_calls["node-strict"] >= 1, what="strict polls"
            )
            await asyncio.sleep(0.5)
            info = await queue.get(task_id)
            assert info.status == pb.TASK_STATUS_QUEUED  # not offered to the strict worker
            relaxed = await start_worker(tmp_path / "node-relaxed", pool.address)
            info = (await queue.wait_done([task_id], timeout=60))[task_id]
            assert info.status == pb.TASK_STATUS_SUCCEEDED
            assert info.node_id == "node-relaxed" and info.attempt == 1
            assert not [e for e in strict.events if isinstance(e, TaskStarted)]
    finally:
        await strict.stop()
        if relaxed is not None:
            await relaxed.stop()
        await pool.stop()


def spooled_leases(spool: Path) -> list[str]:
    """Leases whose result the worker's outbox has committed (read-only, beside the worker)."""
    if not (spool / "outbox.db").exists():
        return []
    db = sqlite3.connect(f"file:{spool / 'outbox.db'}?mode=ro", uri=True, timeout=5)
    try:
        return [row[0] for row in db.execute("SELECT lease_id FROM results")]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # the worker has not created it yet
            return []
        raise
    finally:
        db.close()


@pytest.mark.slow
async def test_result_kept_in_the_outbox_is_delivered_after_a_crash(tmp_path: Path) -> None:
    db = tmp_path / "pool.db"
    pool = await start_pool(db, lease_timeout=60)
    listen = pool.address
    home = tmp_path / "node-a"
    proc = await worker_subprocess(home, pool.address)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                python_task(
                    "import time; time.sleep(1.5); open('results/r.txt', 'w').write('kept')",
                    name="outlives a crash",
                )
            )
            for _ in range(300):
                if (await queue.get(task_id)).status == pb.TASK_STATUS_RUNNING:
                    break
                await asyncio.sleep(0.1)
        await pool.stop()  # the task finishes while the pool is away: its result is spooled
        spool = home / "data" / "outbox"
        # Kept means recorded: the archive file lands a moment before its record commits,
        # and an archive without a record is swept away on the next start (a crash between
        # the two runs the task again, as it should).
        for _ in range(300):
            if spooled_leases(spool) and list(spool.glob("*.tar.gz")):
                break
            await asyncio.sleep(0.1)
        assert spooled_leases(spool), "the result never reached the outbox"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

        pool = await start_pool(db, listen=listen)
        proc = await worker_subprocess(home, pool.address)
        async with queue_client(pool.address) as queue:
            info = (await queue.wait_done([task_id], timeout=60))[task_id]
            assert info.status == pb.TASK_STATUS_SUCCEEDED
            assert info.attempt == 1 and info.node_id == "node-a"
            assert archive_files(await queue.download(task_id)) == {"results/r.txt": b"kept"}
        for _ in range(100):
            if not list(spool.glob("*.tar.gz")):
                break
            await asyncio.sleep(0.1)
        assert list(spool.glob("*.tar.gz")) == []  # freed once the pool acknowledged it
    finally:
        if proc.poll() is None:
            proc.kill()
        await pool.stop()


async def test_a_task_cancelled_here_and_handed_back_at_once_runs_again(tmp_path: Path) -> None:
    # A long lease: if the second hand-out were ignored, the test would wait out the lease.
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=300)
    worker = await start_worker(tmp_path / "node-a", pool.address)
    # Each run waits for a "go" file in its own workspace; the test gives it to the second.
    source = """
        import os, time
        open("waiting", "w").close()
        for _ in range(1200):
            if os.path.exists("go"):
                break
            time.sleep(0.05)
        open("results/r.txt", "w").write("second run")
    """
    home = tmp_path / "node-a"
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task(source, name="again"))
            await wait_for(lambda: written(home, "waiting"), what="first run")
            first = written(home, "waiting")[0].parent
            worker.engine.cancel_task(task_id, exclude_here=False)  # given back as by a stop
            await wait_for(
                lambda: any(p.parent != first for p in written(home, "waiting")),
                what="second run",
            )
            second = next(p.parent for p in written(home, "waiting") if p.parent != first)
            (second / "go").touch()
            info = (await queue.wait_done([task_id], timeout=60))[task_id]
            assert info.status == pb.TASK_STATUS_SUCCEEDED
            assert info.attempt == 2 and info.node_id == "node-a"
            assert archive_files(await queue.download(task_id)) == {"results/r.txt": b"second run"}
    finally:
        await worker.stop()
        await pool.stop()


async def test_a_task_the_person_cancels_here_runs_on_another_node_only(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=300)
    here = await start_worker(tmp_path / "node-a", pool.address)
    # Each run waits for a "go" file in its own workspace (tasks cannot write outside it).
    source = """
        import os, time
        open("waiting", "w").close()
        for _ in range(1200):
            if os.path.exists("go"):
                break
            time.sleep(0.05)
        open("results/r.txt", "w").write("elsewhere")
    """
    other = None
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task(source, name="not here"))
            await wait_for(lambda: written(tmp_path / "node-a", "waiting"), what="first run")
            here.engine.cancel_task(task_id)  # as the dashboard does
            await wait_for(lambda: not here.engine._running, what="the cancel reported")
            await asyncio.sleep(3)  # this worker keeps polling, and is never given it again
            info = await queue.get(task_id)
            assert info.status == pb.TASK_STATUS_QUEUED and info.attempt == 2
            other = await start_worker(tmp_path / "node-b", pool.address)
            await wait_for(lambda: written(tmp_path / "node-b", "waiting"), what="run elsewhere")
            (written(tmp_path / "node-b", "waiting")[0].parent / "go").touch()
            info = (await queue.wait_done([task_id], timeout=60))[task_id]
            assert info.status == pb.TASK_STATUS_SUCCEEDED and info.node_id == "node-b"
            assert len(written(tmp_path / "node-a", "waiting")) <= 1
    finally:
        if other is not None:
            await other.stop()
        await here.stop()
        await pool.stop()


async def test_a_sandbox_standing_in_for_docker_is_told_to_the_person(tmp_path: Path) -> None:
    from hivemind_worker.engine.events import ErrorRaised
    from hivemind_worker.engine.executors.process import ProcessExecutor

    def stand_in(settings: object) -> ProcessExecutor:
        executor = ProcessExecutor(tmp_path / "work")
        executor.notice = "Docker is not usable (test), so tasks run in the process sandbox."
        return executor

    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node-a", pool.address, executor=stand_in)
    try:
        await wait_for(lambda: worker.engine.state is EngineState.IDLE, what="connected")
        errors = [e for e in worker.events if isinstance(e, ErrorRaised)]
        assert [e.title for e in errors] == ["Docker not available"]
        assert "process sandbox" in errors[0].message
    finally:
        await worker.stop()
        await pool.stop()


async def test_images_the_pool_names_are_preloaded_at_registration(tmp_path: Path) -> None:
    from hivemind_worker.engine.executors.process import ProcessExecutor

    asked: list[list[str]] = []

    class Recording(ProcessExecutor):
        async def preload(self, images: list[str]) -> None:
            asked.append(images)

    pool = await start_pool(
        tmp_path / "pool.db", preload_images=("python:3.12-slim", "not an image!")
    )
    worker = await start_worker(
        tmp_path / "node-a", pool.address, executor=lambda s: Recording(tmp_path / "work")
    )
    try:
        await wait_for(lambda: bool(asked), what="preload")
        assert asked == [["python:3.12-slim"]]  # the malformed reference is dropped
    finally:
        await worker.stop()
        await pool.stop()
