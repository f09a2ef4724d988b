"""Result uploads: spooled to a file, checked (size, sha256, lease), then moved into the store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import grpc

from hivemind_worker.pool.common import CHUNK_BYTES, Refused, invalid, require_sha256
from hivemind_worker.pool.core import PoolCore, Upload
from hivemind_worker.pool.records import StaleLease
from hivemind_worker.protocol import nodepool_pb2 as pb

log = logging.getLogger("hivemind_worker.pool")


async def _until(
    messages: AsyncIterator[pb.UploadTaskResultRequest], stop: asyncio.Event
) -> AsyncIterator[pb.UploadTaskResultRequest]:
    """The messages, until `stop` is set: then ABORTED, even while waiting for the next one."""
    iterator = aiter(messages)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            following = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                following.cancel()
                raise Refused(
                    grpc.StatusCode.ABORTED, "superseded by a newer upload for this lease"
                )
            try:
                yield following.result()
            except StopAsyncIteration:
                return
    finally:
        stopped.cancel()


async def receive_upload(
    core: PoolCore,
    user: str,
    node_id: str,
    task_id: str,
    lease_id: str,
    head: pb.UploadHeader,
    messages: AsyncIterator[pb.UploadTaskResultRequest],
) -> pb.UploadTaskResultResponse:
    """Receive one lease holder's upload after its header; supersede an earlier one in flight."""
    expected_sha = require_sha256("header.sha256", head.sha256)
    total = head.total_size
    if total < 0:
        raise invalid("header.total_size", "is negative")
    core.store.node_capabilities(node_id, user)
    task = core.store.get_task(task_id)
    if task is None or not core.store.lease_is_current(task_id, lease_id, node_id):
        raise StaleLease(lease_id, task_id)
    limit = task.spec.max_result_bytes
    if total > limit:
        raise invalid(
            "header.total_size",
            f"{total} bytes is more than the task's max_result_bytes ({limit})",
        )
    previous = core.uploading.get(lease_id)
    if previous is not None:
        log.info("upload for lease %s supersedes the one still in flight", lease_id)
        previous.stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(previous.finished.wait(), 10)
        if lease_id in core.uploading:
            raise Refused(
                grpc.StatusCode.ABORTED, "an upload for this lease is still being stopped"
            )
    cap = core.config.max_upload_bytes_in_flight
    if total > cap:
        # Never "retry later": no amount of waiting makes room for it, and a worker reads
        # RESOURCE_EXHAUSTED as busy and would send it again for as long as it runs.
        raise Refused(
            grpc.StatusCode.OUT_OF_RANGE,
            f"{total} bytes is more than this pool receives at once ({cap})",
        )
    if core.upload_bytes + total > cap:
        raise Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the pool is receiving {core.upload_bytes} bytes of other uploads and takes "
            f"at most {cap} at once; {total} more do not fit now: retry later",
        )
    # Reserved until this call ends, however it ends (a client cancel included).
    me = Upload()
    core.uploading[lease_id] = me
    core.upload_bytes += total
    path = core.spool / f"upload-{uuid.uuid4().hex}.part"
    spool: IO[bytes] | None = None
    try:
        # Creating the file is quick; doing it here means no thread can create it after
        # the cleanup below ran. Writes, which may be slow, go to a thread.
        spool = path.open("xb+")
        size, digest = await _receive(spool, messages, total, me.stop)
        # Also a moment for a client's cancel, which ends the stream like this, to arrive.
        await asyncio.to_thread(spool.flush)
        if size != total:
            raise Refused(
                grpc.StatusCode.DATA_LOSS,
                f"received {size} bytes but header.total_size is {total}",
            )
        if digest != expected_sha:
            raise Refused(
                grpc.StatusCode.DATA_LOSS,
                f"received data has sha256 {digest}, not header.sha256 {expected_sha}",
            )
        await _store_spooled(core, spool, task_id, lease_id, node_id, digest, size)
    except OSError as exc:  # the spool folder is full or gone: not the caller's fault
        log.exception("upload for lease %s: spool file %s failed", lease_id, path)
        raise Refused(
            grpc.StatusCode.INTERNAL, f"the pool cannot spool the upload: {exc.strerror}"
        ) from None
    finally:
        if core.uploading.get(lease_id) is me:
            del core.uploading[lease_id]
        me.finished.set()
        core.upload_bytes -= total
        try:
            if spool is not None:
                spool.close()  # waits for a write still running in its thread, if any
        finally:
            path.unlink(missing_ok=True)
    core.stats.uploads += 1
    log.info("stored result of task %s (%d bytes, lease %s)", task_id, size, lease_id)
    return pb.UploadTaskResultResponse(sha256=digest, size=size)


async def _receive(
    spool: IO[bytes],
    messages: AsyncIterator[pb.UploadTaskResultRequest],
    total: int,
    stop: asyncio.Event,
) -> tuple[int, str]:
    """Write the data messages to `spool`; their size and sha256. `stop`: superseded."""
    hasher = hashlib.sha256()

    def write(data: bytes) -> None:
        spool.write(data)
        hasher.update(data)  # releases the GIL for big buffers, like the write

    size = 0
    async for msg in _until(messages, stop):
        if msg.WhichOneof("part") != "data":
            raise invalid("header", "sent more than once; only the first message is one")
        data = msg.data
        if len(data) > CHUNK_BYTES:
            raise invalid("data", f"a chunk of {len(data)} bytes is larger than 1 MiB")
        size += len(data)
        if size > total:
            raise invalid("data", f"more than header.total_size ({total}) bytes were sent")
        if data:
            await asyncio.to_thread(write, data)
    return size, hasher.hexdigest()


async def _store_spooled(
    core: PoolCore,
    spool: IO[bytes],
    task_id: str,
    lease_id: str,
    node_id: str,
    digest: str,
    size: int,
) -> None:
    """Move the spooled upload into the store chunk by chunk, then commit it as the result.

    Each chunk is read in a thread and written in its own short transaction, with the loop
    free in between; the commit re-checks the lease in the transaction that swaps the
    result in, so a lease lost meanwhile is refused.
    """
    store = core.store

    def read() -> bytes:
        return spool.read(CHUNK_BYTES)

    if not store.lease_is_current(task_id, lease_id, node_id):
        raise StaleLease(lease_id, task_id)  # lost while receiving: store nothing
    await asyncio.to_thread(spool.seek, 0)
    blob_id = store.new_blob()
    seq = 0
    try:
        while True:
            data = await asyncio.to_thread(read)
            if not data:
                break
            if core.before_result_chunk is not None:
                await core.before_result_chunk(lease_id, seq)
            store.add_blob_chunk(blob_id, seq, data)
            seq += 1
    except BaseException:
        store.discard_blob(blob_id)
        raise
    store.commit_result(
        task_id, lease_id, node_id, sha256=digest, size=size, blob_id=blob_id, chunks=seq
    )


def prepare_spool(spool: Path) -> None:
    """Create the spool folder and remove uploads a previous run left behind (a crash)."""
    spool.mkdir(parents=True, exist_ok=True)
    for leftover in spool.glob("upload-*.part"):
        leftover.unlink(missing_ok=True)
