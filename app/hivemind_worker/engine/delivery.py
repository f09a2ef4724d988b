"""Result delivery: spool each result, deliver it to the pool exactly once per lease, remember it.

`Delivery` owns the outbox. A result is kept on disk before it is sent, so a crash or a lost
connection costs nothing; it is sent until the pool has it or refuses it for good; and every
lease this worker has reported is remembered (across restarts) so that a pool handing the same
lease out again never gets the task run twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from hivemind_worker.engine.events import ErrorRaised, Event, ResultDelivered
from hivemind_worker.engine.outbox import Outbox, OutboxFull, Pending
from hivemind_worker.engine.pool_client import (
    AuthError,
    NodePoolClient,
    NodeUnknownError,
    PoolError,
    PoolUnavailable,
    StaleLeaseError,
    file_sha256,
)
from hivemind_worker.logs import task_context
from hivemind_worker.tasks import TaskResult, TaskStatus

log = logging.getLogger(__name__)

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
MAX_UNEXPECTED_DELIVERY_ERRORS = 10
# How long a reported lease is remembered: far longer than any pool's lease timeout, so a
# lease handed out again after its report is recognised for as long as it could be honoured.
REPORTED_MEMORY_SECONDS = 7 * 24 * 3600.0


def backoff_delay(
    attempt: int, *, initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_MAX
) -> float:
    """Exponential backoff with jitter: uniform in [initial/2, min(cap, initial * 2**attempt)]."""
    ceiling = min(cap, initial * (2 ** min(attempt, 16)))
    return random.uniform(min(initial / 2, ceiling), ceiling)


def _module_backoff(attempt: int) -> float:
    # Looked up at each retry (not bound at construction), so the module's policy can be tuned.
    return backoff_delay(attempt)


class Delivery:
    """Owns the outbox; used on the engine's loop (blocking I/O goes through to_thread).

    `wait_client` returns the live pool client, waiting for a session, or None once the
    worker is stopping (the result then stays spooled for the next start).
    """

    def __init__(
        self,
        outbox_dir: Path,
        node_id: str,
        *,
        publish: Callable[[Event], None],
        wait_client: Callable[[], Awaitable[NodePoolClient | None]],
        backoff: Callable[[int], float] | None = None,
    ) -> None:
        self.outbox_dir = outbox_dir
        self.node_id = node_id
        self._publish = publish
        self._wait_client = wait_client
        self._backoff = backoff or _module_backoff
        self._outbox: Outbox | None = None
        self._reported: set[tuple[str, str]] = set()
        # Spooled results of earlier runs still owed to the pool: heartbeats keep their leases.
        self.undelivered: dict[tuple[str, str], TaskResult] = {}

    # ------------------------------------------------------------------ outbox

    async def open(self) -> list[Pending]:
        """Open the outbox; the results an earlier run left to deliver."""
        try:
            self._outbox = await asyncio.to_thread(Outbox, self.outbox_dir)
            since = time.time() - REPORTED_MEMORY_SECONDS
            self._reported = await asyncio.to_thread(self._outbox.reported_leases, since)
            return await asyncio.to_thread(self._outbox.pending)
        except (OSError, sqlite3.Error) as exc:
            log.error("the result spool in %s is unusable: %s", self.outbox_dir, exc)
            self._publish(
                ErrorRaised.of(
                    OutboxFull(
                        f"Results cannot be kept in {self.outbox_dir}; check the disk.",
                        title="Result spool unusable",
                        details=str(exc),
                    )
                )
            )
            return []

    async def close(self) -> None:
        if self._outbox is not None:
            await asyncio.to_thread(self._outbox.close)

    async def is_full(self) -> bool:
        return self._outbox is not None and await asyncio.to_thread(self._outbox.is_full)

    def already_reported(self, task_id: str, lease_id: str) -> bool:
        """True for a lease this worker has reported (now, or in an earlier run)."""
        return (task_id, lease_id) in self._reported

    async def spool(self, result: TaskResult, max_result_bytes: int) -> bool:
        """Keep the result on disk until the pool has it; False when it could not be kept."""
        if self._outbox is None:
            return False
        try:
            await asyncio.to_thread(self._outbox.put, result, max_result_bytes)
        except OutboxFull as exc:
            log.error("%s", exc)
            self._publish(ErrorRaised.of(exc))
            return False
        except OSError as exc:
            log.error("could not spool the result of %s: %s", result.task_id, exc)
            return False
        return True

    async def _forget(self, result: TaskResult) -> None:
        """The pool has settled this lease: drop the spooled copy, remember the lease."""
        key = (result.task_id, result.lease_id)
        self._reported.add(key)
        if self._outbox is not None:
            await asyncio.to_thread(self._outbox.settle, *key)

    # ------------------------------------------------------------------ delivery

    async def finish(self, result: TaskResult, max_result_bytes: int, *, spooled: bool) -> bool:
        """Deliver a just-finished task's result, then forget it (or leave it spooled)."""
        archive = result.archive  # deliver() may drop it from the result
        try:
            done = await self.deliver(result, max_result_bytes)
        finally:
            if not spooled and archive is not None:
                archive.unlink(missing_ok=True)
        if done:
            await self._forget(result)
        return done

    async def deliver_spooled(self, pending: Pending) -> None:
        """A result left from an earlier run: deliver it, and keep its lease alive meanwhile."""
        result = pending.result
        key = (result.task_id, result.lease_id)
        self.undelivered[key] = result
        try:
            with task_context(result.task_id):
                log.info("delivering the result of %s kept from an earlier run", result.task_id)
                if await self.deliver(result, pending.max_result_bytes):
                    await self._forget(result)
        finally:
            self.undelivered.pop(key, None)

    async def refuse(self, task_id: str, lease_id: str, reason: str) -> bool:
        """A spec this worker refuses to run anywhere: REJECTED ends the task at the pool."""
        result = TaskResult(task_id, lease_id, TaskStatus.REJECTED, exit_code=-1, error=reason)
        return await self._settle_at_once(result)

    async def give_back(self, task_id: str, lease_id: str, reason: str) -> bool:
        """Not the task's fault: CANCELLED, so the pool hands it to another worker."""
        result = TaskResult(
            task_id, lease_id, TaskStatus.CANCELLED, exit_code=-1, error=f"declined: {reason}"
        )
        return await self._settle_at_once(result)

    async def _settle_at_once(self, result: TaskResult) -> bool:
        done = await self.deliver(result)
        if done:
            self._reported.add((result.task_id, result.lease_id))
            if self._outbox is not None:
                await asyncio.to_thread(self._outbox.settle, result.task_id, result.lease_id)
        return done

    async def deliver(self, result: TaskResult, max_result_bytes: int = 0) -> bool:
        """Upload the archive and report, until the pool has it or refuses it.

        Transient failures (pool unreachable, node forgotten, login expired) wait for the
        session to come back. A stale lease drops the result. Any other refusal is reported
        once as FAILED without the archive, so the task ends instead of holding its lease
        forever. Returns True once the result is settled either way, False when we stopped
        first (a spooled result is then delivered at the next start).
        """
        if result.archive is not None and not result.archive_sha256:
            result.archive_sha256, result.archive_size = await asyncio.to_thread(
                file_sha256, result.archive
            )
        if (
            max_result_bytes
            and result.archive is not None
            and result.archive_size > max_result_bytes
        ):
            result.status = TaskStatus.FAILED
            result.error = (
                f"results are {result.archive_size} bytes packed, over the task's limit of "
                f"{max_result_bytes} bytes"
            )
            result.archive = None
        unexpected = 0
        attempt = 0
        while True:
            client = await self._wait_client()
            if client is None:
                # Stopped: the lease expires and the pool hands the task out again.
                log.warning("stopped before the result of %s was delivered", result.task_id)
                return False
            try:
                await client.upload(self.node_id, result)
                await client.report(self.node_id, result)
            except StaleLeaseError as exc:
                log.warning("result of %s dropped: %s", result.task_id, exc.message)
                self._publish(ResultDelivered(result.task_id, result.lease_id, False, exc.message))
                return True
            except (PoolUnavailable, NodeUnknownError, AuthError) as exc:
                delay = self._backoff(attempt)
                attempt += 1
                log.warning(
                    "could not deliver %s (%s); retrying in %.1f s", result.task_id, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            except PoolError as exc:
                if result.archive is None and result.status is TaskStatus.FAILED:
                    log.error("the pool refused the report of %s: %s", result.task_id, exc)
                    self._publish(
                        ResultDelivered(result.task_id, result.lease_id, False, exc.message)
                    )
                    return True
                log.error("the pool refused the result of %s: %s", result.task_id, exc)
                result.status = TaskStatus.FAILED
                result.error = f"result refused by the pool: {exc.message}"[:4000]
                result.archive = None
                continue
            except Exception as exc:  # e.g. the channel closed under us at a reconnect
                unexpected += 1
                if unexpected > MAX_UNEXPECTED_DELIVERY_ERRORS:
                    log.exception("giving up delivering %s", result.task_id)
                    self._publish(ResultDelivered(result.task_id, result.lease_id, False, str(exc)))
                    return True
                log.warning("delivering %s failed (%r); retrying", result.task_id, exc)
                await asyncio.sleep(self._backoff(unexpected))
                continue
            log.info("result of %s delivered", result.task_id)
            self._publish(ResultDelivered(result.task_id, result.lease_id, True))
            return True
