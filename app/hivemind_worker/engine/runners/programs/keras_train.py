"""TensorFlow (Keras 3, CPU) training: a declared network (mlp on a table, cnn on folders of
images).

The layers are data (type, size, activation); the output layer is added to fit the problem.
Writes model.keras (loads with `keras.models.load_model`), metrics.json (metrics, per-epoch
history, the layers) and summary.txt under results/. Needs tensorflow-cpu, numpy, pandas,
Pillow.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

# Quiet: TensorFlow's start-up notes would fill the task's log tail.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hivemind"))
import hivemind_runner as hr
import keras
import networks
import numpy as np


class Progress(keras.callbacks.Callback):
    """One progress line per epoch, and the timeout budget checked after the first."""

    def __init__(self, epochs: int, budget: hr.EpochBudget, history: list[dict[str, float]]):
        super().__init__()
        self.epochs, self.budget, self.history = epochs, budget, history

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        loss = float((logs or {}).get("loss", float("nan")))
        self.history.append({"epoch": epoch + 1, "loss": loss})
        hr.progress(epoch + 1, self.epochs, "epoch", metric="loss", value=loss)
        self.budget.check(epoch + 1)


def build(p: dict[str, Any], data: networks.Data) -> keras.Sequential:
    shape = data.x_train.shape[1:]
    layers: list[Any] = [keras.Input(shape=shape)]
    flat = len(shape) == 1
    for layer in p["layers"]:
        kind, activation = layer["type"], layer.get("activation") or None
        if kind == "dense" and not flat:
            layers.append(keras.layers.Flatten())
            flat = True
        if kind == "dense":
            layers.append(keras.layers.Dense(layer["units"], activation=activation))
        elif kind == "conv2d":
            layers.append(keras.layers.Conv2D(layer["filters"], layer["kernel_size"],
                                              padding="same", activation=activation))  # fmt: skip
        elif kind == "maxpool2d":
            layers.append(keras.layers.MaxPooling2D(layer["kernel_size"]))
        elif kind == "flatten":
            layers.append(keras.layers.Flatten())
            flat = True
        elif kind == "dropout":
            layers.append(keras.layers.Dropout(layer["rate"]))
    if not flat:
        layers.append(keras.layers.Flatten())
    # The output layer gives logits; the loss applies the softmax.
    layers.append(keras.layers.Dense(len(data.classes) if data.classes else 1))
    return keras.Sequential(layers)


def main(p: dict[str, Any]) -> None:
    started = time.monotonic()
    keras.utils.set_random_seed(int(p["seed"]))
    data = networks.load(p)
    classify = p["problem"] == "classification"
    try:
        model = build(p, data)
    except ValueError as exc:
        raise networks.layer_error(exc) from None
    loss = {
        "cross-entropy": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "mse": keras.losses.MeanSquaredError(),
        "mae": keras.losses.MeanAbsoluteError(),
    }[p["loss"] or ("cross-entropy" if classify else "mse")]
    rate = float(p["learning_rate"])
    optimizer = (keras.optimizers.Adam(rate) if p["optimizer"] == "adam"
                 else keras.optimizers.SGD(rate))  # fmt: skip
    model.compile(optimizer=optimizer, loss=loss)
    history: list[dict[str, float]] = []
    epochs = int(p["epochs"])
    budget = hr.EpochBudget(epochs, float(p.get("timeout_seconds") or 0))
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=int(p["batch_size"]),
              verbose=0, shuffle=True, callbacks=[Progress(epochs, budget, history)])  # fmt: skip
    out = np.asarray(model.predict(data.x_val, verbose=0))
    predicted = out.argmax(axis=1) if classify else out.reshape(-1)
    model.save(hr.results_dir() / "model.keras")
    networks.report(p, data, history, predicted, time.monotonic() - started, ["model.keras"],
                    "tensorflow")  # fmt: skip


if __name__ == "__main__":
    hr.run(main)
