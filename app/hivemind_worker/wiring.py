"""The composition root, Qt-free: settings -> engine with its executor, and logging in to a pool.

Both front-ends (the CLI and the desktop app) build on this module; neither imports the other,
except the CLI launching the GUI.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from hivemind_worker.config import Settings, resolve_node_id
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.paths import Paths

if TYPE_CHECKING:
    from hivemind_worker.engine.engine import WorkerEngine
    from hivemind_worker.engine.executors.base import Executor
    from hivemind_worker.engine.probes import DesktopProbes


DEMO_CONTRIBUTE_SECONDS = 24 * 3600.0  # longer than any demo waits for its tasks


def make_engine(
    settings: Settings,
    paths: Paths,
    credentials: CredentialStore,
    *,
    demo: bool = False,
    choose_executor_at_start: bool = False,
) -> WorkerEngine:
    """The engine with the executor this machine supports (for the demo: one that is ready, and
    running now whatever the "when to contribute" rules say).

    Choosing the executor pings Docker and tidies what an earlier run left: a few hundred ms.
    With `choose_executor_at_start` the engine does it on its own thread when it starts (the
    desktop app shows its window first); otherwise here, before this returns.
    """
    from hivemind_worker.engine.engine import WorkerEngine
    from hivemind_worker.logs import set_node_id

    node_id = resolve_node_id(settings, paths)
    set_node_id(node_id)

    def choose() -> Executor:
        from hivemind_worker.engine.executors.choice import ready_for_python, select_executor

        executor = select_executor(settings, node_id)
        return ready_for_python(executor, settings) if demo else executor

    engine = WorkerEngine(
        settings,
        node_id=node_id,
        credentials=credentials,
        executor=choose if choose_executor_at_start else choose(),
        outbox_dir=paths.outbox_dir,
        probes=desktop_probes(lambda: engine.executor_ready),
    )
    if demo:
        # The demo is a person asking for work now: it runs whatever the "when to contribute"
        # rules would say of this moment (other programs busy, in use, a schedule); a CPU-time
        # cap still holds, and so does a pause.
        engine.contribute_anyway(DEMO_CONTRIBUTE_SECONDS)
    return engine


def desktop_probes(executor: Callable[[], Executor | None]) -> DesktopProbes:
    """This desktop's probes; Docker containers' CPU counts as the worker's own, not other
    programs' (they are not in the worker's process tree). `executor`: the engine's, once
    chosen."""
    from hivemind_worker.engine.probes import DesktopProbes

    def container_cpu() -> float:
        chosen = executor()
        if chosen is None or chosen.capability != "docker":
            return 0.0  # process-sandbox tasks are in the worker's process tree already
        return sum(u.cpu_seconds for u in chosen.usage().values())

    return DesktopProbes.for_this_desktop(extra_cpu_seconds=container_cpu)


async def login_to_pool(
    settings: Settings, credentials: CredentialStore, account: str, password: str
) -> None:
    """Log in and keep the token (never the password) in the keyring.

    Raises the pool client's `PoolError` (a `HiveMindError`) when the pool refuses, and
    `CredentialError` when the keyring cannot keep the token.
    """
    from hivemind_worker.engine.pool_client import client_for

    client = client_for(settings)
    try:
        token = await client.login(account, password)
    finally:
        await client.close()
    await asyncio.to_thread(credentials.set_token, settings.node_pool_address, account, token)


def self_command() -> list[str]:
    """How to start this program again: the frozen binary, or this interpreter with -m."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "hivemind_worker"]
