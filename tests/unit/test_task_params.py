"""The ml and data task kinds' parameters: refused with the field named, kept as JSON intact."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemind_worker.engine import runners
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.task_params import param_value, required_capability
from hivemind_worker.tasks import TaskKind, TaskSpec, TaskSpecError


def ml_spec(**ml: object) -> pb.TaskSpec:
    params = pb.MlParams(**{"framework": "scikit-learn", "model": "k-means", **ml})  # type: ignore[arg-type]
    return pb.TaskSpec(task_id="t1", lease_id="L1", kind=pb.TASK_KIND_ML, ml=params)


def csv_spec(**options: object) -> pb.TaskSpec:
    return pb.TaskSpec(
        task_id="t2",
        kind=pb.TASK_KIND_DATA,
        data=pb.DataParams(
            processing="csv_analysis",
            input_path="t.csv",
            csv=pb.CsvAnalysis(**options),  # type: ignore[arg-type]
        ),
        input_files=[pb.InputFile(path="t.csv", content=b"a,b\n1,2\n")],
    )


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        (ml_spec(model="gpt-5", dataset="iris"), "ml.model", "'gpt-5' is not a scikit-learn"),
        (ml_spec(framework="jax", dataset="iris"), "ml.framework", "must be one of"),
        (ml_spec(), "ml.train_path", "either a training file or a data set"),
        (ml_spec(train_path="missing.csv"), "ml.train_path", "not among the task's input"),
        (ml_spec(model="linear-regression", dataset="iris"), "ml.dataset", "classification"),
        (ml_spec(dataset="iris", metrics=["r2"]), "ml.metrics", "does not fit clustering"),
        (ml_spec(dataset="iris", k_folds=1), "ml.k_folds", "from 2 to 100"),
        (
            ml_spec(framework="tensorflow", model="mlp", train_path="x.csv"),
            "ml.train_path",
            "not among",
        ),
        (csv_spec(aggregations=["sum", "eval"]), "data.csv.aggregations", "'eval' is not one of"),
        (csv_spec(delimiter=";;"), "data.csv.delimiter", "one character"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(
    spec: pb.TaskSpec, field: str, reason: str
) -> None:
    with pytest.raises(TaskSpecError) as err:
        TaskSpec.from_proto(spec)
    assert err.value.field == field
    assert reason in str(err.value)


def test_a_hyperparameter_is_data_with_a_checked_name() -> None:
    spec = ml_spec(dataset="iris")
    spec.ml.hyperparameters["n_clusters"].CopyFrom(param_value(3))
    assert TaskSpec.from_proto(spec).ml.hyperparameters == {"n_clusters": 3}  # type: ignore[union-attr]
    spec.ml.hyperparameters["max-depth"].CopyFrom(param_value(3))
    with pytest.raises(TaskSpecError, match="lower-case letters"):
        TaskSpec.from_proto(spec)


def test_a_runner_kind_runs_nothing_of_the_submitters() -> None:
    for change in ({"source": "print(1)"}, {"image": "python:3.12"}):
        spec = ml_spec(dataset="iris")
        for name, value in change.items():
            setattr(spec, name, value)
        with pytest.raises(TaskSpecError, match="run the worker's own runner"):
            TaskSpec.from_proto(spec)
    spec = ml_spec(dataset="iris")
    spec.input_files.append(pb.InputFile(path="_hivemind/params.json", content=b"{}"))
    with pytest.raises(TaskSpecError, match="keeps for itself"):
        TaskSpec.from_proto(spec)
    for field, value in (("env", {"PYTHONPATH": "inputs"}), ("argv", ["--evil"])):
        spec = ml_spec(dataset="iris")
        getattr(spec, field).update(value) if field == "env" else spec.argv.extend(value)
        with pytest.raises(TaskSpecError, match="takes its parameters only") as err:
            TaskSpec.from_proto(spec)
        assert err.value.field == field
    for name in ("json.py", "numpy/__init__.py", "evil.pth", "lib.cpython-311-x86_64.so"):
        spec = ml_spec(dataset="iris")
        spec.input_files.append(pb.InputFile(path=name, content=b"import os"))
        with pytest.raises(TaskSpecError, match="would be importable by the runner"):
            TaskSpec.from_proto(spec)
    spec = ml_spec(dataset="iris")
    spec.input_archive = b"\x1f\x8b"
    with pytest.raises(TaskSpecError, match="take their inputs as input_files"):
        TaskSpec.from_proto(spec)
    spec = ml_spec(dataset="iris")
    spec.input_files.append(pb.InputFile(path="code/numpy.py", content=b"fine: not importable"))
    assert TaskSpec.from_proto(spec).ml is not None
    python = pb.TaskSpec(task_id="t3", kind=pb.TASK_KIND_PYTHON, source="x", ml=pb.MlParams())
    with pytest.raises(TaskSpecError, match="only for ml/data tasks"):
        TaskSpec.from_proto(python)


def test_the_pool_and_the_worker_ask_for_the_same_capability() -> None:
    for spec, needed in ((ml_spec(dataset="iris"), "ml:scikit-learn"), (csv_spec(), "data")):
        assert required_capability(spec) == needed
        assert TaskSpec.from_proto(spec).required_capability == needed
    assert required_capability(pb.TaskSpec(kind=pb.TASK_KIND_PYTHON)) == ""


def test_ml_data_and_runner_tasks_read_back_from_their_dict_form() -> None:
    """What the Docker executor keeps on disk: the params, and the runner task made of them."""
    spec = ml_spec(dataset="iris", validation_split=0.3, seed=7, metrics=["silhouette"])
    spec.ml.hyperparameters["n_clusters"].CopyFrom(param_value(3))
    spec.ml.hyperparameters["tol"].CopyFrom(param_value(1e-3))
    spec.ml.hyperparameters["verbose"].CopyFrom(param_value(True))
    for task in (TaskSpec.from_proto(spec), TaskSpec.from_proto(csv_spec(group_by=["a"]))):
        kept = json.loads(json.dumps(task.to_dict()))
        assert TaskSpec.from_dict(kept) == task
        assert TaskSpec.from_proto(task.to_proto()) == task
        runnable = runners.materialize(task)
        assert runnable.kind is TaskKind.PYTHON and runnable.environment
        assert TaskSpec.from_dict(json.loads(json.dumps(runnable.to_dict()))) == runnable
    hyper = TaskSpec.from_dict(json.loads(json.dumps(TaskSpec.from_proto(spec).to_dict()))).ml
    assert hyper is not None and hyper.hyperparameters == {"n_clusters": 3, "tol": 1e-3,
                                                           "verbose": True}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"ml": {"framework": "scikit-learn", "model": "gpt-5", "dataset": "iris"}}, "ml.model",
         "not a scikit-learn model"),
        ({"ml": {"framework": 3}}, "ml", "framework"),
        ({"ml": ["x"]}, "ml", "JSON object"),
        ({"ml": {"hyperparameters": {"a": {"int_value": "x"}}}}, "ml", "int_value"),
        ({"environment": "../x"}, "environment", "not a runner environment"),
    ],
)  # fmt: skip
def test_a_bad_kept_runner_spec_is_refused_like_the_wire_form(
    change: dict[str, object], field: str, reason: str
) -> None:
    data = {**TaskSpec.from_proto(ml_spec(dataset="iris")).to_dict(), **change}
    with pytest.raises(TaskSpecError) as err:
        TaskSpec.from_dict(data)
    assert err.value.field == field
    assert reason in str(err.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    ml=st.dictionaries(st.sampled_from(sorted(pb.MlParams.DESCRIPTOR.fields_by_name)), _json),
    data=_json,
)
def test_random_kept_params_never_crash_validation(ml: dict[str, object], data: object) -> None:
    base = TaskSpec.from_proto(ml_spec(dataset="iris")).to_dict()
    for change in ({"ml": {**base["ml"], **ml}}, {"ml": None, "kind": "data", "data": data}):  # type: ignore[dict-item]
        try:
            TaskSpec.from_dict({**base, **change})
        except TaskSpecError as exc:
            assert exc.field and exc.reason


def test_every_environment_says_what_it_downloads_on_every_platform() -> None:
    """A new requirement set without a measured size would show the person nothing: run
    tools/runner_sizes.py after changing one."""
    import tomllib
    from importlib import resources

    folder = resources.files(runners).joinpath("requirements")
    sets = {p.name.removesuffix(".txt") for p in folder.iterdir() if p.name.endswith(".txt")}
    table = tomllib.loads(folder.joinpath(runners.SIZES_FILE).read_text(encoding="utf-8"))
    assert runners.MEASURED_PLATFORM in table and "windows-amd64" in table
    for platform, figures in table.items():
        assert set(figures) == sets, platform
        assert all(isinstance(mb, int) and mb > 0 for mb in figures.values()), platform
        # The opt-in frameworks are the large ones; the on-by-default kinds are lighter.
        assert min(figures["tensorflow"], figures["pytorch"]) > figures[runners.DATA_ENVIRONMENT]
    for name in sets:  # this machine's figure, or the measured platform's where it has none
        assert runners.download_mb(name) > 0
