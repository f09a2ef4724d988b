"""Hand memory freed after work back to the system, so an idle worker stays small.

CPython frees objects into glibc's heap, which keeps the pages: after a task (its archive,
its log, a gRPC upload) the worker would sit idle with that peak resident. `trim()` collects
cyclic garbage and asks glibc to return free pages (malloc_trim). Elsewhere (Windows, macOS,
musl, which have no malloc_trim) it only collects. Blocking for a few milliseconds: the
engine runs it through asyncio.to_thread when no task is running.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

_malloc_trim: Callable[[int], int] | None = None
_looked = False


def _find_malloc_trim() -> Callable[[int], int] | None:
    global _looked, _malloc_trim  # noqa: PLW0603 - looked up once per process
    if not _looked:
        _looked = True
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc
                _malloc_trim = None
    return _malloc_trim


def trim() -> bool:
    """Collect garbage and return free heap pages; True if glibc was asked to trim."""
    gc.collect()
    malloc_trim = _find_malloc_trim()
    if malloc_trim is None:
        return False
    try:
        malloc_trim(0)
    except Exception:  # never worth failing for
        log.debug("malloc_trim failed", exc_info=True)
        return False
    return True
