"""Parameters of the ml and data task kinds: what the worker's runners accept, as data.

The runners live in engine/runners/; what they accept is declared and checked here, in the
shared domain, so that the pool refuses a bad spec at submit with the same reason (the field
named) the worker would give on receipt. Nothing in the parameters is ever executed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

from google.protobuf import json_format

from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.spec_checks import TaskSpecError, safe_relative_path

RUNNER_PROGRAM = "main.py"
RUNNER_DIR = "_hivemind"  # the runner's own files and params.json, read-only in the workspace

FRAMEWORKS = ("scikit-learn", "tensorflow", "pytorch")
CLASSIFIERS = (
    "logistic-regression",
    "random-forest-classifier",
    "extra-trees-classifier",
    "gradient-boosting-classifier",
    "hist-gradient-boosting-classifier",
    "decision-tree-classifier",
    "k-neighbors-classifier",
    "svc",
    "linear-svc",
    "gaussian-nb",
    "mlp-classifier",
)
REGRESSORS = (
    "linear-regression",
    "ridge",
    "lasso",
    "elastic-net",
    "random-forest-regressor",
    "extra-trees-regressor",
    "gradient-boosting-regressor",
    "hist-gradient-boosting-regressor",
    "decision-tree-regressor",
    "k-neighbors-regressor",
    "svr",
    "mlp-regressor",
)
CLUSTERERS = ("k-means", "mini-batch-k-means", "dbscan", "agglomerative-clustering")
NETWORK_MODELS = ("mlp", "cnn")
DATASETS = {  # the data sets scikit-learn ships (no download), and the problem each poses
    "iris": "classification",
    "digits": "classification",
    "wine": "classification",
    "breast-cancer": "classification",
    "diabetes": "regression",
}
METRICS = {
    "classification": ("accuracy", "balanced_accuracy", "f1_macro", "precision_macro",
                       "recall_macro"),
    "regression": ("r2", "mae", "mse", "rmse"),
    "clustering": ("silhouette", "calinski_harabasz", "davies_bouldin", "adjusted_rand"),
}  # fmt: skip
LAYER_TYPES = ("dense", "conv2d", "maxpool2d", "flatten", "dropout")
ACTIVATIONS = ("", "linear", "relu", "tanh", "sigmoid", "softmax")
OPTIMIZERS = ("adam", "sgd")
LOSSES = ("", "cross-entropy", "mse", "mae")
PROCESSING_TYPES = ("csv_analysis", "image_processing", "text_analysis")
AGGREGATIONS = ("count", "sum", "mean", "median", "min", "max", "std")
CORRELATIONS = ("pearson", "spearman", "kendall", "none")
IMAGE_FORMATS = ("png", "jpeg", "webp", "gif", "bmp", "tiff")
IMAGE_FILTERS = (
    "blur", "sharpen", "smooth", "edge-enhance", "contour", "detail", "emboss", "find-edges",
)  # fmt: skip
MAX_HYPERPARAMETERS = 64
MAX_PARAM_STRING = 200
MAX_COLUMNS = 1000
MAX_LAYERS = 32
MAX_UNITS = 65536
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65536
MAX_IMAGE_EDGE = 16384
MAX_TOP_TERMS = 1000
MAX_STOP_WORDS = 5000
_PARAM_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_COLUMN_MAX = 200

ParamScalar = int | float | str | bool


def problem_of(model: str) -> str:
    """'classification', 'regression' or 'clustering' for an allow-listed estimator."""
    if model in CLASSIFIERS:
        return "classification"
    if model in REGRESSORS:
        return "regression"
    return "clustering"


@dataclass(frozen=True)
class Layer:
    type: str
    units: int = 0
    activation: str = ""
    filters: int = 0
    kernel_size: int = 0
    rate: float = 0.0


@dataclass(frozen=True)
class MlParams:
    """What an ml task trains on what; `to_json()` is what the runner reads."""

    framework: str
    model: str
    train_path: str = ""
    dataset: str = ""
    target: str = ""
    features: tuple[str, ...] = ()
    validation_split: float = 0.2
    k_folds: int = 0
    hyperparameters: Mapping[str, ParamScalar] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    seed: int = 0
    layers: tuple[Layer, ...] = ()
    optimizer: str = "adam"
    loss: str = ""
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 0.001
    task: str = "classification"
    export_onnx: bool = False

    @property
    def problem(self) -> str:
        if self.framework == "scikit-learn":
            return problem_of(self.model)
        return self.task

    @classmethod
    def from_proto(cls, msg: pb.MlParams, inputs: set[str] | None) -> MlParams:
        """Validate; `inputs` are the task's input names (None: an archive, not checked)."""
        framework = msg.framework
        if framework not in FRAMEWORKS:
            raise TaskSpecError("ml.framework", f"must be one of {', '.join(FRAMEWORKS)}")
        sklearn = framework == "scikit-learn"
        allowed = CLASSIFIERS + REGRESSORS + CLUSTERERS if sklearn else NETWORK_MODELS
        if msg.model not in allowed:
            raise TaskSpecError(
                "ml.model",
                f"{msg.model[:80]!r} is not a {framework} model this worker runs; "
                f"one of: {', '.join(allowed)}",
            )
        if bool(msg.train_path) == bool(msg.dataset):
            raise TaskSpecError("ml.train_path", "give either a training file or a data set")
        if msg.train_path:
            _check_input_path("ml.train_path", msg.train_path, inputs)
        if msg.dataset and (not sklearn or msg.dataset not in DATASETS):
            names = ", ".join(DATASETS) if sklearn else "none (give train_path)"
            raise TaskSpecError("ml.dataset", f"{msg.dataset[:80]!r} is not shipped; {names}")
        problem = problem_of(msg.model) if sklearn else (msg.task or "classification")
        if problem not in ("classification", "regression", "clustering") or (
            not sklearn and problem == "clustering"
        ):
            raise TaskSpecError("ml.task", "must be 'classification' or 'regression'")
        if msg.dataset and problem != "clustering" and DATASETS[msg.dataset] != problem:
            raise TaskSpecError(
                "ml.dataset", f"{msg.dataset} is a {DATASETS[msg.dataset]} data set, "
                f"not one for the {problem} model {msg.model}"
            )  # fmt: skip
        # A cnn's classes are the folders of its images; any other model names its target.
        if msg.train_path and problem != "clustering" and msg.model != "cnn" and not msg.target:
            raise TaskSpecError("ml.target", f"a {problem} model needs the target column")
        for name, value in (("ml.target", msg.target), *(("ml.features", f) for f in msg.features)):
            if len(value) > _COLUMN_MAX or any(ord(c) < 32 for c in value):
                raise TaskSpecError(name, f"{value[:80]!r} is not a column name")
        if len(msg.features) > MAX_COLUMNS:
            raise TaskSpecError("ml.features", f"more than {MAX_COLUMNS} columns")
        if msg.target and msg.target in msg.features:
            raise TaskSpecError("ml.features", f"the target {msg.target!r} is also a feature")
        split = msg.validation_split or 0.2
        if not 0.0 < split < 1.0:
            raise TaskSpecError("ml.validation_split", "must be between 0 and 1 (exclusive)")
        if msg.k_folds == 1 or msg.k_folds > 100:
            raise TaskSpecError("ml.k_folds", "must be 0 (one split) or from 2 to 100")
        if msg.k_folds and not sklearn:
            raise TaskSpecError("ml.k_folds", "k-fold is for scikit-learn models; use a split")
        hyper = _hyperparameters(msg.hyperparameters)
        for metric in msg.metrics:
            if metric not in METRICS[problem]:
                raise TaskSpecError(
                    "ml.metrics",
                    f"{metric[:80]!r} does not fit {problem}; one of {', '.join(METRICS[problem])}",
                )
        layers = tuple(_layer(i, layer) for i, layer in enumerate(msg.layers))
        if not sklearn and not layers:
            raise TaskSpecError("ml.layers", "declare the network's layers")
        if sklearn and layers:
            raise TaskSpecError("ml.layers", "only for tensorflow and pytorch models")
        if len(layers) > MAX_LAYERS:
            raise TaskSpecError("ml.layers", f"more than {MAX_LAYERS} layers")
        if msg.model == "mlp" and any(la.type in ("conv2d", "maxpool2d") for la in layers):
            raise TaskSpecError("ml.layers", "an mlp has no conv2d or maxpool2d layers; use cnn")
        if msg.optimizer and msg.optimizer not in OPTIMIZERS:
            raise TaskSpecError("ml.optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if msg.loss not in LOSSES:
            raise TaskSpecError("ml.loss", f"must be one of {', '.join(LOSSES[1:])}")
        if msg.loss and (msg.loss == "cross-entropy") != (problem == "classification"):
            raise TaskSpecError("ml.loss", f"{msg.loss} does not fit {problem}")
        if msg.epochs > MAX_EPOCHS:
            raise TaskSpecError("ml.epochs", f"must be at most {MAX_EPOCHS}")
        if msg.batch_size > MAX_BATCH_SIZE:
            raise TaskSpecError("ml.batch_size", f"must be at most {MAX_BATCH_SIZE}")
        rate = msg.learning_rate or 0.001
        if not 0.0 < rate <= 10.0:
            raise TaskSpecError("ml.learning_rate", "must be greater than 0 and at most 10")
        if msg.export_onnx and not sklearn:
            raise TaskSpecError("ml.export_onnx", "ONNX export is for scikit-learn models")
        return cls(
            framework=framework,
            model=msg.model,
            train_path=msg.train_path,
            dataset=msg.dataset,
            target=msg.target,
            features=tuple(msg.features),
            validation_split=split,
            k_folds=msg.k_folds,
            hyperparameters=hyper,
            metrics=tuple(msg.metrics),
            seed=msg.seed,
            layers=layers,
            optimizer=msg.optimizer or "adam",
            loss=msg.loss,
            epochs=msg.epochs or 10,
            batch_size=msg.batch_size or 32,
            learning_rate=rate,
            task=problem,
            export_onnx=msg.export_onnx,
        )

    def to_proto(self) -> pb.MlParams:
        msg = pb.MlParams(
            framework=self.framework,
            model=self.model,
            train_path=self.train_path,
            dataset=self.dataset,
            target=self.target,
            features=list(self.features),
            validation_split=self.validation_split,
            k_folds=self.k_folds,
            metrics=list(self.metrics),
            seed=self.seed,
            layers=[pb.Layer(**vars(layer)) for layer in self.layers],
            optimizer=self.optimizer,
            loss=self.loss,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            task=self.task if self.framework != "scikit-learn" else "",
            export_onnx=self.export_onnx,
        )
        for name, value in self.hyperparameters.items():
            msg.hyperparameters[name].CopyFrom(param_value(value))
        return msg

    def to_json(self) -> dict[str, object]:
        out = {k: v for k, v in vars(self).items() if k not in ("layers", "hyperparameters")}
        out["features"] = list(self.features)
        out["metrics"] = list(self.metrics)
        out["layers"] = [vars(layer) for layer in self.layers]
        out["hyperparameters"] = dict(self.hyperparameters)
        out["problem"] = self.problem
        return out


def param_value(value: ParamScalar) -> pb.ParamValue:
    """A typed wire value: bool before int, as bool is an int in Python."""
    if isinstance(value, bool):
        return pb.ParamValue(bool_value=value)
    if isinstance(value, int):
        return pb.ParamValue(int_value=value)
    if isinstance(value, float):
        return pb.ParamValue(float_value=value)
    return pb.ParamValue(string_value=value)


def parse_param(text: str) -> tuple[str, ParamScalar]:
    """`name=value` from a command line: true/false, an int, a float, else a string."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not _PARAM_NAME_RE.match(name):
        raise TaskSpecError("ml.hyperparameters", f"{text[:80]!r} is not name=value")
    raw = raw.strip()
    value: ParamScalar
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
    return name, value


def _hyperparameters(values: Mapping[str, pb.ParamValue]) -> dict[str, ParamScalar]:
    if len(values) > MAX_HYPERPARAMETERS:
        raise TaskSpecError("ml.hyperparameters", f"more than {MAX_HYPERPARAMETERS} entries")
    out: dict[str, ParamScalar] = {}
    for name in sorted(values):
        field_name = f"ml.hyperparameters.{name[:64]}"
        if not _PARAM_NAME_RE.match(name):
            raise TaskSpecError(field_name, "names are lower-case letters, digits and _")
        which = values[name].WhichOneof("value")
        if which is None:
            raise TaskSpecError(field_name, "has no value")
        value: ParamScalar = getattr(values[name], which)
        if isinstance(value, float) and not math.isfinite(value):
            raise TaskSpecError(field_name, "is not a finite number")
        if isinstance(value, str) and (len(value) > MAX_PARAM_STRING or "\x00" in value):
            raise TaskSpecError(field_name, f"longer than {MAX_PARAM_STRING} characters")
        out[name] = value
    return out


def _layer(index: int, msg: pb.Layer) -> Layer:
    name = f"ml.layers[{index}]"
    if msg.type not in LAYER_TYPES:
        raise TaskSpecError(f"{name}.type", f"must be one of {', '.join(LAYER_TYPES)}")
    if msg.activation not in ACTIVATIONS:
        raise TaskSpecError(f"{name}.activation", f"must be one of {', '.join(ACTIVATIONS[1:])}")
    if msg.type == "dense" and not 0 < msg.units <= MAX_UNITS:
        raise TaskSpecError(f"{name}.units", f"a dense layer needs 1-{MAX_UNITS} units")
    if msg.type == "conv2d" and not (0 < msg.filters <= 4096 and 0 < msg.kernel_size <= 15):
        raise TaskSpecError(f"{name}", "a conv2d layer needs 1-4096 filters, kernel_size 1-15")
    if msg.type == "maxpool2d" and not 0 < msg.kernel_size <= 15:
        raise TaskSpecError(f"{name}.kernel_size", "a maxpool2d layer needs kernel_size 1-15")
    if msg.type == "dropout" and not 0.0 <= msg.rate < 1.0:
        raise TaskSpecError(f"{name}.rate", "a dropout rate is at least 0 and below 1")
    return Layer(msg.type, msg.units, msg.activation, msg.filters, msg.kernel_size, msg.rate)


def _check_input_path(field_name: str, path: str, inputs: set[str] | None) -> None:
    clean = str(safe_relative_path(path.rstrip("/"), field_name))
    if inputs is None:
        return  # inside the archive, which the runner reads: it names a missing path itself
    if clean not in inputs and not any(name.startswith(clean + "/") for name in inputs):
        raise TaskSpecError(field_name, f"{path[:80]!r} is not among the task's input files")


@dataclass(frozen=True)
class DataParams:
    """What a data task computes over which input; `to_json()` is what the runner reads."""

    processing: str
    input_path: str
    options: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: pb.DataParams, inputs: set[str] | None) -> DataParams:
        if msg.processing not in PROCESSING_TYPES:
            raise TaskSpecError("data.processing", f"must be one of {', '.join(PROCESSING_TYPES)}")
        if not msg.input_path:
            raise TaskSpecError("data.input_path", "name the input file or folder")
        _check_input_path("data.input_path", msg.input_path, inputs)
        which = msg.WhichOneof("options")
        expected = {"csv_analysis": "csv", "image_processing": "image", "text_analysis": "text"}
        want = expected[msg.processing]
        if which is not None and which != want:
            raise TaskSpecError(f"data.{which}", f"options for another kind than {msg.processing}")
        if want == "csv":
            options = _csv_options(msg.csv)
        elif want == "image":
            options = _image_options(msg.image)
        else:
            options = _text_options(msg.text)
        return cls(msg.processing, msg.input_path.rstrip("/"), options)

    def to_proto(self) -> pb.DataParams:
        msg = pb.DataParams(processing=self.processing, input_path=self.input_path)
        o: dict[str, Any] = dict(self.options)
        if self.processing == "csv_analysis":
            msg.csv.CopyFrom(pb.CsvAnalysis(**o))
        elif self.processing == "image_processing":
            msg.image.CopyFrom(pb.ImageProcessing(**o))
        else:
            msg.text.CopyFrom(pb.TextAnalysis(**o))
        return msg

    def to_json(self) -> dict[str, object]:
        return {
            "processing": self.processing,
            "input_path": self.input_path,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()},
        }


def _columns(field_name: str, names: Iterable[str]) -> tuple[str, ...]:
    out = tuple(names)
    if len(out) > MAX_COLUMNS:
        raise TaskSpecError(field_name, f"more than {MAX_COLUMNS} columns")
    for name in out:
        if not name or len(name) > _COLUMN_MAX or any(ord(c) < 32 for c in name):
            raise TaskSpecError(field_name, f"{name[:80]!r} is not a column name")
    return out


def _csv_options(msg: pb.CsvAnalysis) -> dict[str, object]:
    for agg in msg.aggregations:
        if agg not in AGGREGATIONS:
            raise TaskSpecError("data.csv.aggregations", f"{agg[:40]!r} is not one of "
                                f"{', '.join(AGGREGATIONS)}")  # fmt: skip
    if msg.correlation and msg.correlation not in CORRELATIONS:
        raise TaskSpecError("data.csv.correlation", f"must be one of {', '.join(CORRELATIONS)}")
    if len(msg.delimiter) > 1 or msg.delimiter in ('"', "\n", "\r"):
        raise TaskSpecError("data.csv.delimiter", "must be one character (not a quote)")
    return {
        "group_by": _columns("data.csv.group_by", msg.group_by),
        "aggregate": _columns("data.csv.aggregate", msg.aggregate),
        "aggregations": tuple(msg.aggregations) or ("count", "mean", "sum", "min", "max"),
        "correlation": msg.correlation or "pearson",
        "delimiter": msg.delimiter or ",",
    }


def _image_options(msg: pb.ImageProcessing) -> dict[str, object]:
    if bool(msg.width) != bool(msg.height):
        raise TaskSpecError("data.image.width", "give both width and height, or neither")
    if msg.width > MAX_IMAGE_EDGE or msg.height > MAX_IMAGE_EDGE:
        raise TaskSpecError("data.image.width", f"width and height are at most {MAX_IMAGE_EDGE}")
    if msg.thumbnail and not msg.width:
        raise TaskSpecError("data.image.thumbnail", "a thumbnail needs width and height")
    if msg.format and msg.format not in IMAGE_FORMATS:
        raise TaskSpecError("data.image.format", f"must be one of {', '.join(IMAGE_FORMATS)}")
    if not -360 <= msg.rotate <= 360:
        raise TaskSpecError("data.image.rotate", "must be from -360 to 360 degrees")
    for name in msg.filters:
        if name not in IMAGE_FILTERS:
            raise TaskSpecError("data.image.filters", f"{name[:40]!r} is not one of "
                                f"{', '.join(IMAGE_FILTERS)}")  # fmt: skip
    if msg.quality > 100:
        raise TaskSpecError("data.image.quality", "must be from 1 to 100")
    if not (msg.width or msg.format or msg.grayscale or msg.rotate or msg.filters):
        raise TaskSpecError(
            "data.image", "nothing to do: ask for a resize, thumbnail, format, grayscale, "
            "rotation or filter"
        )  # fmt: skip
    return {
        "width": msg.width,
        "height": msg.height,
        "thumbnail": msg.thumbnail,
        "format": msg.format,
        "grayscale": msg.grayscale,
        "rotate": msg.rotate,
        "filters": tuple(msg.filters),
        "quality": msg.quality,
    }


def _text_options(msg: pb.TextAnalysis) -> dict[str, object]:
    if msg.top_terms > MAX_TOP_TERMS:
        raise TaskSpecError("data.text.top_terms", f"must be at most {MAX_TOP_TERMS}")
    if len(msg.ngrams) > 4 or any(not 2 <= n <= 5 for n in msg.ngrams):
        raise TaskSpecError("data.text.ngrams", "up to four n-gram sizes, each from 2 to 5")
    if len(msg.stop_words) > MAX_STOP_WORDS or any(len(w) > 64 for w in msg.stop_words):
        raise TaskSpecError("data.text.stop_words", f"at most {MAX_STOP_WORDS} words of 64")
    if msg.min_word_length > 100:
        raise TaskSpecError("data.text.min_word_length", "must be at most 100")
    return {
        "top_terms": msg.top_terms or 20,
        "ngrams": tuple(sorted(set(msg.ngrams))) or (2,),
        "keep_case": msg.keep_case,
        "stop_words": tuple(msg.stop_words),
        "min_word_length": msg.min_word_length or 1,
    }


def required_capability(msg: pb.TaskSpec) -> str:
    """For the pool's matching: the capability beyond the executor's that `msg` needs."""
    if msg.kind == pb.TASK_KIND_ML:
        return f"ml:{msg.ml.framework}"
    if msg.kind == pb.TASK_KIND_DATA:
        return "data"
    return ""


ENVIRONMENTS = (*FRAMEWORKS, "data")  # the runner environments, named as their requirement sets


def checked(
    kind: str,
    ml: pb.MlParams | None,
    data: pb.DataParams | None,
    *,
    requirements: tuple[str, ...],
    env: Mapping[str, str],
    argv: tuple[str, ...],
    input_paths: Iterable[PurePosixPath],
    has_archive: bool,
) -> tuple[MlParams | None, DataParams | None]:
    """The parameters of a task of `kind` ("ml", "data", or another kind, which has none)."""
    if kind not in ("ml", "data"):
        if ml is not None or data is not None:
            raise TaskSpecError("ml" if ml is not None else "data", "only for ml/data tasks")
        return None, None
    if requirements:
        raise TaskSpecError("requirements", "the runner brings its own environment")
    if env or argv:  # a PYTHONPATH, say, would let the submitter's files run as the runner
        raise TaskSpecError("env" if env else "argv", "the runner takes its parameters only")
    paths = list(input_paths)
    for path in paths:
        if str(path) == RUNNER_PROGRAM or path.parts[0] == RUNNER_DIR:
            raise TaskSpecError(
                "input_files", f"{str(path)!r} is a name the runner keeps for itself"
            )
        if _importable(path):
            raise TaskSpecError(
                "input_files", f"{str(path)!r} would be importable by the runner; rename it"
            )
    if has_archive:  # its names are unknown until unpacked: inputs come as checked files
        raise TaskSpecError("input_archive", f"{kind} tasks take their inputs as input_files")
    inputs = {str(p) for p in paths}
    if kind == "ml":
        return MlParams.from_proto(ml or pb.MlParams(), inputs), None
    return None, DataParams.from_proto(data or pb.DataParams(), inputs)


_CODE_SUFFIXES = (".py", ".pyc", ".pyw", ".pyd", ".so", ".pth", ".zip", ".egg")


def _importable(path: PurePosixPath) -> bool:
    """Whether Python could import `path` from the workspace as a module or a package: the
    runner's own imports (and the sandbox launcher's) must never reach the submitter's files."""
    if len(path.parts) == 1:
        return path.name.lower().endswith(_CODE_SUFFIXES)
    return len(path.parts) == 2 and path.parts[1].startswith("__init__.")


def check_environment(name: str) -> str:
    """The worker-set environment of a kept spec: empty or one of the runner environments."""
    if name and name not in ENVIRONMENTS:
        raise TaskSpecError("environment", f"{name[:40]!r} is not a runner environment")
    return name


def params_to_dict(params: MlParams | DataParams | None) -> dict[str, object] | None:
    """The JSON form of a task's parameters (the wire message's JSON mapping)."""
    if params is None:
        return None
    return json_format.MessageToDict(params.to_proto(), preserving_proto_field_name=True)


def ml_from_dict(value: object) -> pb.MlParams | None:
    return _from_dict("ml", value, pb.MlParams())


def data_from_dict(value: object) -> pb.DataParams | None:
    return _from_dict("data", value, pb.DataParams())


_Wire = TypeVar("_Wire", pb.MlParams, pb.DataParams)


def _from_dict(field_name: str, value: object, msg: _Wire) -> _Wire | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TaskSpecError(field_name, "must be a JSON object")
    try:
        return json_format.ParseDict(value, msg)
    except json_format.ParseError as exc:
        raise TaskSpecError(field_name, str(exc)[:200]) from None
