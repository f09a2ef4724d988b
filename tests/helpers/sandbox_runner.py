"""Runs tasks through a real ProcessExecutor in its own process, as the user it is started as.

The sandbox tests start it as root (a worker run with sudo) and under `setpriv --reuid=nobody`
(an ordinary person's worker): `python sandbox_runner.py WORK_DIR < tasks.json`, one JSON
object per task (source, files, memory, disk, timeout), answered on stdout with one JSON list:
status, error, exit code, output and the result archive's files, and how often a ticker on
the executor's event loop ticked during the run, after the task printed END-OF-TASK (while
the worker packs its results), and while its workspace was deleted in the background.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.engine.executors.workspace import TRASH_DIR, wait_for_discards
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import MiB, TaskSpec


def make_spec(item: dict[str, Any], index: int) -> TaskSpec:
    msg = pb.TaskSpec(
        task_id=f"t{index}",
        lease_id=f"l{index}",
        kind=pb.TASK_KIND_PYTHON,
        source=item["source"],
        timeout_seconds=int(item.get("timeout", 60)),
        input_files=[
            pb.InputFile(path=p, content=c.encode()) for p, c in item.get("files", {}).items()
        ],
        resources=pb.Resources(
            memory_bytes=int(item.get("memory", 256 * MiB)), disk_bytes=int(item.get("disk", 0))
        ),
    )
    return TaskSpec.from_proto(msg, require_lease=True)


def archive_files(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    out: dict[str, str] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            f = tar.extractfile(member) if member.isfile() else None
            out[member.name] = base64.b64encode(f.read()).decode() if f else ""
    return out


async def run_all(work_dir: Path, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    executor = ProcessExecutor(work_dir)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:  # a heartbeat-like coroutine on the executor's loop
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    beat = asyncio.create_task(ticker())
    out: list[dict[str, Any]] = []
    try:
        for index, item in enumerate(items):
            spec = make_spec(item, index)
            await executor.prepare(spec)
            workspace = executor.workspace(spec.task_id)
            assert workspace is not None
            before = ticks
            marked: list[int] = []

            def on_log(task_id: str, chunk: bytes, marked: list[int] = marked) -> None:
                if b"END-OF-TASK" in chunk:
                    marked.append(ticks)  # the task's last words: what follows is the worker's

            result = await executor.run(spec, on_log)
            run_ticks = ticks - before
            ticks_after_task = ticks - marked[0] if marked else -1
            files = archive_files(result.archive)
            await executor.cleanup(spec.task_id)
            gone_at_once = not workspace.exists()
            before = ticks
            await asyncio.to_thread(wait_for_discards, 120)
            ticks_while_deleting = ticks - before
            out.append(
                {
                    "status": result.status.value,
                    "error": result.error,
                    "exit_code": result.exit_code,
                    "output": result.log_tail.decode(errors="replace"),
                    "files": files,
                    "run_ticks": run_ticks,
                    "ticks_after_task": ticks_after_task,
                    "ticks_while_deleting": ticks_while_deleting,
                    "workspace_gone_at_cleanup": gone_at_once,
                }
            )
            if result.archive is not None:
                result.archive.unlink()
        confinement = await executor.confinement()
        walls = confinement.walls if confinement is not None else ""
    finally:
        stop.set()
        await beat
        await executor.close()
    trash_emptied = wait_for_discards(120)
    trash = work_dir / TRASH_DIR
    left = os.listdir(trash) if trash.exists() else []
    for entry in out:
        entry["walls"] = walls
        entry["uid"] = os.getuid()
        entry["trash_emptied"] = trash_emptied and not left
    return out


def main() -> None:
    items = json.loads(sys.stdin.read())
    results = asyncio.run(run_all(Path(sys.argv[1]), items))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
