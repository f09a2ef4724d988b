"""The worker steps aside by itself: the engine, real probes and the real pool, end to end.

Each test drives a real source (a sysfs battery tree read through psutil, an X server with
a window manager, a CPU burner outside the worker's process tree) and checks what a person
would: the tasks freeze, the reason is told (event, state, the pool's node record), leases
hold, and the frozen task finishes with the right result, or runs elsewhere exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from helpers.desktop import (
    app_window,
    cpu_burners,
    missing_tools,
    move_pointer,
    set_fullscreen,
    write_battery,
    xvfb,
)
from helpers.harness import (
    Worker,
    archive_files,
    python_task,
    queue_client,
    start_pool,
    start_worker,
    wait_for,
    worker_subprocess,
)
from hivemind_worker.engine.events import EngineState, PolicyChanged, TaskFinished, TaskStarted
from hivemind_worker.engine.policy import Reason, Verdict
from hivemind_worker.engine.probes import DesktopProbes
from hivemind_worker.engine.probes.load import LoadProbe
from hivemind_worker.engine.probes.power import PowerProbe
from hivemind_worker.engine.probes.x11 import X11Desktop
from hivemind_worker.pool.store import NodeNotFound, PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import TaskStatus

pytestmark = [pytest.mark.usefixtures("memory_keyring"), pytest.mark.timeout(120)]

needs_x = pytest.mark.skipif(
    bool(missing_tools()) and os.environ.get("CI") != "true",
    reason=f"needs {', '.join(missing_tools())} (Debian: xvfb openbox xdotool)",
)

# Hashes its steps with a pause between each, so that a freeze shows as steps not taken;
# the result proves every step ran exactly once, in order.
STEPS_SOURCE = """
    import hashlib, sys, time
    digest = hashlib.sha256()
    for i in range(int(sys.argv[1])):
        digest.update(str(i).encode())
        time.sleep(0.1)
    open("results/out.txt", "w").write(digest.hexdigest())
    print("all steps done")
"""
SPIN_SOURCE = """
    import sys, time
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        pass
    open("results/out.txt", "w").write("spun")
"""


def expected_steps(count: int) -> bytes:
    digest = hashlib.sha256()
    for i in range(count):
        digest.update(str(i).encode())
    return digest.hexdigest().encode()


def task_processes() -> list[psutil.Process]:
    """The process-sandbox task trees running under this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "main.py" in child.cmdline():
                found.append(child)
    return found


def all_frozen() -> bool:
    processes = task_processes()
    try:
        return bool(processes) and all(p.status() == psutil.STATUS_STOPPED for p in processes)
    except psutil.Error:
        return False


def none_frozen() -> bool:
    try:
        return all(p.status() != psutil.STATUS_STOPPED for p in task_processes())
    except psutil.Error:
        return False


def decisions(worker: Worker) -> list[PolicyChanged]:
    return [e for e in worker.events if isinstance(e, PolicyChanged)]


def suspended_for(worker: Worker, reason: Reason) -> bool:
    changes = decisions(worker)
    return (
        bool(changes)
        and changes[-1].decision.verdict is Verdict.SUSPEND
        and (changes[-1].decision.reason is reason)
    )


def running_again(worker: Worker) -> bool:
    changes = decisions(worker)
    return bool(changes) and changes[-1].decision.verdict is Verdict.RUN


def started(worker: Worker) -> bool:
    return any(isinstance(e, TaskStarted) for e in worker.events)


def finished(worker: Worker) -> list[TaskFinished]:
    return [e for e in worker.events if isinstance(e, TaskFinished)]


def node_record(db: Path, node_id: str) -> tuple[int, str] | None:
    """The node's status and its reason at the pool; None until it has registered."""
    store = PoolStore(db)
    try:
        node = store.get_node(node_id, "alice")
        return node.status, node.status_message
    except NodeNotFound:
        return None
    finally:
        store.close()


# Only the rule under test: the machine's own load (other tests, other people) stays out.
QUIET_RULES = {"other_cpu_percent": 0, "memory_low_percent": 0}


