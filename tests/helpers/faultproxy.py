"""A loopback TCP proxy owned by a test, which drops or black-holes a connection on cue."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class FaultProxy:
    target_host: str
    target_port: int
    mode: str = "drop"  # "drop": close both sides; "blackhole": stop forwarding, stay open
    armed_after: int | None = None  # fault once after this many more client-to-server bytes
    faults: int = 0
    upstream_bytes: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def arm(self, after_bytes: int) -> None:
        self.armed_after = self.upstream_bytes + after_bytes

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        state = {"holed": False}
        for coro in (
            self._pump(reader, up_writer, [writer, up_writer], state, upstream=True),
            self._pump(up_reader, writer, [writer, up_writer], state, upstream=False),
        ):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        both: list[asyncio.StreamWriter],
        state: dict[str, bool],
        *,
        upstream: bool,
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await source.read(65536):
                if upstream:
                    self.upstream_bytes += len(data)
                    if self.armed_after is not None and self.upstream_bytes >= self.armed_after:
                        self.armed_after = None
                        self.faults += 1
                        if self.mode == "drop":
                            for w in both:
                                w.close()
                            return
                        state["holed"] = True
                if state["holed"]:
                    continue  # read and discard: the peer hears nothing, and no FIN either
                sink.write(data)
                await sink.drain()
        with contextlib.suppress(Exception):
            sink.close()
