"""The connection dies mid-upload (dropped, or black-holed): the result still arrives whole."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from helpers.faultproxy import FaultProxy
from helpers.harness import archive_files, python_task, queue_client, start_pool, start_worker
from hivemind_worker.engine.events import TaskFinished
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = [pytest.mark.usefixtures("memory_keyring"), pytest.mark.slow]

SOURCE = """
    import hashlib, os
    payload = os.urandom(3 * 1024 * 1024)
    open("results/payload.bin", "wb").write(payload)
    print("sha256", hashlib.sha256(payload).hexdigest())
"""


@pytest.mark.parametrize("mode", ["drop", "blackhole"])
@pytest.mark.timeout(150)
async def test_upload_interrupted_midway_is_restarted_and_matches(
    tmp_path: Path, mode: str
) -> None:
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=120)
    host, port = pool.address.rsplit(":", 1)
    proxy = FaultProxy(host, int(port), mode=mode)
    worker = await start_worker(tmp_path / "node-a", await proxy.start())

    def on_event(event: object) -> None:
        # The archive upload follows at once: fault the connection a megabyte into it.
        if isinstance(event, TaskFinished):
            proxy.arm(1024 * 1024)

    worker.engine.subscribe(on_event)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                python_task(SOURCE, max_result_bytes=8 * 1024 * 1024, name="big result")
            )
            info = (await queue.wait_done([task_id], timeout=120))[task_id]
            assert proxy.faults == 1
            assert info.status == pb.TASK_STATUS_SUCCEEDED
            assert info.attempt == 1  # the lease held through the fault
            payload = archive_files(await queue.download(task_id))["results/payload.bin"]
            printed = info.log_tail.decode().split("sha256 ")[1].split()[0]
            assert hashlib.sha256(payload).hexdigest() == printed
            assert pool.stats.uploads_by_lease[info.spec.lease_id] >= 1
    finally:
        await worker.stop()
        await proxy.close()
        await pool.stop()
