"""PyTorch training (CPU): a declared network (mlp on a table, cnn on folders of images).

The layers are data (type, size, activation); the output layer is added to fit the problem.
Writes model.pt (the state_dict: loads with `torch.load(..., weights_only=True)`),
metrics.json (metrics, per-epoch history, the layers to rebuild the network) and summary.txt
under results/. Needs torch, numpy, pandas, Pillow.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hivemind"))
import hivemind_runner as hr
import networks
import numpy as np
import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softmax": None}


def build(p: dict[str, Any], data: networks.Data) -> nn.Sequential:
    """The declared layers and an output layer; convolutions keep their input's size."""
    modules: list[nn.Module] = []
    flat = p["model"] == "mlp"
    for layer in p["layers"]:
        kind = layer["type"]
        if kind == "dense" and not flat:
            modules.append(nn.Flatten())
            flat = True
        if kind == "dense":
            modules.append(nn.LazyLinear(layer["units"]))
        elif kind == "conv2d":
            modules.append(nn.LazyConv2d(layer["filters"], layer["kernel_size"], padding="same"))
        elif kind == "maxpool2d":
            modules.append(nn.MaxPool2d(layer["kernel_size"]))
        elif kind == "flatten":
            modules.append(nn.Flatten())
            flat = True
        elif kind == "dropout":
            modules.append(nn.Dropout(layer["rate"]))
        activation = ACTIVATIONS.get(layer.get("activation") or "")
        if activation is not None:
            modules.append(activation())
    if not flat:
        modules.append(nn.Flatten())
    # Softmax is in the cross-entropy loss: the output layer gives logits.
    modules.append(nn.LazyLinear(len(data.classes) if data.classes else 1))
    return nn.Sequential(*modules)


def tensor(x: np.ndarray, images: bool) -> torch.Tensor:
    # Images arrive as (N, H, W, C); torch convolutions want (N, C, H, W).
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if images else x))


def main(p: dict[str, Any]) -> None:
    started = time.monotonic()
    torch.manual_seed(int(p["seed"]))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1))  # fmt: skip
    data = networks.load(p)
    images = p["model"] == "cnn"
    classify = p["problem"] == "classification"
    x_train, x_val = tensor(data.x_train, images), tensor(data.x_val, images)
    y_train = torch.from_numpy(data.y_train if classify else data.y_train.reshape(-1, 1))
    model = build(p, data)
    try:
        model(x_train[:1])  # sizes the lazy layers
    except RuntimeError as exc:
        raise networks.layer_error(exc) from None
    loss_fn: nn.Module = {
        "cross-entropy": nn.CrossEntropyLoss(), "mse": nn.MSELoss(), "mae": nn.L1Loss(),
    }[p["loss"] or ("cross-entropy" if classify else "mse")]  # fmt: skip
    optimizer_class = torch.optim.Adam if p["optimizer"] == "adam" else torch.optim.SGD
    optimizer = optimizer_class(model.parameters(), lr=float(p["learning_rate"]))
    budget = hr.EpochBudget(int(p["epochs"]), float(p.get("timeout_seconds") or 0))
    generator = torch.Generator().manual_seed(int(p["seed"]))
    history = []
    for epoch in range(1, int(p["epochs"]) + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), int(p["batch_size"])):
            batch = order[start : start + int(p["batch_size"])]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            total += float(loss) * len(batch)
        train_loss = total / len(order)
        history.append({"epoch": epoch, "loss": train_loss})
        hr.progress(epoch, int(p["epochs"]), "epoch", metric="loss", value=train_loss)
        budget.check(epoch)
    model.eval()
    with torch.no_grad():
        out = model(x_val)
    predicted = out.argmax(dim=1).numpy() if classify else out.reshape(-1).numpy()
    torch.save(model.state_dict(), hr.results_dir() / "model.pt")
    networks.report(p, data, history, predicted, time.monotonic() - started, ["model.pt"],
                    "pytorch")  # fmt: skip


if __name__ == "__main__":
    hr.run(main)
