"""GUI test fixtures: offscreen Qt, and an app on a real engine thread with a real pool."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.guikit import LoopPool, World, make_world
from hivemind_worker.engine.runners.environments import Environments
from hivemind_worker.gui.app import WorkerApp


@pytest.fixture(scope="session")
def qapp_args() -> list[str]:
    """Every GUI test but the tray's (a child process under Xvfb) runs offscreen.

    A QApplication argument, not QT_QPA_PLATFORM: an environment variable would leak into
    the subprocesses of other test tiers and make `hivemind-worker` think it has a display.
    """
    return ["hivemind-worker-tests", "-platform", "offscreen"]


@pytest.fixture
def gui_app(qtbot, tmp_path: Path, memory_keyring) -> Iterator[tuple[WorkerApp, LoopPool]]:
    """A WorkerApp on a real engine thread, with the real pool on the same loop, not started."""
    world = make_world(tmp_path / "home", drain_timeout=20)
    yield from _running_app(qtbot, world, LoopPool(world, tmp_path / "pool.db", []))


@pytest.fixture
def gui_app_with_runners(
    qtbot, tmp_path: Path, memory_keyring, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[WorkerApp, LoopPool]]:
    """As gui_app, with an engine that runs (and advertises) the ml and data runners.

    uv is offline with an empty cache: a runner task that reaches this worker fails at its
    environment's build instead of downloading hundreds of MB.
    """
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    environments = Environments(tmp_path / "environments")
    world = make_world(tmp_path / "home", environments=environments, drain_timeout=20)
    yield from _running_app(qtbot, world, LoopPool(world, tmp_path / "pool.db", []))


def _running_app(qtbot, world: World, pool: LoopPool) -> Iterator[tuple[WorkerApp, LoopPool]]:
    app = WorkerApp(
        world.settings,
        world.paths,
        world.credentials,
        world.engine,
        autostart_engine=False,
        before=pool.before,
        after=pool.after,
        show_tray=False,
        exit_on_quit=False,
    )
    pool.app = app
    app.start_engine(show_dashboard=True)
    # Until the pool's address has reached the app: a test's own settings come after it.
    qtbot.waitUntil(
        lambda: (
            world.pool is not None
            and world.pool.port > 0
            and app.settings.node_pool_address == world.pool.address
        ),
        timeout=20_000,
    )
    try:
        yield app, pool
    finally:
        world.engine.shutdown()
        app.engine_thread.wait(30_000)
        app.model.flush()
        app.dispose()
        qtbot.wait(50)  # run the deferred deletes now, not in some later test's GC
