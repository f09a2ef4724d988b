"""memory.trim(): collects cyclic garbage and, on glibc, hands free heap pages back."""

from __future__ import annotations

import gc
import sys

from hivemind_worker.engine import memory


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_trim_collects_cycles_and_asks_glibc_where_there_is_one() -> None:
    gc.disable()
    try:
        for _ in range(1000):
            Cycle()
        assert any(type(o) is Cycle for o in gc.get_objects())
        trimmed = memory.trim()
        assert not any(type(o) is Cycle for o in gc.get_objects())
    finally:
        gc.enable()
    libc = sys.platform.startswith("linux") and "glibc" in " ".join(
        __import__("platform").libc_ver()
    )
    assert trimmed is bool(libc)
