"""Whole-tree freeze and CPU duty cycle (executors/freeze.py) on real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import psutil

from hivemind_worker.engine.executors.freeze import TreeControl

# A parent and a forked child, both spinning on the CPU.
SPINNERS = textwrap.dedent(
    """
    import os
    os.fork()
    while True:
        pass
    """
)


@contextlib.asynccontextmanager
async def spinning_tree() -> AsyncIterator[tuple[TreeControl, list[psutil.Process]]]:
    proc = subprocess.Popen(  # noqa: ASYNC220 - killed with SIGKILL by the fixture
        [sys.executable, "-c", SPINNERS], start_new_session=True
    )
    try:
        leader = psutil.Process(proc.pid)
        for _ in range(100):
            if leader.children():
                break
            await asyncio.sleep(0.05)
        tree = [leader, *leader.children(recursive=True)]
        assert len(tree) == 2

        def signal_tree(sig: int) -> None:
            os.killpg(proc.pid, sig)

        control = TreeControl(signal_tree)
        yield control, tree
        control.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def cpu(tree: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in tree)


async def test_freeze_stops_every_process_of_the_tree_and_thaw_continues_them() -> None:
    async with spinning_tree() as (control, tree):
        control.freeze()
        await asyncio.sleep(0.2)
        assert [p.status() for p in tree] == [psutil.STATUS_STOPPED] * 2
        before = cpu(tree)
        await asyncio.sleep(1.0)
        assert cpu(tree) == before  # not one tick of CPU while frozen
        control.thaw()
        await asyncio.sleep(0.5)
        assert psutil.STATUS_STOPPED not in [p.status() for p in tree]
        assert cpu(tree) > before


async def stopped_share(tree: list[psutil.Process], seconds: float) -> float:
    """The share of samples (every 10 ms) in which every process of the tree was stopped: a
    measure of the duty cycle that does not depend on how busy the machine is."""
    stopped = total = 0
    end = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < end:
        total += 1
        stopped += all(p.status() == psutil.STATUS_STOPPED for p in tree)
        await asyncio.sleep(0.01)
    return stopped / total


async def test_duty_cycle_runs_the_tree_for_its_share_only() -> None:
    async with spinning_tree() as (control, tree):
        assert await stopped_share(tree, 0.5) == 0
        control.set_share(0.2)
        # Stopped for about 80 % of each period, running (and using CPU) for the rest.
        before = cpu(tree)
        assert 0.6 < await stopped_share(tree, 3.0) < 0.97
        assert cpu(tree) > before
        control.set_share(1.0)
        await asyncio.sleep(0.1)
        assert await stopped_share(tree, 0.5) == 0


async def test_freeze_wins_over_the_duty_cycle() -> None:
    async with spinning_tree() as (control, tree):
        control.set_share(0.5)
        control.freeze()
        await asyncio.sleep(0.3)
        before = cpu(tree)
        await asyncio.sleep(1.5)  # three duty periods: none may continue the tree
        assert cpu(tree) == before
        control.thaw()
        await asyncio.sleep(1.0)
        assert cpu(tree) > before
