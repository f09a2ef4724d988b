"""Command-line entry point: gui (default), run --headless, login, logout, doctor, demo, pool."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import io
import logging
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from hivemind_worker import __version__
from hivemind_worker.config import ConfigError, Settings, load_settings, resolve_node_id
from hivemind_worker.credentials import CredentialError, CredentialStore
from hivemind_worker.paths import Paths, default_paths

if TYPE_CHECKING:
    from hivemind_worker.engine.engine import WorkerEngine
    from hivemind_worker.engine.executors.base import Executor
    from hivemind_worker.engine.probes import DesktopProbes

log = logging.getLogger("hivemind_worker.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """One clear line for the person; the CLI prints it and exits non-zero."""


# ---------------------------------------------------------------------------- parser


def _settings_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override settings; dest names are the setting keys (config.flag_name)."""
    g = p.add_argument_group("settings (override the settings file and environment)")
    g.add_argument("--node-pool", dest="node_pool_address", metavar="HOST:PORT")
    g.add_argument("--node-id", dest="node_id", metavar="ID")
    g.add_argument("--account", dest="account", metavar="NAME")
    g.add_argument("--insecure", dest="insecure", action="store_const", const=True,
                   help="allow a plaintext connection to a non-loopback pool")  # fmt: skip
    g.add_argument("--max-cpu-cores", dest="max_cpu_cores", metavar="N")
    g.add_argument("--max-memory-gb", dest="max_memory_gb", metavar="GB")
    g.add_argument("--max-disk-gb", dest="max_disk_gb", metavar="GB")
    g.add_argument("--max-concurrent-tasks", dest="max_concurrent_tasks", metavar="N")
    g.add_argument("--task-timeout", dest="task_timeout", metavar="SECONDS")
    g.add_argument("--no-docker", dest="docker_enabled", action="store_const", const=False,
                   help="run tasks in the process sandbox even when Docker is present")  # fmt: skip
    g.add_argument("--work-dir", dest="work_dir", metavar="DIR")
    g.add_argument("--log-level", dest="log_level", metavar="LEVEL")


