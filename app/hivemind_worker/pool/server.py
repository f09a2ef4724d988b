"""The reference Node Pool: PoolServer (serve, stop, lease reaper) and its worker-facing service."""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hivemind_worker import __version__
from hivemind_worker.net import is_loopback_host
from hivemind_worker.pool.collections_pace import FullCollections
from hivemind_worker.pool.common import (
    MAX_CAPABILITIES,
    MAX_MESSAGE_BYTES,
    MAX_TASKS_PER_POLL,
    SERVICE_NAMES,
    WILDCARD_HOSTS,
    Context,
    LoginThrottle,
    PoolConfig,
    PoolStartError,
    PoolStats,
    RecentCounter,
    Refused,
    invalid,
    peer_host,
    require_id,
    require_sha256,
    rpc,
    split_host_port,
    usage_dict,
)
from hivemind_worker.pool.core import PollRequest, PoolCore
from hivemind_worker.pool.pace import SEEDED_FOR_MS
from hivemind_worker.pool.queue_service import TaskQueueService
from hivemind_worker.pool.records import Heartbeat
from hivemind_worker.pool.store import (
    PoolStore,
    StaleLease,
    StoreError,
    now_ms,
    verify_password,
)
from hivemind_worker.pool.uploads import prepare_spool, receive_upload
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc
from hivemind_worker.tasks import MAX_ID_LEN, Resources, TaskSpecError, TaskStatus

__all__ = [
    "LoginThrottle",
    "PoolConfig",
    "PoolServer",
    "PoolStartError",
    "PoolStats",
    "RecentCounter",
    "split_host_port",
]

log = logging.getLogger("hivemind_worker.pool")

MAX_PENDING_CALLS = 20_000


