"""Typed worker settings, declared once: defaults < TOML file < environment < command-line flags.

Each setting is one field of `Settings` whose default is a `setting(...)` call. The field's
name is its key in settings.toml and its annotation its type; the call holds the default, the
environment variable, the command-line flag, what values are allowed, the help text and
whether the desktop app's settings dialog shows it. Everything else comes from that one
declaration: the environment mapping and the checks in `load_settings`, the flags cli.py
builds from `settings_table()`, and the tests that hold README's configuration table and
`hivemind-worker run --help` to the declarations.

The module runs past ~600 lines because it is mostly that list of declarations, one per
setting (rules live in setting_rules.py): split, the list would no longer be the one place.

To add a setting, add one field, in the place its README row should have:

    max_gpus: int = setting(
        0,
        env="MAX_GPUS",                        # None: only in the settings file
        flag=Flag("--max-gpus", metavar="N"),  # None: no command-line flag
        rule=Range(0, 16, integer=True),       # None: any value of the type
        help="GPUs tasks may use; 0 means none",
    )

then copy the row the failing README test prints into README's table, and read the value where
it is used (`settings.max_gpus`). Settings the settings dialog edits say `gui=True`. The rules
(Range, Pattern, Choice, ...) live in setting_rules.py; a new kind goes there. A new key
with a default keeps every existing file valid, so SCHEMA_VERSION stays; raise it only when an
existing key changes meaning. A key that goes away moves to `_RETIRED`, so files that still
have it load with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
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

from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.paths import Paths
from hivemind_worker.setting_rules import (
    Address,
    Choice,
    MaxLength,
    OptionalFile,
    Pattern,
    Range,
    Rule,
    RuleError,
    WeeklySchedule,
    number_text,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
GIB = 1024**3
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(HiveMindError):
    """A setting or settings file the worker cannot use; str() is one line meant for the person."""

    kind = ErrorKind.BAD_SETTING
    title = "Setting not valid"


def _cpu_count() -> int:
    return os.cpu_count() or 1


def _total_memory() -> int:
    return int(psutil.virtual_memory().total)


_NODE_ID_PATTERN = r"[A-Za-z0-9._-]{1,64}"

_TYPE_TEXT: dict[type, str] = {
    bool: "true or false (also yes/no, on/off, 1/0)",
    int: "a whole number",
    float: "a number",
    str: "text",
    Path: "a folder path",
}
_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})


# ---------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Flag:
    """A setting's command-line flag.

    A flag with a `const` is a switch that sets the setting to that value (`--no-docker`);
    one without takes a value, shown as `metavar`. `help` is for switches, whose wording
    differs from the setting's; a value flag's help is the setting's own.
    """

    name: str
    metavar: str | None = None
    const: object = None
    help: str = ""


@dataclass(frozen=True)
class SettingSpec:
    """One setting as declared: `env` None means file only, `flag` None means no flag."""

    key: str
    type: type
    default: object
    help: str
    env: str | None = None
    flag: Flag | None = None
    rule: Rule | None = None
    gui: bool = False
    # README's default column when the value alone does not say it (an empty text or folder).
    shown_default: str = ""

    @property
    def type_name(self) -> str:
        return self.type.__name__

    def allowed(self) -> str:
        return self.rule.allowed() if self.rule else _TYPE_TEXT[self.type]

    def default_text(self) -> str:
        """The default as README shows it: the file's literal, or what an empty one means."""
        if self.shown_default:
            return self.shown_default
        value = self.default
        if isinstance(value, bool):
            return "`true`" if value else "`false`"
        if isinstance(value, int | float):
            return f"`{number_text(value)}`"
        return f"`{value}`"


_DECLARATION = "hivemind_worker.config.setting"


def setting(
    default: object,
    *,
    help: str,
    env: str | None = None,
    flag: Flag | None = None,
    rule: Rule | None = None,
    gui: bool = False,
    shown_default: str = "",
) -> Any:
    """Declare one setting, as the default of a `Settings` field (see the module docstring).

    A folder setting's default is "", meaning the folder of the same name in `Paths`.
    """
    spec = SettingSpec("", object, default, help, env, flag, rule, gui, shown_default)
    # No dataclass default: Settings come only from load_settings, which fills every field.
    return dataclasses.field(metadata={_DECLARATION: spec})