async def test_on_battery_freezes_past_the_lease_timeout_and_finishes_right(
    tmp_path: Path,
) -> None:
    power = tmp_path / "power_supply"
    write_battery(power, plugged=True, percent=80)
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=3)
    worker = await start_worker(
        tmp_path / "node-a",
        pool.address,
        probes=DesktopProbes(power=PowerProbe(power)),
        **QUIET_RULES,
    )
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task(STEPS_SOURCE, "30"))
            await wait_for(lambda: started(worker) and bool(task_processes()), what="start")
            write_battery(power, plugged=False, percent=79)
            await wait_for(lambda: suspended_for(worker, Reason.ON_BATTERY), what="suspend")
            await wait_for(all_frozen, what="every task process stopped")
            assert worker.engine.state is EngineState.WAITING
            assert worker.engine.state_message == "on battery — resumes when plugged in"
            await wait_for(
                lambda: (
                    node_record(tmp_path / "pool.db", "node-a")
                    == (pb.NODE_STATUS_PAUSED, "on battery")
                ),
                what="the pool to see the node paused, on battery",
            )
            # Frozen for more than twice the lease timeout: heartbeats keep the lease.
            await asyncio.sleep(7)
            assert all_frozen()
            info = await queue.get(task_id)
            assert (info.status, info.attempt) == (pb.TASK_STATUS_RUNNING, 1)
            write_battery(power, plugged=True, percent=79)
            await wait_for(lambda: running_again(worker), what="resume")
            (info,) = (await queue.wait_done([task_id], timeout=60)).values()
            assert (info.status, info.attempt, info.node_id) == (
                pb.TASK_STATUS_SUCCEEDED, 1, "node-a",
            )  # fmt: skip
            files = archive_files(await queue.download(task_id))
            assert files["results/out.txt"] == expected_steps(30)
            status, reason = node_record(tmp_path / "pool.db", "node-a") or (0, "?")
            assert status != pb.NODE_STATUS_PAUSED and reason == ""
    finally:
        await worker.stop()
        await pool.stop()


async def test_frozen_past_the_give_back_limit_runs_elsewhere_exactly_once(
    tmp_path: Path,
) -> None:
    power = tmp_path / "power_supply"
    write_battery(power, plugged=True, percent=80)
    # A long lease: only the worker's own give-back can put the task back in the queue.
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=300)
    laptop = await start_worker(
        tmp_path / "laptop",
        pool.address,
        probes=DesktopProbes(power=PowerProbe(power)),
        give_back_minutes=0.05,  # 3 s
        **QUIET_RULES,
    )
    desktop = None
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task(STEPS_SOURCE, "20"))
            await wait_for(lambda: started(laptop) and bool(task_processes()), what="start")
            write_battery(power, plugged=False, percent=60)
            await wait_for(all_frozen, what="frozen")
            await wait_for(
                lambda: any(e.given_back == 1 for e in decisions(laptop)), what="give back"
            )
            returned = next(e for e in decisions(laptop) if e.given_back)
            assert returned.line.endswith("gave 1 task(s) back to the pool")
            await wait_for(lambda: bool(finished(laptop)), what="the frozen run to end")
            desktop = await start_worker(tmp_path / "desktop", pool.address)
            (info,) = (await queue.wait_done([task_id], timeout=60)).values()
            assert (info.status, info.node_id, info.attempt) == (
                pb.TASK_STATUS_SUCCEEDED, "desktop", 2,
            )  # fmt: skip
            files = archive_files(await queue.download(task_id))
            assert files["results/out.txt"] == expected_steps(20)
            # Exactly once: one cancelled run on the laptop, one success on the desktop, and
            # the laptop, still on battery, took nothing more.
            assert [e.status for e in finished(laptop)] == [TaskStatus.CANCELLED]
            assert [e.status for e in finished(desktop)] == [TaskStatus.SUCCEEDED]
            assert laptop.engine.state is EngineState.WAITING
    finally:
        if desktop is not None:
            await desktop.stop()
        await laptop.stop()
        await pool.stop()


def ambient_other_cpu(seconds: float = 2.0) -> float:
    probe = LoadProbe()
    probe.other_cpu_percent()
    time.sleep(seconds)
    return probe.other_cpu_percent() or 0.0


async def test_other_programs_busy_freezes_the_task_and_it_resumes_after(tmp_path: Path) -> None:
    # On a quiet machine the burners below are the busy programs, and stopping them is what
    # lets the task resume. Where something else already keeps every core busy (a shared
    # box, the test loop's burned runs) that never happens by itself: there the person
    # raises the threshold in the settings instead, the other way a person ends the pause.
    ambient = await asyncio.to_thread(ambient_other_cpu)
    busy_anyway = ambient > 60
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / "node-a",
        pool.address,
        probes=DesktopProbes(load=LoadProbe()),
        other_cpu_percent=80,
        other_cpu_suspend_seconds=1,
        other_cpu_resume_seconds=2,
        memory_low_percent=0,
    )
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task(STEPS_SOURCE, "30"))
            await wait_for(lambda: started(worker) and bool(task_processes()), what="start")
            with cpu_burners(os.cpu_count() or 1):
                await wait_for(lambda: suspended_for(worker, Reason.OTHER_LOAD), what="suspend")
                await wait_for(all_frozen, what="frozen")
                assert worker.engine.state_message.startswith("other programs are busy")
            if busy_anyway:
                worker.engine.apply_settings(replace(worker.engine.settings, other_cpu_percent=0))
            await wait_for(lambda: running_again(worker), timeout=60, what="resume")
            (info,) = (await queue.wait_done([task_id], timeout=60)).values()
            assert (info.status, info.attempt) == (pb.TASK_STATUS_SUCCEEDED, 1)
            files = archive_files(await queue.download(task_id))
            assert files["results/out.txt"] == expected_steps(30)
    finally:
        await worker.stop()
        await pool.stop()


