"""Task workspaces shared by the executors: safe inputs in, safe result archives out."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import stat
import sys
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from hivemind_worker.archives import extract_checked
from hivemind_worker.engine.executors.base import ExecutorError, ResultError
from hivemind_worker.tasks import (
    MAX_INPUT_BYTES,
    TaskSpec,
    TaskSpecError,
    safe_relative_path,
)

log = logging.getLogger(__name__)

MAX_ARCHIVE_MEMBERS = 10_000
MAX_ARCHIVE_BYTES = MAX_INPUT_BYTES
MAX_RESULT_DEPTH = 100
ARCHIVES_DIR = "_archives"
TRASH_DIR = "_trash"  # workspaces being deleted in the background
TMP_DIR = "tmp"

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC


def check_result_name(name: str) -> PurePosixPath:
    """The one rule for a result entry's name, in both executors: relative, '/'-separated,
    no '..', '.', empty parts, backslashes, ':', control characters, or absolute names.

    Kinds (only regular files and folders) and the count and byte caps are checked where
    entries are read (_ResultWalker, _repack), each naming this same rule in its errors.
    """
    if "\x7f" in name:
        raise ResultError(
            f"refused an entry of the results: {name[:80]!r} contains control characters"
        )
    try:
        return safe_relative_path(name, "results")
    except TaskSpecError as exc:
        raise ResultError(f"refused an entry of the results: {exc.reason}") from None


def disk_usage(root: Path, stop_above: int = 0) -> int:
    """Bytes allocated on disk under `root` (never following a symlink); stops counting once
    past `stop_above` when that is > 0, so watching a huge workspace stays cheap."""
    total = 0
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            continue  # removed or unreadable since the listing: nothing to count
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += getattr(st, "st_blocks", 0) * 512 or st.st_size
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                if stop_above and total > stop_above:
                    return total
    return total


_discard_lock = threading.Lock()  # guards _discarding
_delete_lock = threading.Lock()  # one deletion at a time: the disk, not the CPU, is the limit
_discarding: list[threading.Thread] = []


def discard(workspace: Path, work_dir: Path) -> None:
    """Remove a workspace without waiting for it: it is renamed into `work_dir/_trash` (one
    rename, however many files it holds) and deleted there by a background thread, which
    also clears what an earlier run of the worker left in the trash."""
    if not (workspace.exists() or workspace.is_symlink()):
        return
    trash = work_dir / TRASH_DIR
    try:
        trash.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = trash / f"{workspace.name}-{uuid.uuid4().hex[:8]}"
        os.rename(workspace, target)
    except OSError:
        rmtree(workspace)  # another filesystem, or no rights: delete it in place
        return
    thread = threading.Thread(target=_empty_trash, args=(trash,), name="discard", daemon=True)
    with _discard_lock:
        _discarding[:] = [t for t in _discarding if t.is_alive()]
        _discarding.append(thread)
    thread.start()


def wait_for_discards(timeout: float | None = None) -> bool:
    """Wait for background deletions (for tests and shutdown); True when none is left."""
    with _discard_lock:
        threads = list(_discarding)
    for thread in threads:
        thread.join(timeout)
    return not any(t.is_alive() for t in threads)


def _empty_trash(trash: Path) -> None:
    with _delete_lock:
        try:
            names = os.listdir(trash)
        except OSError:
            return
        for name in names:
            try:
                rmtree(trash / name)
            except OSError as exc:
                log.warning("cannot delete the old workspace %s: %s", trash / name, exc)


def workspace_path(work_dir: Path, task: TaskSpec) -> Path:
    """Where a task's workspace lives: one per lease, so a re-run never sees an old one."""
    return work_dir / f"{task.task_id}-{task.lease_id or 'nolease'}"


