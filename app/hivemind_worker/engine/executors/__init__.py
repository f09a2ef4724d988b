"""Executors, and the choice of the one this machine supports."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hivemind_worker.engine.executors.base import Executor

if TYPE_CHECKING:
    from hivemind_worker.config import Settings

log = logging.getLogger(__name__)


def select_executor(settings: Settings) -> Executor:
    """The process sandbox; the Docker executor takes over here once it is built (issue 3)."""
    from hivemind_worker.engine.executors.process import ProcessExecutor

    if settings.docker_enabled:
        log.info("Docker execution is not part of this build; tasks run in the process sandbox")
    return ProcessExecutor(settings.work_dir)
