"""Docker executor helpers that need no engine: image allowlist, pull policy, container
config, courtesy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import docker.errors
import pytest
import requests

from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.engine.executors import docker_host, follow, images, leftovers
from hivemind_worker.engine.executors.base import ExecutorError
from hivemind_worker.tasks import MiB, Resources, TaskKind, TaskSpec

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("image", "allowlist", "allowed"),
    [
        ("python:3.12", (), True),
        ("python:3.12", ("docker.io/library/",), True),
        ("python", ("docker.io/library/python",), True),
        ("pythonista:1", ("docker.io/library/python",), False),
        ("ghcr.io/org/tool:1", ("docker.io/library/",), False),
        ("ghcr.io/org/tool:1", ("ghcr.io/org",), True),
        ("ghcr.io/orgx/tool:1", ("ghcr.io/org",), False),
        ("ghcr.io/orgx/tool:1", ("ghcr.io/org/",), False),
        (f"ghcr.io/any/thing@{DIGEST}", (DIGEST,), True),
        ("ghcr.io/any/thing:latest", (DIGEST,), False),
        ("localhost:5000/tool", ("localhost:5000/",), True),
        ("user/tool", ("docker.io/user/",), True),
    ],
)
def test_image_allowlist(image: str, allowlist: tuple[str, ...], allowed: bool) -> None:
    assert images.image_allowed(image, allowlist) is allowed


def test_parse_allowlist_and_requirements_tag() -> None:
    assert images.parse_allowlist(" docker.io/library/ , ,ghcr.io/x/") == (
        "docker.io/library/",
        "ghcr.io/x/",
    )
    tag = images.requirements_tag("python:3.12-slim", ["numpy==2.0"])
    assert tag.startswith(images.REQUIREMENTS_REPOSITORY + ":")
    assert tag == images.requirements_tag("python:3.12-slim", ["numpy==2.0"])
    assert tag != images.requirements_tag("python:3.13-slim", ["numpy==2.0"])
    assert tag != images.requirements_tag("python:3.12-slim", ["numpy==2.1"])


def test_container_config_never_widens_the_lockdown(tmp_path: Path) -> None:
    executor = dockerx.DockerExecutor(
        None,  # type: ignore[arg-type] - building the config needs no engine
        tmp_path,
        "node-a",
        network="bridge",
    )
    task = TaskSpec(
        task_id="t1",
        lease_id="l1",
        kind=TaskKind.CONTAINER,
        image="busybox",
        argv=("sh", "-c", "true"),
        env={"HIVEMIND_TASK_ID": "spoofed", "FOO": "bar"},
        resources=Resources(1.5, 256 * MiB, 1024 * MiB),
        timeout_seconds=10,
        network="none",
    )
    config = executor.container_config(task, tmp_path / "ws")
    assert config["network_mode"] == "none"  # allowed, but not asked for
    assert config["environment"]["HIVEMIND_TASK_ID"] == "t1"
    assert config["environment"]["FOO"] == "bar"
    assert config["nano_cpus"] == 1_500_000_000
    assert config["mem_limit"] == config["memswap_limit"] == 256 * MiB
    assert config["tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={128 * MiB}"}
    assert config["privileged"] is False
    assert [m["Target"] for m in config["mounts"]] == ["/workspace"]
    assert "volumes" not in config and "devices" not in config
    bridged = executor.container_config(
        TaskSpec(**{**task.__dict__, "network": "bridge"}), tmp_path / "ws"
    )
    assert bridged["network_mode"] == "bridge"


def test_courtesy_cgroup_parent_off_linux_and_unknown_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(docker_host.sys, "platform", "win32")
    parent, why = dockerx.courtesy_cgroup_parent("cgroupfs", "1")
    assert parent == "" and "Docker Desktop" in why
    monkeypatch.setattr(docker_host.sys, "platform", "linux")
    parent, why = dockerx.courtesy_cgroup_parent("", "2")
    assert parent == "" and "unknown" in why


class _FakeImages:
    def __init__(self, present: set[str]) -> None:
        self.present = present

    def get(self, ref: str) -> object:
        if ref not in self.present:
            raise docker.errors.ImageNotFound(ref)
        return SimpleNamespace(id=f"sha256:{len(ref)}")


class _FakeAPI:
    def __init__(self, events: list[dict[str, object]]) -> None:
        self.events = events
        self.pulls: list[tuple[str, str]] = []

    def pull(self, repository: str, tag: str, stream: bool, decode: bool) -> Iterator[object]:
        self.pulls.append((repository, tag))
        yield from self.events


class _FakeClient:
    """Just the parts of docker.DockerClient that the pull policy uses."""

    def __init__(self, present: set[str], events: list[dict[str, object]]) -> None:
        self.images = _FakeImages(present)
        self.api = _FakeAPI(events)


def _pulling(
    tmp_path: Path, policy: str, present: set[str], events: list[dict[str, object]]
) -> tuple[dockerx.DockerExecutor, _FakeClient]:
    client = _FakeClient(present, events)
    executor = dockerx.DockerExecutor(
        client,  # type: ignore[arg-type]
        tmp_path,
        "n",
        pull_policy=policy,
    )
    return executor, client


LAYERS = [
    {"status": "Pulling fs layer", "id": "a"},
    {"status": "Downloading", "id": "a", "progressDetail": {"current": 50, "total": 100}},
    {"status": "Downloading", "id": "b", "progressDetail": {"current": 10, "total": 300}},
    {"status": "Download complete", "id": "a"},
    {"status": "Status: Downloaded newer image for x:1"},
]


def test_pull_policy_and_progress(tmp_path: Path) -> None:
    executor, client = _pulling(tmp_path, "if-not-present", {"python:3.12"}, LAYERS)
    seen: list[tuple[str, int, int]] = []
    executor.on_pull = lambda image, done, total: seen.append((image, done, total))
    executor.images.ensure("python:3.12")
    assert client.api.pulls == []  # present: not pulled
    executor.images.ensure("ghcr.io/org/tool")
    assert client.api.pulls == [("ghcr.io/org/tool", "latest")]  # never every tag
    assert seen[0] == ("ghcr.io/org/tool", 0, 0)  # the first report comes at once
    assert seen[-1] == ("ghcr.io/org/tool", 400, 400)  # and the last when it is done

    always, client = _pulling(tmp_path, "always", {"python:3.12"}, [])
    always.images.ensure("python:3.12")
    assert client.api.pulls == [("python", "3.12")]


def test_pull_failures_carry_the_registry_message(tmp_path: Path) -> None:
    executor, _ = _pulling(tmp_path, "never", set(), [])
    with pytest.raises(ExecutorError, match="not on this machine and the pull policy is 'never'"):
        executor.images.ensure("python:3.12")
    denied = [{"error": "pull access denied for x, repository does not exist"}]
    executor, _ = _pulling(tmp_path, "if-not-present", set(), denied)
    with pytest.raises(ExecutorError, match="cannot pull image x:1: pull access denied"):
        executor.images.ensure("x:1")


async def test_preload_fetches_named_images_once_within_the_allowlist(tmp_path: Path) -> None:
    executor, client = _pulling(tmp_path, "if-not-present", {"python:3.12"}, LAYERS)
    executor.images._allowlist = ("ghcr.io/org/",)
    await executor.preload(["ghcr.io/org/tool:1", "ghcr.io/org/tool:1", "evil.example/miner:1"])
    await executor.preload(["ghcr.io/org/tool:1"])
    assert client.api.pulls == [("ghcr.io/org/tool", "1")]  # once; the stranger never


async def test_preload_failures_are_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    executor, _ = _pulling(tmp_path, "never", set(), [])
    await executor.preload(["python:3.12"])
    assert "could not preload python:3.12" in caplog.text


def test_network_totals_come_from_the_stats_api(tmp_path: Path) -> None:
    import threading
    from types import SimpleNamespace

    stats = {
        "cpu_stats": {"cpu_usage": {"total_usage": 2_000_000_000}},
        "memory_stats": {"usage": 64 * MiB, "stats": {"cache": 0}},
        "networks": {
            "eth0": {"rx_bytes": 1000, "tx_bytes": 200},
            "eth1": {"rx_bytes": 24, "tx_bytes": 6},
        },
    }
    run = SimpleNamespace(
        task=SimpleNamespace(task_id="t"),
        stop=threading.Event(),
        cpu_seconds=0.0,
        max_memory=0,
        usage=None,
    )

    def one_sample(**_: object) -> dict[str, object]:
        run.stop.set()  # one sample, then the loop ends
        return stats

    run.container = SimpleNamespace(stats=one_sample)
    follow.sample_stats(run)  # type: ignore[arg-type]
    assert run.usage.network_rx_bytes == 1024 and run.usage.network_tx_bytes == 206
    assert run.usage.memory_bytes == 64 * MiB and run.usage.cpu_seconds == 2.0


def _api_error(status: int, explanation: str) -> docker.errors.APIError:
    """The error docker-py raises for an HTTP answer of the daemon (a stand-in response: the
    race that makes the real one cannot be forced here)."""
    response = requests.Response()
    response.status_code = status
    message = f"{status} Client Error"
    return docker.errors.APIError(message, response=response, explanation=explanation)


class StandInContainer:
    """A container whose removal the daemon answers with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.short_id, self.labels, self.status = "c0ffee", {}, "exited"
        self.attrs: dict[str, object] = {"Mounts": []}

    def remove(self, *, force: bool, v: bool) -> None:
        assert force and v
        raise self.error


def test_a_removal_already_under_way_counts_as_removed_stand_in_daemon_answer(
    tmp_path: Path,
) -> None:
    """A worker killed while removing a container leaves the daemon finishing the job; the next
    start's sweep meets 409 "removal ... already in progress" and must count it removed, not
    give up Docker for the process sandbox ("Docker is not usable (409 ...)")."""
    under_way = _api_error(409, "removal of container c0ffee is already in progress")
    client = SimpleNamespace(
        containers=SimpleNamespace(list=lambda **_: [StandInContainer(under_way)])
    )
    assert leftovers.sweep(client, tmp_path, "node") == ([], 1)  # type: ignore[arg-type]
    images.force_remove(StandInContainer(docker.errors.NotFound("gone")))  # type: ignore[arg-type]
    for other in (
        _api_error(409, "You cannot remove a running container c0ffee"),
        _api_error(500, "driver failed to remove root filesystem"),
    ):
        with pytest.raises(docker.errors.APIError):
            images.force_remove(StandInContainer(other))  # type: ignore[arg-type]
