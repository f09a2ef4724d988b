"""Command-line entry point: gui (default), run --headless, login, logout, doctor, demo, pool."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from hivemind_worker import __version__
from hivemind_worker.config import (
    ConfigError,
    Settings,
    load_settings,
    save_settings,
    settings_table,
)
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.demo import DEMO_ACCOUNT, DemoError, DemoPool, result_summary
from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.paths import Paths, default_paths
from hivemind_worker.wiring import login_to_pool, make_engine

if TYPE_CHECKING:
    from hivemind_worker.engine.engine import WorkerEngine

log = logging.getLogger("hivemind_worker.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(HiveMindError):
    """One clear line for the person; the CLI prints it and exits non-zero."""

    kind = ErrorKind.BAD_SETTING
    title = "Command not valid"


# ---------------------------------------------------------------------------- parser


def _settings_flags(p: argparse.ArgumentParser) -> None:
    """The flags that override settings, one per setting declared with a flag; dest is its key."""
    g = p.add_argument_group("settings (override the settings file and environment)")
    for spec in settings_table():
        if spec.flag is None:
            continue
        if spec.flag.const is not None:
            g.add_argument(
                spec.flag.name,
                dest=spec.key,
                action="store_const",
                const=spec.flag.const,
                help=spec.flag.help,
            )
        else:
            help_text = f"{spec.help} (env {spec.env})".replace("%", "%%")
            g.add_argument(spec.flag.name, dest=spec.key, metavar=spec.flag.metavar, help=help_text)


SETTING_DESTS = tuple(spec.key for spec in settings_table() if spec.flag is not None)


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
    p.add_argument(
        "--keep-pool",
        action="store_true",
        help="only keep the login; do not make this pool (and account) the worker's own",
    )
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
    except HiveMindError as exc:
        # One sentence for the person; the library's own words go to the log.
        if exc.details:
            log.info("%s: %s", exc.title, exc.details)
        prefix = "keyring: " if exc.kind is ErrorKind.KEYRING else ""
        print(f"hivemind-worker: {prefix}{exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------- run


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
        from hivemind_worker.gui.main import run_gui
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
    if not args.keep_pool:
        _make_it_this_workers_pool(paths, settings.node_pool_address, account)
    return EXIT_OK


def _make_it_this_workers_pool(paths: Paths, address: str, account: str) -> None:
    """Save the pool and account to the settings file, so `run` uses what was logged in to.

    Only those two keys change: the file's other settings stay as they are, and flags or
    environment values given for this one command are not written.
    """
    saved = load_settings(paths, env={})
    if saved.node_pool_address == address and saved.account == account:
        return
    save_settings(paths, replace(saved, node_pool_address=address, account=account))
    print(f"This worker now contributes to {address} as {account} ({paths.settings_file}).")


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


def cmd_demo(args: argparse.Namespace, settings: Settings, paths: Paths) -> int:
    if args.tasks < 1 or args.tasks > 1000:
        raise CliError("--tasks must be between 1 and 1000")
    from hivemind_worker.gui import has_display

    if not args.headless and has_display():
        from hivemind_worker.gui.main import run_gui

        return run_gui(settings, paths, demo_tasks=args.tasks)
    pool = DemoPool(paths, args.tasks)
    print(f"Starting a local pool (database {pool.pool.db}, log {pool.pool.log})")
    return asyncio.run(_demo(settings, paths, CredentialStore(paths), pool))


async def _demo(
    settings: Settings, paths: Paths, credentials: CredentialStore, pool: DemoPool
) -> int:
    import grpc

    from hivemind_worker.engine.events import EngineState, StateChanged, TaskFinished, TaskProgress
    from hivemind_worker.pool.client import TaskQueueClient
    from hivemind_worker.tasks import TaskStatus

    try:
        settings = await pool.start(settings, credentials)
        print(f"Local pool running at {settings.node_pool_address}")
        engine = make_engine(settings, paths, credentials, demo=True)
        for line in await pool.submit_runner_samples(engine):
            print(line)
        names = pool.submitted
        ids = list(names)
        print(f"Submitted {len(ids)} sample tasks; the worker takes them now.\n")
        finished: dict[str, str] = {}

        def on_event(event: object) -> None:
            if isinstance(event, TaskProgress) and event.task_id in names:
                # A runner's steps, and the first-use build of its environment.
                print(f"  {names[event.task_id]}: {event.label()}", flush=True)
            elif isinstance(event, TaskFinished) and event.task_id in names:
                finished[event.task_id] = event.status.value
                print(
                    f"[{len(finished)}/{len(ids)}] {event.name}: {event.status.value} "
                    f"in {event.duration:.1f} s",
                    flush=True,
                )
            elif isinstance(event, StateChanged) and event.state is EngineState.ERROR:
                print(f"worker error: {event.message}", file=sys.stderr, flush=True)

        engine.subscribe(on_event)
        queue = TaskQueueClient(settings.node_pool_address)
        await queue.login(DEMO_ACCOUNT, pool.password)
        runner = asyncio.create_task(run_headless(engine, settings.drain_timeout))
        waiting = asyncio.create_task(
            queue.wait_done(ids, timeout=max(300.0, 60.0 * len(ids)) + pool.extra_wait)
        )
        await asyncio.wait({runner, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            # The worker stopped first: Ctrl-C or SIGTERM (it finished its running tasks).
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            await runner
            raise CliError("the demo was stopped before its tasks finished")
        try:
            infos = waiting.result()
        except TimeoutError:
            engine.shutdown()
            await runner
            raise CliError("the demo tasks did not finish in time; see the log above") from None
        except grpc.aio.AioRpcError as e:
            engine.shutdown()
            await runner
            raise DemoError(
                f"The local pool stopped answering; see {pool.pool.log}.",
                details=f"{e.code().name}: {e.details()}",
            ) from None
        engine.drain_and_shutdown(settings.drain_timeout)
        await runner

        print("\nResults:")
        failures = 0
        for task_id in ids:
            info = infos[task_id]
            status = TaskStatus.from_proto(info.status)
            if status is not TaskStatus.SUCCEEDED:
                failures += 1
                print(f"  {names[task_id]}: {status.value}: {info.error}")
                continue
            print(f"  {names[task_id]}: {result_summary(await queue.download(task_id))}")
        await queue.close()
    finally:
        await pool.stop()
    print(f"\nDone: {len(ids) - failures} of {len(ids)} tasks succeeded.")
    print(f"Worker log: {settings.log_dir / 'worker.jsonl'}")
    return EXIT_OK if failures == 0 else EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
