"""The `hivemind-pool` command: serve a reference pool, add users, submit and fetch tasks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import getpass
import io
import logging
import os
import re
import signal
import sqlite3
import stat
import sys
import tarfile
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc

from hivemind_worker.archives import extract_checked
from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.pool.client import ResultIntegrityError, TaskQueueClient
from hivemind_worker.pool.common import MAX_SUBMIT_BATCH
from hivemind_worker.pool.runner_args import RUNNER_MEMORY_MB, add_runner_options, runner_spec
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import MiB, TaskStatus

DEFAULT_POOL = "127.0.0.1:50051"
PASSWORD_ENV = "HIVEMIND_PASSWORD"
USER_ENV = "HIVEMIND_USER"
POOL_ENV = "HIVEMIND_POOL"
MAX_EXTRACT_MEMBERS = 100_000
MAX_EXTRACT_BYTES = 8 * 1024 * MiB
_USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class CliError(HiveMindError):
    """Printed as one `error: ...` line; exit status 1."""

    kind = ErrorKind.BAD_SETTING
    title = "Command not valid"


# ----------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hivemind-pool",
        description="The HiveMind reference Node Pool: a gRPC server with a SQLite store, "
        "and a small client to submit tasks to it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run a pool until Ctrl+C / SIGTERM")
    p.add_argument("--db", type=Path, required=True, metavar="FILE", help="SQLite database")
    p.add_argument(
        "--listen",
        default=DEFAULT_POOL,
        metavar="HOST:PORT",
        help=f"address to listen on; port 0 picks a free one (default {DEFAULT_POOL})",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=_positive_int,
        default=10,
        metavar="N",
        help="seconds between worker heartbeats (default 10)",
    )
    p.add_argument(
        "--lease-timeout",
        type=_positive_int,
        default=60,
        metavar="N",
        help="seconds a lease lives without a heartbeat (default 60)",
    )
    p.add_argument(
        "--max-heartbeats-per-second",
        type=_non_negative_int,
        default=100,
        metavar="N",
        help="past this many workers per second of interval, the heartbeat interval (and the "
        "lease timeout with it) stretches to keep the rate at N; 0: never (default 100)",
    )
    p.add_argument(
        "--max-wait",
        type=_non_negative_int,
        default=30,
        metavar="N",
        help="longest long-poll the pool holds, in seconds (default 30)",
    )
    p.add_argument(
        "--stop-with-stdin",
        action="store_true",
        help="stop when stdin closes (for a program that starts its own pool)",
    )
    p.add_argument(
        "--preload-image",
        dest="preload_images",
        action="append",
        default=[],
        metavar="IMAGE",
        help="an image workers with Docker fetch ahead of tasks (repeatable)",
    )
    p.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=3,
        metavar="N",
        help="hand-outs of a task before it fails, unless it says (default 3)",
    )
    p.add_argument(
        "--token-ttl",
        type=_positive_int,
        default=7 * 86400,
        metavar="SECONDS",
        help="how long a login lasts (default 7 days)",
    )
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve TLS with this certificate")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="... and this private key")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback address (trusted networks only)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    p = sub.add_parser("add-user", help="create a user, or set a new password for one")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--db", type=Path, required=True, metavar="FILE", help="SQLite database")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin",
    )

    client = argparse.ArgumentParser(add_help=False)
    g = client.add_argument_group("connection")
    g.add_argument(
        "--pool",
        default=os.environ.get(POOL_ENV, DEFAULT_POOL),
        metavar="HOST:PORT",
        help=f"the pool (default ${POOL_ENV} or {DEFAULT_POOL})",
    )
    g.add_argument(
        "--user",
        default=os.environ.get(USER_ENV),
        metavar="NAME",
        help=f"account name (default ${USER_ENV}); password from ${PASSWORD_ENV} or a prompt",
    )
    g.add_argument("--ca-cert", type=Path, metavar="PEM", help="trust this CA / pool certificate")
    g.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext to a non-loopback pool (trusted networks only)",
    )
    g.add_argument(
        "--rpc-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each call (default 30)",
    )

    p = sub.add_parser(
        "submit",
        parents=[client],
        help="submit a task; prints its id",
        usage="%(prog)s (--python FILE | --image IMAGE | --ml FRAMEWORK | --data KIND) [options] "
        "[-- ARGV...]",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--python", type=Path, metavar="FILE", help="run this Python program")
    what.add_argument("--image", metavar="IMAGE", help="run ARGV (after --) in this image")
    add_runner_options(p, what)
    p.add_argument(
        "--input",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="a file, or a folder (recursively), put in the workspace; repeatable",
    )
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="A",
        help="an argument for the program; repeatable (or put them after --)",
    )
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--cpus", type=float, default=0.0, metavar="X", help="CPU cores (default 1)")
    p.add_argument(
        "--memory-mb",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="memory in MiB (default 512)",
    )
    p.add_argument(
        "--disk-mb",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="disk in MiB (default 1024)",
    )
    p.add_argument(
        "--timeout",
        type=_non_negative_int,
        default=0,
        metavar="S",
        help="seconds before the task is killed (default 600)",
    )
    p.add_argument("--name", default="", help="a label shown to the worker")
    p.add_argument("--id", default="", metavar="TASK_ID", help="choose the task id")
    p.add_argument("--max-attempts", type=_non_negative_int, default=0, metavar="N")
    p.add_argument(
        "--copies",
        type=_positive_int,
        default=1,
        metavar="N",
        help="submit N copies in one go (a sweep), each with HIVEMIND_COPY=0..N-1 in its "
        "environment; prints one id a line",
    )

    p = sub.add_parser("status", parents=[client], help="one task in detail, or your tasks")
    p.add_argument("task_id", nargs="?", metavar="TASK_ID")
    p.add_argument(
        "--limit",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="how many tasks to list (default 100)",
    )

    p = sub.add_parser("result", parents=[client], help="download a task's result archive")
    p.add_argument("task_id", metavar="TASK_ID")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the archive here")
    out.add_argument("--extract", type=Path, metavar="DIR", help="unpack the archive here")

    p = sub.add_parser("cancel", parents=[client], help="cancel a task")
    p.add_argument("task_id", metavar="TASK_ID")
    p.add_argument("--reason", default="", help="kept with the task")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


# ------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    after_dashes: list[str] = []
    if args_list[:1] == ["submit"] and "--" in args_list:
        cut = args_list.index("--")
        args_list, after_dashes = args_list[:cut], args_list[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(args_list)
    args.argv = after_dashes
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "add-user":
            return _add_user(args)
        return asyncio.run(_client_command(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ----------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    from hivemind_worker.pool.server import PoolConfig, PoolServer, PoolStartError, split_host_port
    from hivemind_worker.pool.store import StoreError

    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        host, _ = split_host_port(args.listen)
    except ValueError as exc:
        raise CliError(f"--listen {exc}") from None
    config = PoolConfig(
        db_path=args.db,
        listen=args.listen,
        heartbeat_interval=args.heartbeat_interval,
        lease_timeout=args.lease_timeout,
        max_heartbeats_per_second=args.max_heartbeats_per_second,
        max_wait=args.max_wait,
        preload_images=tuple(args.preload_images),
        token_ttl=args.token_ttl,
        default_max_attempts=args.max_attempts,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        insecure=args.insecure,
    )

    async def run() -> None:
        server = PoolServer(config)
        try:
            port = await server.start()
        except (PoolStartError, StoreError, OSError) as exc:
            raise CliError(str(exc)) from None
        # The one line on stdout: `demo` and tests read the bound port from it. Logs go to
        # stderr, so a parent that stops reading stdout never blocks the pool.
        print(f"listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Windows has no loop signal handlers; Ctrl+C arrives as KeyboardInterrupt there.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        if args.stop_with_stdin:
            # The demo's own pool: it ends with the program that started it, however that
            # one ends (a closed terminal, a kill), when the pipe to its stdin closes.
            def watch_stdin() -> None:
                while sys.stdin.buffer.read(4096):
                    pass
                loop.call_soon_threadsafe(stop.set)

            threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
        try:
            await stop.wait()
            logging.getLogger("hivemind_worker.pool").info("stopping")
        finally:
            await server.stop(grace=2.0)

    asyncio.run(run())
    return 0


# -------------------------------------------------------------------- add-user


def _add_user(args: argparse.Namespace) -> int:
    from hivemind_worker.pool.store import PoolStore, StoreError

    name: str = args.name
    if not _USERNAME_RE.match(name):
        raise CliError(f"{name!r} is not a valid user name: 1-64 of A-Z a-z 0-9 . _ @ -")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = _ask_password(f"Password for {name}: ")
        if password and _ask_password("Again: ") != password:
            raise CliError("the passwords differ")
    if not password:
        raise CliError("refusing an empty password")
    try:
        store = PoolStore(args.db)
        try:
            created = store.add_user(name, password)
        finally:
            store.close()
    except (StoreError, sqlite3.Error, OSError) as exc:
        raise CliError(f"cannot update {args.db}: {exc}") from None
    if created:
        print(f"added user {name}")
    else:
        print(f"set a new password for {name}; their existing logins were signed out")
    return 0


# ------------------------------------------------------------- client commands


def _ask_password(prompt: str) -> str:
    """Ask on the terminal; without one (a launcher, a pipe) say what to do, not EOFError."""
    try:
        return getpass.getpass(prompt)
    except EOFError:
        raise CliError(f"no terminal to ask for the password on: set {PASSWORD_ENV}") from None


async def _client_command(args: argparse.Namespace) -> int:
    if not args.user:
        raise CliError(f"give --user NAME or set {USER_ENV}")
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        password = _ask_password(f"Password for {args.user} at {args.pool}: ")
    root = None
    if args.ca_cert is not None:
        try:
            root = args.ca_cert.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read --ca-cert: {exc}") from None
    client = TaskQueueClient(
        args.pool,
        timeout=args.rpc_timeout,
        tls=False if args.insecure else None,
        root_certificates=root,
    )
    try:
        await client.login(args.user, password)
        if args.command == "submit":
            spec = _build_spec(args)
            if args.copies == 1:
                print(await client.submit(spec))
            else:
                await _submit_copies(client, spec, args.copies)
        elif args.command == "status":
            if args.task_id:
                _print_task(await client.get(args.task_id))
            else:
                _print_table(await client.list(limit=args.limit))
        elif args.command == "result":
            _save_result(args, await client.download(args.task_id))
        elif args.command == "cancel":
            status = TaskStatus.from_proto(await client.cancel(args.task_id, args.reason))
            if status is TaskStatus.RUNNING:
                print("cancel requested; the worker stops the task at its next heartbeat")
            else:
                print(status.value)
        return 0
    except grpc.RpcError as exc:
        raise CliError(_describe_rpc_error(exc, args.pool)) from None
    except ResultIntegrityError as exc:
        raise CliError(str(exc)) from None
    finally:
        await client.close()


def _describe_rpc_error(exc: grpc.RpcError, address: str) -> str:
    code: grpc.StatusCode | None = None
    details: str | None = str(exc)
    if isinstance(exc, grpc.aio.AioRpcError | grpc.Call):
        code, details = exc.code(), exc.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the pool at {address}: is it running?"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the pool at {address} did not answer in time"
    return details or (code.name.lower() if code is not None else "call failed")


async def _submit_copies(client: TaskQueueClient, spec: pb.TaskSpec, copies: int) -> None:
    """`copies` of `spec`, MAX_SUBMIT_BATCH a call (each call all or none); ids printed as each
    call is accepted, so a refusal part-way leaves a list of what was queued."""
    if spec.task_id:
        raise CliError("--id names one task: leave it out with --copies (each copy gets an id)")
    for first in range(0, copies, MAX_SUBMIT_BATCH):
        batch = []
        for n in range(first, min(first + MAX_SUBMIT_BATCH, copies)):
            copy = pb.TaskSpec()
            copy.CopyFrom(spec)
            copy.env["HIVEMIND_COPY"] = str(n)
            copy.name = f"{spec.name} #{n}" if spec.name else f"#{n}"
            batch.append(copy)
        for task_id in await client.submit_many(batch):
            print(task_id, flush=True)


def _build_spec(args: argparse.Namespace) -> pb.TaskSpec:
    spec = pb.TaskSpec(
        task_id=args.id,
        name=args.name,
        argv=[*args.arg, *args.argv],
        timeout_seconds=args.timeout,
        max_attempts=args.max_attempts,
        resources=pb.Resources(
            cpus=args.cpus, memory_bytes=args.memory_mb * MiB, disk_bytes=args.disk_mb * MiB
        ),
    )
    if args.ml or args.data:
        train = _input_files(args.train) if args.ml and args.train is not None else []
        try:
            runner_spec(spec, args, train)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if not args.memory_mb:
            spec.resources.memory_bytes = RUNNER_MEMORY_MB * MiB
    elif args.python is not None:
        spec.kind = pb.TASK_KIND_PYTHON
        try:
            spec.source = args.python.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {args.python}: {exc}") from None
        spec.name = spec.name or args.python.name
    else:
        spec.kind = pb.TASK_KIND_CONTAINER
        spec.image = args.image
        if not spec.argv:
            raise CliError("a container task needs a command: put it after --")
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--env {item!r} is not NAME=VALUE")
        spec.env[name] = value
    for path in args.input:
        spec.input_files.extend(_input_files(path))
    return spec


def _input_files(path: Path) -> list[pb.InputFile]:
    """A file as its own name; a folder as its files under the folder's name (no links)."""
    try:
        if path.is_file():
            return [_input_file(path, path.name)]
        if not path.is_dir():
            raise CliError(f"--input {path}: no such file or folder")
        files: list[pb.InputFile] = []
        base = path.resolve()
        for folder, dirs, names in os.walk(base):
            dirs.sort()
            for name in sorted(names):
                full = Path(folder, name)
                if full.is_symlink() or not full.is_file():
                    continue
                files.append(_input_file(full, f"{base.name}/{full.relative_to(base).as_posix()}"))
        return files
    except OSError as exc:
        raise CliError(f"--input {path}: {exc}") from None