SETTING_DESTS = (
    "node_pool_address", "node_id", "account", "insecure", "max_cpu_cores", "max_memory_gb",
    "max_disk_gb", "max_concurrent_tasks", "task_timeout", "docker_enabled", "work_dir",
    "log_level",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hivemind-worker",
        description="Donate your computer's spare compute to the HiveMind platform.",
    )
    parser.add_argument("--version", action="version", version=f"hivemind-worker {__version__}")
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="keep settings, data and logs under DIR (also HIVEMIND_HOME)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("gui", help="the desktop app (the default when no command is given)")
    p.add_argument("--hidden", action="store_true", help="start in the tray, window closed")
    _settings_flags(p)

    p = sub.add_parser("run", help="run the worker")
    p.add_argument("--headless", action="store_true", help="no window: log to the console")
    _settings_flags(p)

    p = sub.add_parser("login", help="sign in to a pool; the token is kept in the system keyring")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _settings_flags(p)

    p = sub.add_parser("logout", help="forget the stored login for a pool")
    _settings_flags(p)

    p = sub.add_parser("doctor", help="check the pool, the login, Docker and free resources")
    _settings_flags(p)

    p = sub.add_parser("demo", help="run a local pool and the worker on sample tasks")
    p.add_argument("--tasks", type=int, default=6, metavar="N", help="how many sample tasks")
    p.add_argument("--headless", action="store_true", help="console only, even with a display")
    _settings_flags(p)

    sub.add_parser("pool", help="the reference Node Pool (see `hivemind-worker pool --help`)",
                   add_help=False)  # fmt: skip
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {k: getattr(args, k) for k in SETTING_DESTS if getattr(args, k, None) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `pool ...` is the reference pool's own CLI, mounted here so one binary carries both.
    if argv[:1] == ["pool"]:
        from hivemind_worker.pool.cli import main as pool_main

        return pool_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args.command = "gui"
    paths = default_paths(args.data_dir)
    try:
        paths.ensure()
        settings = load_settings(paths, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"hivemind-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"hivemind-worker: cannot use the data folder: {exc}", file=sys.stderr)
        return EXIT_ERROR

    from hivemind_worker.logs import setup_logging

    setup_logging(
        settings.log_dir,
        level=settings.log_level,
        console=args.command != "doctor",
        # The demo prints its own progress; the console gets only what needs attention.
        console_level="warning" if args.command == "demo" else None,
    )
    commands = {
        "gui": cmd_gui,
        "run": cmd_run,
        "login": cmd_login,
        "logout": cmd_logout,
        "doctor": cmd_doctor,
        "demo": cmd_demo,
    }
    try:
        return commands[args.command](args, settings, paths)
    except CliError as exc:
        print(f"hivemind-worker: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except CredentialError as exc:
        print(f"hivemind-worker: keyring: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------- run


def make_engine(
    settings: Settings, paths: Paths, credentials: CredentialStore, *, demo: bool = False
) -> WorkerEngine:
    """The engine with the executor this machine supports (for the demo: one that is ready)."""
    from hivemind_worker.engine.engine import WorkerEngine
    from hivemind_worker.engine.executors import ready_for_python, select_executor
    from hivemind_worker.logs import set_node_id

    node_id = resolve_node_id(settings, paths)
    set_node_id(node_id)
    executor = select_executor(settings, node_id)
    if demo:
        executor = ready_for_python(executor, settings)
    return WorkerEngine(
        settings,
        node_id=node_id,
        credentials=credentials,
        executor=executor,
        outbox_dir=paths.outbox_dir,
        probes=desktop_probes(executor),
    )


def desktop_probes(executor: Executor) -> DesktopProbes:
    """This desktop's probes; Docker containers' CPU counts as the worker's own, not other
    programs' (they are not in the worker's process tree)."""
    from hivemind_worker.engine.probes import DesktopProbes

    def container_cpu() -> float:
        if executor.capability != "docker":
            return 0.0  # process-sandbox tasks are in the worker's process tree already
        return sum(u.cpu_seconds for u in executor.usage().values())

    return DesktopProbes.for_this_desktop(extra_cpu_seconds=container_cpu)


async def run_headless(engine: WorkerEngine, drain_timeout: float) -> None:
    """Run until SIGINT/SIGTERM; the first signal drains, a second one stops at once."""
    loop = asyncio.get_running_loop()
    signals = {"count": 0}

    def on_signal() -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info(
                "stopping: finishing running tasks (up to %.0f s); press Ctrl-C again to stop now",
                drain_timeout,
            )
            engine.drain_and_shutdown(drain_timeout)
        else:
            engine.shutdown()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(on_signal))
    await engine.run()


def cmd_gui(args: argparse.Namespace, settings: Settings, paths: Paths) -> int:
    from hivemind_worker.gui import has_display

    if not has_display():
        raise CliError(
            "no display to open the desktop app on (DISPLAY and WAYLAND_DISPLAY are unset); "
            "run the worker without a window with `hivemind-worker run --headless`"
        )
    try:
        from hivemind_worker.gui.app import run_gui
    except ImportError as exc:  # a Qt library missing from the system
        raise CliError(
            f"the desktop app cannot start ({exc}); use `hivemind-worker run --headless`"
        ) from None
    return run_gui(settings, paths, hidden=getattr(args, "hidden", False))


def cmd_run(args: argparse.Namespace, settings: Settings, paths: Paths) -> int:
    if not args.headless:
        return cmd_gui(args, settings, paths)
    engine = make_engine(settings, paths, CredentialStore(paths))
    log.info(
        "hivemind-worker %s: node %s, pool %s, %s sandbox",
        __version__, engine.node_id, settings.node_pool_address, engine.executor.capability,
    )  # fmt: skip
    asyncio.run(run_headless(engine, settings.drain_timeout))
    return EXIT_OK


# ---------------------------------------------------------------------------- login


def _account(settings: Settings, credentials: CredentialStore, *, ask: bool) -> str:
    account = settings.account or credentials.last_account(settings.node_pool_address) or ""
    if not account and ask:
        account = input("Account name: ").strip()
    if not account:
        raise CliError("no account given: use --account NAME or set HIVEMIND_ACCOUNT")
    return account


async def login_to_pool(
    settings: Settings, credentials: CredentialStore, account: str, password: str
) -> None:
    """Log in and keep the token (never the password) in the keyring."""
    from hivemind_worker.engine.pool_client import PoolError, client_for

    client = client_for(settings)
    try:
        reply = await client.login(account, password)
    except PoolError as exc:
        raise CliError(exc.message) from None
    finally:
        await client.close()
    await asyncio.to_thread(credentials.set_token, settings.node_pool_address, account, reply.token)


def cmd_login(args: argparse.Namespace, settings: Settings, paths: Paths) -> int:
    credentials = CredentialStore(paths)
    account = _account(settings, credentials, ask=not args.password_stdin)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {account} at {settings.node_pool_address}: ")
    if not password:
        raise CliError("empty password")
    asyncio.run(login_to_pool(settings, credentials, account, password))
    print(
        f"Logged in to {settings.node_pool_address} as {account}; "
        f"the token is kept in {credentials.backend_name}."
    )
    return EXIT_OK


def cmd_logout(args: argparse.Namespace, settings: Settings, paths: Paths) -> int:
    credentials = CredentialStore(paths)
    account = _account(settings, credentials, ask=False)
    credentials.delete_token(settings.node_pool_address, account)
    print(f"Logged out of {settings.node_pool_address} ({account}).")
    return EXIT_OK


# ---------------------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace, settings: Settings, paths: Paths) -> int:
    from hivemind_worker.doctor import run_checks

    results = asyncio.run(run_checks(settings, paths, CredentialStore(paths)))
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{r.mark}  {r.name.ljust(width)}  {r.detail}")
    unhealthy = [r for r in results if r.level == "fail"]
    print()
    print("unhealthy: " + ", ".join(r.name for r in unhealthy) if unhealthy else "healthy")
    return EXIT_ERROR if unhealthy else EXIT_OK


# ---------------------------------------------------------------------------- demo


def self_command() -> list[str]:
    """How to start this program again: the frozen binary, or this interpreter with -m."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "hivemind_worker"]


class LocalPool:
    """A reference pool in its own process (DESIGN.md: one grpc.aio loop per process)."""

    def __init__(self, db: Path, *, heartbeat_interval: int = 2, lease_timeout: int = 30) -> None:
        self.db = db
        self.log = db.with_suffix(".log")
        self.heartbeat_interval = heartbeat_interval
        self.lease_timeout = lease_timeout
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def add_user(self, name: str, password: str) -> None:
        done = subprocess.run(
            [*self_command(), "pool", "add-user", name, "--db", str(self.db), "--password-stdin"],
            input=password + "\n", capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise CliError(f"could not create the demo account: {done.stderr.strip()}")

    def start(self, timeout: float = 30.0) -> str:
        with self.log.open("a") as log_file:  # the child keeps its own copy of the handle
            self.process = subprocess.Popen(
                [*self_command(), "pool", "serve", "--db", str(self.db),
                 "--listen", "127.0.0.1:0",
                 "--heartbeat-interval", str(self.heartbeat_interval),
                 "--lease-timeout", str(self.lease_timeout)],
                stdout=subprocess.PIPE, stderr=log_file, text=True,
            )  # fmt: skip
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith("listening on "):
                self.address = line.split()[-1]
                return self.address
        self.stop()
        raise CliError(f"the local pool did not start; see {self.log}")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None


def cmd_demo(args: argparse.Namespace, settings: Settings, paths: Paths) -> int:
    import secrets

    if args.tasks < 1 or args.tasks > 1000:
        raise CliError("--tasks must be between 1 and 1000")
    from hivemind_worker.gui import has_display

    if not args.headless and has_display():
        from hivemind_worker.gui.app import run_gui

        return run_gui(settings, paths, demo_tasks=args.tasks)
    demo_dir = paths.data_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    db = demo_dir / "pool.db"
    for suffix in ("", "-wal", "-shm"):  # every demo starts from an empty pool
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    pool = LocalPool(db)
    password = secrets.token_urlsafe(16)
    pool.add_user("demo", password)
    address = pool.start()
    print(f"Local pool running at {address} (database {db}, log {pool.log})")
    try:
        settings = replace(settings, node_pool_address=address, account="demo")
        credentials = CredentialStore(paths)
        return asyncio.run(_demo(settings, paths, credentials, password, args.tasks))
    finally:
        pool.stop()


async def _demo(
    settings: Settings, paths: Paths, credentials: CredentialStore, password: str, count: int
) -> int:
    from hivemind_worker.engine.events import EngineState, StateChanged, TaskFinished
    from hivemind_worker.pool.client import TaskQueueClient
    from hivemind_worker.samples import demo_tasks

    await login_to_pool(settings, credentials, "demo", password)
    queue = TaskQueueClient(settings.node_pool_address)
    await queue.login("demo", password)
    samples = demo_tasks(count)
    ids = [await queue.submit(s.spec) for s in samples]
    names = dict(zip(ids, (s.name for s in samples), strict=True))
    print(f"Submitted {len(ids)} sample tasks; the worker takes them now.\n")

    engine = make_engine(settings, paths, credentials, demo=True)
    finished: dict[str, str] = {}

    def on_event(event: object) -> None:
        if isinstance(event, TaskFinished) and event.task_id in names:
            finished[event.task_id] = event.status.value
            print(
                f"[{len(finished)}/{len(ids)}] {event.name}: {event.status.value} "
                f"in {event.duration:.1f} s",
                flush=True,
            )
        elif isinstance(event, StateChanged) and event.state is EngineState.ERROR:
            print(f"worker error: {event.message}", file=sys.stderr, flush=True)

    engine.subscribe(on_event)
    runner = asyncio.create_task(run_headless(engine, settings.drain_timeout))
    try:
        infos = await queue.wait_done(ids, timeout=max(300.0, 60.0 * count))
    except TimeoutError:
        engine.shutdown()
        await runner
        raise CliError("the demo tasks did not finish in time; see the log above") from None
    engine.drain_and_shutdown(settings.drain_timeout)
    await runner

    print("\nResults:")
    failures = 0
    for task_id in ids:
        info = infos[task_id]
        from hivemind_worker.engine.tasks import TaskStatus

        status = TaskStatus.from_proto(info.status)
        if status is not TaskStatus.SUCCEEDED:
            failures += 1
            print(f"  {names[task_id]}: {status.value}: {info.error}")
            continue
        summary = _summary(await queue.download(task_id))
        print(f"  {names[task_id]}: {summary}")
    await queue.close()
    print(f"\nDone: {len(ids) - failures} of {len(ids)} tasks succeeded.")
    print(f"Worker log: {settings.log_dir / 'worker.jsonl'}")
    return EXIT_OK if failures == 0 else EXIT_ERROR


def _summary(archive: bytes) -> str:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.name.endswith("summary.txt") and member.isfile():
                fh = tar.extractfile(member)
                if fh is not None:
                    return fh.read().decode("utf-8", "replace").strip()
    return f"({len(archive)} bytes of results)"


if __name__ == "__main__":
    raise SystemExit(main())