def prepare_workspace(
    task: TaskSpec, workspace: Path, work_dir: Path, *, existing: bool = False
) -> None:
    """A fresh 0700 workspace holding the inputs, main.py, the results folder and tmp/.

    `existing`: the workspace is a warm sandbox's, made empty for this task (warm.py); the
    inputs are written into it as it is.
    """
    try:
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not existing:
            if workspace.exists() or workspace.is_symlink():
                rmtree(workspace)
            os.mkdir(workspace, 0o700)
    except OSError as exc:
        raise ExecutorError(f"cannot create the task workspace {workspace}: {exc}") from exc
    root = os.open(workspace, _DIR_FLAGS)
    try:
        if task.input_archive:
            _unpack_archive(task.input_archive, workspace)
        for f in task.input_files:
            _write_file(
                root, workspace, str(f.path), f.content, mode=f.mode, field_name="input_files"
            )
        if task.source:
            _write_file(
                root, workspace, "main.py", task.source.encode(), mode=0o644, field_name="source"
            )
        _make_dirs(root, workspace, str(task.result_path), "result_path")
        _make_dirs(root, workspace, TMP_DIR, "input_files")
    except OSError as exc:
        raise ExecutorError(f"cannot write the task inputs: {exc}") from exc
    finally:
        os.close(root)


def pack_results(
    task: TaskSpec, workspace: Path, archive_dir: Path, max_files: int
) -> tuple[Path, str, int]:
    """Pack the workspace's results folder, never following a symlink; see write_archive."""

    def fill(tar: tarfile.TarFile) -> None:
        _ResultWalker(tar, task.max_result_bytes, max_files).pack(workspace, task.result_path)

    return write_archive(task, archive_dir, fill)


def repack_results(
    chunks: Iterable[bytes], task: TaskSpec, archive_dir: Path, max_files: int
) -> tuple[Path, str, int]:
    """Re-pack a tar stream of the results folder (as Docker's get_archive sends it).

    Nothing is unpacked to disk: each entry is checked (regular files and folders only,
    relative names without '..', under the caps) and copied into the archive with its first
    component renamed to the task's result_path.
    """

    def fill(tar: tarfile.TarFile) -> None:
        _repack(_ChunkReader(iter(chunks)), tar, task, max_files)

    return write_archive(task, archive_dir, fill)


def write_archive(
    task: TaskSpec, archive_dir: Path, fill: Callable[[tarfile.TarFile], None]
) -> tuple[Path, str, int]:
    """Write `archive_dir/<task>-<lease>.tar.gz` with `fill`; return (path, sha256, size).

    Names in it are relative and start with the task's result_path ("results/..."), with an
    entry for the folder itself; a results folder that does not exist gives no entries.
    A partial archive is removed when `fill` raises.
    """
    archive_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    archive = archive_dir / f"{task.task_id}-{task.lease_id or 'nolease'}.tar.gz"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(archive)
    fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar,
        ):
            fill(tar)
        digest = hashlib.sha256()
        with open(archive, "rb") as f:
            while block := f.read(1024 * 1024):
                digest.update(block)
        return archive, digest.hexdigest(), archive.stat().st_size
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(archive)
        raise


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks, for tarfile's stream mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _repack(raw: io.RawIOBase, out: tarfile.TarFile, task: TaskSpec, max_files: int) -> None:
    result_path = task.result_path
    entries = 0
    total = 0
    try:
        with tarfile.open(fileobj=io.BufferedReader(raw), mode="r|") as tar:
            for member in tar:
                raw_name = member.name
                entries += 1
                if entries > max_files:
                    raise ResultError(
                        f"results hold more than {max_files} files and folders (at {raw_name})"
                    )
                if member.issym() or member.islnk():
                    raise ResultError(
                        f"{raw_name} is a link; results may hold only regular files and folders"
                    )
                if member.issparse() or not (member.isreg() or member.isdir()):
                    raise ResultError(
                        f"{raw_name} is a device, fifo or other special entry; results may "
                        "hold only regular files and folders"
                    )
                name = raw_name.rstrip("/") if member.isdir() else raw_name
                rel = check_result_name(name)
                # get_archive names entries after the folder's own base name.
                target = PurePosixPath(*result_path.parts, *rel.parts[1:])
                info = tarfile.TarInfo(str(target))
                info.mtime = int(member.mtime)
                if member.isdir():
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    out.addfile(info)
                    continue
                total += member.size
                if total > task.max_result_bytes:
                    raise ResultError(
                        f"results are larger than the task's limit of {task.max_result_bytes} "
                        f"bytes (at {target})"
                    )
                info.size = member.size
                info.mode = 0o755 if member.mode & 0o111 else 0o644
                data = tar.extractfile(member)
                if data is None:  # pragma: no cover - regular members always have data
                    raise ResultError(f"{raw_name} cannot be read")
                _add_fileobj(out, info, data)
    except tarfile.TarError as exc:
        raise ResultError(f"the results archive is damaged: {exc}") from exc


