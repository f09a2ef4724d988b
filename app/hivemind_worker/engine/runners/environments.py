"""Per-requirement-set Python environments, built once with uv outside the sandbox, then read-only.

The process sandbox runs a task that has requirements with the interpreter of a virtualenv
made for exactly that set (`venv_python`); Docker copies a `--target` folder of the same set
into a derived image (`target_dir`). Both are built by `uv` with the network on, wheels only
(`--no-build`: installing a wheel runs none of its code on this machine), and are keyed by a
hash of the interpreter and the requirements, so each set is built once per machine. The
finished folder is made read-only and renamed into place in one step: a build that dies
half-way leaves only a `.build-*` folder, removed by the next build.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from hivemind_worker.engine.executors.base import ExecutorError

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".hivemind-complete"
BUILD_TIMEOUT_SECONDS = 3600
Progress = Callable[[str, str], None]
"""Told (environment name, one line of what the build is doing); must not block."""


def uv_binary() -> str:
    """The uv executable: the one bundled in the one-file build, the one the `uv` package
    ships, else one on PATH."""
    if getattr(sys, "frozen", False):
        bundled = Path(getattr(sys, "_MEIPASS", "")) / ("uv.exe" if os.name == "nt" else "uv")
        if bundled.is_file():
            return str(bundled)
    try:
        import uv

        found: str = uv.find_uv_bin()
        return found
    except (ImportError, FileNotFoundError):
        on_path = shutil.which("uv")
        if on_path:
            return on_path
    raise ExecutorError(
        "uv is not installed, so task environments cannot be built; "
        "reinstall the worker (it ships uv) or put uv on PATH"
    )


class Environments:
    """The environments under `root`, built on demand; thread-safe, one build per set at once."""

    def __init__(
        self,
        root: Path,
        *,
        find_links: Sequence[str] = (),
        uv: str | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.root = Path(root)
        self._find_links = tuple(f for f in find_links if f)
        self._uv = uv
        self.on_progress = on_progress
        self._progress: Progress | None = None  # of the build under way (one at a time)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # One build at a time: each downloads hundreds of MB and uses every core it can.
        self._build_lock = threading.Lock()

    def venv_python(
        self,
        name: str,
        requirements: Sequence[str],
        base_python: str,
        on_progress: Progress | None = None,
    ) -> Path:
        """The interpreter of a virtualenv on `base_python` holding `requirements` (blocking)."""
        base = os.path.realpath(base_python)
        key = _key("venv", base, *requirements)
        folder = self._ensure(
            name, key, requirements, lambda tmp: self._build_venv(tmp, base), on_progress
        )
        return _venv_interpreter(folder)

    def target_dir(
        self,
        name: str,
        requirements: Sequence[str],
        python_version: str,
        on_progress: Progress | None = None,
        *,
        python_platform: str = "",
    ) -> Path:
        """A folder to put on PYTHONPATH of a `python_version` interpreter (blocking); for
        another machine's platform (uv's name, e.g. x86_64-manylinux_2_28) when given."""
        key = _key("target", python_version, python_platform, *requirements)
        return self._ensure(
            name,
            key,
            requirements,
            lambda tmp: self._build_target(tmp, python_version, python_platform),
            on_progress,
        )

    def built(self) -> list[Path]:
        """The finished environments on disk."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if (p / COMPLETE_MARKER).exists())

    # ------------------------------------------------------------ building

    def _ensure(
        self,
        name: str,
        key: str,
        requirements: Sequence[str],
        create: Callable[[Path], list[str]],
        on_progress: Progress | None = None,
    ) -> Path:
        for line in requirements:
            if not line.strip() or line.lstrip().startswith("-"):
                # -r, -e, --index-url and friends would reach files or servers of their choosing.
                raise ExecutorError(f"{line[:80]!r} is not a package requirement")
        final = self.root / f"{_safe(name)}-{key}"
        if (final / COMPLETE_MARKER).exists():
            return final
        with self._build_lock, self._lock(key):
            if (final / COMPLETE_MARKER).exists():
                return final
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f".build-{key}-*"):
                _remove(stale)
            tmp = self.root / f".build-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            self._progress = on_progress or self.on_progress
            started = time.monotonic()
            self._say(name, f"building the {name} environment ({len(requirements)} packages)")
            try:
                reqs = tmp.parent / f"{tmp.name}.txt"
                reqs.write_text("".join(f"{line.strip()}\n" for line in requirements))
                try:
                    install_into = create(tmp)
                    self._uv_run(
                        name,
                        [
                            "pip", "install", *install_into, "--no-build", "--compile-bytecode",
                            *(a for f in self._find_links for a in ("--find-links", f)),
                            "-r", str(reqs),
                        ],
                    )  # fmt: skip
                finally:
                    reqs.unlink(missing_ok=True)
                (tmp / COMPLETE_MARKER).write_text(
                    "".join(f"{line.strip()}\n" for line in requirements)
                )
                _make_read_only(tmp)
                if final.exists():  # an unfinished leftover of an older worker
                    _remove(final)
                tmp.rename(final)
            except BaseException:
                _remove(tmp)
                raise
            seconds = time.monotonic() - started
            size = _size(final)
            self._say(name, f"the {name} environment is ready ({size >> 20} MiB, {seconds:.0f} s)")
            return final

    def _build_venv(self, tmp: Path, base: str) -> list[str]:
        self._uv_run(tmp.name, ["venv", "--python", base, "--no-project", "--quiet", str(tmp)])
        return ["--python", str(_venv_interpreter(tmp))]

    def _build_target(self, tmp: Path, python_version: str, python_platform: str) -> list[str]:
        platform = ["--python-platform", python_platform] if python_platform else []
        return ["--target", str(tmp), "--python-version", python_version, *platform]

    def _uv_run(self, name: str, args: list[str]) -> None:
        env = dict(os.environ)
        env["UV_PYTHON_DOWNLOADS"] = "never"  # never fetch an interpreter: use the given one
        env["UV_NO_PROGRESS"] = "1"
        # The system's certificates, as a browser would: behind a proxy with its own CA (in
        # offices, on these build machines) uv's built-in roots refuse PyPI. The older name
        # for older uv releases.
        env.setdefault("UV_SYSTEM_CERTS", "1")
        env.setdefault("UV_NATIVE_TLS", "1")
        env.pop("VIRTUAL_ENV", None)
        command = [self._uv or uv_binary(), *args]
        log.debug("running %s", " ".join(command))
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        except OSError as exc:
            raise ExecutorError(f"cannot run uv to build the {name} environment: {exc}") from exc
        tail: list[str] = []
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            tail = [*tail[-19:], line]
            self._say(name, line.strip())
        code = proc.wait(timeout=BUILD_TIMEOUT_SECONDS)
        if code != 0:
            detail = "; ".join(t.strip() for t in tail[-4:])
            raise ExecutorError(
                f"building the {name} environment failed (uv exited with {code}): {detail}"
            )

    def _say(self, name: str, line: str) -> None:
        log.info("environment %s: %s", name, line)
        progress = self._progress
        if progress is not None:
            try:
                progress(name, line)
            except Exception:
                log.exception("environment progress callback failed")

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "env"


def _venv_interpreter(folder: Path) -> Path:
    if os.name == "nt":
        return folder / "Scripts" / "python.exe"
    return folder / "bin" / "python"


def _make_read_only(root: Path) -> None:
    """No write bit anywhere: a task that runs in it cannot change what the next task runs."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, stat.S_IMODE(mode) & ~0o222)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o555)
    os.chmod(root, 0o555)


def _remove(path: Path) -> None:
    """Remove a (read-only) environment folder."""

    def writable(func: Callable[[str], object], name: str, _: object) -> None:
        os.chmod(os.path.dirname(name), 0o755)
        func(name)

    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, _ in os.walk(path):
            os.chmod(dirpath, 0o755)
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if not os.path.islink(full):
                    os.chmod(full, 0o755)
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=writable)
        else:
            shutil.rmtree(path, onerror=writable)
    else:
        path.unlink(missing_ok=True)


def _size(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
