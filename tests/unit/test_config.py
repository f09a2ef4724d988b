"""Tests for hivemind_worker.config."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil
import pytest

from hivemind_worker.cli import _overrides, build_parser
from hivemind_worker.config import (
    GIB,
    SCHEMA_VERSION,
    ConfigError,
    Settings,
    SettingSpec,
    load_settings,
    resolve_node_id,
    save_settings,
    settings_table,
)
from hivemind_worker.paths import Paths, default_paths

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return default_paths(tmp_path / "home")


def write_file(paths: Paths, text: str) -> None:
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    paths.settings_file.write_text(text, encoding="utf-8")


def test_defaults(paths: Paths) -> None:
    settings = load_settings(paths, env={})
    assert settings.schema_version == SCHEMA_VERSION
    assert settings.node_id == ""
    assert settings.node_pool_address == "127.0.0.1:50051"
    assert settings.insecure is False
    assert settings.max_cpu_cores == 0.0
    assert settings.max_disk_gb == 10.0
    assert settings.task_timeout == 3600
    assert settings.max_concurrent_tasks == 1
    assert settings.docker_enabled is True
    assert settings.docker_network == "none"
    assert settings.log_level == "info"
    assert settings.drain_timeout == 60
    assert settings.work_dir == paths.work_dir
    assert settings.log_dir == paths.log_dir


def test_precedence_file_then_env_then_flag(paths: Paths) -> None:
    assert load_settings(paths, env={}).task_timeout == 3600
    write_file(paths, "task_timeout = 100\n")
    assert load_settings(paths, env={}).task_timeout == 100
    env = {"TASK_TIMEOUT": "200"}
    assert load_settings(paths, env=env).task_timeout == 200
    assert load_settings(paths, env=env, overrides={"task_timeout": "300"}).task_timeout == 300
    assert load_settings(paths, env=env, overrides={"task_timeout": 400}).task_timeout == 400
    # None means "flag not given"; an empty variable counts as unset.
    assert load_settings(paths, env=env, overrides={"task_timeout": None}).task_timeout == 200
    assert load_settings(paths, env={"TASK_TIMEOUT": ""}).task_timeout == 100


def test_only_the_winning_value_is_checked(paths: Paths) -> None:
    write_file(paths, "task_timeout = 0\n")
    assert load_settings(paths, env={}, overrides={"task_timeout": "5"}).task_timeout == 5


def test_bad_value_in_file(paths: Paths) -> None:
    write_file(paths, "max_concurrent_tasks = 65\n")
    with pytest.raises(ConfigError) as info:
        load_settings(paths, env={})
    assert str(info.value) == (
        f"Invalid setting max_concurrent_tasks = 65 (from {paths.settings_file}): "
        "expected a whole number from 1 to 64"
    )


def test_bad_value_in_env(paths: Paths) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(paths, env={"MAX_CPU_CORES": "abc"})
    assert str(info.value) == (
        "Invalid setting max_cpu_cores = 'abc' (from environment variable MAX_CPU_CORES): "
        f"expected a number from 0 to {os.cpu_count()}"
    )


def test_bad_value_from_flag(paths: Paths) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(paths, env={}, overrides={"max_disk_gb": "0"})
    assert str(info.value) == (
        "Invalid setting max_disk_gb = '0' (from command-line flag --max-disk-gb): "
        "expected a number greater than 0 and at most 100000"
    )


def test_errors_are_one_line(paths: Paths) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(paths, env={"MAX_MEMORY_GB": "1e9"})
    message = str(info.value)
    assert "\n" not in message
    assert "max_memory_gb" in message
    assert "MAX_MEMORY_GB" in message
    ram_gb = psutil.virtual_memory().total / GIB
    assert "expected a number from 0 to " in message
    assert float(message.rsplit(" ", 1)[1]) <= ram_gb


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        *[("true", True), ("YES", True), ("on", True), ("1", True)],
        *[("false", False), ("No", False), ("off", False), ("0", False)],
    ],
)
def test_bool_words_from_env(paths: Paths, word: str, expected: bool) -> None:
    assert load_settings(paths, env={"DOCKER_ENABLED": word}).docker_enabled is expected


def test_bool_in_toml_must_be_a_real_boolean(paths: Paths) -> None:
    write_file(paths, 'insecure = "yes"\n')
    with pytest.raises(ConfigError, match=r"insecure = 'yes' .*expected true or false"):
        load_settings(paths, env={})
    write_file(paths, "insecure = true\n")
    assert load_settings(paths, env={}).insecure is True


def test_bool_rejected_for_numbers(paths: Paths) -> None:
    write_file(paths, "task_timeout = true\n")
    with pytest.raises(ConfigError, match="task_timeout = True"):
        load_settings(paths, env={})


@pytest.mark.parametrize(
    "address", ["127.0.0.1:50051", "[::1]:50051", "pool.example.org:443", "my-pool:1"]
)
def test_good_addresses(paths: Paths, address: str) -> None:
    settings = load_settings(paths, env={"NODE_POOL_ADDRESS": address})
    assert settings.node_pool_address == address


@pytest.mark.parametrize(
    "address", ["localhost", "::1:50051", "host:0", "host:65536", "host: 80", ":80", "[]:80"]
)
def test_bad_addresses(paths: Paths, address: str) -> None:
    with pytest.raises(ConfigError, match=r"expected host:port with a port from 1 to 65535"):
        load_settings(paths, env={"NODE_POOL_ADDRESS": address})


@pytest.mark.parametrize("node_id", ["a" * 65, "bad id", "ünïcode"])
def test_bad_node_ids(paths: Paths, node_id: str) -> None:
    with pytest.raises(ConfigError, match="node_id"):
        load_settings(paths, env={"NODE_ID": node_id})


def test_account_length(paths: Paths) -> None:
    assert load_settings(paths, env={"HIVEMIND_ACCOUNT": "a" * 128}).account == "a" * 128
    with pytest.raises(ConfigError, match="at most 128 characters"):
        load_settings(paths, env={"HIVEMIND_ACCOUNT": "a" * 129})


def test_log_level_is_case_insensitive(paths: Paths) -> None:
    assert load_settings(paths, env={"LOG_LEVEL": "DEBUG"}).log_level == "debug"
    with pytest.raises(ConfigError, match="expected one of debug, info, warning, error"):
        load_settings(paths, env={"LOG_LEVEL": "verbose"})


def test_directories(paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "user"))
    settings = load_settings(paths, env={"WORK_DIR": "rel/work", "LOG_DIR": "~/logs"})
    assert settings.work_dir == tmp_path / "rel" / "work"
    assert settings.log_dir == tmp_path / "user" / "logs"
    assert load_settings(paths, env={}).log_dir == paths.log_dir


def test_a_file_with_the_retired_temp_dir_loads_with_a_warning(
    paths: Paths, caplog: pytest.LogCaptureFixture
) -> None:
    write_file(paths, 'schema_version = 1\ntemp_dir = "/somewhere/tmp"\ntask_timeout = 99\n')
    with caplog.at_level(logging.WARNING, logger="hivemind_worker.config"):
        settings = load_settings(paths, env={"TEMP_DIR": "/elsewhere"})
    assert settings.task_timeout == 99
    assert not hasattr(settings, "temp_dir")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        f"Ignoring setting temp_dir in {paths.settings_file}: nothing uses it any more"
    )
    # Saving drops it; the rest of the file is kept.
    save_settings(paths, settings)
    assert tomllib.loads(paths.settings_file.read_text(encoding="utf-8")) == {
        "schema_version": SCHEMA_VERSION,
        "task_timeout": 99,
    }


def test_unknown_key_in_file(paths: Paths) -> None:
    write_file(paths, "max_cpu_core = 2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(paths, env={})
    assert str(info.value) == (
        f"Unknown setting 'max_cpu_core' in {paths.settings_file}; did you mean 'max_cpu_cores'?"
    )


def test_malformed_toml(paths: Paths) -> None:
    write_file(paths, "task_timeout = 10\nmax_disk_gb 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(paths, env={})
    message = str(info.value)
    assert message.startswith(f"Cannot read settings file {paths.settings_file}: ")
    assert "line 2" in message
    assert "column" in message


def test_newer_schema_version_is_refused(paths: Paths) -> None:
    write_file(paths, f"schema_version = {SCHEMA_VERSION + 1}\nfuture_key = 1\n")
    with pytest.raises(ConfigError, match=r"schema_version .* newer HiveMind Worker"):
        load_settings(paths, env={})


def test_schema_version_cannot_be_overridden(paths: Paths) -> None:
    with pytest.raises(ValueError, match="schema_version"):
        load_settings(paths, env={}, overrides={"schema_version": 1})


def test_save_then_load_round_trip(paths: Paths, tmp_path: Path) -> None:
    settings = dataclasses.replace(
        load_settings(paths, env={}),
        node_id="node-a",
        max_memory_gb=1.5,
        docker_enabled=False,
        work_dir=tmp_path / "elsewhere",
    )
    save_settings(paths, settings)
    assert load_settings(paths, env={}) == settings

    document = tomllib.loads(paths.settings_file.read_text(encoding="utf-8"))
    assert document == {
        "schema_version": SCHEMA_VERSION,
        "node_id": "node-a",
        "max_memory_gb": 1.5,
        "docker_enabled": False,
        "work_dir": str(tmp_path / "elsewhere"),
    }
    assert [p.name for p in paths.config_dir.iterdir()] == ["settings.toml"]  # no temp files left


def test_save_defaults_writes_only_the_version(paths: Paths) -> None:
    save_settings(paths, load_settings(paths, env={}))
    assert paths.settings_file.read_text(encoding="utf-8") == f"schema_version = {SCHEMA_VERSION}\n"


def test_caps(paths: Paths) -> None:
    defaults = load_settings(paths, env={})
    assert defaults.cpu_cap() == os.cpu_count()
    assert defaults.memory_cap_bytes() == psutil.virtual_memory().total // 2
    assert defaults.disk_cap_bytes() == 10 * GIB
    capped = dataclasses.replace(defaults, max_cpu_cores=0.5, max_memory_gb=0.25)
    assert capped.cpu_cap() == 0.5
    assert capped.memory_cap_bytes() == GIB // 4


def test_resolve_node_id_is_generated_once_and_kept(paths: Paths) -> None:
    paths.data_dir.mkdir(parents=True)
    paths.state_file.write_text(json.dumps({"other": 1}), encoding="utf-8")
    settings = load_settings(paths, env={})
    node_id = resolve_node_id(settings, paths)
    assert node_id.startswith("node-")
    assert len(node_id) == len("node-") + 12
    assert resolve_node_id(settings, paths) == node_id
    state = json.loads(paths.state_file.read_text(encoding="utf-8"))
    assert state == {"node_id": node_id, "other": 1}


def test_resolve_node_id_prefers_the_setting(paths: Paths) -> None:
    settings = load_settings(paths, env={"NODE_ID": "my-node"})
    assert resolve_node_id(settings, paths) == "my-node"
    assert not paths.state_file.exists()


def test_settings_table_matches_settings() -> None:
    table = settings_table()
    assert [spec.key for spec in table] == [f.name for f in dataclasses.fields(Settings)]
    by_key = {spec.key: spec for spec in table}
    assert by_key["max_cpu_cores"].type_name == "float"
    assert by_key["work_dir"].type is Path
    assert by_key["schema_version"].env is None
    assert by_key["schema_version"].flag is None
    assert all(spec.help for spec in table)
    assert [s.key for s in table if s.gui] == [
        "node_pool_address",
        "account",
        "max_cpu_cores",
        "max_memory_gb",
        "max_disk_gb",
        "max_concurrent_tasks",
        "docker_enabled",
        "start_at_login",
        "start_on_launch",
        "close_to_tray",
        # the "Kinds of tasks" page
        "ml_scikit_learn",
        "ml_tensorflow",
        "ml_pytorch",
        "data_processing",
        # the "When to contribute" page
        "idle_only_minutes",
        "suspend_on_battery",
        "battery_below_percent",
        "other_cpu_percent",
        "other_cpu_suspend_seconds",
        "other_cpu_resume_seconds",
        "suspend_fullscreen",
        "schedule",
        "memory_low_percent",
        "cpu_time_percent",
        "give_back_minutes",
    ]


def test_the_original_environment_names_are_kept() -> None:
    env = {spec.key: spec.env for spec in settings_table()}
    assert env == env | {
        "node_id": "NODE_ID",
        "node_pool_address": "NODE_POOL_ADDRESS",
        "max_cpu_cores": "MAX_CPU_CORES",
        "max_memory_gb": "MAX_MEMORY_GB",
        "max_disk_gb": "MAX_DISK_GB",
        "task_timeout": "TASK_TIMEOUT",
        "max_concurrent_tasks": "MAX_CONCURRENT_TASKS",
        "heartbeat_interval": "HEARTBEAT_INTERVAL",
        "docker_enabled": "DOCKER_ENABLED",
        "docker_network": "DOCKER_NETWORK",
        "work_dir": "WORK_DIR",
        "log_dir": "LOG_DIR",
    }


@pytest.mark.parametrize(
    "spec", [spec for spec in settings_table() if spec.env], ids=lambda spec: spec.key
)
def test_each_environment_variable_reaches_its_setting(paths: Paths, spec: SettingSpec) -> None:
    odd = "odd\tvalue"
    try:
        settings = load_settings(paths, env={str(spec.env): odd})
    except ConfigError as exc:
        # A rule that can name the wrong part of the value (the schedule's) adds it after this.
        assert str(exc).startswith(
            f"Invalid setting {spec.key} = {odd!r} (from environment variable {spec.env}): "
            f"expected {spec.allowed()}"
        )
    else:  # settings that take any text
        assert getattr(settings, spec.key) == (Path(odd).absolute() if spec.type is Path else odd)


def readme_cells(spec: SettingSpec) -> list[str]:
    """The cells of the README table row the declaration implies."""
    return [
        f"`{spec.key}`",
        f"`{spec.env}`" if spec.env else "",
        f"`{spec.flag.name}`" if spec.flag else "",
        spec.default_text(),
        spec.help,
    ]


def test_readme_settings_table_matches_the_declarations() -> None:
    section = README.read_text(encoding="utf-8").split("\n## Configuration\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `")
    ]
    expected = [readme_cells(spec) for spec in settings_table()]
    table = "\n".join("| " + " | ".join(cells) + " |" for cells in expected)
    assert rows == expected, (
        "README's settings table disagrees with the declarations in config.py; "
        f"its rows should read:\n{table.replace('|  |', '| |').replace('|  |', '| |')}"
    )


def test_every_declared_flag_is_in_run_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hivemind_worker", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    group = done.stdout.split("settings (override the settings file and environment):", 1)[1]
    shown = re.findall(r"^  (--[a-z-]+)", group, flags=re.MULTILINE)
    declared = [spec.flag.name for spec in settings_table() if spec.flag]
    assert shown == declared


@pytest.mark.parametrize(
    "spec", [spec for spec in settings_table() if spec.flag], ids=lambda spec: spec.key
)
def test_each_flag_overrides_its_setting(spec: SettingSpec) -> None:
    assert spec.flag is not None
    if spec.flag.const is None:
        args = build_parser().parse_args(["run", spec.flag.name, "given"])
        assert _overrides(args) == {spec.key: "given"}
    else:
        args = build_parser().parse_args(["run", spec.flag.name])
        assert _overrides(args) == {spec.key: spec.flag.const}
    assert _overrides(build_parser().parse_args(["run"])) == {}


def test_flags_reach_the_loaded_settings(paths: Paths) -> None:
    argv = ["run", "--max-cpu-cores", "1", "--no-docker", "--insecure", "--node-pool", "h:1"]
    settings = load_settings(paths, env={}, overrides=_overrides(build_parser().parse_args(argv)))
    assert settings.max_cpu_cores == 1.0
    assert settings.docker_enabled is False
    assert settings.insecure is True
    assert settings.node_pool_address == "h:1"


def test_when_to_contribute_defaults_a_person_at_home_accepts(paths: Paths) -> None:
    settings = load_settings(paths, env={})
    assert settings.idle_only_minutes == 0
    assert settings.suspend_on_battery is True
    assert settings.other_cpu_percent == 25
    assert settings.suspend_fullscreen is True
    assert settings.schedule == ""
    assert settings.cpu_time_percent == 100
    assert settings.give_back_minutes == 30


def test_schedule_from_the_environment(paths: Paths) -> None:
    env = {"HIVEMIND_SCHEDULE": " mon-fri 18:00-08:00; sat-sun 00:00-24:00 "}
    settings = load_settings(paths, env=env)
    assert settings.schedule == "mon-fri 18:00-08:00; sat-sun 00:00-24:00"


def test_bad_schedule_names_the_wrong_part(paths: Paths) -> None:
    write_file(paths, 'schedule = "mon-fri 18:00-08:00; sat-sunday 09:00-25:00"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(paths, env={})
    message = str(caught.value)
    assert message.startswith("Invalid setting schedule = ")
    assert str(paths.settings_file) in message
    assert "bad time '25:00' in 'sat-sunday 09:00-25:00'" in message
    assert "\n" not in message


def test_when_to_contribute_bounds(paths: Paths) -> None:
    with pytest.raises(ConfigError, match=r"HIVEMIND_CPU_TIME_PERCENT.*from 1 to 100"):
        load_settings(paths, env={"HIVEMIND_CPU_TIME_PERCENT": "0"})
    with pytest.raises(ConfigError, match="other_cpu_percent"):
        load_settings(paths, env={"HIVEMIND_OTHER_CPU_PERCENT": "150"})
