"""The result spool keeps reports and archives across restarts and frees them once delivered."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemind_worker.engine.outbox import Outbox, OutboxFull
from hivemind_worker.tasks import TaskResult, TaskStatus


def make_result(tmp_path: Path, task_id: str, payload: bytes = b"archive") -> TaskResult:
    archive = tmp_path / f"{task_id}.tar.gz"
    archive.write_bytes(payload)
    return TaskResult(
        task_id, "lease-" + task_id, TaskStatus.SUCCEEDED, 0, "", b"tail",
        archive=archive, archive_sha256="ab" * 32, archive_size=len(payload),
        started_at=1.0, finished_at=2.0, cpu_seconds=0.5, max_memory_bytes=1024,
    )  # fmt: skip


def test_a_spooled_result_survives_a_restart_and_is_freed_on_remove(tmp_path: Path) -> None:
    spool = tmp_path / "outbox"
    outbox = Outbox(spool)
    kept = outbox.put(make_result(tmp_path, "t1"), max_result_bytes=1000)
    assert kept.archive is not None and kept.archive.parent == spool
    assert not (tmp_path / "t1.tar.gz").exists()  # moved in, not copied
    outbox.close()

    reopened = Outbox(spool)
    [pending] = reopened.pending()
    assert pending.result.task_id == "t1" and pending.result.lease_id == "lease-t1"
    assert pending.result.status is TaskStatus.SUCCEEDED
    assert pending.result.log_tail == b"tail" and pending.max_result_bytes == 1000
    assert pending.result.archive is not None
    assert pending.result.archive.read_bytes() == b"archive"
    reopened.remove("t1", "lease-t1")
    assert reopened.pending() == []
    assert list(spool.glob("*.tar.gz")) == []


def test_a_full_spool_refuses_with_a_reason(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox", max_bytes=10)
    outbox.put(make_result(tmp_path, "t1", b"12345678"), max_result_bytes=100)
    assert not outbox.is_full()
    with pytest.raises(OutboxFull, match=r"result spool .* is full"):
        outbox.put(make_result(tmp_path, "t2", b"12345678"), max_result_bytes=100)
    assert [p.result.task_id for p in outbox.pending()] == ["t1"]


def test_orphan_archives_are_swept_at_open(tmp_path: Path) -> None:
    spool = tmp_path / "outbox"
    Outbox(spool).close()
    (spool / "ghost-lease.tar.gz").write_bytes(b"left by a crash before its record")
    Outbox(spool).close()
    assert not (spool / "ghost-lease.tar.gz").exists()
