"""The `hivemind-pool` command in subprocesses: serve, add-user, submit, status, result, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from hivemind_worker.pool.cli import CliError, extract_archive
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

PASSWORD = "s3cret pass"
CLI = [sys.executable, "-m", "hivemind_worker.pool.cli"]


def run_cli(
    *args: str, stdin: str | None = None, password: str | None = PASSWORD
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("HIVEMIND_USER", None)
    if password is not None:
        env["HIVEMIND_PASSWORD"] = password
    return subprocess.run(
        [*CLI, *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


@pytest.fixture
def pool_process(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`serve` on port 0 in a subprocess; yields (address, db) and stops it at the end."""
    db = tmp_path / "pool.db"
    added = run_cli("add-user", "alice", "--db", str(db), "--password-stdin", stdin=PASSWORD)
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "added user alice"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [*CLI, "serve", "--db", str(db), "--listen", "127.0.0.1:0", "--lease-timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    assert stdout is not None
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=30)
        assert first.startswith("listening on 127.0.0.1:"), first
        address = first.split()[-1]
        assert not address.endswith(":0")
        yield address, db
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
        finally:
            log.close()
        assert code == 0, (tmp_path / "serve.log").read_text()


def result_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"forty-two\n"
        info = tarfile.TarInfo("results/answer.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def act_as_worker(address: str, archive: bytes) -> pb.TaskSpec:
    """Lease one task, upload `archive` and report success, with raw stubs."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.NodeManagerStub(channel)
        token = (await stub.Login(pb.LoginRequest(username="alice", password=PASSWORD))).token
        md = (("authorization", f"Bearer {token}"),)
        await stub.RegisterNode(
            pb.RegisterNodeRequest(node_id="cli-node", capabilities=["process"]),
            metadata=md,
            timeout=10,
        )
        reply = await stub.GetAssignedTasks(
            pb.GetAssignedTasksRequest(
                node_id="cli-node",
                free=pb.Resources(cpus=4, memory_bytes=8 << 30, disk_bytes=64 << 30),
                max_tasks=1,
                wait_seconds=5,
            ),
            metadata=md,
            timeout=15,
        )
        (spec,) = reply.tasks
        sha = hashlib.sha256(archive).hexdigest()

        async def upload() -> AsyncIterator[pb.UploadTaskResultRequest]:
            yield pb.UploadTaskResultRequest(
                header=pb.UploadHeader(
                    node_id="cli-node",
                    task_id=spec.task_id,
                    lease_id=spec.lease_id,
                    total_size=len(archive),
                    sha256=sha,
                )
            )
            yield pb.UploadTaskResultRequest(data=archive)

        await stub.UploadTaskResult(upload(), metadata=md, timeout=10)
        await stub.ReportTaskResult(
            pb.ReportTaskResultRequest(
                node_id="cli-node",
                task_id=spec.task_id,
                lease_id=spec.lease_id,
                status=pb.TASK_STATUS_SUCCEEDED,
                result_sha256=sha,
                result_size=len(archive),
                log_tail=b"all good\n",
            ),
            metadata=md,
            timeout=10,
        )
        return spec


@pytest.mark.slow
async def test_cli_round_trip(pool_process: tuple[str, Path], tmp_path: Path) -> None:
    address, db = pool_process
    conn = ("--pool", address, "--user", "alice")
    program = tmp_path / "job.py"
    program.write_text("import sys\nprint(open('data/n.txt').read(), sys.argv[1:])\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "n.txt").write_text("7")

    submitted = await asyncio.to_thread(
        run_cli,
        "submit", "--python", str(program), "--input", str(data_dir), "--arg", "a",
        "--memory-mb", "256", "--name", "cli job", *conn, "--", "b",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    assert len(task_id) == 32

    archive = result_tar()
    spec = await asyncio.wait_for(act_as_worker(address, archive), 20)
    assert spec.task_id == task_id
    assert list(spec.argv) == ["a", "b"]
    assert [(f.path, f.content) for f in spec.input_files] == [("data/n.txt", b"7")]
    assert spec.resources.memory_bytes == 256 << 20 and spec.name == "cli job"

    status = await asyncio.to_thread(run_cli, "status", task_id, *conn)
    assert status.returncode == 0, status.stderr
    assert "succeeded (exit 0)" in status.stdout and "all good" in status.stdout
    listing = await asyncio.to_thread(run_cli, "status", *conn)
    assert task_id in listing.stdout and "succeeded" in listing.stdout

    out_dir = tmp_path / "out"
    got = await asyncio.to_thread(run_cli, "result", task_id, "--extract", str(out_dir), *conn)
    assert got.returncode == 0, got.stderr
    assert (out_dir / "results" / "answer.txt").read_text() == "forty-two\n"
    raw = tmp_path / "result.tar.gz"
    got = await asyncio.to_thread(run_cli, "result", task_id, "-o", str(raw), *conn)
    assert got.returncode == 0 and raw.read_bytes() == archive

    other = await asyncio.to_thread(
        run_cli, "submit", "--image", "alpine:3", *conn, "--", "echo", "hi"
    )
    assert other.returncode == 0, other.stderr
    cancelled = await asyncio.to_thread(run_cli, "cancel", other.stdout.strip(), *conn)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, "cancelled")

    # Errors: one line on stderr, exit 1.
    wrong = await asyncio.to_thread(run_cli, "status", *conn, password="nope")
    assert (wrong.returncode, wrong.stderr) == (1, "error: wrong username or password\n")
    bad = await asyncio.to_thread(
        run_cli, "submit", "--python", str(program), "--input", str(program), "--cpus", "-1", *conn
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: resources:")
    missing = await asyncio.to_thread(run_cli, "result", "nosuchtask", *conn)
    assert (missing.returncode, missing.stderr) == (1, "error: task nosuchtask not found\n")

    # A new password for an existing user works while the pool runs, and signs out old logins.
    again = await asyncio.to_thread(
        run_cli, "add-user", "alice", "--db", str(db), "--password-stdin", stdin="other\n"
    )
    assert again.returncode == 0 and "new password" in again.stdout
    relog = await asyncio.to_thread(run_cli, "status", *conn, password="other")
    assert relog.returncode == 0, relog.stderr


@pytest.mark.slow
async def test_a_sweep_of_copies_is_submitted_in_calls_of_a_thousand(
    pool_process: tuple[str, Path], tmp_path: Path
) -> None:
    address, db = pool_process
    conn = ("--pool", address, "--user", "alice")
    program = tmp_path / "seed.py"
    program.write_text("import os\nprint(os.environ['HIVEMIND_COPY'])\n")
    done = await asyncio.to_thread(
        run_cli, "submit", "--python", str(program), "--copies", "1201", "--name", "mc", *conn
    )
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == len(set(ids)) == 1201
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = reader.execute("SELECT task_id, spec FROM tasks ORDER BY seq").fetchall()
    finally:
        reader.close()
    assert [r[0] for r in rows] == ids  # queued in order, across the two calls
    specs = [pb.TaskSpec.FromString(r[1]) for r in rows]
    assert [s.env["HIVEMIND_COPY"] for s in specs] == [str(n) for n in range(1201)]
    assert specs[7].name == "mc #7"

    named = await asyncio.to_thread(
        run_cli, "submit", "--python", str(program), "--copies", "2", "--id", "one", *conn
    )
    assert named.returncode == 1
    assert named.stderr == (
        "error: --id names one task: leave it out with --copies (each copy gets an id)\n"
    )
    bad = await asyncio.to_thread(
        run_cli, "submit", "--python", str(program), "--copies", "3", "--cpus", "-1", *conn
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: specs[0]: resources")
    assert "\n" not in bad.stderr.rstrip("\n") and bad.stdout == ""  # one line, none queued


def test_cli_errors_without_a_pool(tmp_path: Path) -> None:
    down = run_cli("status", "--pool", "127.0.0.1:1", "--user", "alice")
    assert down.returncode == 1
    assert down.stderr == "error: cannot reach the pool at 127.0.0.1:1: is it running?\n"
    no_user = run_cli("status", "--pool", "127.0.0.1:1")
    assert no_user.returncode == 1 and "--user" in no_user.stderr
    empty = run_cli("add-user", "bob", "--db", str(tmp_path / "p.db"), "--password-stdin")
    assert (empty.returncode, empty.stderr) == (1, "error: refusing an empty password\n")
    bad_name = run_cli("add-user", "../bob", "--db", str(tmp_path / "p.db"), "--password-stdin")
    assert bad_name.returncode == 1 and "user name" in bad_name.stderr
    refused = run_cli("serve", "--db", str(tmp_path / "p.db"), "--listen", "192.0.2.1:0")
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1].startswith("error: refusing to serve plaintext")


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_extract_refuses_links_and_escapes(tmp_path: Path) -> None:
    link = tarfile.TarInfo("results/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(CliError, match="links"):
        extract_archive(_tar((link, b"")), tmp_path / "a")
    with pytest.raises(CliError, match="leaves"):
        extract_archive(_tar((tarfile.TarInfo("../escape.txt"), b"x")), tmp_path / "b")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(CliError, match="absolute"):
        extract_archive(_tar((tarfile.TarInfo("/abs.txt"), b"x")), tmp_path / "c")
    assert extract_archive(_tar((tarfile.TarInfo("ok/file.txt"), b"fine")), tmp_path / "d") == 1
    assert (tmp_path / "d" / "ok" / "file.txt").read_bytes() == b"fine"


def test_no_terminal_and_no_password_says_what_to_do(tmp_path: Path) -> None:
    """Started from a launcher: no terminal to ask on, no HIVEMIND_PASSWORD (issue 12, bug 9)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HIVEMIND_PASSWORD", "HIVEMIND_USER")}
    done = subprocess.run(
        [*CLI, "status", "--pool", "127.0.0.1:1", "--user", "alice"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, env=env,
        check=False, start_new_session=True,  # no controlling terminal
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "EOFError" not in done.stderr
    assert "set HIVEMIND_PASSWORD" in done.stderr
