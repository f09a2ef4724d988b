"""The status ladder and result merge both executors share (executors/base.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemind_worker.engine.executors.base import ResultError, collect_results, settle_status
from hivemind_worker.tasks import MiB, Resources, TaskKind, TaskResult, TaskSpec, TaskStatus

TASK = TaskSpec("t1", TaskKind.PYTHON, Resources(1, 256 * MiB, MiB), timeout_seconds=7)


def settled(exit_code: int, **how: bool) -> TaskResult:
    result = TaskResult("t1", "l1", TaskStatus.FAILED, exit_code=exit_code)
    flags = {"cancelled": False, "timed_out": False, "out_of_memory": False, **how}
    settle_status(result, TASK, memory_limit=256 * MiB, failure="exited with code 3", **flags)
    return result


@pytest.mark.parametrize(
    ("exit_code", "how", "status", "error"),
    [
        (137, {"cancelled": True, "timed_out": True}, TaskStatus.CANCELLED, "cancelled"),
        (137, {"timed_out": True, "out_of_memory": True}, TaskStatus.TIMED_OUT, "7 s timeout"),
        (0, {"out_of_memory": True}, TaskStatus.OUT_OF_MEMORY, "limit 256 MiB"),
        (0, {}, TaskStatus.SUCCEEDED, ""),
        (3, {}, TaskStatus.FAILED, "exited with code 3"),
    ],
)
def test_a_cancel_beats_a_timeout_beats_running_out_of_memory_beats_the_exit(
    exit_code: int, how: dict[str, bool], status: TaskStatus, error: str
) -> None:
    result = settled(exit_code, **how)
    assert result.status is status
    assert error in result.error if error else result.error == ""


async def test_results_that_cannot_be_collected_fail_a_success_and_extend_a_failure(
    tmp_path: Path,
) -> None:
    def refused() -> tuple[Path, str, int]:
        raise ResultError("results/x is a link")

    def broken() -> tuple[Path, str, int]:
        raise OSError("disk full")

    ok = settled(0)
    await collect_results(ok, refused, (OSError,), "pack")
    assert (ok.status, ok.error, ok.archive) == (TaskStatus.FAILED, "results/x is a link", None)

    failed = settled(3)
    await collect_results(failed, broken, (OSError,), "copy")
    assert failed.status is TaskStatus.FAILED
    assert failed.error == (
        "exited with code 3; results not collected: cannot copy results: disk full"
    )

    archive = tmp_path / "a.tar.gz"
    done = settled(0)
    await collect_results(done, lambda: (archive, "ab" * 32, 10), (OSError,), "pack")
    assert (done.status, done.archive, done.archive_size) == (TaskStatus.SUCCEEDED, archive, 10)

    cancelled = settled(137, cancelled=True)
    await collect_results(cancelled, lambda: (archive, "", 0), (OSError,), "pack")
    assert cancelled.archive is None  # a cancelled task's results are never packed
