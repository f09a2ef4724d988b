"""Typed worker settings, declared once: defaults < TOML file < environment < command-line flags."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import psutil
import tomli_w

from hivemind_worker.paths import Paths

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
GIB = 1024**3
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A setting or settings file the worker cannot use; str() is one line meant for the person."""


@dataclass(frozen=True)
class Settings:
    """Validated settings; the directory fields are always concrete paths."""

    schema_version: int
    node_id: str
    node_pool_address: str
    account: str
    insecure: bool
    ca_file: str
    max_cpu_cores: float
    max_memory_gb: float
    max_disk_gb: float
    task_timeout: int
    max_concurrent_tasks: int
    heartbeat_interval: int
    docker_enabled: bool
    docker_network: str
    docker_python_image: str
    docker_pull_policy: str
    docker_image_allowlist: str
    work_dir: Path
    temp_dir: Path
    log_dir: Path
    log_level: str
    drain_timeout: int
    idle_only_minutes: float
    suspend_on_battery: bool
    battery_below_percent: int
    other_cpu_percent: int
    other_cpu_suspend_seconds: int
    other_cpu_resume_seconds: int
    suspend_fullscreen: bool
    schedule: str
    memory_low_percent: int
    cpu_time_percent: int
    give_back_minutes: float
    start_at_login: bool
    start_on_launch: bool
    close_to_tray: bool

    def cpu_cap(self) -> float:
        return self.max_cpu_cores or float(_cpu_count())

    def memory_cap_bytes(self) -> int:
        if self.max_memory_gb:
            return int(self.max_memory_gb * GIB)
        return _total_memory() // 2

    def disk_cap_bytes(self) -> int:
        return int(self.max_disk_gb * GIB)


def _cpu_count() -> int:
    return os.cpu_count() or 1


def _total_memory() -> int:
    return int(psutil.virtual_memory().total)


