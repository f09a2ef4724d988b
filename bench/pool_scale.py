#!/usr/bin/env python3
"""Pool scale benchmark: N simulated workers and a submitter against one reference pool.

Three kinds of process, all on loopback: the pool (`serve`, the real PoolServer on a fresh
SQLite file), a few worker processes (`workers`, each a grpc.aio client simulating many
workers: register, heartbeat at the interval the pool gives, one open GetAssignedTasks
long-poll, report at once), and this orchestrator, which submits tasks at a fixed rate (or as
fast as the pool accepts), samples the pool's CPU and RSS, then checks in the database that
every task was completed exactly once. Latencies are measured client side. Every rung is
bounded in time and every process is ended by its id.

    .venv/bin/python bench/pool_scale.py                      # the ladder + max throughput
    .venv/bin/python bench/pool_scale.py --ladder 100 --no-max --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import grpc
import psutil
from _report import write_section

from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "bench", "bench-password"
WORKERS_PER_CHANNEL = int(os.environ.get("POOL_SCALE_PER_CHANNEL", "100"))  # per HTTP/2 conn
RPC_DEADLINE = 10.0  # seconds; a heartbeat slower than this is an error, as for a real worker
FREE = pb.Resources(cpus=4, memory_bytes=4 << 30, disk_bytes=20 << 30)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ----------------------------------------------------------------------------- the pool


class BareNodeManager(pb_grpc.NodeManagerServicer):
    """The floor: grpc.aio unary handlers that do nothing but answer (no auth, no store).

    Served with the pool's own server options and driven by the same simulated workers, it
    measures what one call costs in grpc.aio itself on this machine, in the same run."""

    def __init__(self, heartbeat_interval: int) -> None:
        self.interval = heartbeat_interval or 10

    async def Login(self, request: Any, context: Any) -> Any:
        return pb.LoginResponse(token="bare", username=request.username)

    async def RegisterNode(self, request: Any, context: Any) -> Any:
        return pb.RegisterNodeResponse(
            accepted=True,
            heartbeat_interval_seconds=self.interval,
            lease_timeout_seconds=60,
            max_wait_seconds=30,
        )

    async def UpdateNodeStatus(self, request: Any, context: Any) -> Any:
        return pb.UpdateNodeStatusResponse(ack=True)

    async def GetAssignedTasks(self, request: Any, context: Any) -> Any:
        wait = min(float(request.wait_seconds), 30.0)
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, max(remaining - 1.0, 0.0))
        await asyncio.sleep(wait)  # parked, as the pool parks a poll with no work for it
        return pb.GetAssignedTasksResponse()


#: The unary calls counted in the measured window (CPU per call = CPU seconds / calls).
COUNTED = ("UpdateNodeStatus", "GetAssignedTasks", "ReportTaskResult", "RegisterNode")


def serve(args: argparse.Namespace) -> None:
    """The pool (or the bare floor server) in this process.

    SIGUSR1 starts the measured window, SIGUSR2 ends it (calls served and CPU used are
    taken then), SIGTERM stops the server and writes the stats file."""
    import logging

    from hivemind_worker.pool import server as pool_server
    from hivemind_worker.pool.server import PoolConfig, PoolServer
    from hivemind_worker.pool.store import PoolStore

    logging.basicConfig(level=logging.WARNING)  # a log line per RPC would measure the logging
    if not args.bare:
        store = PoolStore(args.db)
        store.add_user(USER, PASSWORD)
        store.close()

    handler_seconds: dict[str, list[float]] = defaultdict(list)
    calls: Counter[str] = Counter()

    def timed(cls: Any, name: str) -> None:  # each handler's own time, calls by method
        inner = getattr(cls, name)

        async def wrapper(self: Any, request: Any, context: Any) -> Any:
            start = time.perf_counter()
            if getattr(request, "timestamp_unix_ms", 0):  # sent -> handler start: queueing
                queued = time.time() - request.timestamp_unix_ms / 1000
                handler_seconds["UpdateNodeStatus queued"].append(queued)
            try:
                return await inner(self, request, context)
            finally:
                handler_seconds[name].append(time.perf_counter() - start)
                calls[name] += 1

        setattr(cls, name, wrapper)

    for name in COUNTED:
        timed(BareNodeManager if args.bare else pool_server.NodeManagerService, name)

    async def main() -> None:
        if args.bare:
            await serve_bare(args, handler_seconds, calls)
            return
        config = PoolConfig(db_path=Path(args.db), listen="127.0.0.1:0")
        if args.heartbeat_interval:
            config.heartbeat_interval = args.heartbeat_interval
        if args.unpaced:
            config.max_heartbeats_per_second = 0  # every worker at heartbeat_interval
        pool = PoolServer(config)
        await pool.start()
        await asyncio.to_thread(Path(args.port_file).write_text, str(pool.port))
        core = pool._core
        assert core is not None
        lags: list[float] = []
        marks: dict[str, Any] = {}
        window: dict[str, Any] = {}

        def mark() -> None:
            lags.clear()
            handler_seconds.clear()
            calls.clear()
            pool.store.tx_seconds.clear()
            marks.update(
                writes=pool.store.write_transactions,
                leases=pool.store.lease_transactions,
                wakeups=pool.wakeups,
                batches=core.liveness.flushes,
                cpu=time.process_time(),
            )

        def end_window() -> None:
            window.update(calls=dict(calls), cpu_s=time.process_time() - marks["cpu"])

        mark()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, mark)
        loop.add_signal_handler(signal.SIGUSR2, end_window)
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        async def lag_probe() -> None:  # how late the loop runs a 50 ms timer: its busyness
            while True:
                start = loop.time()
                await asyncio.sleep(0.05)
                lags.append(loop.time() - start - 0.05)

        probe = asyncio.create_task(lag_probe())
        await stop.wait()
        probe.cancel()
        tx = list(pool.store.tx_seconds)
        out = {
            "write_transactions": pool.store.write_transactions - marks["writes"],
            "lease_transactions": pool.store.lease_transactions - marks["leases"],
            "wakeups": pool.wakeups - marks["wakeups"],
            "heartbeat_flushes": core.liveness.flushes - marks["batches"],
            "tx_p50_ms": pct(tx, 0.5) * 1000,
            "tx_p99_ms": pct(tx, 0.99) * 1000,
            "tx_max_ms": max(tx, default=0.0) * 1000,
            "lag_p50_ms": pct(lags, 0.5) * 1000,
            "lag_p99_ms": pct(lags, 0.99) * 1000,
            "lag_max_ms": max(lags, default=0.0) * 1000,
            "handler_ms": {
                name: [pct(v, 0.5) * 1000, pct(v, 0.99) * 1000]
                for name, v in handler_seconds.items()
            },
            **window,
        }
        await asyncio.to_thread(Path(args.stats_file).write_text, json.dumps(out))
        await pool.stop(0)

    profile = os.environ.get("POOL_SCALE_PROFILE")  # a file: where the pool's profile goes
    if not profile:
        asyncio.run(main())
        return
    import cProfile

    with cProfile.Profile() as prof:
        asyncio.run(main())
    prof.dump_stats(profile)


async def serve_bare(
    args: argparse.Namespace, handler_seconds: dict[str, list[float]], calls: Counter[str]
) -> None:
    """The floor server: BareNodeManager with the pool's server options, the same signals."""
    from hivemind_worker.pool.server import server_options

    server = grpc.aio.server(options=server_options())
    pb_grpc.add_NodeManagerServicer_to_server(BareNodeManager(args.heartbeat_interval), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.to_thread(Path(args.port_file).write_text, str(port))
    marks: dict[str, float] = {"cpu": time.process_time()}
    window: dict[str, Any] = {}

    def mark() -> None:
        handler_seconds.clear()
        calls.clear()
        marks["cpu"] = time.process_time()

    def end_window() -> None:
        window.update(calls=dict(calls), cpu_s=time.process_time() - marks["cpu"])

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, mark)
    loop.add_signal_handler(signal.SIGUSR2, end_window)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    out = {
        "handler_ms": {
            name: [pct(v, 0.5) * 1000, pct(v, 0.99) * 1000] for name, v in handler_seconds.items()
        },
        **window,
    }
    await asyncio.to_thread(Path(args.stats_file).write_text, json.dumps(out))
    await server.stop(0)


