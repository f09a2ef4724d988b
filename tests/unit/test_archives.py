"""Unpacking checked archives: the same outcome with the stdlib's data filter and without it
(Debian 12's Python 3.11.2 has no `filter=`), so both paths are run on every interpreter."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest

from hivemind_worker import archives


def make_tar(entries: list[tuple[str, bytes | None, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ENTRIES = [
    ("data", None, 0o755),
    ("data/nested", None, 0o777),
    ("data/nested/a.txt", b"alpha", 0o4777),  # setuid and world-writable: masked
    ("b.bin", b"\x00\x01", 0o600),
    ("run.sh", b"#!/bin/sh\n", 0o775),
]


# Both paths where this Python has the filter; the by-hand path alone where it has not.
@pytest.fixture(params=["stdlib filter", "by hand"] if archives.HAS_DATA_FILTER else ["by hand"])
def extractor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "by hand":
        monkeypatch.setattr(archives, "HAS_DATA_FILTER", False)
    return str(request.param)


def test_files_folders_and_modes_come_out_alike(tmp_path: Path, extractor: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(make_tar(ENTRIES))) as tar:
        archives.extract_checked(tar, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "data" / "nested" / "a.txt").read_bytes() == b"alpha"
    assert (out / "b.bin").read_bytes() == b"\x00\x01"
    mode = stat.S_IMODE((out / "data" / "nested" / "a.txt").stat().st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWGRP | stat.S_IWOTH) == 0
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) & stat.S_IXUSR
    assert stat.S_IMODE((out / "b.bin").stat().st_mode) & stat.S_IRUSR


def test_a_link_in_the_destination_is_not_followed(tmp_path: Path, extractor: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "data").symlink_to(outside)
    with (
        tarfile.open(fileobj=io.BytesIO(make_tar(ENTRIES))) as tar,
        pytest.raises(tarfile.TarError),
    ):
        archives.extract_checked(tar, out)
    assert list(outside.iterdir()) == []


def test_a_name_that_leaves_the_destination_is_refused_by_hand(tmp_path: Path) -> None:
    data = make_tar([("../escape.txt", b"x", 0o644)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar, pytest.raises(tarfile.ExtractError):
        archives._extract_by_hand(tar, tmp_path / "out", tar.getmembers())
    assert not (tmp_path / "escape.txt").exists()