def server_options() -> list[tuple[str, int]]:
    """The gRPC server's channel options (the pool's, and the benchmark's bare floor server)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Workers ping every 20 s to notice a dead connection (keepalive); a long-poll
        # carries no data for up to max_wait, and the default policy (one ping per
        # 5 minutes without data) would answer those pings with GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        # And the pool pings too, so a worker whose connection went silent does not
        # hold an upload slot (or a long-poll) for ever.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.so_reuseport", 0),
        # Calls that arrived but that the loop has not picked up yet. gRPC's defaults
        # (1,000, and 3,000 at most) cancel calls at random past them: with thousands
        # of workers a burst of heartbeats and re-polls crosses that in a busy moment,
        # and each cancelled worker retries, adding load. Queue them instead.
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
    ]


class NodeManagerService(pb_grpc.NodeManagerServicer):
    """The worker-facing service: login, registration, heartbeats, leases, reports, uploads."""

    def __init__(self, core: PoolCore) -> None:
        self._core = core

    @rpc
    async def Login(self, request: pb.LoginRequest, context: Context) -> pb.LoginResponse:
        if not request.username:
            raise invalid("username", "is empty")
        core = self._core
        store = core.store
        user_key = f"user:{request.username[:MAX_ID_LEN]}"
        keys = (user_key, f"peer:{peer_host(context.peer() or '')}")
        throttle = core.login_throttle
        self._refuse_if_throttled(keys)
        # scrypt costs 16 MiB and tens of milliseconds and releases the GIL: keep it off the
        # loop, and run only a few at once.
        async with core.login_slots:
            self._refuse_if_throttled(keys)  # failures recorded while this call waited
            stored = store.password_hash(request.username)
            ok = await asyncio.to_thread(verify_password, request.password, stored)
        if not ok:
            throttle.failed(keys)
            log.info("login refused for %r from %s", request.username[:80], context.peer())
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "wrong username or password")
        throttle.succeeded(user_key)
        token, expires = store.issue_token(request.username, self._core.config.token_ttl)
        log.info("login: %s", request.username)
        return pb.LoginResponse(token=token, expires_unix_ms=expires, username=request.username)

    def _refuse_if_throttled(self, keys: Iterable[str]) -> None:
        wait = self._core.login_throttle.retry_after(keys)
        if wait > 0:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"too many failed logins; try again in {math.ceil(wait)} s",
            )

    @rpc
    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: Context
    ) -> pb.RegisterNodeResponse:
        user = self._core.user(context)
        node_id = require_id("node_id", request.node_id)
        caps = list(request.capabilities)
        if len(caps) > MAX_CAPABILITIES or any(not c or len(c) > 32 for c in caps):
            raise invalid("capabilities", f"at most {MAX_CAPABILITIES} names of 1-32 characters")
        self._core.store.upsert_node(node_id, user, request, caps)
        config = self._core.config
        self._core.pacer.seen(node_id, now_ms())
        pace = self._core.pacer.pace
        log.info("node %s registered by %s (capabilities %s)", node_id, user, ",".join(caps))
        return pb.RegisterNodeResponse(
            accepted=True,
            message=f"node {node_id} registered for {user}",
            heartbeat_interval_seconds=pace.heartbeat_interval,
            lease_timeout_seconds=pace.lease_timeout,
            max_wait_seconds=config.max_wait,
            preload_images=list(config.preload_images),
        )

    @rpc
    async def UpdateNodeStatus(
        self, request: pb.UpdateNodeStatusRequest, context: Context
    ) -> pb.UpdateNodeStatusResponse:
        core = self._core
        user = core.user(context)
        node_id = require_id("node_id", request.node_id)
        core.store.node_capabilities(node_id, user)
        lease_ids: list[str] = []
        usage: dict[str, dict[str, float]] = {}
        for running in request.running:
            lease_id = require_id("running.lease_id", running.lease_id)
            lease_ids.append(lease_id)
            if running.HasField("usage"):
                usage[lease_id] = usage_dict(running.usage)
        metrics = request.metrics
        now = now_ms()
        core.pacer.seen(node_id, now)  # before the beat: its renewal lasts the pace's lease
        # Noted in memory and answered now; the reaper writes the noted beats in one
        # transaction before each pass (heartbeats.py says what a crash loses).
        outcome = core.liveness.beat(
            Heartbeat(
                node_id=node_id,
                status=int(request.status),
                metrics={
                    "cpu_percent": metrics.cpu_percent,
                    "memory_used_bytes": metrics.memory_used_bytes,
                    "memory_total_bytes": metrics.memory_total_bytes,
                    "disk_free_bytes": metrics.disk_free_bytes,
                },
                lease_ids=lease_ids,
                usage=usage,
                status_message=request.status_message[:200],
            ),
            now,
        )
        if outcome.lost:
            log.info("node %s holds leases the pool no longer honours: %s", node_id, outcome.lost)
        pace = core.pacer.pace
        return pb.UpdateNodeStatusResponse(
            ack=True,
            cancel_task_ids=outcome.cancels,
            drain=False,
            lost_lease_ids=outcome.lost,
            heartbeat_interval_seconds=pace.heartbeat_interval,
            lease_timeout_seconds=pace.lease_timeout,
        )

    @rpc
    async def GetAssignedTasks(
        self, request: pb.GetAssignedTasksRequest, context: Context
    ) -> pb.GetAssignedTasksResponse:
        core = self._core
        user = core.user(context)
        node_id = require_id("node_id", request.node_id)
        node_capabilities = core.store.node_capabilities(node_id, user)
        core.stats.get_assigned_calls[node_id] += 1
        free = Resources.from_proto(request.free)
        cpus_ok = math.isfinite(free.cpus) and free.cpus >= 0
        if not cpus_ok or min(free.memory_bytes, free.disk_bytes, free.gpus) < 0:
            raise invalid("free", "resources must be finite and not negative")
        wait = float(min(request.wait_seconds, core.config.max_wait))
        # Answer a little before the caller's deadline: a lease handed out in a response the
        # caller has stopped waiting for would sit unused until it expired.
        remaining = context.time_remaining()
        if remaining is not None and math.isfinite(remaining):
            wait = min(wait, max(remaining - 1.0, 0.0))
        poll = PollRequest(
            node_id=node_id,
            free=free,
            max_tasks=min(request.max_tasks or 1, MAX_TASKS_PER_POLL),
            capabilities=frozenset(request.capabilities) or node_capabilities,
            max_timeout_seconds=max(request.max_timeout_seconds, 0),
            networks=frozenset(request.networks) | {"none"},
        )
        specs = await core.lease_or_wait(poll, wait)
        core.stats.leased += len(specs)
        for spec in specs:
            log.info(
                "leased task %s (attempt %d) to node %s as lease %s",
                spec.task_id,
                spec.attempt,
                node_id,
                spec.lease_id,
            )
        return pb.GetAssignedTasksResponse(tasks=specs)

    @rpc
    async def ReportTaskResult(
        self, request: pb.ReportTaskResultRequest, context: Context
    ) -> pb.ReportTaskResultResponse:
        core = self._core
        user = core.user(context)
        node_id = require_id("node_id", request.node_id)
        task_id = require_id("task_id", request.task_id)
        lease_id = require_id("lease_id", request.lease_id)
        core.stats.reports_by_lease[lease_id] += 1
        status = TaskStatus.from_proto(request.status)
        if not status.is_final:
            raise invalid("status", f"must be a final status, not {status.value}")
        if request.result_sha256:
            require_sha256("result_sha256", request.result_sha256)
        if request.result_size < 0:
            raise invalid("result_size", "is negative")
        core.store.node_capabilities(node_id, user)
        # A renewal still in memory is moot once the lease is reported; its usage is the
        # latest the pool has if the report carries none.
        pending = core.liveness.renewal(lease_id)
        usage = usage_dict(request.usage) if request.HasField("usage") else None
        if usage is None and pending is not None and pending.node_id == node_id:
            usage = pending.usage
        try:
            outcome = core.store.record_report(
                node_id=node_id,
                task_id=task_id,
                lease_id=lease_id,
                status=status,
                exit_code=request.exit_code,
                error=request.error,
                log_tail=request.log_tail,
                result_sha256=request.result_sha256,
                result_size=request.result_size,
                started_ms=max(request.started_unix_ms, 0),
                finished_ms=max(request.finished_unix_ms, 0),
                usage=usage,
                exclude_node=request.exclude_this_node and status is TaskStatus.CANCELLED,
            )
        except StaleLease:
            core.stats.stale_reports += 1
            core.store.count_stale_report()
            raise
        core.liveness.forget(lease_id)
        if outcome.repeated:
            log.info("repeated report for lease %s acknowledged again", lease_id)
        else:
            log.info(
                "task %s reported %s by node %s (recorded %s)",
                task_id,
                status.value,
                node_id,
                outcome.recorded.value,
            )
        if outcome.requeued:
            core.stats.requeued += 1
            core.offer_queued([task_id])
        return pb.ReportTaskResultResponse(ack=True, recorded_status=outcome.recorded.to_proto())

    @rpc
    async def UploadTaskResult(
        self, request_iterator: AsyncIterator[pb.UploadTaskResultRequest], context: Context
    ) -> pb.UploadTaskResultResponse:
        core = self._core
        user = core.user(context)
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("part") != "header":
            raise invalid("header", "the first message must be an UploadHeader")
        head = first.header
        node_id = require_id("header.node_id", head.node_id)
        task_id = require_id("header.task_id", head.task_id)
        lease_id = require_id("header.lease_id", head.lease_id)
        core.stats.uploads_by_lease[lease_id] += 1
        try:
            return await receive_upload(
                self._core, user, node_id, task_id, lease_id, head, messages
            )
        except (Refused, TaskSpecError, StoreError):
            # A client that cancels ends the request stream early, which looks like a short
            # upload here: that is not a refusal the client ever sees.
            if not context.cancelled():
                core.stats.refused_uploads_by_lease[lease_id] += 1
            raise

    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        return pb.PingResponse(server_version=__version__, server_time_unix_ms=now_ms())


class PoolServer:
    """A running reference pool: gRPC server, SQLite store and lease reaper on one loop."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.stats = PoolStats()
        self._store: PoolStore | None = None
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._core: PoolCore | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.collections = FullCollections(config.full_collection_every)
        self._port = 0

    @property
    def store(self) -> PoolStore:
        if self._store is None:
            raise RuntimeError("the pool is not started")
        return self._store

    @property
    def port(self) -> int:
        return self._port

    @property
    def parked_polls(self) -> int:
        """GetAssignedTasks calls waiting for work now."""
        return len(self._core.waiters) if self._core is not None else 0

    @property
    def wakeups(self) -> int:
        """Parked polls woken for a task since start."""
        return self._core.waiters.wakeups if self._core is not None else 0

    @property
    def address(self) -> str:
        """Where a client on this machine reaches the pool, e.g. '127.0.0.1:50051'."""
        host, _ = split_host_port(self.config.listen)
        if host in WILDCARD_HOSTS:
            host = "127.0.0.1"
        return f"{host}:{self._port}"

    async def start(self) -> int:
        """Open the store, bind, serve and start the reaper; return the bound port."""
        config = self.config
        try:
            host, _ = split_host_port(config.listen)
        except ValueError as exc:
            raise PoolStartError(f"listen address {exc}") from None
        credentials: grpc.ServerCredentials | None = None
        if config.tls_cert or config.tls_key:
            if not (config.tls_cert and config.tls_key):
                raise PoolStartError("TLS needs both a certificate and a key file")
            try:
                credentials = grpc.ssl_server_credentials(
                    [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())]
                )
            except OSError as exc:
                raise PoolStartError(f"cannot read TLS files: {exc}") from None
        elif not is_loopback_host(host) and not config.insecure:
            raise PoolStartError(
                f"refusing to serve plaintext on {config.listen}, which is not a loopback "
                "address: give a TLS certificate and key, or --insecure on a trusted network"
            )

        try:
            store = PoolStore(config.db_path, default_max_attempts=config.default_max_attempts)
        except (sqlite3.Error, OSError) as exc:
            raise PoolStartError(f"cannot open the database {config.db_path}: {exc}") from None
        try:
            prepare_spool(config.spool_path)
        except OSError as exc:
            store.close()
            raise PoolStartError(
                f"cannot use the spool folder {config.spool_path}: {exc}"
            ) from None
        core = PoolCore(config, store, self.stats)
        # The workers alive before a restart keep the interval they were given (pace.py) until
        # they are back; the pace counts them meanwhile.
        start = now_ms()
        core.pacer.seed(store.count_nodes_seen_since(start - SEEDED_FOR_MS), start)
        # Workers could not heartbeat while the pool was down: give each running lease a
        # full timeout from now to reconnect before the reaper may expire it.
        lease_timeout = core.pacer.pace.lease_timeout
        extended = store.extend_running_leases(start + lease_timeout * 1000)
        if extended:
            log.info("gave %d running leases %ds to reconnect", extended, lease_timeout)
        server = grpc.aio.server(options=server_options())
        pb_grpc.add_NodeManagerServicer_to_server(NodeManagerService(core), server)
        pb_grpc.add_TaskQueueServicer_to_server(TaskQueueService(core), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            if credentials is not None:
                port = server.add_secure_port(config.listen, credentials)
            else:
                port = server.add_insecure_port(config.listen)
        except RuntimeError as exc:
            store.close()
            raise PoolStartError(f"cannot listen on {config.listen}: {exc}") from None
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._store, self._server, self._core, self._health = store, server, core, health_servicer
        self._port = port
        self._reaper = asyncio.create_task(self._reap(), name="pool-lease-reaper")
        self.collections.start()
        log.info(
            "pool serving on %s (%s, db %s)",
            self.address,
            "TLS" if credentials else "plaintext",
            config.db_path,
        )
        return port

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds), stop the reaper, close the db."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
            self._health = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._core is not None:
            try:
                self._core.liveness.flush()  # a clean stop loses no heartbeat
            except Exception:  # the store may be gone (disk); a restart grants grace anyway
                log.exception("writing the last heartbeats on stop failed")
        if self._store is not None:
            self._store.close()
            self._store = None
        self._core = None
        self.collections.stop()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.config.reaper_interval)
            core = self._core
            if core is None:
                return
            try:
                # The renewals noted since the last pass first: a lease a worker renewed is
                # never expired for want of its write.
                core.liveness.flush()
                out = core.store.expire_leases()
                # Free discarded result blobs a few MiB per pass, never in one long transaction.
                core.store.collect_garbage()
                self.collections.maybe_collect()  # the heap's, at a bounded rate
            except Exception:  # the reaper must outlive one bad pass; the next one retries
                log.exception("lease reaper pass failed")
                continue
            for task_id in out.requeued:
                log.info("lease of task %s expired: requeued", task_id)
            for task_id in out.failed:
                log.warning("lease of task %s expired: attempts used up, failed", task_id)
            for task_id in out.cancelled:
                log.info("lease of task %s expired after a cancel: cancelled", task_id)
            self.stats.requeued += len(out.requeued)
            self.stats.expired_failed += len(out.failed)
            core.offer_queued(out.requeued)
