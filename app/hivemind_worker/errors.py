"""One root error for the whole app: a kind, a short title, a message a person reads, details.

Every layer raises `HiveMindError` (or a subclass); library errors (gRPC, Docker, OSError,
keyring) are translated once, at the boundary that meets them. Front-ends choose wording and
whether to notify from `kind` and `needs_action`, never from the message text.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """What went wrong, as data. The GUI maps each kind to its wording and its notification."""

    LOGIN = "login"  # not logged in, token refused or expired
    KEYRING = "keyring"  # the system keyring cannot be used
    POOL_UNREACHABLE = "pool_unreachable"  # no answer, busy, connection closed
    POOL_REFUSED = "pool_refused"  # the pool refused a request (invalid, not allowed)
    DOCKER_MISSING = "docker_missing"  # Docker asked for but not usable: the sandbox stands in
    IMAGE_UNAVAILABLE = "image_unavailable"  # an image could not be pulled or built
    SANDBOX_UNAVAILABLE = "sandbox_unavailable"  # no sandbox this machine can offer
    DISK_FULL = "disk_full"  # the result spool or the work folder is full
    BAD_SETTING = "bad_setting"  # a setting is invalid (file, environment, flag or dialog)
    TASK_REJECTED = "task_rejected"  # a task's spec is invalid or does not fit this worker
    TASK_FAILED = "task_failed"  # running a task failed for a reason of the worker's
    RESULT_REFUSED = "result_refused"  # a result breaks the rules (links, size, count)
    INTERNAL = "internal"  # a bug: the details say what, the log has the traceback


# Kinds a person must act on: the tray notifies for these, and only for these.
ACTION_KINDS = frozenset(
    {
        ErrorKind.LOGIN,
        ErrorKind.KEYRING,
        ErrorKind.DOCKER_MISSING,
        ErrorKind.SANDBOX_UNAVAILABLE,
        ErrorKind.DISK_FULL,
        ErrorKind.BAD_SETTING,
    }
)


class HiveMindError(Exception):
    """The app's root error.

    `message`: one sentence a person understands, with what to do (`str()` of the error).
    `title`: a few words ("Not logged in"). `details`: raw library text, for the Details box
    and the log, never the headline.
    """

    kind: ErrorKind = ErrorKind.INTERNAL
    title = "Something went wrong"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        title: str | None = None,
        kind: ErrorKind | None = None,
        details: str = "",
        needs_action: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if title is not None:
            self.title = title
        if kind is not None:
            self.kind = kind
        self.needs_action = self.kind in ACTION_KINDS if needs_action is None else needs_action

    def __str__(self) -> str:
        return self.message
