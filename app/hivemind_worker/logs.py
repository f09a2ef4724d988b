"""Logging setup: JSON lines to a rotating file, readable lines on stderr, node and task ids."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

LOG_FILE = "worker.jsonl"
MAX_BYTES = 5 * 1024 * 1024
BACKUP_COUNT = 5

_task_id: ContextVar[str | None] = ContextVar("hivemind_task_id", default=None)
_node_id: str | None = None  # one per process, and worker threads must see it: not a ContextVar
_handlers: list[logging.Handler] = []

log = logging.getLogger("hivemind_worker")


def set_node_id(node_id: str) -> None:
    global _node_id  # noqa: PLW0603 - process-wide by design
    _node_id = node_id


@contextlib.contextmanager
def task_context(task_id: str) -> Iterator[None]:
    """Tag every record emitted inside, including in asyncio tasks created inside, with task_id."""
    token = _task_id.set(task_id)
    try:
        yield
    finally:
        _task_id.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = _node_id
        record.task_id = _task_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "node_id": getattr(record, "node_id", None),
        }
        task_id = getattr(record, "task_id", None)
        if task_id is not None:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-8s %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        task_id = getattr(record, "task_id", None)
        return f"{line} [task={task_id}]" if task_id is not None else line


def setup_logging(
    log_dir: Path,
    *,
    level: str = "info",
    console: bool = True,
    console_level: str | None = None,
    node_id: str | None = None,
    max_bytes: int = MAX_BYTES,
) -> None:
    """Send all logging to log_dir/worker.jsonl (and stderr); safe to call again to reconfigure."""
    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}")
    if node_id is not None:
        set_node_id(node_id)

    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()

    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.handlers.RotatingFileHandler(
        log_dir / LOG_FILE, maxBytes=max_bytes, backupCount=BACKUP_COUNT, encoding="utf-8"
    )
    file_handler.setFormatter(_JsonFormatter())
    _handlers.append(file_handler)
    if console and sys.stderr is not None:  # a windowed (GUI) executable has no stderr
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(_ConsoleFormatter())
        if console_level is not None:
            console_handler.setLevel(console_level.upper())
        _handlers.append(console_handler)
    for handler in _handlers:
        handler.addFilter(_ContextFilter())
        root.addHandler(handler)
    root.setLevel(numeric_level)

    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    log.critical("Uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit):  # as the default hook does
        return
    name = args.thread.name if args.thread is not None else "unknown"
    if args.exc_value is None:
        log.critical("Uncaught %s in thread %s", args.exc_type.__name__, name)
        return
    log.critical(
        "Uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
