"""What the desktop app says: one short sentence and what to do, chosen from the error's kind.

Engine and library messages (which may name a terminal command or quote gRPC) never reach a
headline; they go behind a Details button and into the log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from hivemind_worker.config import GIB, Settings
from hivemind_worker.errors import ErrorKind
from hivemind_worker.tasks import DEFAULT_CPUS, DEFAULT_MEMORY_BYTES

# Where a person who has never used a terminal gets Docker.
DOCKER_INSTALL_URL = "https://docs.docker.com/get-started/get-docker/"


@dataclass(frozen=True)
class Words:
    """A headline sentence, and the one thing to do about it ('' when nothing is needed)."""

    sentence: str
    action: str = ""
    settings: bool = False  # the action happens in Settings: offer a button to open it

    @property
    def text(self) -> str:
        return f"{self.sentence} {self.action}".strip()


def clock(epoch: float) -> str:
    return time.strftime("%H:%M", time.localtime(epoch))


def for_kind(kind: ErrorKind | None, address: str, retry_at: float | None = None) -> Words:
    """The words for an error of `kind`; `retry_at` (epoch) when the engine tries again."""
    again = f" Trying again at {clock(retry_at)}." if retry_at else ""
    match kind:
        case ErrorKind.LOGIN:
            return Words(
                f"Not signed in to the pool at {address}.",
                "Sign in from Settings.",
                settings=True,
            )
        case ErrorKind.KEYRING:
            return Words(
                "Your saved sign-in can't be read: the system keyring is locked or missing.",
                "Unlock it (or sign in again from Settings), then press Try again.",
                settings=True,
            )
        case ErrorKind.POOL_UNREACHABLE:
            return Words(f"Can't reach the pool at {address}.", again.strip())
        case ErrorKind.POOL_REFUSED:
            return Words(
                f"The pool at {address} refused this computer.",
                f"Check the pool address in Settings.{again}",
                settings=True,
            )
        case ErrorKind.DOCKER_MISSING:
            return Words(
                "Docker isn't available, so tasks run in the built-in process sandbox.",
                "Install Docker to also run container tasks.",
            )
        case ErrorKind.IMAGE_UNAVAILABLE:
            return Words(
                "A task's software image could not be downloaded.",
                "The task goes back to the pool; check this computer's internet connection.",
            )
        case ErrorKind.SANDBOX_UNAVAILABLE:
            return Words(
                "This computer can't run tasks safely isolated, so it takes none.",
                "Install Docker, then restart the app.",
            )
        case ErrorKind.DISK_FULL:
            return Words(
                "The disk is full: finished results can't be kept until they are sent.",
                "Free some disk space.",
            )
        case ErrorKind.BAD_SETTING:
            return Words("A setting is not valid.", "Open Settings to fix it.", settings=True)
        case ErrorKind.TASK_REJECTED:
            return Words("A task did not fit this computer and was refused.")
        case ErrorKind.TASK_FAILED:
            return Words("A task could not be run on this computer.")
        case ErrorKind.RESULT_REFUSED:
            return Words("The pool refused a task's result.")
        case _:
            return Words(
                "Something went wrong inside the app.", "The details were written to the log."
            )


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cap_problems(settings: Settings) -> list[str]:
    """Limits no task can fit in: tasks ask for 1 CPU and 512 MiB unless they say otherwise."""
    problems = []
    if settings.cpu_cap() < DEFAULT_CPUS:
        problems.append(f"tasks ask for at least {DEFAULT_CPUS:g} CPU")
    if settings.memory_cap_bytes() < DEFAULT_MEMORY_BYTES:
        problems.append(f"tasks ask for at least {DEFAULT_MEMORY_BYTES / GIB:g} GiB of memory")
    return problems


def cap_warning(settings: Settings) -> str:
    """For the header: which limit, what it is, and what to do."""
    problems = cap_problems(settings)
    if not problems:
        return ""
    limits = []
    if settings.cpu_cap() < DEFAULT_CPUS:
        limits.append(f"the CPU limit is {settings.cpu_cap():g}")
    if settings.memory_cap_bytes() < DEFAULT_MEMORY_BYTES:
        limits.append(f"the memory limit is {settings.memory_cap_bytes() / GIB:.1f} GiB")
    return (
        f"No task can run: {' and '.join(problems)}, and {' and '.join(limits)}. "
        "Raise it in Settings."
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
