"""scikit-learn training: an allow-listed estimator on a CSV/Parquet file or a shipped data set.

Hold-out split or k-fold, the metrics that fit the problem, the fitted model (model.joblib,
plus model.onnx when asked and skl2onnx converts it), metrics.json and summary.txt under results/.
Parameters are data: estimator arguments are plain values checked against the estimator's
own parameter names. Needs scikit-learn, pandas, joblib (skl2onnx optional).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hivemind"))
import hivemind_runner as hr
import joblib
import numpy as np
import pandas as pd
import tables
from sklearn import metrics as skm
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split
from sklearn.utils._param_validation import InvalidParameterError

ESTIMATORS = {
    "logistic-regression": "linear_model.LogisticRegression",
    "random-forest-classifier": "ensemble.RandomForestClassifier",
    "extra-trees-classifier": "ensemble.ExtraTreesClassifier",
    "gradient-boosting-classifier": "ensemble.GradientBoostingClassifier",
    "hist-gradient-boosting-classifier": "ensemble.HistGradientBoostingClassifier",
    "decision-tree-classifier": "tree.DecisionTreeClassifier",
    "k-neighbors-classifier": "neighbors.KNeighborsClassifier",
    "svc": "svm.SVC",
    "linear-svc": "svm.LinearSVC",
    "gaussian-nb": "naive_bayes.GaussianNB",
    "mlp-classifier": "neural_network.MLPClassifier",
    "linear-regression": "linear_model.LinearRegression",
    "ridge": "linear_model.Ridge",
    "lasso": "linear_model.Lasso",
    "elastic-net": "linear_model.ElasticNet",
    "random-forest-regressor": "ensemble.RandomForestRegressor",
    "extra-trees-regressor": "ensemble.ExtraTreesRegressor",
    "gradient-boosting-regressor": "ensemble.GradientBoostingRegressor",
    "hist-gradient-boosting-regressor": "ensemble.HistGradientBoostingRegressor",
    "decision-tree-regressor": "tree.DecisionTreeRegressor",
    "k-neighbors-regressor": "neighbors.KNeighborsRegressor",
    "svr": "svm.SVR",
    "mlp-regressor": "neural_network.MLPRegressor",
    "k-means": "cluster.KMeans",
    "mini-batch-k-means": "cluster.MiniBatchKMeans",
    "dbscan": "cluster.DBSCAN",
    "agglomerative-clustering": "cluster.AgglomerativeClustering",
}
DATASETS = {
    "iris": "load_iris",
    "digits": "load_digits",
    "wine": "load_wine",
    "breast-cancer": "load_breast_cancer",
    "diabetes": "load_diabetes",
}
DEFAULT_METRICS = {
    "classification": ["accuracy", "f1_macro"],
    "regression": ["r2", "mae", "rmse"],
    "clustering": ["silhouette"],
}
CLASSIFICATION_METRICS = {
    "accuracy": skm.accuracy_score,
    "balanced_accuracy": skm.balanced_accuracy_score,
    "f1_macro": lambda y, p: skm.f1_score(y, p, average="macro"),
    "precision_macro": lambda y, p: skm.precision_score(y, p, average="macro", zero_division=0),
    "recall_macro": lambda y, p: skm.recall_score(y, p, average="macro"),
}
STAGES = 10  # forests and boosting grow in this many steps, each a progress line


def load(p: dict[str, Any]) -> tuple[pd.DataFrame, str]:
    if p["dataset"]:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, DATASETS[p["dataset"]])(as_frame=True)
        frame = bunch.frame
        return frame, f"the {p['dataset']} data set"
    name = p["train_path"]
    return tables.read_table(hr.input_path(name), name), name


def columns(frame: pd.DataFrame, p: dict[str, Any], source: str) -> tuple[list[str], str]:
    target = p["target"] or ("target" if p["dataset"] and p["problem"] != "clustering" else "")
    if p["dataset"] and p["problem"] == "clustering" and not p["target"]:
        target = "target"  # kept apart from the features, used for adjusted_rand
    if target:
        tables.require_columns(frame, [target], source, "ml.target")
    features = list(p["features"]) or [c for c in frame.columns if c != target]
    tables.require_columns(frame, features, source, "ml.features")
    if not features:
        raise hr.RunnerError(f"ml.features: {source} has no column besides the target")
    for column in features:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            line = tables.first_bad_row(values)
            raise hr.RunnerError(
                f"{source} line {line}: feature column {column!r} is not numeric "
                f"({str(values.iloc[line - 2])[:40]!r}); encode it as numbers or leave it out "
                "with ml.features"
            )
        if values.isna().any():
            line = int(values.isna().to_numpy().argmax()) + 2
            raise hr.RunnerError(
                f"{source} line {line}: feature column {column!r} has a missing value"
            )
    if target and frame[target].isna().any():
        line = int(frame[target].isna().to_numpy().argmax()) + 2
        raise hr.RunnerError(f"{source} line {line}: the target {target!r} is missing")
    if target and p["problem"] == "regression" and not pd.api.types.is_numeric_dtype(frame[target]):
        line = tables.first_bad_row(frame[target])
        raise hr.RunnerError(
            f"{source} line {line}: the target {target!r} of a regression is not numeric"
        )
    return features, target


def make_estimator(p: dict[str, Any]) -> Any:
    module, _, cls = ESTIMATORS[p["model"]].rpartition(".")
    estimator = getattr(importlib.import_module(f"sklearn.{module}"), cls)()
    known = estimator.get_params()
    hyper = dict(p["hyperparameters"])
    for name in hyper:
        if name not in known:
            raise hr.RunnerError(
                f"ml.hyperparameters.{name}: {cls} has no such parameter "
                f"(it has: {', '.join(sorted(known))})"
            )
    if "random_state" in known and "random_state" not in hyper:
        hyper["random_state"] = p["seed"]
    if p["model"].startswith("mlp-"):
        hyper.setdefault("max_iter", p["epochs"])
    estimator.set_params(**hyper)
    return estimator


def fit(estimator: Any, x: Any, y: Any, p: dict[str, Any], budget: hr.EpochBudget) -> None:
    """Fit, in steps where the estimator allows it, so progress shows while it trains."""
    params = estimator.get_params()
    try:
        if p["model"].startswith("mlp-") and y is not None:
            epochs = int(params["max_iter"])
            budget.epochs = epochs
            classes = np.unique(y) if p["problem"] == "classification" else None
            for epoch in range(1, epochs + 1):
                if classes is not None:
                    estimator.partial_fit(x, y, classes=classes)
                else:
                    estimator.partial_fit(x, y)
                hr.progress(epoch, epochs, "epoch", metric="loss", value=estimator.loss_)
                budget.check(epoch)
            return
        if "n_estimators" in params and "warm_start" in params and y is not None:
            total = int(params["n_estimators"])
            steps = min(STAGES, total)
            for step in range(1, steps + 1):
                estimator.set_params(warm_start=True, n_estimators=max(1, total * step // steps))
                estimator.fit(x, y)
                hr.progress(step, steps, "step", trees=estimator.n_estimators)
            estimator.set_params(warm_start=False)
            return
        if y is None:
            estimator.fit(x)
        else:
            estimator.fit(x, y)
    except InvalidParameterError as exc:
        raise hr.RunnerError(f"ml.hyperparameters: {exc}") from None
    except ValueError as exc:
        raise hr.RunnerError(f"the model cannot be fitted to this data: {exc}") from None


def score(p: dict[str, Any], estimator: Any, x: Any, y: Any, labels: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    problem = p["problem"]
    predicted = estimator.predict(x) if problem != "clustering" else None
    for metric in p["metrics"] or DEFAULT_METRICS[problem]:
        if problem == "classification":
            out[metric] = CLASSIFICATION_METRICS[metric](y, predicted)
        elif problem == "regression":
            mse = skm.mean_squared_error(y, predicted)
            out[metric] = {
                "r2": skm.r2_score(y, predicted),
                "mae": skm.mean_absolute_error(y, predicted),
                "mse": mse,
                "rmse": float(np.sqrt(mse)),
            }[metric]
        else:
            ok = len(set(labels)) > 1
            if metric == "adjusted_rand":
                out[metric] = skm.adjusted_rand_score(y, labels) if y is not None else None
            elif metric == "silhouette":
                out[metric] = skm.silhouette_score(x, labels) if ok else None
            elif metric == "calinski_harabasz":
                out[metric] = skm.calinski_harabasz_score(x, labels) if ok else None
            else:
                out[metric] = skm.davies_bouldin_score(x, labels) if ok else None
    return out


def main(p: dict[str, Any]) -> None:
    started = time.monotonic()
    budget = hr.EpochBudget(p["epochs"], float(p.get("timeout_seconds") or 0))
    frame, source = load(p)
    features, target = columns(frame, p, source)
    x = frame[features].to_numpy(dtype=float)
    y = frame[target].to_numpy() if target else None
    problem = p["problem"]
    result: dict[str, Any] = {
        "framework": "scikit-learn",
        "model": p["model"],
        "estimator": ESTIMATORS[p["model"]].rpartition(".")[2],
        "problem": problem,
        "data": source,
        "rows": len(frame),
        "features": features,
        "target": target or None,
        "seed": p["seed"],
    }
    estimator = make_estimator(p)
    if problem == "clustering":
        fit(estimator, x, None, p, budget)
        labels = estimator.labels_
        result["metrics"] = score(p, estimator, x, y, labels)
        result["clusters"] = len(set(labels.tolist()) - {-1})
    elif p["k_folds"]:
        k = int(p["k_folds"])
        splitter: Any = (
            StratifiedKFold(k, shuffle=True, random_state=p["seed"])
            if problem == "classification"
            else KFold(k, shuffle=True, random_state=p["seed"])
        )
        try:
            folds = list(splitter.split(x, y))
        except ValueError as exc:
            raise hr.RunnerError(f"ml.k_folds: {exc}") from None
        per_fold = []
        for i, (train, test) in enumerate(folds, start=1):
            model = make_estimator(p)
            fit(model, x[train], y[train], p, hr.EpochBudget(p["epochs"], 0))
            per_fold.append(score(p, model, x[test], y[test], None))
            first = next(iter(per_fold[-1]))
            hr.progress(i, k, "fold", metric=first, value=per_fold[-1][first])
        result["validation"] = {"method": "k-fold", "k": k}
        result["folds"] = per_fold
        result["metrics"] = {m: float(np.mean([f[m] for f in per_fold])) for m in per_fold[0]}
        fit(estimator, x, y, p, budget)  # the model handed back is trained on all the data
    else:
        stratify = y if problem == "classification" else None
        try:
            x_train, x_test, y_train, y_test = train_test_split(
                x, y, test_size=p["validation_split"], random_state=p["seed"], stratify=stratify
            )
        except ValueError as exc:
            raise hr.RunnerError(f"ml.validation_split: {exc}") from None
        fit(estimator, x_train, y_train, p, budget)
        result["validation"] = {
            "method": "split",
            "fraction": p["validation_split"],
            "train_rows": len(x_train),
            "validation_rows": len(x_test),
        }
        result["metrics"] = score(p, estimator, x_test, y_test, None)
        if problem == "classification":
            labels = np.unique(y)
            result["classes"] = labels.tolist()
            result["confusion_matrix"] = skm.confusion_matrix(
                y_test, estimator.predict(x_test), labels=labels
            ).tolist()
    joblib.dump(estimator, hr.results_dir() / "model.joblib")
    result["artifacts"] = ["model.joblib"]
    if p["export_onnx"]:  # asked for: importing onnx alone takes about a second
        onnx_note = export_onnx(estimator, len(features))
        if onnx_note is None:
            result["artifacts"].append("model.onnx")
        else:
            result["onnx"] = onnx_note
    result["seconds"] = round(time.monotonic() - started, 3)
    hr.write_json("metrics.json", result)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items() if v is not None)
    hr.write_text("summary.txt", f"{p['model']} on {source}: {shown}\n")
    print(f"metrics: {shown}", flush=True)


def export_onnx(estimator: Any, n_features: int) -> str | None:
    """None when model.onnx was written, else why not (skl2onnx absent or not convertible)."""
    try:
        from skl2onnx import to_onnx
    except ImportError:
        return "not written: skl2onnx is not in this environment"
    try:
        model = to_onnx(estimator, np.zeros((1, n_features), dtype=np.float32))
    except Exception as exc:  # skl2onnx raises many types for what it cannot convert
        return f"not written: skl2onnx cannot convert this model ({type(exc).__name__})"
    (hr.results_dir() / "model.onnx").write_bytes(model.SerializeToString())
    return None


if __name__ == "__main__":
    hr.run(main)
