"""The submitter-facing TaskQueue service of the reference pool."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from hivemind_worker.pool.common import (
    MAX_LIST_LIMIT,
    MAX_MAX_ATTEMPTS,
    MAX_SUBMIT_BATCH,
    Context,
    Refused,
    invalid,
    require_id,
    rpc,
    status_for,
)
from hivemind_worker.pool.core import PoolCore
from hivemind_worker.pool.records import TaskNeed
from hivemind_worker.pool.store import StoreError
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc
from hivemind_worker.tasks import TaskSpec, TaskSpecError, TaskStatus

log = logging.getLogger("hivemind_worker.pool")


class TaskQueueService(pb_grpc.TaskQueueServicer):
    """The submitter-facing service; each user sees only their own tasks."""

    def __init__(self, core: PoolCore) -> None:
        self._core = core

    @rpc
    async def SubmitTask(
        self, request: pb.SubmitTaskRequest, context: Context
    ) -> pb.SubmitTaskResponse:
        core = self._core
        user = core.user(context)
        if not request.HasField("spec"):
            raise invalid("spec", "is missing")
        task = self._checked(request.spec)
        task_id = core.store.submit(task, user)
        self._queued(user, [task], [task_id])
        return pb.SubmitTaskResponse(task_id=task_id)

    @rpc
    async def SubmitTasks(
        self, request: pb.SubmitTasksRequest, context: Context
    ) -> pb.SubmitTasksResponse:
        core = self._core
        user = core.user(context)
        if not request.specs:
            raise invalid("specs", "is empty")
        if len(request.specs) > MAX_SUBMIT_BATCH:
            raise invalid("specs", f"at most {MAX_SUBMIT_BATCH} a call, not {len(request.specs)}")
        tasks = []
        for i, spec in enumerate(request.specs):
            try:
                tasks.append(self._checked(spec))
            except (TaskSpecError, Refused) as exc:
                raise invalid(f"specs[{i}]", str(exc)) from None
        task_ids = core.store.submit_many(tasks, user)
        self._queued(user, tasks, task_ids)
        return pb.SubmitTasksResponse(task_ids=task_ids)

    def _checked(self, spec: pb.TaskSpec) -> TaskSpec:
        """A submitted spec, validated; TaskSpecError or Refused naming the field otherwise."""
        task = TaskSpec.from_proto(spec, require_id=False)
        if task.max_attempts > MAX_MAX_ATTEMPTS:
            raise invalid("max_attempts", f"must be at most {MAX_MAX_ATTEMPTS}")
        cap = self._core.config.max_upload_bytes_in_flight
        if spec.max_result_bytes > cap:  # asked for; the default is left to the upload
            raise invalid(
                "max_result_bytes", f"must be at most {cap}: this pool receives no larger result"
            )
        return task

    def _queued(self, user: str, tasks: list[TaskSpec], task_ids: list[str]) -> None:
        core = self._core
        core.stats.submitted += len(tasks)
        for task, task_id in zip(tasks, task_ids, strict=True):
            log.info("task %s (%s) submitted by %s", task_id, task.kind.value, user)
            core.offer(TaskNeed.of(task, task_id))  # wakes one parked poll that can run it

    @rpc
    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.TaskInfo:
        user = self._core.user(context)
        task_id = require_id("task_id", request.task_id)
        task = self._core.store.get_task(task_id, owner=user)
        if task is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
        return task.to_info()

    @rpc
    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        user = self._core.user(context)
        try:
            statuses = [TaskStatus.from_proto(s) for s in request.statuses]
        except TaskSpecError as exc:
            raise invalid("statuses", exc.reason) from None
        limit = min(request.limit or 100, MAX_LIST_LIMIT)
        tasks = self._core.store.list_tasks(statuses, limit, owner=user)
        return pb.ListTasksResponse(tasks=[t.to_info(with_contents=False) for t in tasks])

    @rpc
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: Context
    ) -> pb.CancelTaskResponse:
        user = self._core.user(context)
        task_id = require_id("task_id", request.task_id)
        reason = request.reason[:500]
        status = self._core.store.request_cancel(task_id, user, reason)
        if status is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
        log.info("cancel of task %s requested by %s: now %s", task_id, user, status.value)
        return pb.CancelTaskResponse(status=status.to_proto())

    async def DownloadTaskResult(
        self, request: pb.DownloadTaskResultRequest, context: Context
    ) -> AsyncIterator[pb.ResultChunk]:
        store = self._core.store
        try:
            user = self._core.user(context)
            task_id = require_id("task_id", request.task_id)
            if store.get_task(task_id, owner=user) is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
            info = store.get_result(task_id)
            if info is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"task {task_id} has no result")
        except (Refused, StoreError) as exc:
            status = status_for(exc) or (grpc.StatusCode.INTERNAL, str(exc))
            await context.abort(*status)
        if info.chunks == 0:
            yield pb.ResultChunk(data=b"", total_size=0, sha256=info.sha256)
        for seq in range(info.chunks):
            data = store.result_chunk(task_id, seq)
            if seq == 0:
                yield pb.ResultChunk(data=data, total_size=info.size, sha256=info.sha256)
            else:
                yield pb.ResultChunk(data=data)
