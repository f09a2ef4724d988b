"""Tests for hivemind_worker.logs."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivemind_worker import logs
from hivemind_worker.logs import set_node_id, setup_logging, task_context

log = logging.getLogger("hivemind_worker.test")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    logs._node_id = None


def records(log_dir: Path) -> list[dict[str, Any]]:
    lines = (log_dir / "worker.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_json_lines_carry_node_and_task_ids(tmp_path: Path) -> None:
    setup_logging(tmp_path, console=False, node_id="node-1")
    log.info("outside")
    with task_context("task-7"):
        log.warning("inside %s", "a task")
    entries = records(tmp_path)
    assert [e["msg"] for e in entries] == ["outside", "inside a task"]
    outside, inside = entries
    assert outside["node_id"] == "node-1"
    assert "task_id" not in outside
    assert inside["task_id"] == "task-7"
    assert inside["level"] == "WARNING"
    assert inside["logger"] == "hivemind_worker.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", inside["ts"])


def test_exceptions_are_logged_with_traceback(tmp_path: Path) -> None:
    setup_logging(tmp_path, console=False)
    set_node_id("node-2")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (entry,) = records(tmp_path)
    assert entry["node_id"] == "node-2"
    assert "Traceback" in entry["exc"]
    assert "ValueError: boom" in entry["exc"]


async def test_task_id_propagates_into_asyncio_tasks(tmp_path: Path) -> None:
    setup_logging(tmp_path, console=False)

    async def work() -> None:
        await asyncio.sleep(0)
        log.info("in task")
        await asyncio.to_thread(log.info, "in thread")

    with task_context("task-9"):
        spawned = asyncio.create_task(work())
    log.info("after")
    await spawned
    by_msg = {e["msg"]: e for e in records(tmp_path)}
    assert by_msg["in task"]["task_id"] == "task-9"
    assert by_msg["in thread"]["task_id"] == "task-9"
    assert "task_id" not in by_msg["after"]


def test_console_lines_are_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(tmp_path, level="debug")
    with task_context("t1"):
        log.debug("hello")
    log.info("bye")
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d DEBUG +hello \[task=t1\]", lines[0])
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO +bye", lines[1])


def test_level_filters(tmp_path: Path) -> None:
    setup_logging(tmp_path, level="WARNING", console=False)
    log.info("dropped")
    log.error("kept")
    assert [e["msg"] for e in records(tmp_path)] == ["kept"]
    with pytest.raises(ValueError, match="verbose"):
        setup_logging(tmp_path, level="verbose")


def test_setup_twice_does_not_duplicate(tmp_path: Path) -> None:
    setup_logging(tmp_path / "first")
    setup_logging(tmp_path / "second", console=False)
    log.info("once")
    assert [e["msg"] for e in records(tmp_path / "second")] == ["once"]
    assert records(tmp_path / "first") == []
    ours = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.handlers.RotatingFileHandler)
    ]
    assert len(ours) == 1


def test_rotation(tmp_path: Path) -> None:
    setup_logging(tmp_path, console=False, max_bytes=300)
    for n in range(100):
        log.info("line %d", n)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["worker.jsonl"] + [f"worker.jsonl.{n}" for n in range(1, 6)]
    assert all(p.stat().st_size <= 300 for p in tmp_path.iterdir())
    assert records(tmp_path)[-1]["msg"] == "line 99"


def test_uncaught_exceptions_are_logged(tmp_path: Path) -> None:
    setup_logging(tmp_path, console=False)
    try:
        raise RuntimeError("main thread")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)

    def crash() -> None:
        raise KeyError("worker thread")

    thread = threading.Thread(target=crash, name="crasher")
    thread.start()
    thread.join()
    main, worker = records(tmp_path)
    assert main["level"] == worker["level"] == "CRITICAL"
    assert "RuntimeError: main thread" in main["exc"]
    assert worker["msg"] == "Uncaught exception in thread crasher"
    assert "KeyError: 'worker thread'" in worker["exc"]