@dataclass(frozen=True)
class Settings:
    """Validated settings; the folder fields are always concrete paths."""

    schema_version: int = setting(
        SCHEMA_VERSION,
        help="the settings file's format, written by the app",
        rule=Range(
            1,
            SCHEMA_VERSION,
            integer=True,
            note="a higher one means a newer HiveMind Worker wrote the file",
        ),
    )
    node_id: str = setting(
        "",
        env="NODE_ID",
        flag=Flag("--node-id", metavar="ID"),
        rule=Pattern(
            f"|{_NODE_ID_PATTERN}",
            "1 to 64 characters from A-Z, a-z, 0-9, '.', '_', '-' (or empty to generate one)",
        ),
        help="this machine's id at the pool; empty means generate one once and keep it",
        shown_default="generated once",
    )
    node_pool_address: str = setting(
        "127.0.0.1:50051",
        env="NODE_POOL_ADDRESS",
        flag=Flag("--node-pool", metavar="HOST:PORT"),
        rule=Address(),
        help="the pool to work for, as host:port",
        gui=True,
    )
    account: str = setting(
        "",
        env="HIVEMIND_ACCOUNT",
        flag=Flag("--account", metavar="NAME"),
        rule=MaxLength(128),
        help="your account at the pool; empty means the last one you logged in with",
        gui=True,
        shown_default="last login",
    )
    insecure: bool = setting(
        False,
        env="HIVEMIND_INSECURE",
        flag=Flag(
            "--insecure", const=True, help="allow a plaintext connection to a non-loopback pool"
        ),
        help="allow an unencrypted connection to a pool that is not on this machine",
    )
    ca_file: str = setting(
        "",
        env="HIVEMIND_CA_FILE",
        rule=OptionalFile(),
        help="PEM CA bundle to trust for the pool's TLS certificate; when set, TLS is used "
        "on this machine too",
        shown_default="system CAs",
    )
    max_cpu_cores: float = setting(
        0.0,
        env="MAX_CPU_CORES",
        flag=Flag("--max-cpu-cores", metavar="N"),
        rule=Range(0, _cpu_count),
        help="CPU cores all tasks together may use; 0 means all of them",
        gui=True,
    )
    max_memory_gb: float = setting(
        0.0,
        env="MAX_MEMORY_GB",
        flag=Flag("--max-memory-gb", metavar="GB"),
        rule=Range(0, lambda: _total_memory() / GIB),
        help="memory in GiB all tasks together may use; 0 means half of this machine's RAM",
        gui=True,
    )
    max_disk_gb: float = setting(
        10.0,
        env="MAX_DISK_GB",
        flag=Flag("--max-disk-gb", metavar="GB"),
        rule=Range(0, 100_000, low_open=True),
        help="disk space in GiB all task workspaces together may use",
        gui=True,
    )
    task_timeout: int = setting(
        3600,
        env="TASK_TIMEOUT",
        flag=Flag("--task-timeout", metavar="SECONDS"),
        rule=Range(1, 7 * 86400, integer=True),
        help="longest task this worker accepts, in seconds",
    )
    max_concurrent_tasks: int = setting(
        1,
        env="MAX_CONCURRENT_TASKS",
        flag=Flag("--max-concurrent-tasks", metavar="N"),
        rule=Range(1, 64, integer=True),
        help="most tasks to run at once",
        gui=True,
    )
    heartbeat_interval: int = setting(
        30,
        env="HEARTBEAT_INTERVAL",
        rule=Range(1, 3600, integer=True),
        help="seconds between heartbeats when the pool does not ask for an interval",
    )
    docker_enabled: bool = setting(
        True,
        env="DOCKER_ENABLED",
        flag=Flag(
            "--no-docker",
            const=False,
            help="run tasks in the process sandbox even when Docker is present",
        ),
        help="run tasks in Docker containers when Docker is there",
        gui=True,
    )
    docker_network: str = setting(
        "none",
        env="DOCKER_NETWORK",
        help="the one Docker network, besides none, a task may ask for",
    )
    docker_python_image: str = setting(
        "python:3.12-slim",
        env="DOCKER_PYTHON_IMAGE",
        rule=Pattern(
            r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}", "an image reference like python:3.12-slim"
        ),
        help="Docker image that runs python tasks",
    )
    docker_pull_policy: str = setting(
        "if-not-present",
        env="DOCKER_PULL_POLICY",
        rule=Choice(("if-not-present", "always", "never")),
        help="when to pull task images: if-not-present, always or never",
    )
    docker_image_allowlist: str = setting(
        "",
        env="DOCKER_IMAGE_ALLOWLIST",
        rule=Pattern(
            r"[A-Za-z0-9._/:@, -]{0,4000}",
            "comma-separated registry prefixes or sha256: digests",
        ),
        help="comma-separated registry prefixes (docker.io/library/) or digests (sha256:...) "
        "task images must match",
        shown_default="empty = any image",
    )
    work_dir: Path = setting(
        "",
        env="WORK_DIR",
        flag=Flag("--work-dir", metavar="DIR"),
        help="folder for task workspaces, where each task also gets its scratch space",
        shown_default="data folder `/work`",
    )
    log_dir: Path = setting(
        "",
        env="LOG_DIR",
        help="folder for the JSON-lines logs, rotated at 5 MiB",
        shown_default="platform log folder",
    )
    log_level: str = setting(
        "info",
        env="LOG_LEVEL",
        flag=Flag("--log-level", metavar="LEVEL"),
        rule=Choice(LOG_LEVELS),
        help="how much to log: debug, info, warning or error",
    )
    drain_timeout: int = setting(
        60,
        env="HIVEMIND_DRAIN_TIMEOUT",
        rule=Range(0, 86400, integer=True),
        help="seconds to let running tasks finish when stopping",
    )
    # Desktop app only: the settings dialog writes them, the headless worker ignores them.
    start_at_login: bool = setting(False, help="desktop app: start when you log in", gui=True)
    start_on_launch: bool = setting(
        False, help="desktop app: start contributing as soon as it opens", gui=True
    )
    close_to_tray: bool = setting(
        True, help="desktop app: closing the window keeps it running in the tray", gui=True
    )
    # The ml and data task kinds: each framework's environment is downloaded on first use, so
    # the heavy ones are opt-in; the settings dialog shows each download's size (measured per
    # platform in engine/runners/requirements/download-sizes.toml).
    ml_scikit_learn: bool = setting(
        True,
        help="run scikit-learn training tasks (its environment is downloaded on first use)",
        env="HIVEMIND_ML_SCIKIT_LEARN",
        gui=True,
    )
    ml_tensorflow: bool = setting(
        False,
        help="run TensorFlow training tasks (tensorflow-cpu; a large download on first use)",
        env="HIVEMIND_ML_TENSORFLOW",
        gui=True,
    )
    ml_pytorch: bool = setting(
        False,
        help="run PyTorch training tasks (CPU build; a large download on first use)",
        env="HIVEMIND_ML_PYTORCH",
        gui=True,
    )
    data_processing: bool = setting(
        True,
        help="run data-processing tasks: CSV, image and text analysis (downloaded on first use)",
        env="HIVEMIND_DATA_PROCESSING",
        gui=True,
    )
    runner_find_links: str = setting(
        "",
        help="a folder or page of wheels searched besides PyPI when task environments are built "
        "(PyTorch's CPU wheels are not on PyPI)",
        env="HIVEMIND_RUNNER_FIND_LINKS",
        shown_default="empty",
    )
    # When to contribute (engine/policy.py; README "When it runs"); 0 turns a numeric rule off.
    idle_only_minutes: float = setting(
        0.0,
        env="HIVEMIND_IDLE_ONLY_MINUTES",
        rule=Range(0, 24 * 60),
        help="contribute only after this many minutes without keyboard or mouse input",
        shown_default="`0` = also while in use",
        gui=True,
    )
    suspend_on_battery: bool = setting(
        True,
        env="HIVEMIND_SUSPEND_ON_BATTERY",
        help="pause tasks on battery, resume when plugged in",
        gui=True,
    )
    battery_below_percent: int = setting(
        0,
        env="HIVEMIND_BATTERY_BELOW_PERCENT",
        rule=Range(0, 100, integer=True),
        help="with suspend_on_battery: only once the charge is below this %",
        shown_default="`0` = any charge",
        gui=True,
    )
    other_cpu_percent: int = setting(
        25,
        env="HIVEMIND_OTHER_CPU_PERCENT",
        rule=Range(0, 100, integer=True),
        help="pause while other programs use more than this % of the CPU; 0 means never",
        gui=True,
    )
    other_cpu_suspend_seconds: int = setting(
        10,
        env="HIVEMIND_OTHER_CPU_SUSPEND_SECONDS",
        rule=Range(1, 3600, integer=True),
        help="seconds other programs must stay that busy before tasks pause",
        gui=True,
    )
    other_cpu_resume_seconds: int = setting(
        30,
        env="HIVEMIND_OTHER_CPU_RESUME_SECONDS",
        rule=Range(1, 3600, integer=True),
        help="seconds they must then stay quiet before tasks resume",
        gui=True,
    )
    suspend_fullscreen: bool = setting(
        True,
        env="HIVEMIND_SUSPEND_FULLSCREEN",
        help="pause while a full-screen app or game has the focus",
        gui=True,
    )
    schedule: str = setting(
        "",
        env="HIVEMIND_SCHEDULE",
        rule=WeeklySchedule(),
        help="weekly windows to contribute in, e.g. `mon-fri 18:00-08:00; sat-sun 00:00-24:00`",
        shown_default="empty = any time",
        gui=True,
    )
    memory_low_percent: int = setting(
        10,
        env="HIVEMIND_MEMORY_LOW_PERCENT",
        rule=Range(0, 90, integer=True),
        help="pause while less than this % of memory is available; 0 means never",
        gui=True,
    )
    cpu_time_percent: int = setting(
        100,
        env="HIVEMIND_CPU_TIME_PERCENT",
        rule=Range(1, 100, integer=True),
        help="use at most this % of CPU time, on top of max_cpu_cores (running tasks too)",
        gui=True,
    )
    give_back_minutes: float = setting(
        30.0,
        env="HIVEMIND_GIVE_BACK_MINUTES",
        rule=Range(0, 7 * 24 * 60),
        help="after tasks have been paused this long, give them back to the pool; 0 means "
        "keep them",
        gui=True,
    )

    def cpu_cap(self) -> float:
        return self.max_cpu_cores or float(_cpu_count())

    def memory_cap_bytes(self) -> int:
        if self.max_memory_gb:
            return int(self.max_memory_gb * GIB)
        return _total_memory() // 2

    def disk_cap_bytes(self) -> int:
        return int(self.max_disk_gb * GIB)