def _input_file(path: Path, name: str) -> pb.InputFile:
    executable = path.stat().st_mode & stat.S_IXUSR
    return pb.InputFile(path=name, content=path.read_bytes(), mode=0o755 if executable else 0o644)


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _print_task(info: pb.TaskInfo) -> None:
    status = TaskStatus.from_proto(info.status)
    spec = info.spec
    rows = [
        ("task", spec.task_id + (f"  ({spec.name})" if spec.name else "")),
        ("status", status.value + (f" (exit {info.exit_code})" if status.is_final else "")),
        ("attempt", f"{info.attempt} of {spec.max_attempts}"),
        ("node", info.node_id or "-"),
        ("submitted", _when(info.submitted_unix_ms)),
        ("started", _when(info.started_unix_ms)),
        ("finished", _when(info.finished_unix_ms)),
    ]
    if info.cancel_requested and not status.is_final:
        rows.append(("cancel", "requested"))
    if info.error:
        rows.append(("error", info.error))
    if info.result_sha256:
        rows.append(("result", f"{info.result_size} bytes, sha256 {info.result_sha256}"))
    for key, value in rows:
        print(f"{key:<10} {value}")
    if info.log_tail:
        print("log tail:")
        print(info.log_tail.decode("utf-8", errors="replace").rstrip("\n"))