@needs_x
async def test_a_full_screen_window_suspends_and_leaving_it_resumes(tmp_path: Path) -> None:
    with xvfb(tmp_path / "x", window_manager=True) as display:
        x11 = X11Desktop(display)
        pool = await start_pool(tmp_path / "pool.db")
        worker = await start_worker(
            tmp_path / "node-a",
            pool.address,
            probes=DesktopProbes(idle=x11, fullscreen=x11),
            **QUIET_RULES,
        )
        try:
            async with queue_client(pool.address) as queue:
                task_id = await queue.submit(python_task(STEPS_SOURCE, "30"))
                await wait_for(lambda: started(worker) and bool(task_processes()), what="start")
                with app_window(display, "a game") as window:
                    await asyncio.to_thread(set_fullscreen, display, window, True)
                    await wait_for(lambda: suspended_for(worker, Reason.FULLSCREEN), what="suspend")
                    await wait_for(all_frozen, what="frozen")
                    await asyncio.sleep(2)
                    assert all_frozen()
                    await asyncio.to_thread(set_fullscreen, display, window, False)
                    await wait_for(lambda: running_again(worker), what="resume")
                    await wait_for(none_frozen, what="thawed")
                (info,) = (await queue.wait_done([task_id], timeout=60)).values()
                assert info.status == pb.TASK_STATUS_SUCCEEDED
                files = archive_files(await queue.download(task_id))
                assert files["results/out.txt"] == expected_steps(30)
        finally:
            await worker.stop()
            await pool.stop()


@needs_x
async def test_only_when_idle_freezes_on_a_pointer_move_and_resumes_when_away(
    tmp_path: Path,
) -> None:
    with xvfb(tmp_path / "x") as display:
        x11 = X11Desktop(display)
        pool = await start_pool(tmp_path / "pool.db")
        worker = await start_worker(
            tmp_path / "node-a",
            pool.address,
            probes=DesktopProbes(idle=x11),
            idle_only_minutes=0.05,  # 3 s without input
            **QUIET_RULES,
        )
        try:
            async with queue_client(pool.address) as queue:
                await wait_for(lambda: running_again(worker), what="idle long enough")
                task_id = await queue.submit(python_task(STEPS_SOURCE, "30"))
                await wait_for(lambda: started(worker) and bool(task_processes()), what="start")
                await asyncio.to_thread(move_pointer, display, 300, 200)
                await wait_for(lambda: suspended_for(worker, Reason.IN_USE), what="suspend")
                await wait_for(all_frozen, what="frozen")
                assert "resumes after 0.05 minutes without input" in worker.engine.state_message
                await wait_for(lambda: running_again(worker), what="resume when away")
                (info,) = (await queue.wait_done([task_id], timeout=60)).values()
                assert info.status == pb.TASK_STATUS_SUCCEEDED
                files = archive_files(await queue.download(task_id))
                assert files["results/out.txt"] == expected_steps(30)
        finally:
            await worker.stop()
            await pool.stop()