# Keys older versions wrote that nothing reads any more: a file holding one still loads.
_RETIRED: dict[str, str] = {
    "temp_dir": "each task's scratch space is the tmp folder in its workspace under work_dir",
}


def _declarations() -> tuple[SettingSpec, ...]:
    """Each Settings field's declaration with its key and type; a mistake in one fails import."""
    types = get_type_hints(Settings)
    specs = []
    for field in dataclasses.fields(Settings):
        declared = field.metadata.get(_DECLARATION)
        if not isinstance(declared, SettingSpec):
            raise RuntimeError(f"Settings.{field.name} is not declared with setting(...)")
        specs.append(dataclasses.replace(declared, key=field.name, type=types[field.name]))
    for what, names in (
        ("environment variable", [s.env for s in specs if s.env]),
        ("flag", [s.flag.name for s in specs if s.flag]),
    ):
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise RuntimeError(f"two settings declare the {what} {twice[0]}")
    for spec in specs:
        if spec.flag and spec.env is None:
            raise RuntimeError(f"{spec.key} is file only but declares the flag {spec.flag.name}")
        if spec.flag and spec.flag.const is not None and spec.type is not bool:
            raise RuntimeError(f"{spec.key}: only a true/false setting can have a switch flag")
        if spec.default == "" and not spec.shown_default:
            raise RuntimeError(f"{spec.key}: say what its empty default means (shown_default)")
        if spec.key in _RETIRED:
            raise RuntimeError(f"{spec.key} is declared and retired")
    return tuple(specs)