# ------------------------------------------------------------------- simulated workers


class Fleet:
    """Many simulated workers in one process: latencies by RPC, errors by status code."""

    def __init__(self, address: str, prefix: str, count: int) -> None:
        channels = max(1, (count + WORKERS_PER_CHANNEL - 1) // WORKERS_PER_CHANNEL)
        # Own connections: gRPC would otherwise share one among channels with the same target.
        options = [
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self.channels = [
            grpc.aio.insecure_channel(address, options=options) for _ in range(channels)
        ]
        self.stubs = [pb_grpc.NodeManagerStub(c) for c in self.channels]
        self.prefix = prefix
        self.count = count
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.details: dict[str, str] = {}  # one message per error kind, for the log
        self.handout: list[float] = []
        self.tasks: list[str] = []
        self.measuring = False
        self.stopping = False
        self.interval = 10.0
        self.max_wait = 30.0
        self.paces: Counter[float] = Counter()  # heartbeat intervals the pool's replies gave

    async def call(self, name: str, fn: Any, request: Any, timeout: float) -> Any:
        start = time.perf_counter()
        try:
            reply = await fn(request, metadata=self.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if self.measuring and not self.stopping:
                key = f"{name} {exc.code().name}"
                self.errors[key] += 1
                elapsed = time.perf_counter() - start
                self.details.setdefault(key, f"{exc.details()!s:.200} after {elapsed:.1f} s")
            return None
        if self.measuring:
            self.latency[name].append(time.perf_counter() - start)
        return reply

    async def login(self) -> None:
        # One login (one scrypt check) per process; its workers reuse the token, as a
        # reconnecting worker reuses its stored one.
        reply = await self.stubs[0].Login(
            pb.LoginRequest(username=USER, password=PASSWORD), timeout=60
        )
        self.metadata = (("authorization", f"Bearer {reply.token}"),)

    async def register(self, n: int) -> None:
        stub = self.stubs[n % len(self.stubs)]
        request = pb.RegisterNodeRequest(
            node_id=f"{self.prefix}-{n}", hostname="bench", cpu_cores=4, capabilities=["process"]
        )
        for _ in range(20):  # bounded retries while thousands register at once
            reply = await self.call("RegisterNode", stub.RegisterNode, request, 60)
            if reply is not None:
                self.interval = float(reply.heartbeat_interval_seconds or 10)
                self.max_wait = float(reply.max_wait_seconds or 30)
                return
            await asyncio.sleep(1)
        raise RuntimeError(f"worker {n} could not register")

    async def worker(self, n: int) -> None:
        stub = self.stubs[n % len(self.stubs)]
        node_id = f"{self.prefix}-{n}"
        running: list[str] = []

        async def heartbeats() -> None:
            interval = self.interval  # the registration's; each reply may change it (pace.py)
            await asyncio.sleep(random.uniform(0, interval))  # workers start spread out
            while not self.stopping:
                request = pb.UpdateNodeStatusRequest(
                    node_id=node_id,
                    status=pb.NODE_STATUS_BUSY if running else pb.NODE_STATUS_IDLE,
                    timestamp_unix_ms=int(time.time() * 1000),
                    running=[pb.RunningTask(lease_id=lease) for lease in running],
                )
                reply = await self.call(
                    "UpdateNodeStatus", stub.UpdateNodeStatus, request, RPC_DEADLINE
                )
                if reply is not None and reply.heartbeat_interval_seconds:
                    interval = float(reply.heartbeat_interval_seconds)
                if self.measuring:
                    self.paces[interval] += 1
                await asyncio.sleep(interval)

        beat = asyncio.create_task(heartbeats())
        # The first poll waits a random part of max_wait, so re-polls are spread as in a fleet
        # whose workers joined at different times, not all due in the same second.
        wait = random.randint(1, int(self.max_wait))
        try:
            while not self.stopping:
                request = pb.GetAssignedTasksRequest(
                    node_id=node_id, free=FREE, max_tasks=1, wait_seconds=wait
                )
                wait = int(self.max_wait)
                reply = await self.call(
                    "GetAssignedTasks", stub.GetAssignedTasks, request, self.max_wait + 5
                )
                if reply is None:
                    await asyncio.sleep(1)
                    continue
                for spec in reply.tasks:
                    got = time.time()
                    running.append(spec.lease_id)
                    if self.measuring:
                        self.handout.append(got - float(spec.name.split()[-1]))
                        self.tasks.append(spec.task_id)
                    report = pb.ReportTaskResultRequest(
                        node_id=node_id,
                        task_id=spec.task_id,
                        lease_id=spec.lease_id,
                        status=pb.TASK_STATUS_SUCCEEDED,
                    )
                    await self.call("ReportTaskResult", stub.ReportTaskResult, report, RPC_DEADLINE)
                    running.remove(spec.lease_id)
        finally:
            beat.cancel()


def workers(args: argparse.Namespace) -> None:
    """A worker process: register all, say 'ready', measure from 'go' to 'stop', print JSON."""

    # The load generator holds thousands of parked polls too: CPython's full collections
    # paused it for 0.5 s at a time, which its clock counted against the pool. Like the pool
    # (collections_pace.py), it leaves the oldest generation alone while it measures.
    gc.freeze()
    gc.set_threshold(*gc.get_threshold()[:2], 1_000_000_000)

    async def main() -> None:
        fleet = Fleet(args.address, args.prefix, args.count)
        await fleet.login()
        sem = asyncio.Semaphore(64)

        async def register(n: int) -> None:
            async with sem:
                await fleet.register(n)

        await asyncio.gather(*(register(n) for n in range(args.count)))
        loop = asyncio.get_running_loop()
        runners = [asyncio.create_task(fleet.worker(n)) for n in range(args.count)]
        print("ready", flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        assert line.strip() == "go", line
        fleet.measuring = True
        line = await loop.run_in_executor(None, sys.stdin.readline)
        fleet.stopping = True
        for channel in fleet.channels:
            await channel.close(grace=None)
        await asyncio.gather(*runners, return_exceptions=True)
        print(
            json.dumps(
                {
                    "latency": fleet.latency,
                    "errors": fleet.errors,
                    "details": fleet.details,
                    "handout": fleet.handout,
                    "tasks": fleet.tasks,
                    "paces": fleet.paces,
                }
            ),
            flush=True,
        )

    asyncio.run(main())


# ------------------------------------------------------------------------ orchestrator


class Rung:
    """One measured run: a fresh pool, `workers` simulated workers, submits for `seconds`."""

    def __init__(
        self,
        home: Path,
        workers: int,
        rate: float | None,
        seconds: float,
        heartbeat: int = 0,
        bare: bool = False,
        paced: bool = True,
        batch: int = 1,
    ) -> None:
        self.home = home
        self.batch = batch  # tasks per submit call in a max run (>1: SubmitTasks)
        self.paced = paced  # False: the pool's pace off, every worker at the configured interval
        self.heartbeat = heartbeat  # 0: the pool's default interval
        self.workers = workers
        self.rate = rate  # None: as fast as the pool accepts; 0: no submits
        self.bare = bare  # the floor server instead of the pool (no submits then)
        self.seconds = seconds
        self.procs: list[subprocess.Popen[str]] = []
        self.db = home / "pool.db"

    def spawn(self, *argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, __file__, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT / "bench",
        )
        self.procs.append(proc)
        return proc

    def end(self) -> None:
        for proc in self.procs:  # each by its own id
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    async def run(self, processes: int) -> dict[str, Any]:
        port_file, stats_file = self.home / "port", self.home / "pool-stats.json"
        pool = self.spawn(
            "serve",
            "--heartbeat-interval",
            str(self.heartbeat),
            "--db",
            str(self.db),
            "--port-file",
            str(port_file),
            "--stats-file",
            str(stats_file),
            *(["--bare"] if self.bare else []),
            *([] if self.paced else ["--unpaced"]),
        )
        for _ in range(300):
            if port_file.exists() and port_file.read_text():
                break
            await asyncio.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text()}"
        per = [self.workers // processes + (i < self.workers % processes) for i in range(processes)]
        fleets = [
            self.spawn("workers", "--address", address, "--prefix", f"w{i}", "--count", str(n))
            for i, n in enumerate(per)
            if n
        ]
        ramp = time.perf_counter()
        for proc in fleets:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"a worker process failed to start: {line!r}")
        ramp = time.perf_counter() - ramp
        # Every poll parked, and every worker has beaten once: those that registered early,
        # at the interval of a smaller fleet, have heard the pace of this one.
        await asyncio.sleep(SETTLE_SECONDS)

        channel = grpc.aio.insecure_channel(address)
        nm, queue = pb_grpc.NodeManagerStub(channel), pb_grpc.TaskQueueStub(channel)
        token = (
            await nm.Login(pb.LoginRequest(username=USER, password=PASSWORD), timeout=60)
        ).token
        metadata = (("authorization", f"Bearer {token}"),)
        submit_latency: list[float] = []
        submit_errors: Counter[str] = Counter()
        submitted = 0

        async def submit_one() -> None:
            nonlocal submitted
            batch = self.batch if self.rate is None else 1
            specs = [
                pb.TaskSpec(
                    kind=pb.TASK_KIND_PYTHON, source="print('hi')", name=f"bench {time.time():.6f}"
                )
                for _ in range(batch)
            ]
            start = time.perf_counter()
            try:
                if batch == 1:
                    await queue.SubmitTask(
                        pb.SubmitTaskRequest(spec=specs[0]), metadata=metadata, timeout=RPC_DEADLINE
                    )
                else:
                    await queue.SubmitTasks(
                        pb.SubmitTasksRequest(specs=specs), metadata=metadata, timeout=RPC_DEADLINE
                    )
            except grpc.aio.AioRpcError as exc:
                submit_errors[f"SubmitTask {exc.code().name}"] += 1
                return
            submit_latency.append(time.perf_counter() - start)
            submitted += batch

        ps = psutil.Process(pool.pid)
        os.kill(pool.pid, signal.SIGUSR1)
        for proc in fleets:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        fleet_ps = [psutil.Process(proc.pid) for proc in fleets]
        fleet0 = sum(sum(f.cpu_times()[:2]) for f in fleet_ps)
        cpu0, t0 = ps.cpu_times(), time.perf_counter()
        rss_max = 0
        end = t0 + self.seconds
        if self.rate == 0:  # heartbeats and polls only
            while time.perf_counter() < end:
                rss_max = max(rss_max, ps.memory_info().rss)
                await asyncio.sleep(min(1.0, max(0.0, end - time.perf_counter())))
        elif self.rate:
            pending: set[asyncio.Task[None]] = set()
            i = 0
            while (due := t0 + i / self.rate) < end:  # open loop: on schedule, not on replies
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                task = asyncio.create_task(submit_one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
                if i % int(self.rate) == 0:
                    rss_max = max(rss_max, ps.memory_info().rss)
            await asyncio.gather(*pending)
        else:
            # Batches would outrun the workers and only grow the queue: the submitters keep
            # at most BACKLOG tasks queued (read from the pool's database), so the rung
            # measures what the pool completes, not how much it can store.
            backlog = {"queued": 0}
            watcher = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)

            async def flood() -> None:
                while time.perf_counter() < end:
                    if self.batch > 1 and backlog["queued"] >= BACKLOG:
                        await asyncio.sleep(0.01)
                        continue
                    await submit_one()

            sampler_done = asyncio.Event()

            async def sampler() -> None:
                nonlocal rss_max
                ticks = 0
                while not sampler_done.is_set():
                    if ticks % 50 == 0:
                        rss_max = max(rss_max, ps.memory_info().rss)
                    if self.batch > 1:
                        backlog["queued"] = watcher.execute(
                            "SELECT count(*) FROM tasks WHERE status = 'queued'"
                        ).fetchone()[0]
                    ticks += 1
                    await asyncio.sleep(0.02)

            sampling = asyncio.create_task(sampler())
            await asyncio.gather(*(flood() for _ in range(SUBMITTERS)))
            sampler_done.set()
            await sampling
            watcher.close()
        window = time.perf_counter() - t0
        # Let the last tasks finish (bounded), then read the pool's own account.
        reader = None if self.bare else sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        for _ in range(150 if reader is not None else 0):
            left = reader.execute(
                "SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')"
            ).fetchone()[0]
            if not left:
                break
            await asyncio.sleep(0.1)
        drain = time.perf_counter() - t0 - window
        cpu1 = ps.cpu_times()
        fleet1 = sum(sum(f.cpu_times()[:2]) for f in fleet_ps)
        os.kill(pool.pid, signal.SIGUSR2)  # the server takes its calls served and CPU used
        rss_max = max(rss_max, ps.memory_info().rss)
        await channel.close()
        outs = []
        for proc in fleets:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            outs.append(json.loads(await asyncio.to_thread(proc.stdout.readline)))
        os.kill(pool.pid, signal.SIGTERM)
        await asyncio.to_thread(pool.wait, 30)
        pool_stats = json.loads(stats_file.read_text())
        db_check = {"tasks": 0, "succeeded": 0, "not_succeeded": 0, "retried": 0}
        if reader is not None:
            db_check = self.check_db(reader)
            reader.close()
        db_check.setdefault("reports_not_one", 0)
        self.end()

        latency: dict[str, list[float]] = defaultdict(list)
        errors: Counter[str] = Counter(submit_errors)
        handout: list[float] = []
        received: list[str] = []
        paces: Counter[float] = Counter()
        for out in outs:
            paces.update({float(k): v for k, v in out["paces"].items()})
            for name, values in out["latency"].items():
                latency[name].extend(values)
            errors.update(out["errors"])
            for key, text in out["details"].items():
                print(f"{key}: {text}", file=sys.stderr)
            handout.extend(out["handout"])
            received.extend(out["tasks"])
        latency["SubmitTask"] = submit_latency
        served = sum(pool_stats.get("calls", {}).values())
        return {
            "workers": self.workers,
            "heartbeat": self.heartbeat,
            "rate": self.rate,
            "bare": self.bare,
            "paced": self.paced,
            "batch": self.batch if self.rate is None else 1,
            # The heartbeat interval most beats in the window were told to keep.
            "beat_every_s": paces.most_common(1)[0][0] if paces else None,
            "calls_served": served,
            "cpu_us_per_call": pool_stats.get("cpu_s", 0.0) / max(served, 1) * 1e6,
            "window_s": window,
            "drain_s": drain,
            "ramp_s": ramp,
            "submitted": submitted,
            "completed_per_s": db_check["succeeded"] / (window + drain),
            "handed_out_twice": len(received) - len(set(received)),
            "rpc": {
                name: {"n": len(v), "p50_ms": pct(v, 0.5) * 1000, "p99_ms": pct(v, 0.99) * 1000}
                for name, v in sorted(latency.items())
            },
            "handout_p50_ms": pct(handout, 0.5) * 1000,
            "handout_p99_ms": pct(handout, 0.99) * 1000,
            "errors": dict(errors),
            "pool_cpu_cores": (
                (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (window + drain)
            ),
            "pool_rss_mib": rss_max / 2**20,
            "fleet_cpu_cores": (fleet1 - fleet0) / (window + drain),  # the load generator
            "pool": pool_stats,
            "db": db_check,
        }

    @staticmethod
    def check_db(db: sqlite3.Connection) -> dict[str, int]:
        """Exactly once, by the pool's own records: one lease, one report per task."""
        count = dict(db.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())
        return {
            "tasks": sum(count.values()),
            "succeeded": count.get("succeeded", 0),
            "not_succeeded": sum(v for k, v in count.items() if k != "succeeded"),
            "retried": db.execute("SELECT count(*) FROM tasks WHERE attempt > 1").fetchone()[0],
            "reports_not_one": db.execute(
                "SELECT count(*) FROM tasks t WHERE (SELECT count(*) FROM reports r"
                " WHERE r.task_id = t.task_id) <> 1"
            ).fetchone()[0],
        }


def row(r: dict[str, Any]) -> str:
    rpc = r["rpc"]
    nan = float("nan")

    def lat(name: str) -> str:
        v = rpc.get(name)
        return f"{v['p50_ms']:.1f} / {v['p99_ms']:.1f}" if v and v["n"] else "-"

    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
    once = (
        "yes"
        if not (
            r["handed_out_twice"]
            or r["db"]["reports_not_one"]
            or r["db"]["retried"]
            or r["db"]["not_succeeded"]
        )
        else (
            f"no ({r['db']['not_succeeded']} unfinished, {r['db']['retried']} retried, "
            f"{r['handed_out_twice']} handed out twice)"
        )
    )
    rate = "max" if r["rate"] is None else f"{r['rate']:g}"
    if r.get("batch", 1) > 1:
        rate += f" ({r['batch']} a call)"
    workers = f"{r['workers']:,}" + (f" (heartbeat {r['heartbeat']} s)" if r["heartbeat"] else "")
    if not r.get("paced", True):
        workers += " (pace off)"
    elif r.get("beat_every_s") and r["beat_every_s"] != 10:
        workers += f" (beats every {r['beat_every_s']:g} s)"
    return (
        f"| {workers} | {rate} | {lat('UpdateNodeStatus')} | {lat('GetAssignedTasks')} "
        f"| {lat('ReportTaskResult')} | {lat('SubmitTask')} "
        f"| {r['handout_p50_ms']:.1f} / {r['handout_p99_ms']:.1f} "
        f"| {r['completed_per_s']:.1f} | {errors} | {once} "
        f"| {r['pool_cpu_cores'] * 100:.0f} % / {r['pool_rss_mib']:.0f} MiB "
        f"| {r['cpu_us_per_call']:.0f} "
        f"| {r['pool'].get('tx_p99_ms', nan):.2f} / {r['pool'].get('lag_p99_ms', nan):.1f} |"
    )


def floor_rows(results: list[dict[str, Any]]) -> str:
    """The pool against the bare grpc.aio server, same fleet, no submits: cost per call."""
    pairs = [(r, b) for r in results for b in results if b["bare"] and not r["bare"]]
    pairs = [(r, b) for r, b in pairs if r["rate"] == 0 and r["workers"] == b["workers"]]
    lines = []
    for pool, bare in pairs:
        for r in (bare, pool):
            hb = r["rpc"].get("UpdateNodeStatus", {"p50_ms": float("nan"), "p99_ms": float("nan")})
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
            lines.append(
                f"| {'bare grpc.aio handler' if r['bare'] else 'the pool'} | {r['workers']:,} "
                f"| {hb['p50_ms']:.1f} / {hb['p99_ms']:.1f} | {errors} | {r['calls_served']:,} "
                f"| {r['cpu_us_per_call']:.0f} "
                f"| {r['cpu_us_per_call'] / max(bare['cpu_us_per_call'], 1e-9):.2f} "
                f"| {r['pool_cpu_cores'] * 100:.0f} % / {r['fleet_cpu_cores'] * 100:.0f} % |"
            )
    return "\n".join(lines)


def report(
    results: list[dict[str, Any]],
    load: tuple[float, float, float],
    seconds: float,
    processes: int,
) -> str:
    head = (
        "| workers | submits/s | heartbeat p50 / p99 ms | poll p50 / p99 ms | report p50 / p99 ms "
        "| submit p50 / p99 ms | submit → handed out p50 / p99 ms | tasks/s done | errors "
        "| each task once | pool CPU / RSS | pool CPU µs per worker call "
        "| SQLite tx p99 ms / loop lag p99 ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = "\n".join(row(r) for r in results if r["rate"] != 0)
    floor = floor_rows(results)
    floor_text = (
        (
            "\n**The floor.** The same simulated workers (heartbeats and long-polls, no submits) "
            "against the pool and against a bare grpc.aio server with the pool's server options "
            "whose handlers only answer (no auth, no store; a poll just waits), one after the "
            "other in this run. *CPU per call* is the server process's CPU time (all its threads) "
            "in the window over the worker calls it served then; *ratio to bare* is the pool's "
            "cost as a multiple of the bare server's.\n\n"
            "| server | workers | heartbeat p50 / p99 ms | errors | calls served | CPU µs per call "
            "| ratio to bare | CPU: server / worker processes |\n"
            "|---|---|---|---|---|---|---|---|\n"
            f"{floor}\n"
        )
        if floor
        else ""
    )
    return (
        "## Pool scale (`bench/pool_scale.py`)\n\n"
        f"One reference pool process (SQLite in WAL mode) on loopback, simulated workers in "
        f"{processes} processes ({WORKERS_PER_CHANNEL} per HTTP/2 connection, one login per "
        "process) and the submitter, all on the same 2 cores. Each worker registers, "
        "heartbeats at the interval the pool gives (10 s, stretched past 1,000 workers to keep the "
        "pool at 100 heartbeats a second: docs/pool.md, the pace; *pace off* rows keep 10 s at "
        "any size), keeps one long-poll open (30 s; the "
        "first waits a random part of it, so re-polls are spread as in a fleet that joined over "
        "time) and reports each task at once (a row marked *heartbeat 20 s* uses that interval "
        "instead). Each rung measures after the fleet is up and every worker has beaten once. "
        "A *max* rung submits as fast as the pool accepts from 16 concurrent callers, one task "
        "a call (SubmitTask) or, where it says *N a call*, N tasks a call (SubmitTasks) while "
        f"fewer than {BACKLOG:,} are queued. "
        "The pool logs at WARNING: a line per task would measure the logging. "
        f"Each rung submits for {seconds:g} s (open loop), then "
        "waits for the last tasks. Latencies are client side. *Poll* is a GetAssignedTasks "
        "call, which waits up to 30 s when there is no work, so its p50 is not a service time. "
        "*Each task once*: every task succeeded with one lease, one attempt and one report, "
        "checked in the pool's database. The pool's CPU is in cores (100 % = one core); "
        "*CPU µs per worker call* is the pool's CPU time in the window over the worker calls "
        "(register, heartbeat, poll, report) it served then (submits are not counted, so at "
        "few workers it is mostly their cost and the pool's fixed costs); "
        "*SQLite tx* is the time of a write transaction inside the pool, *loop lag* how late "
        "its event loop ran a 50 ms timer.\n\n"
        f"Load average at the start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 "
        "min). The machine is shared with other engineers' builds and tests and is noisy: "
        "read the numbers as an order of magnitude, not to the millisecond.\n\n"
        f"{head}\n{rows}\n{floor_text}"
    )


PROCESSES = 4
BACKLOG = 1000  # tasks queued at most by a batched max rung
SETTLE_SECONDS = 12.0  # after the fleet is up: one default heartbeat interval, and 2 s
SUBMITTERS = int(os.environ.get("POOL_SCALE_SUBMITTERS", "16"))  # concurrent submits, max runs


async def orchestrate(args: argparse.Namespace) -> list[dict[str, Any]]:
    hb = args.heartbeat_interval
    plan: list[tuple[int, float | None, int, bool]] = [
        (n, args.rate, hb, False) for n in args.ladder
    ]
    batched = []
    if args.max_workers:
        plan.append((args.max_workers, None, hb, False))
        if args.max_batch > 1:  # the same, submitting many tasks a call (SubmitTasks)
            batched.append(len(plan))
            plan.append((args.max_workers, None, hb, False))
    if args.also_heartbeat and args.ladder:  # the largest rung again, with a longer interval
        plan.append((max(args.ladder), args.rate, args.also_heartbeat, False))
    unpaced = []
    if args.also_unpaced and args.ladder:  # the largest rung again, every worker at 10 s
        unpaced.append(len(plan))
        plan.append((max(args.ladder), args.rate, hb, False))
    if args.floor:  # heartbeats and polls only: the pool, then the bare grpc.aio server, both
        unpaced.append(len(plan))  # with every worker at the same interval
        plan += [(args.floor, 0, hb, False), (args.floor, 0, hb, True)]
    results = []
    for i, (workers, rate, heartbeat, bare) in enumerate(plan):
        with tempfile.TemporaryDirectory(prefix="pool-scale-") as tmp:
            rung = Rung(
                Path(tmp),
                workers,
                rate,
                args.seconds,
                heartbeat,
                bare,
                paced=i not in unpaced,
                batch=args.max_batch if i in batched else 1,
            )
            try:
                result = await asyncio.wait_for(rung.run(args.processes), args.seconds + 300)
            finally:
                rung.end()
        print(json.dumps({k: v for k, v in result.items()}), flush=True)
        print(row(result), flush=True)
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("serve")
    s.add_argument("--db", required=True)
    s.add_argument("--port-file", required=True)
    s.add_argument("--stats-file", required=True)
    s.add_argument("--heartbeat-interval", type=int, default=0)
    s.add_argument("--bare", action="store_true", help="the floor server instead of the pool")
    s.add_argument("--unpaced", action="store_true", help="the pool's pace off (pace.py)")
    w = sub.add_parser("workers")
    w.add_argument("--address", required=True)
    w.add_argument("--prefix", required=True)
    w.add_argument("--count", type=int, required=True)
    parser.add_argument(
        "--ladder",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[100, 1000, 3000, 10000],
    )
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-workers", type=int, default=1000, help="0: no max-throughput run")
    parser.add_argument("--processes", type=int, default=PROCESSES)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="run the max-throughput rung again submitting this many tasks a call",
    )
    parser.add_argument(
        "--heartbeat-interval", type=int, default=0, help="seconds; 0: the pool's default"
    )
    parser.add_argument(
        "--also-heartbeat",
        type=int,
        default=0,
        help="run the largest rung once more with this heartbeat interval (seconds)",
    )
    parser.add_argument(
        "--also-unpaced",
        action="store_true",
        help="run the largest rung once more with the pool's pace off (every worker at 10 s)",
    )
    parser.add_argument(
        "--floor",
        type=int,
        default=0,
        help="this many workers, no submits, against the pool and the bare grpc.aio server",
    )
    parser.add_argument("--no-write", action="store_true", help="print, leave docs alone")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
        return
    if args.command == "workers":
        workers(args)
        return
    load = os.getloadavg()
    results = asyncio.run(orchestrate(args))
    section = report(results, load, args.seconds, args.processes)
    print(section)
    if not args.no_write:
        write_section("pool-scale", section)


if __name__ == "__main__":
    main()
