"""Task specs from the wire: what is refused, with which reason, and the defaults applied."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemind_worker.engine.delivery import backoff_delay
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import (
    DEFAULT_MEMORY_BYTES,
    MAX_SOURCE_BYTES,
    Resources,
    TaskSpec,
    TaskSpecError,
)


def python_spec(**fields: object) -> pb.TaskSpec:
    base: dict[str, object] = {"task_id": "t1", "kind": pb.TASK_KIND_PYTHON, "source": "print(1)"}
    base.update(fields)
    return pb.TaskSpec(**base)  # type: ignore[arg-type]


def test_defaults_are_applied() -> None:
    spec = TaskSpec.from_proto(python_spec())
    assert spec.resources.memory_bytes == DEFAULT_MEMORY_BYTES
    assert spec.network == "none"
    assert str(spec.result_path) == "results"
    assert spec.to_proto().resources.memory_bytes == DEFAULT_MEMORY_BYTES


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../escape.txt", "leaves the workspace"),
        ("a/../../escape.txt", "leaves the workspace"),
        ("/etc/passwd", "absolute path"),
        ("C:/Windows/win.ini", "absolute path"),
        ("C:evil", "absolute path"),
        ("dir\\file", "backslashes"),
        ("a//b", "empty"),
        ("./a", "'.'"),
        ("bad\x00name", "control characters"),
        ("", "empty file name"),
    ],
)
def test_escaping_input_names_are_refused(name: str, reason: str) -> None:
    with pytest.raises(TaskSpecError) as err:
        TaskSpec.from_proto(python_spec(input_files=[pb.InputFile(path=name, content=b"x")]))
    assert err.value.field == "input_files"
    assert reason in str(err.value)


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"resources": pb.Resources(memory_bytes=-1)}, "resources", "negative"),
        ({"resources": pb.Resources(cpus=-0.5)}, "resources", "negative"),
        ({"resources": pb.Resources(cpus=float("nan"))}, "resources", "cpus"),
        ({"kind": pb.TASK_KIND_CONTAINER, "image": "alpine:3"}, "argv", "argv is empty"),
        ({"kind": pb.TASK_KIND_CONTAINER, "argv": ["true"]}, "image", "needs an image"),
        (
            {"kind": pb.TASK_KIND_CONTAINER, "image": "Not An Image", "argv": ["x"]},
            "image",
            "not a valid image",
        ),
        ({"source": "x" * (MAX_SOURCE_BYTES + 1)}, "source", "larger than"),
        ({"source": "  "}, "source", "needs source"),
        ({"kind": pb.TASK_KIND_UNSPECIFIED}, "kind", "container"),
        ({"task_id": "../../x"}, "task_id", "must be"),
        ({"env": {"1BAD": "x"}}, "env", "not a valid variable name"),
        ({"network": "host"}, "network", "must be one of"),
        ({"timeout_seconds": 10**9}, "timeout_seconds", "at most"),
        ({"argv": ["x"] * 1000}, "argv", "more than"),
        ({"result_path": "../out"}, "result_path", "leaves"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(
    fields: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(TaskSpecError) as err:
        TaskSpec.from_proto(python_spec(**fields))
    assert err.value.field == field
    assert reason in str(err.value)


def test_a_lease_is_required_when_the_worker_receives_a_task() -> None:
    with pytest.raises(TaskSpecError, match="lease_id: is empty"):
        TaskSpec.from_proto(python_spec(), require_lease=True)
    assert TaskSpec.from_proto(python_spec(lease_id="L1"), require_lease=True).lease_id == "L1"


def test_resources_arithmetic_and_fit() -> None:
    caps = Resources(cpus=2, memory_bytes=1 << 30, disk_bytes=1 << 30)
    task = Resources(cpus=0.1, memory_bytes=512 << 20, disk_bytes=1)
    used = task + task + task
    assert used.fits_in(caps) is False  # 1.5 GiB of memory
    assert (task + task).fits_in(caps)
    assert (caps - used).clamp_at_zero().memory_bytes == 0


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(max_size=300),
    argv=st.lists(st.text(max_size=50), max_size=5),
    env=st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=3),
    cpus=st.floats(allow_nan=True, allow_infinity=True),
    memory=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    kind=st.integers(min_value=0, max_value=5),
)
def test_random_specs_never_crash_validation(
    name: str, argv: list[str], env: dict[str, str], cpus: float, memory: int, kind: int
) -> None:
    msg = python_spec(
        input_files=[pb.InputFile(path=name, content=b"")],
        argv=argv,
        env=env,
        resources=pb.Resources(cpus=cpus, memory_bytes=memory),
        kind=kind,
    )
    try:
        spec = TaskSpec.from_proto(msg)
    except TaskSpecError as exc:
        assert exc.field and exc.reason  # always a readable reason
    else:
        assert not str(spec.input_files[0].path).startswith("/")
        assert ".." not in spec.input_files[0].path.parts


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    delays = [backoff_delay(n, initial=1.0, cap=60.0) for n in range(12)]
    assert all(0.5 <= d <= 60.0 for d in delays)
    assert max(backoff_delay(20, initial=1.0, cap=60.0) for _ in range(50)) <= 60.0
    assert len({round(backoff_delay(5), 6) for _ in range(20)}) > 1  # jittered


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_wire_bytes_never_crash_validation(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    try:
        msg = pb.TaskSpec.FromString(data)
    except DecodeError:
        return  # gRPC would have refused the message before it reached us
    try:
        TaskSpec.from_proto(msg, require_lease=True)
    except TaskSpecError as exc:
        assert str(exc).startswith(exc.field)


def test_oversized_fields_are_refused_with_a_reason() -> None:
    huge = "x" * (20 * 1024 * 1024)
    cases = {
        "input_files": {"input_files": [pb.InputFile(path="big", content=huge.encode())]},
        "env": {"env": {"BIG": huge}},
        "argv": {"argv": [huge]},
        "name": {"name": huge},
        "requirements": {"requirements": [huge]},
    }
    for field, fields in cases.items():
        with pytest.raises(TaskSpecError) as err:
            TaskSpec.from_proto(python_spec(**fields))
        assert err.value.field == field


def full_spec() -> TaskSpec:
    return TaskSpec.from_proto(
        pb.TaskSpec(
            task_id="t1",
            lease_id="L1",
            kind=pb.TASK_KIND_CONTAINER,
            image="ghcr.io/org/tool:1",
            argv=["sh", "-c", "echo ü"],
            env={"FOO": "bar"},
            input_files=[pb.InputFile(path="in/a.bin", content=b"\x00\xff", mode=0o755)],
            input_archive=b"\x1f\x8b not really",
            resources=pb.Resources(cpus=1.5, memory_bytes=256 << 20, disk_bytes=1 << 30, gpus=1),
            timeout_seconds=90,
            network="bridge",
            result_path="out/results",
            max_result_bytes=1 << 20,
            requirements=["numpy==2.0"],
            attempt=2,
            name="a task",
            max_attempts=3,
        ),
        require_lease=True,
    )


def test_the_dict_form_reads_back_as_the_same_spec() -> None:
    spec = full_spec()
    text = json.dumps(spec.to_dict())  # what the Docker executor keeps on disk
    assert TaskSpec.from_dict(json.loads(text), require_lease=True) == spec
    python = TaskSpec.from_proto(python_spec(lease_id="L1"))
    assert TaskSpec.from_dict(python.to_dict()) == python


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"resources": {"memory_bytes": -1}}, "resources", "negative"),
        ({"resources": {"cpus": "2"}}, "resources", "cpus must be a number"),
        ({"kind": "shell"}, "kind", "container"),
        ({"task_id": "../../x"}, "task_id", "must be"),
        ({"lease_id": ""}, "lease_id", "is empty"),
        ({"input_files": [{"path": "../x", "content": ""}]}, "input_files", "leaves"),
        ({"input_files": ["a"]}, "input_files", "JSON object"),
        ({"input_archive": "not base64!"}, "input_archive", "base64"),
        ({"argv": "ls"}, "argv", "must be a list"),
        ({"argv": [1]}, "argv", "list of strings"),
        ({"env": {"FOO": 1}}, "env", "strings"),
        ({"timeout_seconds": "10"}, "timeout_seconds", "integer"),
        ({"attempt": True}, "attempt", "integer"),
        ({"network": "host"}, "network", "must be one of"),
        ({"privileged": True}, "privileged", "not a field"),
    ],
)
def test_a_bad_dict_form_is_refused_like_the_wire_form(
    change: dict[str, object], field: str, reason: str
) -> None:
    data = {**full_spec().to_dict(), **change}
    with pytest.raises(TaskSpecError) as err:
        TaskSpec.from_dict(data, require_lease=True)
    assert err.value.field == field
    assert reason in str(err.value)
    with pytest.raises(TaskSpecError, match="JSON object"):
        TaskSpec.from_dict([data])


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(overrides=st.dictionaries(st.sampled_from(sorted(full_spec().to_dict())), _json))
def test_random_dict_forms_never_crash_validation(overrides: dict[str, object]) -> None:
    try:
        TaskSpec.from_dict({**full_spec().to_dict(), **overrides})
    except TaskSpecError as exc:
        assert exc.field and exc.reason  # always a readable reason