_SPECS: tuple[SettingSpec, ...] = _declarations()
_BY_KEY: dict[str, SettingSpec] = {spec.key: spec for spec in _SPECS}


def settings_table() -> list[SettingSpec]:
    """Every setting, in declaration (and README) order."""
    return list(_SPECS)


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
    except ValueError as exc:
        # A rule that can tell which part of the value is wrong says so after what it allows.
        detail = f" ({exc})" if isinstance(exc, RuleError) else ""
        raise ConfigError(
            f"Invalid setting {spec.key} = {raw!r} ({source}): expected {spec.allowed()}{detail}"
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
    for key in list(document):
        if key in _RETIRED:
            log.warning(
                "Ignoring setting %s in %s: nothing uses it any more (%s); you can delete it",
                key,
                path,
                _RETIRED[key],
            )
            del document[key]
        elif key not in _BY_KEY:
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

    `overrides` come from command-line flags (or a test or benchmark), keyed by setting key;
    None values are ignored, and settings that live only in the file cannot be overridden.
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
            via = f"command-line flag {spec.flag.name}" if spec.flag else "an override"
            raw, source = overrides[spec.key], f"from {via}"
            parse_text = True
        values[spec.key] = _checked(spec, raw, source, parse_text, paths)
    return Settings(**values)


def save_settings(paths: Paths, settings: Settings) -> None:
    """Write the settings that differ from their defaults, plus schema_version, atomically."""
    document: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    for spec in _SPECS:
        if spec.key == "schema_version":
            continue
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
