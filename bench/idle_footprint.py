#!/usr/bin/env python3
"""Idle footprint: the headless worker connected to a pool with nothing to do, against the
BOINC client attached to no project, side by side over the same window.

The pool is the reference pool in its own process on loopback, with its default heartbeat
interval (10 s) and long-poll (30 s). The worker is `hivemind-worker run --headless` with
the process sandbox, logged in, registered and idle; BOINC runs with `--no_info_fetch`
(no project list or version fetch, its only traffic when attached to nothing) and the
benchmark checks that none of its sockets reaches past loopback. A bare grpc.aio channel to
the same pool, connected and doing nothing, shows the floor any gRPC worker stands on. All
are measured over the same window after they settle (CPU time per thread from schedstat,
resident memory of the process tree); the ratios go to docs/benchmarks.md between the
idle-footprint markers.

`--pythonpath DIR` runs the worker from another checkout's `app/` folder (a before/after run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _footprint import (
    Boinc,
    Usage,
    load_line,
    local_pool,
    login,
    measure_together,
    stop,
    wait_for_line,
    worker_env,
)
from _report import write_section

# The floor under any gRPC worker: a grpc.aio channel to the same pool with the worker's
# channel options (keepalive), connected and doing nothing, in a process of its own.
BARE_GRPC = """
import asyncio, sys, grpc
from hivemind_worker.engine.pool_client import _CHANNEL_OPTIONS
async def main():
    channel = grpc.aio.insecure_channel(sys.argv[1], options=_CHANNEL_OPTIONS)
    await channel.channel_ready()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
GOAL_CPU_PERCENT = 0.1
GOAL_RSS_MIB = 50.0
# Where the rest goes, per thread (schedstat) and per mapping (smaps), when this was written.
NOTE = (
    "Where an idle worker's time goes (per-thread, 60 s, when this benchmark was written): "
    "gRPC's own threads (timer, EventEngine pool, lifeguard) about 0.06 % of a core; the "
    "engine's loop and its worker threads about 0.05 % (a heartbeat every 10 s, the long-poll "
    "renewed every 30 s, a when-to-contribute look every 10 s; host metrics only for "
    "heartbeats unless a dashboard watches). Memory: the interpreter with asyncio and OpenSSL "
    "about 19 MiB, gRPC's core library 12-15 MiB of resident pages, the engine's and "
    "keyring's modules most of the rest."
)


def row(name: str, usage: Usage) -> str:
    return (
        f"| {name} | {usage.cpu_percent:.3f} % ({usage.cpu_seconds * 1000:.0f} ms; "
        f"ticks {usage.tick_seconds * 1000:.0f} ms) | {usage.rss_mib:.1f} MiB "
        f"(peak {usage.rss_peak_bytes / 2**20:.1f}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window")
    parser.add_argument("--settle", type=float, default=15.0, help="wait after registering")
    parser.add_argument("--pythonpath", type=Path, help="run the worker from this app/ folder")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    load = load_line()
    print(f"idle footprint, {args.seconds:.0f} s window; {load}", flush=True)
    with tempfile.TemporaryDirectory(prefix="idle-footprint-") as tmp:
        home = Path(tmp)
        boinc = Boinc(home / "boinc") if Boinc.available() else None
        worker: subprocess.Popen[bytes] | None = None
        bare: subprocess.Popen[bytes] | None = None
        with local_pool(home) as pool:
            try:
                extra = {"PYTHONPATH": str(args.pythonpath)} if args.pythonpath else {}
                env = worker_env(home / "worker", **extra)
                login(env, pool.address)
                log = home / "worker.log"
                with log.open("wb") as out:
                    worker = subprocess.Popen(
                        [sys.executable, "-m", "hivemind_worker", "run", "--headless",
                         "--node-pool", pool.address, "--node-id", "idle-bench"],
                        env=env, stdout=out, stderr=subprocess.STDOUT,
                    )  # fmt: skip
                bare = subprocess.Popen(
                    [sys.executable, "-c", BARE_GRPC, pool.address], stdout=subprocess.PIPE
                )
                assert bare.stdout is not None
                if bare.stdout.readline().strip() != b"ready":
                    raise RuntimeError("the bare gRPC channel did not connect")
                pids = {"worker": worker.pid, "grpc": bare.pid}
                if boinc is not None:
                    pids["boinc"] = boinc.start()
                wait_for_line(log, "registered node", 120, worker)
                measure_together({"settle": worker.pid}, args.settle)
                usage = measure_together(pids, args.seconds)
                peers = boinc.remote_peers() if boinc is not None else []
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited; see {log}")
            finally:
                stop(worker)
                stop(bare)
                if boinc is not None:
                    boinc.stop()
    if peers:
        raise SystemExit(f"BOINC reached past loopback ({', '.join(peers)}): not a fair yardstick")
    lines = [
        f"Measured {args.seconds:.0f} s after {args.settle:.0f} s of settling; "
        f"{load} at the start"
        + (f"; worker from {args.pythonpath}" if args.pythonpath else "")
        + ".",
        "",
        "| process | CPU (share of one core) | resident memory |",
        "|---|---|---|",
        row("headless worker, connected, idle", usage["worker"]),
        row("bare grpc.aio channel to the same pool (floor)", usage["grpc"]),
    ]
    if "boinc" in usage:
        w, b = usage["worker"], usage["boinc"]
        lines += [
            row("BOINC client, no project (yardstick)", b),
            "",
            f"Ratio worker / BOINC: CPU {w.cpu_percent / max(b.cpu_percent, 1e-9):.2f}x, "
            f"memory {w.rss_bytes / b.rss_bytes:.2f}x. "
            f"Bare gRPC channel / BOINC: CPU "
            f"{usage['grpc'].cpu_percent / max(b.cpu_percent, 1e-9):.2f}x, "
            f"memory {usage['grpc'].rss_bytes / b.rss_bytes:.2f}x.",
        ]
    else:
        lines += ["", "BOINC is not installed (`apt-get install boinc-client`): no yardstick."]
    w = usage["worker"]
    met = w.cpu_percent <= GOAL_CPU_PERCENT and w.rss_mib <= GOAL_RSS_MIB
    lines.append(
        f"Goal ≤ {GOAL_CPU_PERCENT} % of a core and ≤ {GOAL_RSS_MIB:.0f} MiB: "
        + ("met." if met else "not met.")
    )
    lines += ["", NOTE]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section("idle-footprint", "## Idle footprint (headless)\n\n" + section)


if __name__ == "__main__":
    main()
