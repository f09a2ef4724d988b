"""TensorFlow and PyTorch runners end to end: the real pool, the process sandbox, tensorflow-cpu
and torch (CPU) in uv-built environments, networks declared as data, numbers checked.

Their environments are large (about 1.5 GB and 1.1 GB), so this tier runs apart:
`python3 build.py test-ml` (pytest -m ml_frameworks). PyTorch's CPU build is not on PyPI: the
environment takes it from HIVEMIND_RUNNER_FIND_LINKS (build.py points it at /opt/wheels).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.harness import archive_files, queue_client, start_pool, start_worker
from helpers.runners import ml_task, process_executor, reachable_dir, remove_environments
from hivemind_worker.engine.events import TaskProgress
from hivemind_worker.engine.runners import requirements
from hivemind_worker.engine.runners.environments import Environments
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = [
    pytest.mark.ml_frameworks,
    pytest.mark.slow,
    pytest.mark.usefixtures("memory_keyring"),
    pytest.mark.timeout(1500),
]
FRAMEWORKS = ["tensorflow", "pytorch"]
MODEL_FILE = {"tensorflow": "results/model.keras", "pytorch": "results/model.pt"}


@pytest.fixture(scope="module")
def envs() -> Iterator[Environments]:
    # In a folder tasks running as nobody can reach (a root worker's tasks do; pytest's own
    # temporary folders are 0700), as tests/integration/test_runners.py has it.
    links = os.environ.get("HIVEMIND_RUNNER_FIND_LINKS", "")
    root = reachable_dir("hivemind-test-ml-")
    try:
        yield Environments(root / "environments", find_links=[links] if links else [])
    finally:
        remove_environments(root)


def table(rows: int, label: object) -> bytes:
    rng = np.random.default_rng(3)
    lines = ["a,b,label"]
    for a, b in rng.normal(size=(rows, 2)):
        lines.append(f"{a:.5f},{b:.5f},{label(a, b)}")
    return ("\n".join(lines) + "\n").encode()


def stripes(vertical: bool, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(12, 12)).astype(np.uint8)
    offset = int(rng.integers(0, 2))
    for i in range(offset, 12, 3):
        if vertical:
            pixels[:, i] = 230
        else:
            pixels[i, :] = 230
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def dense(units: int, activation: str = "relu") -> pb.Layer:
    return pb.Layer(type="dense", units=units, activation=activation)


def specs(framework: str) -> list[pb.TaskSpec]:
    """An mlp classifier, an mlp regression, a cnn on images, and layers that cannot fit."""
    mlp = ml_task(
        framework=framework, model="mlp", train_path="points.csv", target="label",
        layers=[dense(16), dense(8)], epochs=30, learning_rate=0.01, seed=5,
        inputs={"points.csv": table(240, lambda a, b: "pos" if a + b > 0 else "neg")},
        timeout=900,
    )  # fmt: skip
    regression = ml_task(
        framework=framework, model="mlp", train_path="line.csv", target="label",
        task="regression", layers=[dense(16)], epochs=60, learning_rate=0.02, seed=5,
        metrics=["r2", "mae"],
        inputs={"line.csv": table(240, lambda a, b: f"{2 * a - 3 * b + 1:.5f}")},
        timeout=900,
    )  # fmt: skip
    images = {
        f"shapes/{kind}/{i}.png": stripes(kind == "vertical", seed)
        for kind, first in (("vertical", 100), ("horizontal", 0))
        for i, seed in enumerate(range(first, first + 30))
    }
    cnn = ml_task(
        framework=framework, model="cnn", train_path="shapes", seed=5, epochs=15,
        learning_rate=0.01, batch_size=16, validation_split=0.25,
        layers=[pb.Layer(type="conv2d", filters=8, kernel_size=3, activation="relu"),
                pb.Layer(type="maxpool2d", kernel_size=2), dense(16)],
        inputs=images, hyperparameters={"image_size": 12, "grayscale": True}, timeout=900,
    )  # fmt: skip
    too_deep = ml_task(
        framework=framework, model="cnn", train_path="shapes", epochs=2, inputs=images,
        layers=[pb.Layer(type="maxpool2d", kernel_size=15)],
        hyperparameters={"image_size": 12, "grayscale": True}, timeout=900,
    )  # fmt: skip
    return [mlp, regression, cnn, too_deep]


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_declared_networks_train_and_report(
    framework: str, tmp_path: Path, envs: Environments
) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    enabled = {"ml_tensorflow": framework == "tensorflow", "ml_pytorch": framework == "pytorch"}
    worker = await start_worker(
        tmp_path / "node", pool.address, executor=process_executor(envs), **enabled
    )
    try:
        async with queue_client(pool.address) as queue:
            ids = [await queue.submit(spec) for spec in specs(framework)]
            done = await queue.wait_done(ids, timeout=1400)
            infos = [done[i] for i in ids]
            files = [archive_files(await queue.download(i)) if done[i].result_size else {}
                     for i in ids]  # fmt: skip
    finally:
        await worker.stop()
        await pool.stop()
    statuses = [pb.TaskStatus.Name(i.status) for i in infos]
    assert statuses[:3] == ["TASK_STATUS_SUCCEEDED"] * 3, [(i.error, i.log_tail[-1500:])
                                                          for i in infos]  # fmt: skip
    mlp, regression, cnn = (json.loads(f["results/metrics.json"]) for f in files[:3])
    assert mlp["framework"] == framework and mlp["classes"] == ["neg", "pos"]
    assert mlp["metrics"]["accuracy"] >= 0.9, mlp
    assert sum(map(sum, mlp["confusion_matrix"])) == mlp["validation"]["validation_rows"] == 48
    assert len(mlp["history"]) == 30 and mlp["history"][-1]["loss"] < mlp["history"][0]["loss"]
    assert regression["metrics"]["r2"] >= 0.95, regression
    assert cnn["metrics"]["accuracy"] >= 0.9, cnn
    assert cnn["classes"] == ["horizontal", "vertical"]
    for f in files[:3]:
        assert len(f[MODEL_FILE[framework]]) > 1000
    # The layers that cannot fit 12x12 images fail with a reason naming them, no traceback.
    assert infos[3].status == pb.TASK_STATUS_FAILED
    assert infos[3].error.startswith("ml.layers: these layers do not fit the data"), infos[3].error
    assert b"Traceback" not in infos[3].log_tail
    # Each epoch was shown as it ended.
    epochs = [e for e in worker.events if isinstance(e, TaskProgress) and e.task_id == ids[0]]
    assert [e.step for e in epochs if e.unit == "epoch"] == list(range(1, 31))
    assert epochs[-1].steps == 30 and epochs[-1].metric == "loss" and epochs[-1].value is not None
    # The saved model reloads in the framework and predicts as reported.
    model = tmp_path / Path(MODEL_FILE[framework]).name
    model.write_bytes(files[0][MODEL_FILE[framework]])
    python = envs.venv_python(framework, requirements(framework), sys.executable)
    check = RELOAD[framework]
    done = await asyncio.to_thread(
        subprocess.run, [str(python), "-c", check, str(model)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "ok"


RELOAD = {
    "tensorflow": (
        "import os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'; import keras, numpy as np;"
        "m = keras.models.load_model(sys.argv[1]); out = m.predict(np.zeros((1, 2)), verbose=0);"
        "print('ok' if out.shape == (1, 2) else out.shape)"
    ),
    "pytorch": (
        "import sys, torch; s = torch.load(sys.argv[1], weights_only=True);"
        "shapes = [tuple(v.shape) for v in s.values()];"
        "print('ok' if shapes[0] == (16, 2) and shapes[-1] == (2,) else shapes)"
    ),
}