async def test_manual_pause_wins_and_contribute_anyway_overrides(tmp_path: Path) -> None:
    power = tmp_path / "power_supply"
    write_battery(power, plugged=True, percent=80)
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / "node-a",
        pool.address,
        probes=DesktopProbes(power=PowerProbe(power)),
        **QUIET_RULES,
    )
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task(STEPS_SOURCE, "30"))
            await wait_for(lambda: started(worker) and bool(task_processes()), what="start")
            worker.engine.pause()
            await wait_for(all_frozen, what="paused by hand")
            # The policy going from suspend back to run does not undo a manual pause.
            write_battery(power, plugged=False, percent=70)
            await wait_for(lambda: suspended_for(worker, Reason.ON_BATTERY), what="suspend")
            write_battery(power, plugged=True, percent=70)
            await wait_for(lambda: running_again(worker), what="policy run")
            await asyncio.sleep(1.5)
            assert all_frozen() and worker.engine.state is EngineState.PAUSED
            # Resume while the policy says suspend: still frozen, and the state says why.
            write_battery(power, plugged=False, percent=70)
            await wait_for(lambda: suspended_for(worker, Reason.ON_BATTERY), what="suspend")
            worker.engine.resume()
            await wait_for(lambda: worker.engine.state is EngineState.WAITING, what="waiting")
            assert all_frozen()
            worker.engine.contribute_anyway(3600)
            await wait_for(none_frozen, what="contributing anyway")
            assert decisions(worker)[-1].decision.reason is Reason.OVERRIDE
            assert decisions(worker)[-1].override_until is not None
            (info,) = (await queue.wait_done([task_id], timeout=60)).values()
            assert info.status == pb.TASK_STATUS_SUCCEEDED
    finally:
        await worker.stop()
        await pool.stop()


def stopped_share(seconds: float) -> float:
    """The share of `seconds` that the task's processes spent stopped, sampled every 10 ms.

    Whether a process is stopped does not depend on how busy the machine is, unlike the CPU
    it gets, so this measures the throttle itself on a shared machine.
    """
    stopped = total = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        processes = task_processes()
        with contextlib.suppress(psutil.Error):
            if processes:
                total += 1
                stopped += all(p.status() == psutil.STATUS_STOPPED for p in processes)
        time.sleep(0.01)
    assert total > 0
    return stopped / total


async def test_cpu_time_limit_and_a_lower_core_cap_apply_to_a_running_task(
    tmp_path: Path,
) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node-a", pool.address, **QUIET_RULES)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                python_task(
                    SPIN_SOURCE,
                    "20",
                    resources=pb.Resources(cpus=1, memory_bytes=256 << 20, disk_bytes=64 << 20),
                )
            )
            await wait_for(lambda: started(worker) and bool(task_processes()), what="start")
            assert await asyncio.to_thread(stopped_share, 1.0) == 0
            # "Use at most 25 % of CPU time", changed in the settings while the task runs.
            settings = worker.engine.settings
            worker.engine.apply_settings(replace(settings, cpu_time_percent=25))
            await wait_for(
                lambda: (
                    bool(decisions(worker))
                    and decisions(worker)[-1].decision.verdict is Verdict.THROTTLE
                ),
                what="throttle",
            )
            await asyncio.sleep(0.5)
            # A stop/continue duty cycle: stopped about three quarters of the time.
            assert 0.5 < await asyncio.to_thread(stopped_share, 3.0) < 0.95
            # Back to 100 %, then a core cap of a quarter core for the one-core task.
            worker.engine.apply_settings(replace(settings, cpu_time_percent=100))
            for _ in range(20):  # the duty cycle ends within one period
                if await asyncio.to_thread(stopped_share, 0.3) == 0:
                    break
            assert await asyncio.to_thread(stopped_share, 1.0) == 0
            worker.engine.apply_settings(replace(settings, max_cpu_cores=0.25))
            await asyncio.sleep(0.5)
            assert 0.5 < await asyncio.to_thread(stopped_share, 3.0) < 0.95
            (info,) = (await queue.wait_done([task_id], timeout=90)).values()
            assert info.status == pb.TASK_STATUS_SUCCEEDED
    finally:
        await worker.stop()
        await pool.stop()


async def test_headless_worker_logs_one_line_per_change_and_the_pool_sees_why(
    tmp_path: Path,
) -> None:
    # A weekly window three days from now: now is outside it, whatever day this runs.
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(time.localtime().tm_wday + 3) % 7]
    pool = await start_pool(tmp_path / "pool.db")
    home = tmp_path / "headless"
    worker = await worker_subprocess(
        home, pool.address, env_overrides={"HIVEMIND_SCHEDULE": f"{day} 03:00-04:00"}
    )
    try:
        await wait_for(
            lambda: (
                node_record(tmp_path / "pool.db", "headless")
                == (pb.NODE_STATUS_PAUSED, "outside your schedule")
            ),
            60,
            "the pool to see the node paused outside its schedule",
        )
        await asyncio.sleep(3)  # three more evaluations: no more lines
        lines = [
            line
            for line in (home / "stderr.log").read_text().splitlines()
            if "when to contribute:" in line
        ]
        assert len(lines) == 1, lines
        assert lines[0].endswith("suspended: outside your schedule — resumes at 03:00")
    finally:
        worker.kill()
        worker.wait(10)
        await pool.stop()