def _check_inside(workspace: Path, rel: str, field_name: str) -> PurePosixPath:
    """Validate `rel` again (a TaskSpec may be built without from_proto) and resolve it."""
    path = safe_relative_path(rel, field_name)
    target = (workspace / Path(*path.parts)).resolve()
    if not target.is_relative_to(workspace.resolve()):
        raise TaskSpecError(field_name, f"{rel!r} resolves outside the workspace")
    return path


def _open_parent(root: int, path: PurePosixPath, field_name: str) -> int:
    """An fd of `path`'s parent folder, made as needed, never following a symlink."""
    fd = os.dup(root)
    try:
        for part in path.parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise TaskSpecError(
                    field_name, f"{str(path)!r}: {part!r} is not a folder ({exc.strerror})"
                ) from exc
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_file(
    root: int, workspace: Path, rel: str, content: bytes, *, mode: int, field_name: str
) -> None:
    path = _check_inside(workspace, rel, field_name)
    parent = _open_parent(root, path, field_name)
    try:
        try:
            fd = os.open(
                path.name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                0o600,
                dir_fd=parent,
            )
        except FileExistsError:
            raise TaskSpecError(
                field_name, f"{rel!r} is given twice (inline, in the archive, or as main.py)"
            ) from None
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            os.fchmod(f.fileno(), mode & 0o777)
    finally:
        os.close(parent)


def _make_dirs(root: int, workspace: Path, rel: str, field_name: str) -> None:
    path = _check_inside(workspace, rel, field_name)
    parent = _open_parent(root, path, field_name)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path.name, 0o755, dir_fd=parent)
        st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise TaskSpecError(field_name, f"{rel!r} exists and is not a folder")
    finally:
        os.close(parent)


