"""Unpacking tar members that were already checked, on every Python that `requires-python` claims.

Callers check each member first (regular files and folders only, relative names, no '..').
Then the stdlib's `data` filter (Python 3.11.4+, 3.12+) adds its own checks; on an older 3.11
(Debian 12 ships 3.11.2) the same outcome is reached by writing each member by hand: folders
and regular files only, modes masked like the data filter (no setuid/setgid/sticky, no
group/other write), never chowned, nothing followed through a link.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

HAS_DATA_FILTER = hasattr(tarfile, "data_filter")

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)


def extract_checked(
    tar: tarfile.TarFile, dest: Path, members: Iterable[tarfile.TarInfo] | None = None
) -> None:
    """Extract `members` (default: all) of an already-checked archive into `dest`."""
    chosen = list(tar.getmembers() if members is None else members)
    if HAS_DATA_FILTER:
        tar.extractall(dest, members=chosen, filter="data")
        return
    _extract_by_hand(tar, dest, chosen)


def _extract_by_hand(tar: tarfile.TarFile, dest: Path, members: list[tarfile.TarInfo]) -> None:
    root = dest.resolve()
    root.mkdir(parents=True, exist_ok=True)
    for member in members:
        rel = PurePosixPath(member.name.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            raise tarfile.ExtractError(f"{member.name!r} leaves the destination")
        target = root.joinpath(*rel.parts) if rel.parts else root
        # Every folder on the way must be a real folder inside dest, never a link.
        parent = target if member.isdir() else target.parent
        _make_dirs(root, parent)
        if member.isdir():
            continue
        if not member.isreg():
            raise tarfile.ExtractError(f"{member.name!r} is not a file or a folder")
        source = tar.extractfile(member)
        if source is None:
            raise tarfile.ExtractError(f"cannot read {member.name!r}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW | _O_BINARY
        # The data filter's rule: owner rw (x kept), no group/other write, no special bits.
        mode = (member.mode | stat.S_IRUSR | stat.S_IWUSR) & 0o755
        fd = os.open(target, flags, mode)
        with source, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
        os.chmod(target, mode)


def _make_dirs(root: Path, folder: Path) -> None:
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise tarfile.ExtractError(f"{current} is a link")
        current.mkdir(exist_ok=True)