def _print_table(tasks: list[pb.TaskInfo]) -> None:
    if not tasks:
        print("no tasks")
        return
    print(f"{'TASK ID':<34} {'STATUS':<13} {'TRY':>3}  {'NODE':<16} NAME")
    for info in tasks:
        status = TaskStatus.from_proto(info.status).value
        print(
            f"{info.spec.task_id:<34} {status:<13} {info.attempt:>3}  "
            f"{(info.node_id or '-'):<16} {info.spec.name}"
        )


def _save_result(args: argparse.Namespace, data: bytes) -> None:
    if args.output is not None:
        try:
            args.output.write_bytes(data)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc}") from None
        print(f"wrote {len(data)} bytes to {args.output}")
    elif args.extract is not None:
        count = extract_archive(data, args.extract)
        print(f"unpacked {count} entries into {args.extract}")
    elif sys.stdout.isatty():
        raise CliError("the result is a tar archive: use -o FILE or --extract DIR")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def extract_archive(data: bytes, dest: Path) -> int:
    """Unpack a result tar (gzip allowed) with no links, devices, absolute paths or '..'."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_EXTRACT_MEMBERS:
                raise CliError(f"the archive has more than {MAX_EXTRACT_MEMBERS} entries")
            if sum(m.size for m in members) > MAX_EXTRACT_BYTES:
                raise CliError(f"the archive unpacks to more than {MAX_EXTRACT_BYTES} bytes")
            for member in members:
                if not (member.isfile() or member.isdir()):
                    raise CliError(f"refusing {member.name!r}: links and special files")
                name = member.name.replace("\\", "/")
                if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
                    raise CliError(f"refusing {member.name!r}: an absolute path")
                if ".." in name.split("/"):
                    raise CliError(f"refusing {member.name!r}: it leaves the folder ('..')")
            dest.mkdir(parents=True, exist_ok=True)
            extract_checked(tar, dest, members)
            return len(members)
    except (tarfile.TarError, OSError) as exc:
        raise CliError(f"cannot unpack the result: {exc}") from None


if __name__ == "__main__":
    raise SystemExit(main())