def _unpack_archive(data: bytes, workspace: Path) -> None:
    """Unpack a tar (gzip allowed) of regular files and folders only, within the caps."""
    field_name = "input_archive"
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members: list[tarfile.TarInfo] = []
            files: set[str] = set()
            total = 0
            for member in tar:
                if len(members) >= MAX_ARCHIVE_MEMBERS:
                    raise TaskSpecError(field_name, f"more than {MAX_ARCHIVE_MEMBERS} entries")
                raw = member.name
                if member.issym() or member.islnk():
                    raise TaskSpecError(
                        field_name, f"{raw!r} is a link; only files and folders are allowed"
                    )
                if member.issparse() or not (member.isreg() or member.isdir()):
                    raise TaskSpecError(
                        field_name,
                        f"{raw!r} is a device, fifo or other special entry; "
                        "only files and folders are allowed",
                    )
                name = raw
                while name.startswith("./"):
                    name = name[2:]
                name = name.rstrip("/") if member.isdir() else name
                if name in ("", ".") and member.isdir():
                    continue  # the archive's own root, as `tar -C dir .` writes it
                rel = str(safe_relative_path(name, field_name))
                if member.isreg():
                    if rel in files:
                        raise TaskSpecError(field_name, f"{raw!r} appears twice")
                    files.add(rel)
                total += member.size
                if total > MAX_ARCHIVE_BYTES:
                    raise TaskSpecError(
                        field_name, f"unpacks to more than {MAX_ARCHIVE_BYTES} bytes"
                    )
                member.name = rel
                members.append(member)
            extract_checked(tar, workspace, members)
    except tarfile.TarError as exc:
        raise TaskSpecError(field_name, f"cannot unpack: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise TaskSpecError(field_name, f"cannot unpack: {exc}") from exc


class _ResultWalker:
    """Packs a results folder into a tar, entry by entry, never following a symlink."""

    def __init__(self, tar: tarfile.TarFile, max_bytes: int, max_entries: int) -> None:
        self._tar = tar
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._bytes = 0
        self._entries = 0

    def pack(self, workspace: Path, result_path: PurePosixPath) -> None:
        fd = os.open(workspace, _DIR_FLAGS)
        try:
            for i, part in enumerate(result_path.parts):
                name = PurePosixPath(*result_path.parts[: i + 1])
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    return  # the task removed its results folder: an archive with no entries
                if i == len(result_path.parts) - 1:
                    child = self._open_dir(fd, part, name, st)
                    os.close(fd)
                    fd = child
                    self._add_dir(name, os.fstat(fd))
                    self._walk(fd, name, 1)
                else:
                    child = self._open_dir(fd, part, name, st)
                    os.close(fd)
                    fd = child
        finally:
            os.close(fd)

    def _open_dir(self, parent: int, part: str, name: PurePosixPath, st: os.stat_result) -> int:
        if not stat.S_ISDIR(st.st_mode):
            raise ResultError(f"{name} is {_kind(st.st_mode)}, not a folder")
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise ResultError(f"{name} cannot be opened as a folder: {exc.strerror}") from exc

    def _count(self, name: PurePosixPath) -> None:
        self._entries += 1
        if self._entries > self._max_entries:
            raise ResultError(
                f"results hold more than {self._max_entries} files and folders (at {name})"
            )

    def _add_dir(self, name: PurePosixPath, st: os.stat_result) -> None:
        self._count(name)
        info = tarfile.TarInfo(str(name))
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.mtime = int(st.st_mtime)
        self._tar.addfile(info)

    def _walk(self, dir_fd: int, prefix: PurePosixPath, depth: int) -> None:
        if depth > MAX_RESULT_DEPTH:
            raise ResultError(f"results are nested more than {MAX_RESULT_DEPTH} folders deep")
        with os.scandir(dir_fd) as it:
            names = sorted(entry.name for entry in it)
        for entry_name in names:
            name = check_result_name(f"{prefix}/{entry_name}")
            try:
                st = os.stat(entry_name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the listing (by nothing of the task's: it is dead)
            if stat.S_ISDIR(st.st_mode):
                child = self._open_dir(dir_fd, entry_name, name, st)
                try:
                    self._add_dir(name, os.fstat(child))
                    self._walk(child, name, depth + 1)
                finally:
                    os.close(child)
            elif stat.S_ISREG(st.st_mode):
                self._add_file(dir_fd, entry_name, name)
            else:
                raise ResultError(
                    f"{name} is {_kind(st.st_mode)}; results may hold only regular files "
                    "and folders"
                )

    def _add_file(self, dir_fd: int, entry_name: str, name: PurePosixPath) -> None:
        self._count(name)
        try:
            fd = os.open(
                entry_name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError as exc:
            raise ResultError(f"{name} cannot be read: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ResultError(f"{name} is {_kind(st.st_mode)}, not a regular file")
            self._bytes += st.st_size
            if self._bytes > self._max_bytes:
                raise ResultError(
                    f"results are larger than the task's limit of {self._max_bytes} bytes "
                    f"(at {name})"
                )
            info = tarfile.TarInfo(str(name))
            info.size = st.st_size
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            info.mtime = int(st.st_mtime)
            _add_fileobj(self._tar, info, f)


def _add_fileobj(tar: tarfile.TarFile, info: tarfile.TarInfo, f: IO[bytes]) -> None:
    try:
        tar.addfile(info, f)
    except OSError as exc:  # e.g. the file shrank while being read
        raise ResultError(f"{info.name} cannot be read: {exc}") from exc


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def rmtree(path: Path) -> None:
    """Remove a workspace; read-only files and folders are made writable and retried."""

    def retry(func: Callable[..., object], name: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        with contextlib.suppress(OSError):
            parent = os.path.dirname(name)
            if stat.S_ISDIR(os.lstat(parent).st_mode):
                os.chmod(parent, 0o700)
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):  # lstat: never chmod through a symlink
            os.chmod(name, 0o700)
            shutil.rmtree(name)
        else:
            os.unlink(name)

    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink():
        path.unlink()
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=lambda func, name, info: retry(func, name, info[1]))
