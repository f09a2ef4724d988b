"""Re-packing a result tar stream (as Docker's get_archive sends it): only safe entries pass."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath

import pytest

from hivemind_worker.engine.executors.base import ResultError
from hivemind_worker.engine.executors.workspace import repack_results
from hivemind_worker.tasks import MiB, Resources, TaskKind, TaskSpec


def task(**fields: object) -> TaskSpec:
    return TaskSpec(
        task_id="t1",
        lease_id="l1",
        kind=TaskKind.PYTHON,
        resources=Resources(1, 64 * MiB, 64 * MiB),
        timeout_seconds=10,
        source="pass",
        **fields,  # type: ignore[arg-type]
    )


def stream(*entries: tuple[str, bytes | str | None]) -> list[bytes]:
    """A tar in 1000-byte chunks; an entry's value is file content, a link target, or None."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, value in entries:
            info = tarfile.TarInfo(name)
            if value is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(value, str):
                info.type = tarfile.SYMTYPE if not value.startswith("hard:") else tarfile.LNKTYPE
                info.linkname = value.removeprefix("hard:")
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    data = buffer.getvalue()
    return [data[i : i + 1000] for i in range(0, len(data), 1000)]


def names(archive: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            fh = tar.extractfile(member) if member.isfile() else None
            out[member.name] = fh.read() if fh else None
    return out


def test_renames_the_folder_to_the_result_path(tmp_path: Path) -> None:
    chunks = stream(
        ("out", None), ("out/a.txt", b"a" * 3000), ("out/sub", None), ("out/sub/b", b"")
    )
    archive, digest, size = repack_results(
        chunks, task(result_path=PurePosixPath("deep/out")), tmp_path, 100
    )
    assert names(archive) == {
        "deep/out": None,
        "deep/out/a.txt": b"a" * 3000,
        "deep/out/sub": None,
        "deep/out/sub/b": b"",
    }
    assert size == archive.stat().st_size
    assert len(digest) == 64


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (("results/evil", "/etc/passwd"), "is a link"),
        (("results/evil", "hard:results/a"), "is a link"),
        (("/etc/evil", b"x"), "absolute path"),
        (("results/../../evil", b"x"), "'..'"),
        (("../evil", b"x"), "'..'"),
    ],
    ids=["symlink", "hardlink", "absolute", "dotdot-inside", "dotdot"],
)
def test_refuses_unsafe_entries_and_leaves_nothing(
    tmp_path: Path, entry: tuple[str, bytes | str], reason: str
) -> None:
    out = tmp_path / "archives"
    chunks = stream(("results", None), ("results/a", b"a"), entry)
    with pytest.raises(ResultError, match=reason):
        repack_results(chunks, task(), out, 100)
    # No partial archive, and nothing written anywhere else.
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives"]


def test_refuses_devices(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("results/null")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
    with pytest.raises(ResultError, match="device"):
        repack_results([buffer.getvalue()], task(), tmp_path, 100)


def test_caps_on_file_count_and_bytes(tmp_path: Path) -> None:
    many = [("results", None)] + [(f"results/{i}", b"x") for i in range(20)]
    with pytest.raises(ResultError, match="more than 10 files"):
        repack_results(stream(*many), task(), tmp_path, 10)  # type: ignore[arg-type]
    big = stream(("results", None), ("results/a", b"x" * 600), ("results/b", b"x" * 600))
    with pytest.raises(ResultError, match="larger than the task's limit of 1000 bytes"):
        repack_results(big, task(max_result_bytes=1000), tmp_path, 100)


def test_damaged_stream_is_refused(tmp_path: Path) -> None:
    chunks = stream(("results", None), ("results/a", b"a" * 5000))
    with pytest.raises(ResultError):
        repack_results(chunks[:3], task(), tmp_path, 100)
