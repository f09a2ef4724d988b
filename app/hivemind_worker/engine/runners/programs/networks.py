"""Shared by the TensorFlow and PyTorch runners: the data a declared network trains on, the
held-out split, and the metrics, framework-free (numpy, pandas, Pillow).

Copied read-only into the workspace as `_hivemind/networks.py`. An `mlp` trains on a CSV or
Parquet table (feature columns standardized with the training rows' mean and spread, kept in
metrics.json); a `cnn` on a folder holding one folder of images per class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import hivemind_runner as hr
import numpy as np
import pandas as pd
import tables

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULT_METRICS = {"classification": ["accuracy", "f1_macro"], "regression": ["r2", "mae", "rmse"]}
# What a cnn's images become: hyper-parameters of their own (the others are refused).
CNN_HYPERPARAMETERS = {"image_size": 28, "grayscale": False}
MAX_IMAGE_SIZE = 256


@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    source: str
    rows: int
    classes: list[str] = field(default_factory=list)  # classification: label of each index
    features: list[str] = field(default_factory=list)
    standardize: dict[str, list[float]] = field(default_factory=dict)
    channels: int = 0  # cnn: 1 (grayscale) or 3; images are (N, size, size, channels)


def load(p: dict[str, Any]) -> Data:
    """The training and validation data of a network task, float32, labels as int64 indices
    (classification) or float32 values (regression)."""
    name = p["train_path"]
    path = hr.input_path(name)
    if p["model"] == "cnn":
        return _images(p, path, name)
    unknown = sorted(p["hyperparameters"])
    if unknown:
        raise hr.RunnerError(
            f"ml.hyperparameters.{unknown[0]}: an mlp takes no hyper-parameters; declare its "
            "layers, epochs, batch_size and learning_rate"
        )
    frame = tables.read_table(path, name)
    target = p["target"]
    tables.require_columns(frame, [target], name, "ml.target")
    features = list(p["features"]) or [c for c in frame.columns if c != target]
    tables.require_columns(frame, features, name, "ml.features")
    for column in features:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            line = tables.first_bad_row(values)
            raise hr.RunnerError(
                f"{name} line {line}: feature column {column!r} is not numeric "
                f"({str(values.iloc[line - 2])[:40]!r}); encode it as numbers or leave it out "
                "with ml.features"
            )
        if values.isna().any():
            line = int(values.isna().to_numpy().argmax()) + 2
            raise hr.RunnerError(
                f"{name} line {line}: feature column {column!r} has a missing value"
            )
    if frame[target].isna().any():
        line = int(frame[target].isna().to_numpy().argmax()) + 2
        raise hr.RunnerError(f"{name} line {line}: the target {target!r} is missing")
    x = frame[features].to_numpy(dtype=np.float32)
    classes, y = _labels(p, frame[target], name, target)
    train, val = _split(len(x), p)
    mean = x[train].mean(axis=0)
    spread = x[train].std(axis=0)
    spread[spread == 0] = 1.0
    x = (x - mean) / spread
    return Data(
        x[train], y[train], x[val], y[val], name, len(x), classes, [str(f) for f in features],
        {"mean": mean.tolist(), "std": spread.tolist()},
    )  # fmt: skip


def _labels(p: dict[str, Any], values: Any, name: str, target: str) -> tuple[list[str], Any]:
    if p["problem"] == "regression":
        if not pd.api.types.is_numeric_dtype(values):
            line = tables.first_bad_row(values)
            raise hr.RunnerError(f"{name} line {line}: the target {target!r} is not numeric")
        return [], values.to_numpy(dtype=np.float32)
    labels = values.astype(str)
    classes = sorted(labels.unique())
    if len(classes) < 2:
        raise hr.RunnerError(f"ml.target: {target!r} has one class only ({classes[0]!r})")
    index = {c: i for i, c in enumerate(classes)}
    return classes, labels.map(index).to_numpy(dtype=np.int64)


def _images(p: dict[str, Any], folder: Any, name: str) -> Data:
    from PIL import Image, UnidentifiedImageError

    if p["problem"] != "classification":
        raise hr.RunnerError("ml.task: a cnn here classifies folders of images; use classification")
    settings = dict(CNN_HYPERPARAMETERS)
    for key, value in p["hyperparameters"].items():
        if key not in settings:
            raise hr.RunnerError(
                f"ml.hyperparameters.{key}: a cnn takes {', '.join(CNN_HYPERPARAMETERS)} only"
            )
        if type(value) is not type(settings[key]):
            raise hr.RunnerError(
                f"ml.hyperparameters.{key}: must be {type(settings[key]).__name__}"
            )
        settings[key] = value
    size = int(settings["image_size"])
    if not 4 <= size <= MAX_IMAGE_SIZE:
        raise hr.RunnerError(f"ml.hyperparameters.image_size: from 4 to {MAX_IMAGE_SIZE}")
    if not folder.is_dir():
        raise hr.RunnerError(
            f"{name}: a cnn trains on a folder with one folder of images per class"
        )
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise hr.RunnerError(f"{name}: needs a folder per class, at least two; found {classes}")
    mode = "L" if settings["grayscale"] else "RGB"
    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((folder / cls).rglob("*")):
            if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            shown = f"{name}/{cls}/{file.relative_to(folder / cls).as_posix()}"
            try:
                with Image.open(file) as img:
                    pixels = img.convert(mode).resize((size, size))
            except (UnidentifiedImageError, OSError) as exc:
                raise hr.RunnerError(f"{shown}: not an image Pillow can read ({exc})") from None
            array = np.asarray(pixels, dtype=np.float32) / 255.0
            images.append(array.reshape(size, size, 1 if mode == "L" else 3))
            labels.append(label)
    counts = {c: labels.count(i) for i, c in enumerate(classes)}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise hr.RunnerError(f"{name}/{empty[0]}: holds no image")
    x = np.stack(images)
    y = np.asarray(labels, dtype=np.int64)
    train, val = _split(len(x), p)
    return Data(x[train], y[train], x[val], y[val], name, len(x), classes,
                channels=1 if mode == "L" else 3)  # fmt: skip


def _split(rows: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    held = round(rows * float(p["validation_split"]))
    if rows < 4 or held < 1 or held >= rows:
        raise hr.RunnerError(
            f"ml.validation_split: {rows} rows cannot be split {p['validation_split']:g}; give "
            "more rows or another fraction"
        )
    order = np.random.default_rng(int(p["seed"])).permutation(rows)
    return order[held:], order[:held]


def metrics(p: dict[str, Any], y_true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """The asked-for metrics (or those that fit the problem) of `predicted`: class indices for
    classification, values for regression."""
    out: dict[str, float] = {}
    problem = p["problem"]
    for name in p["metrics"] or DEFAULT_METRICS[problem]:
        if problem == "classification":
            out[name] = _classification(name, y_true, predicted)
        else:
            error = predicted.astype(np.float64) - y_true.astype(np.float64)
            mse = float(np.mean(error**2))
            total = float(np.sum((y_true - y_true.mean()) ** 2))
            out[name] = {
                "r2": 1.0 - float(np.sum(error**2)) / total if total else 0.0,
                "mae": float(np.mean(np.abs(error))),
                "mse": mse,
                "rmse": mse**0.5,
            }[name]
    return out


def _classification(name: str, y: np.ndarray, predicted: np.ndarray) -> float:
    if name == "accuracy":
        return float(np.mean(y == predicted))
    labels = np.unique(np.concatenate([y, predicted]))
    precision, recall, f1 = [], [], []
    for label in labels:
        tp = float(np.sum((predicted == label) & (y == label)))
        p_all, r_all = float(np.sum(predicted == label)), float(np.sum(y == label))
        prec = tp / p_all if p_all else 0.0
        rec = tp / r_all if r_all else 0.0
        precision.append(prec)
        recall.append(rec)
        f1.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    values = {
        "balanced_accuracy": recall,
        "f1_macro": f1,
        "precision_macro": precision,
        "recall_macro": recall,
    }[name]
    return float(np.mean(values))


def confusion(y: np.ndarray, predicted: np.ndarray, classes: int) -> list[list[int]]:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    for truth, guess in zip(y, predicted, strict=True):
        matrix[int(truth), int(guess)] += 1
    return matrix.tolist()


def report(p: dict[str, Any], data: Data, history: list[dict[str, float]], predicted: Any,
           seconds: float, artifacts: list[str], framework: str) -> None:  # fmt: skip
    """metrics.json and summary.txt under results/."""
    result: dict[str, Any] = {
        "framework": framework,
        "model": p["model"],
        "problem": p["problem"],
        "data": data.source,
        "rows": data.rows,
        "validation": {"method": "split", "fraction": p["validation_split"],
                       "train_rows": len(data.y_train), "validation_rows": len(data.y_val)},
        "layers": p["layers"],
        "epochs": p["epochs"],
        "seed": p["seed"],
        "metrics": metrics(p, data.y_val, predicted),
        "history": history,
        "artifacts": artifacts,
    }  # fmt: skip
    if data.classes:
        result["classes"] = data.classes
        result["confusion_matrix"] = confusion(data.y_val, predicted, len(data.classes))
    if data.features:
        result["features"] = data.features
        result["standardize"] = data.standardize  # apply to new rows before predicting
    result["seconds"] = round(seconds, 3)
    hr.write_json("metrics.json", result)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items())
    hr.write_text("summary.txt", f"{p['model']} ({framework}) on {data.source}: {shown}\n")
    print(f"metrics: {shown}", flush=True)


def layer_error(exc: Exception) -> hr.RunnerError:
    """A network the declared layers cannot make for this data, as the submitter's error."""
    return hr.RunnerError(f"ml.layers: these layers do not fit the data ({str(exc)[:300]})")