def _number_text(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{math.floor(x * 10) / 10:g}"  # round down so the shown maximum is itself allowed


class Rule:
    """What one setting accepts beyond its type."""

    def allowed(self) -> str:
        """The text that follows "expected" in an error message."""
        raise NotImplementedError

    def check(self, value: Any) -> Any:
        """Return the value, normalized; raise ValueError if it is not allowed."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Range(Rule):
    low: float
    high: float | Callable[[], float]
    integer: bool = False
    low_open: bool = False
    note: str = ""

    def _high(self) -> float:
        return self.high() if callable(self.high) else self.high

    def allowed(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        low, high = _number_text(self.low), _number_text(self._high())
        text = (
            f"{kind} greater than {low} and at most {high}"
            if self.low_open
            else f"{kind} from {low} to {high}"
        )
        return f"{text} ({self.note})" if self.note else text

    def check(self, value: Any) -> Any:
        above_low = value > self.low if self.low_open else value >= self.low
        if not (above_low and value <= self._high()):  # also rejects NaN
            raise ValueError(value)
        return value


@dataclass(frozen=True)
class _Pattern(Rule):
    pattern: str
    text: str

    def allowed(self) -> str:
        return self.text

    def check(self, value: Any) -> Any:
        if not re.fullmatch(self.pattern, value):
            raise ValueError(value)
        return value


@dataclass(frozen=True)
class _MaxLength(Rule):
    limit: int

    def allowed(self) -> str:
        return f"text of at most {self.limit} characters"

    def check(self, value: Any) -> Any:
        if len(value) > self.limit:
            raise ValueError(value)
        return value


@dataclass(frozen=True)
class _OptionalFile(Rule):
    def allowed(self) -> str:
        return "empty, or the path of an existing file"

    def check(self, value: Any) -> Any:
        if value and not Path(value).expanduser().is_file():
            raise ValueError(value)
        return str(Path(value).expanduser().absolute()) if value else ""


@dataclass(frozen=True)
class _Choice(Rule):
    choices: tuple[str, ...]

    def allowed(self) -> str:
        return "one of " + ", ".join(self.choices)

    def check(self, value: Any) -> Any:
        value = value.strip().lower()
        if value not in self.choices:
            raise ValueError(value)
        return value


class _Explained(ValueError):
    """A value a rule refuses for a reason more precise than what it allows; str() is it."""


@dataclass(frozen=True)
class _Schedule(Rule):
    def allowed(self) -> str:
        return "days and times like 'mon-fri 18:00-08:00; sat-sun 00:00-24:00', or empty"

    def check(self, value: Any) -> Any:
        from hivemind_worker.engine.policy import Schedule, ScheduleError

        try:
            return Schedule.parse(value).text
        except ScheduleError as exc:
            raise _Explained(str(exc)) from None


_NODE_ID_PATTERN = r"[A-Za-z0-9._-]{1,64}"
_ADDRESS_PATTERN = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})"


@dataclass(frozen=True)
class _Address(Rule):
    def allowed(self) -> str:
        return "host:port with a port from 1 to 65535 (IPv6 as [::1]:port)"

    def check(self, value: Any) -> Any:
        match = re.fullmatch(_ADDRESS_PATTERN, value)
        if match is None or not 1 <= int(match[2]) <= 65535:
            raise ValueError(value)
        return value


_TYPE_TEXT: dict[type, str] = {
    bool: "true or false (also yes/no, on/off, 1/0)",
    int: "a whole number",
    float: "a number",
    str: "text",
    Path: "a folder path",
}
_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True)
class SettingSpec:
    """One row of the settings table; `env` is None for settings that live only in the file."""

    key: str
    env: str | None
    type: type
    default: object
    description: str
    rule: Rule | None = None

    @property
    def type_name(self) -> str:
        return self.type.__name__

    @property
    def flag(self) -> str:
        return flag_name(self.key)

    def allowed(self) -> str:
        return self.rule.allowed() if self.rule else _TYPE_TEXT[self.type]


_FIELD_TYPES: dict[str, type] = get_type_hints(Settings)


def _spec(
    key: str, env: str | None, default: object, description: str, rule: Rule | None = None
) -> SettingSpec:
    return SettingSpec(key, env, _FIELD_TYPES[key], default, description, rule)


_SPECS: tuple[SettingSpec, ...] = (
    _spec(
        "schema_version",
        None,
        SCHEMA_VERSION,
        "Version of the settings file format (file only).",
        _Range(
            1,
            SCHEMA_VERSION,
            integer=True,
            note="a higher one means a newer HiveMind Worker wrote the file",
        ),
    ),
    _spec(
        "node_id",
        "NODE_ID",
        "",
        "This machine's id on the pool; empty means generate one once and keep it.",
        _Pattern(
            f"|{_NODE_ID_PATTERN}",
            "1 to 64 characters from A-Z, a-z, 0-9, '.', '_', '-' (or empty to generate one)",
        ),
    ),
    _spec(
        "node_pool_address",
        "NODE_POOL_ADDRESS",
        "127.0.0.1:50051",
        "The Node Pool to work for, as host:port.",
        _Address(),
    ),
    _spec("account", "HIVEMIND_ACCOUNT", "", "Your username on the pool.", _MaxLength(128)),
    _spec(
        "insecure",
        "HIVEMIND_INSECURE",
        False,
        "Allow an unencrypted connection to a pool that is not on this machine.",
    ),
    _spec(
        "ca_file",
        "HIVEMIND_CA_FILE",
        "",
        "CA certificates (PEM) to trust for the pool's TLS certificate; empty means the "
        "system's. When set, TLS is used even on this machine.",
        _OptionalFile(),
    ),
    _spec(
        "max_cpu_cores",
        "MAX_CPU_CORES",
        0.0,
        "CPU cores tasks may use in total; 0 means the whole machine.",
        _Range(0, _cpu_count),
    ),
    _spec(
        "max_memory_gb",
        "MAX_MEMORY_GB",
        0.0,
        "Memory in GiB tasks may use in total; 0 means half of this machine's RAM.",
        _Range(0, lambda: _total_memory() / GIB),
    ),
    _spec(
        "max_disk_gb",
        "MAX_DISK_GB",
        10.0,
        "Disk space in GiB task workspaces may use in total.",
        _Range(0, 100_000, low_open=True),
    ),
    _spec(
        "task_timeout",
        "TASK_TIMEOUT",
        3600,
        "Longest a task may run, in seconds.",
        _Range(1, 7 * 86400, integer=True),
    ),
    _spec(
        "max_concurrent_tasks",
        "MAX_CONCURRENT_TASKS",
        1,
        "Most tasks to run at once.",
        _Range(1, 64, integer=True),
    ),
    _spec(
        "heartbeat_interval",
        "HEARTBEAT_INTERVAL",
        30,
        "Seconds between heartbeats when the pool does not ask for an interval.",
        _Range(1, 3600, integer=True),
    ),
    _spec(
        "docker_enabled", "DOCKER_ENABLED", True, "Run tasks in Docker containers when possible."
    ),
    _spec("docker_network", "DOCKER_NETWORK", "none", "Docker network for task containers."),
    _spec(
        "docker_python_image",
        "DOCKER_PYTHON_IMAGE",
        "python:3.12-slim",
        "Docker image that runs python tasks.",
        _Pattern(
            r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}", "an image reference like python:3.12-slim"
        ),
    ),
    _spec(
        "docker_pull_policy",
        "DOCKER_PULL_POLICY",
        "if-not-present",
        "When to pull task images.",
        _Choice(("if-not-present", "always", "never")),
    ),
    _spec(
        "docker_image_allowlist",
        "DOCKER_IMAGE_ALLOWLIST",
        "",
        "Comma-separated registry prefixes (docker.io/library/) or digests (sha256:...) "
        "task images must match; empty allows any image.",
        _Pattern(
            r"[A-Za-z0-9._/:@, -]{0,4000}",
            "comma-separated registry prefixes or sha256: digests",
        ),
    ),
    _spec(
        "work_dir",
        "WORK_DIR",
        "",
        "Folder for task workspaces; empty means the app's data folder /work.",
    ),
    _spec(
        "temp_dir", "TEMP_DIR", "", "Folder for temporary files; empty means the cache folder /tmp."
    ),
    _spec("log_dir", "LOG_DIR", "", "Folder for log files; empty means the platform's log folder."),
    _spec("log_level", "LOG_LEVEL", "info", "How much to log.", _Choice(LOG_LEVELS)),
    _spec(
        "drain_timeout",
        "HIVEMIND_DRAIN_TIMEOUT",
        60,
        "Seconds to let running tasks finish when stopping.",
        _Range(0, 86400, integer=True),
    ),
    # When to contribute (engine/policy.py); 0 turns a numeric rule off.
    _spec(
        "idle_only_minutes",
        "HIVEMIND_IDLE_ONLY_MINUTES",
        0.0,
        "Contribute only after this many minutes without keyboard or mouse input; 0 means "
        "also while you use the computer.",
        _Range(0, 24 * 60),
    ),
    _spec(
        "suspend_on_battery",
        "HIVEMIND_SUSPEND_ON_BATTERY",
        True,
        "Pause tasks while the computer runs on battery.",
    ),
    _spec(
        "battery_below_percent",
        "HIVEMIND_BATTERY_BELOW_PERCENT",
        0,
        "With suspend_on_battery: pause only once the charge is below this %; 0 means at "
        "any charge.",
        _Range(0, 100, integer=True),
    ),
    _spec(
        "other_cpu_percent",
        "HIVEMIND_OTHER_CPU_PERCENT",
        25,
        "Pause tasks while other programs use more than this % of the CPU; 0 means never.",
        _Range(0, 100, integer=True),
    ),
    _spec(
        "other_cpu_suspend_seconds",
        "HIVEMIND_OTHER_CPU_SUSPEND_SECONDS",
        10,
        "How long other programs must stay that busy before tasks pause, in seconds.",
        _Range(1, 3600, integer=True),
    ),
    _spec(
        "other_cpu_resume_seconds",
        "HIVEMIND_OTHER_CPU_RESUME_SECONDS",
        30,
        "How long they must then stay quiet before tasks resume, in seconds.",
        _Range(1, 3600, integer=True),
    ),
    _spec(
        "suspend_fullscreen",
        "HIVEMIND_SUSPEND_FULLSCREEN",
        True,
        "Pause tasks while a full-screen app or game has the focus.",
    ),
    _spec(
        "schedule",
        "HIVEMIND_SCHEDULE",
        "",
        "When to contribute in the week, e.g. 'mon-fri 18:00-08:00; sat-sun 00:00-24:00'; "
        "empty means at any time.",
        _Schedule(),
    ),
    _spec(
        "memory_low_percent",
        "HIVEMIND_MEMORY_LOW_PERCENT",
        10,
        "Pause tasks while less than this % of memory is available; 0 means never.",
        _Range(0, 90, integer=True),
    ),
    _spec(
        "cpu_time_percent",
        "HIVEMIND_CPU_TIME_PERCENT",
        100,
        "Let tasks use at most this % of CPU time (on top of max_cpu_cores).",
        _Range(1, 100, integer=True),
    ),
    _spec(
        "give_back_minutes",
        "HIVEMIND_GIVE_BACK_MINUTES",
        30.0,
        "After tasks have been paused this long, give them back to the pool to run "
        "elsewhere, in minutes; 0 means keep them.",
        _Range(0, 7 * 24 * 60),
    ),
    # Desktop app only: the settings dialog writes them, the headless worker ignores them.
    _spec("start_at_login", None, False, "Start the desktop app when you log in (file only)."),
    _spec(
        "start_on_launch",
        None,
        False,
        "Start contributing as soon as the desktop app starts (file only).",
    ),
    _spec(
        "close_to_tray",
        None,
        True,
        "Closing the window keeps the app running in the tray (file only).",
    ),
)
_BY_KEY: dict[str, SettingSpec] = {spec.key: spec for spec in _SPECS}
if list(_BY_KEY) != [f.name for f in dataclasses.fields(Settings)]:
    raise RuntimeError("the settings table and the Settings fields disagree")


def settings_table() -> list[SettingSpec]:
    return list(_SPECS)


# Flags whose names are shorter than their keys, kept from the original worker's CLI.
_FLAG_NAMES = {"node_pool_address": "--node-pool", "docker_enabled": "--no-docker"}


def flag_name(key: str) -> str:
    return _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def _convert(spec: SettingSpec, raw: object, parse_text: bool, paths: Paths) -> Any:
    """The typed, allowed value of `raw`; ValueError if there is none."""
    kind = spec.type
    value: Any
    if kind is Path:
        if not isinstance(raw, str | os.PathLike):
            raise ValueError(raw)
        if os.fspath(raw) == "":
            return getattr(paths, spec.key)  # the directory settings share names with Paths
        return Path(raw).expanduser().absolute()
    if isinstance(raw, str) and parse_text and kind is not str:
        word = raw.strip().lower()
        if kind is bool:
            if word not in _TRUE_WORDS | _FALSE_WORDS:
                raise ValueError(raw)
            value = word in _TRUE_WORDS
        else:
            value = kind(word)  # int() and float() raise ValueError themselves
    elif kind is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        value = raw
    else:
        raise ValueError(raw)
    return spec.rule.check(value) if spec.rule else value


def _checked(spec: SettingSpec, raw: object, source: str, parse_text: bool, paths: Paths) -> Any:
    try:
        return _convert(spec, raw, parse_text, paths)
    except _Explained as exc:
        raise ConfigError(f"Invalid setting {spec.key} = {raw!r} ({source}): {exc}") from None
    except ValueError:
        raise ConfigError(
            f"Invalid setting {spec.key} = {raw!r} ({source}): expected {spec.allowed()}"
        ) from None


def check_setting(paths: Paths, key: str, raw: object, source: str = "as entered") -> Any:
    """The typed, allowed value of one setting; ConfigError (one line) if not allowed.

    Text is parsed as the environment's is, so a dialog can pass what the person typed.
    """
    return _checked(_BY_KEY[key], raw, source, isinstance(raw, str), paths)


def _read_settings_file(paths: Paths) -> dict[str, Any]:
    path = paths.settings_file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"Cannot read settings file {path}: {exc.strerror or exc}") from exc
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Cannot read settings file {path}: not UTF-8 text (byte {exc.start})"
        ) from None
    except tomllib.TOMLDecodeError as exc:  # its message carries the line and column
        raise ConfigError(f"Cannot read settings file {path}: {exc}") from None
    # The version comes first: a newer file may hold keys this version has never heard of.
    if "schema_version" in document:
        _checked(
            _BY_KEY["schema_version"], document["schema_version"], f"from {path}", False, paths
        )
    for key in document:
        if key not in _BY_KEY:
            close = difflib.get_close_matches(key, list(_BY_KEY), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown setting {key!r} in {path}{hint}")
    return document


def load_settings(
    paths: Paths,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Settings from defaults < paths.settings_file < env (os.environ if None) < overrides.

    `overrides` come from command-line flags, keyed by setting key; None values are ignored.
    Only the winning value of each setting is checked, so a flag can repair a bad file value.
    """
    env = os.environ if env is None else env
    overrides = overrides or {}
    for key in overrides:
        if key not in _BY_KEY or _BY_KEY[key].env is None:
            raise ValueError(f"{key!r} is not a setting that can be overridden")
    document = _read_settings_file(paths)
    values: dict[str, Any] = {}
    for spec in _SPECS:
        raw, source, parse_text = spec.default, "default", False
        if spec.key in document:
            raw, source = document[spec.key], f"from {paths.settings_file}"
        if spec.env and env.get(spec.env):  # empty variables, common in env files, count as unset
            raw, source, parse_text = env[spec.env], f"from environment variable {spec.env}", True
        if overrides.get(spec.key) is not None:
            raw, source = overrides[spec.key], f"from command-line flag {spec.flag}"
            parse_text = True
        values[spec.key] = _checked(spec, raw, source, parse_text, paths)
    return Settings(**values)


def save_settings(paths: Paths, settings: Settings) -> None:
    """Write the settings that differ from their defaults, plus schema_version, atomically."""
    document: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    for spec in _SPECS[1:]:
        value = getattr(settings, spec.key)
        if value != _checked(spec, spec.default, "default", False, paths):
            document[spec.key] = str(value) if isinstance(value, Path) else value
    paths.config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_atomic(paths.settings_file, tomli_w.dumps(document).encode("utf-8"))


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never half of one."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


_state_lock = threading.Lock()


def read_state(paths: Paths) -> dict[str, Any]:
    """The runtime state the worker keeps for itself (not settings); {} if none or unreadable."""
    try:
        text = paths.state_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        state = json.loads(text)
    except ValueError:
        state = None
    if not isinstance(state, dict):
        log.warning("Ignoring unreadable state file %s", paths.state_file)
        return {}
    return state


def update_state(paths: Paths, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Read, change and atomically rewrite the state file, keeping keys `mutate` leaves alone."""
    with _state_lock:
        state = read_state(paths)
        mutate(state)
        paths.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = json.dumps(state, indent=2, sort_keys=True) + "\n"
        _write_atomic(paths.state_file, text.encode("utf-8"))


def resolve_node_id(settings: Settings, paths: Paths) -> str:
    """The configured node id, else the one kept in the state file, else a new one kept there."""
    if settings.node_id:
        return settings.node_id
    stored = read_state(paths).get("node_id")
    if isinstance(stored, str) and re.fullmatch(_NODE_ID_PATTERN, stored):
        return stored
    node_id = "node-" + secrets.token_hex(6)

    def put(state: dict[str, Any]) -> None:
        state["node_id"] = node_id

    update_state(paths, put)
    return node_id
