"""The ml and data task kinds end to end: the real pool, the process sandbox, real scikit-learn,
pandas and Pillow in uv-built environments, and numbers checked against independent sums."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from helpers.harness import archive_files, queue_client, start_pool, start_worker
from helpers.runners import (
    data_task,
    ml_task,
    process_executor,
    reachable_dir,
    remove_environments,
    shared_environments,
)
from hivemind_worker.engine.events import TaskProgress
from hivemind_worker.engine.runners import requirements
from hivemind_worker.engine.runners.environments import Environments
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = [
    pytest.mark.usefixtures("memory_keyring"),
    pytest.mark.timeout(600),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def envs() -> Iterator[Environments]:
    root = reachable_dir("hivemind-test-envs-")
    try:
        yield shared_environments(root / "environments")
    finally:
        remove_environments(root)


async def run_tasks(
    tmp_path: Path, envs: Environments, *specs: pb.TaskSpec, **settings: object
) -> tuple[list[pb.TaskInfo], list[dict[str, bytes]], list[object]]:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / "node", pool.address, executor=process_executor(envs), **settings
    )
    try:
        async with queue_client(pool.address) as queue:
            ids = [await queue.submit(spec) for spec in specs]
            done = await queue.wait_done(ids, timeout=540)
            infos = [done[i] for i in ids]
            files = [
                archive_files(await queue.download(i)) if done[i].result_size else {} for i in ids
            ]
    finally:
        await worker.stop()
        await pool.stop()
    return infos, files, worker.events


def env_python(envs: Environments, name: str) -> str:
    import sys

    return str(envs.venv_python(name, requirements(name), sys.executable))


async def test_random_forest_on_iris_reaches_090_and_the_model_reloads(
    tmp_path: Path, envs: Environments
) -> None:
    spec = ml_task(
        framework="scikit-learn",
        model="random-forest-classifier",
        dataset="iris",
        validation_split=0.3,
        seed=7,
        hyperparameters={"n_estimators": 50},
        export_onnx=True,
    )
    (info,), (files,), events = await run_tasks(tmp_path, envs, spec)
    assert info.status == pb.TASK_STATUS_SUCCEEDED, (info.error, info.log_tail[-2000:])
    metrics = json.loads(files["results/metrics.json"])
    assert metrics["metrics"]["accuracy"] >= 0.9
    assert metrics["validation"] == {
        "method": "split", "fraction": 0.3, "train_rows": 105, "validation_rows": 45
    }  # fmt: skip
    assert sum(map(sum, metrics["confusion_matrix"])) == 45
    # The dashboard's progress: the forest grows in ten steps.
    steps = [e for e in events if isinstance(e, TaskProgress) and e.unit == "step"]
    assert [e.step for e in steps] == list(range(1, 11)) and steps[-1].steps == 10
    # The saved model reloads (in the runner's own environment) and predicts.
    model = tmp_path / "model.joblib"
    model.write_bytes(files["results/model.joblib"])
    check = await asyncio.to_thread(
        subprocess.run,
        [env_python(envs, "scikit-learn"), "-c",
         "import joblib, sys; from sklearn.datasets import load_iris; d = load_iris();"
         "m = joblib.load(sys.argv[1]); print((m.predict(d.data) == d.target).mean())",
         str(model)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert float(check.stdout) >= 0.9
    assert "results/model.onnx" in files  # asked for; skl2onnx converts a random forest


async def test_k_fold_on_a_csv_and_a_regression(tmp_path: Path, envs: Environments) -> None:
    rows = ["x1,x2,label"] + [
        f"{i % 7 + (10 if i % 2 else 0)},{(i * 3) % 5},{'big' if i % 2 else 'small'}"
        for i in range(60)
    ]
    linear = ["a,b,y"] + [f"{i},{i % 3},{2 * i + 3 * (i % 3) + 1}" for i in range(40)]
    classify = ml_task(
        framework="scikit-learn", model="logistic-regression", train_path="data.csv",
        target="label", k_folds=3, seed=1, inputs={"data.csv": "\n".join(rows).encode()},
    )  # fmt: skip
    regress = ml_task(
        framework="scikit-learn", model="linear-regression", train_path="lin.csv", target="y",
        metrics=["r2", "mae"], inputs={"lin.csv": "\n".join(linear).encode()},
    )  # fmt: skip
    infos, files, _ = await run_tasks(tmp_path, envs, classify, regress)
    assert [i.status for i in infos] == [pb.TASK_STATUS_SUCCEEDED] * 2, [i.error for i in infos]
    folds = json.loads(files[0]["results/metrics.json"])
    assert folds["validation"] == {"method": "k-fold", "k": 3} and len(folds["folds"]) == 3
    assert folds["metrics"]["accuracy"] == 1.0  # the two classes are 10 apart on x1
    fitted = json.loads(files[1]["results/metrics.json"])
    assert fitted["metrics"]["r2"] > 0.999 and fitted["metrics"]["mae"] < 1e-6


SALES = """region,product,units,price
north,apple,10,1.5
south,apple,4,1.25
north,pear,7,
east,pear,3,2.0
south,plum,,3.5
north,plum,12,3.0
east,apple,8,1.75
"""


async def test_csv_analysis_matches_an_independent_summary(
    tmp_path: Path, envs: Environments
) -> None:
    spec = data_task(
        "csv_analysis", "sales.csv", {"sales.csv": SALES.encode()},
        group_by=["region"], aggregations=["sum", "mean", "count"],
    )  # fmt: skip
    (info,), (files,), _ = await run_tasks(tmp_path, envs, spec)
    assert info.status == pb.TASK_STATUS_SUCCEEDED, (info.error, info.log_tail[-2000:])
    summary = json.loads(files["results/summary.json"])
    # The same numbers, computed here with the standard library only.
    rows = list(csv.DictReader(io.StringIO(SALES)))
    units = [float(r["units"]) for r in rows if r["units"]]
    price = [float(r["price"]) for r in rows if r["price"]]
    assert summary["rows"] == 7 and summary["columns"] == 4
    assert summary["missing"] == {"region": 0, "product": 0, "units": 1, "price": 1}
    stats = summary["statistics"]
    assert stats["units"]["count"] == len(units)
    assert stats["units"]["mean"] == pytest.approx(statistics.mean(units))
    assert stats["units"]["std"] == pytest.approx(statistics.stdev(units))
    assert stats["units"]["50%"] == pytest.approx(statistics.median(units))
    assert stats["price"]["min"] == min(price) and stats["price"]["max"] == max(price)
    assert stats["region"]["top"] == "north" and stats["region"]["top_count"] == 3
    groups = {g["region"]: g for g in summary["groups"]}
    for region in ("north", "south", "east"):
        mine = [float(r["units"]) for r in rows if r["region"] == region and r["units"]]
        assert groups[region]["units_sum"] == pytest.approx(sum(mine))
        assert groups[region]["units_count"] == len(mine)
        assert groups[region]["units_mean"] == pytest.approx(statistics.mean(mine))
    pairs = [(float(r["units"]), float(r["price"])) for r in rows if r["units"] and r["price"]]
    expected = statistics.correlation([a for a, _ in pairs], [b for _, b in pairs])
    assert summary["correlations"]["units"]["price"] == pytest.approx(expected)
    assert b"groupby.csv" in b" ".join(k.encode() for k in files)


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


async def test_image_processing_sizes_and_formats(tmp_path: Path, envs: Environments) -> None:
    inputs = {
        "photos/a.png": png((200, 100), (255, 0, 0)),
        "photos/nested/b.png": png((50, 80), (0, 255, 0)),
        "photos/notes.txt": b"not an image, and not one by its name either",
    }
    resize = data_task(
        "image_processing", "photos", inputs, width=64, height=48, format="webp", grayscale=True
    )
    thumb = data_task("image_processing", "photos", inputs, width=40, height=40, thumbnail=True,
                      rotate=90, format="jpeg")  # fmt: skip
    infos, files, _ = await run_tasks(tmp_path, envs, resize, thumb)
    assert [i.status for i in infos] == [pb.TASK_STATUS_SUCCEEDED] * 2, [i.error for i in infos]
    for name in ("results/images/a.webp", "results/images/nested/b.webp"):
        with Image.open(io.BytesIO(files[0][name])) as img:
            assert (img.format, img.size) == ("WEBP", (64, 48))
            # WebP keeps no grey mode: grey shows as equal channels (red would be 255, 0, 0).
            r, g, b = img.convert("RGB").getpixel((32, 24))
            assert abs(r - g) <= 2 and abs(g - b) <= 2 and 40 < r < 200
    # Rotated a quarter turn (200x100 -> 100x200), then fitted within 40x40 keeping its shape.
    with Image.open(io.BytesIO(files[1]["results/images/a.jpg"])) as img:
        assert (img.format, img.size) == ("JPEG", (20, 40))
    with Image.open(io.BytesIO(files[1]["results/images/nested/b.jpg"])) as img:
        assert (img.format, img.size) == ("JPEG", (40, 25))
    manifest = json.loads(files[0]["results/manifest.json"])
    assert [m["source"] for m in manifest["images"]] == ["photos/a.png", "photos/nested/b.png"]


TEXT = "The cat sat on the mat.\nThe dog sat too!\n"


async def test_text_analysis_word_counts(tmp_path: Path, envs: Environments) -> None:
    spec = data_task(
        "text_analysis", "corpus",
        {"corpus/one.txt": TEXT.encode(), "corpus/two.txt": b"Cat and dog.\n"},
        ngrams=[2], stop_words=["the", "on", "and", "too"],
    )  # fmt: skip
    (info,), (files,), _ = await run_tasks(tmp_path, envs, spec)
    assert info.status == pb.TASK_STATUS_SUCCEEDED, (info.error, info.log_tail[-2000:])
    summary = json.loads(files["results/summary.json"])
    assert summary["words"] == 13 and summary["documents"] == 2
    counts = dict(csv.reader(io.StringIO(files["results/word_counts.csv"].decode())))
    assert counts["the"] == "3" and counts["sat"] == "2" and counts["cat"] == "2"
    assert summary["top_terms"][:3] == [["cat", 2], ["dog", 2], ["sat", 2]]
    assert ["cat sat", 1] in summary["ngrams"]["2"]  # "the cat" holds a stop word
    docs = {d["document"]: d for d in summary["per_document"]}
    assert docs["corpus/one.txt"]["words"] == 10 and docs["corpus/one.txt"]["sentences"] == 2


# ------------------------------------------------------------------------------ bad inputs


async def test_unknown_model_is_refused_at_submit(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    try:
        async with queue_client(pool.address) as queue:
            spec = ml_task(framework="scikit-learn", model="gpt-5", dataset="iris")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await queue.submit(spec)
    finally:
        await pool.stop()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ml.model: 'gpt-5' is not a scikit-learn model" in (caught.value.details() or "")


async def test_each_bad_input_fails_with_a_reason_naming_it(
    tmp_path: Path, envs: Environments
) -> None:
    table = b"a,b,label\n1,2,x\n3,4,y\n5,red,x\n7,8,y\n"
    bad = [
        ml_task(framework="scikit-learn", model="random-forest-classifier", train_path="t.csv",
                target="nope", inputs={"t.csv": table}),
        ml_task(framework="scikit-learn", model="random-forest-classifier", train_path="t.csv",
                target="label", inputs={"t.csv": table}),
        data_task("image_processing", "pics", {"pics/ok.png": png((8, 8), (1, 2, 3)),
                  "pics/broken.jpg": b"\xff\xd8\xff\xe0 not really a jpeg"}, format="png"),
        data_task("text_analysis", "notes.txt",
                  {"notes.txt": b"fine\nstill fine\nbad \xff here\n"}),
        ml_task(framework="scikit-learn", model="mlp-classifier", dataset="iris", epochs=100000,
                timeout=20),
    ]  # fmt: skip
    infos, files, _ = await run_tasks(tmp_path, envs, *bad)
    assert [i.status for i in infos] == [pb.TASK_STATUS_FAILED] * 5
    errors = [i.error for i in infos]
    assert errors[0].startswith("ml.target: column 'nope' is not in t.csv"), errors[0]
    assert errors[1].startswith("t.csv line 4: feature column 'b' is not numeric"), errors[1]
    assert errors[2].startswith("pics/broken.jpg: not an image Pillow can read"), errors[2]
    assert errors[3].startswith("notes.txt line 3: not UTF-8 text (byte 0xff"), errors[3]
    assert errors[4].startswith("ml.epochs: 100000 epochs at about"), errors[4]
    assert "beyond the task's timeout of 20 s" in errors[4]
    for info in infos:
        assert b"Traceback" not in info.log_tail
    # What could be done still was: the good image is in the results.
    assert "results/images/ok.png" in files[2]


async def test_the_pool_offers_only_what_the_worker_enabled(
    tmp_path: Path, envs: Environments
) -> None:
    """A worker with scikit-learn off never gets the training; it still does the data task."""
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / "node", pool.address, executor=process_executor(envs), ml_scikit_learn=False
    )
    try:
        async with queue_client(pool.address) as queue:
            train = await queue.submit(
                ml_task(framework="scikit-learn", model="k-means", dataset="iris")
            )
            count = await queue.submit(
                data_task("text_analysis", "t.txt", {"t.txt": b"one two two\n"})
            )
            done = await queue.wait_done([count], timeout=300)
            assert done[count].status == pb.TASK_STATUS_SUCCEEDED, done[count].error
            assert (await queue.get(train)).status == pb.TASK_STATUS_QUEUED
    finally:
        await worker.stop()
        await pool.stop()


async def test_submit_and_extract_from_the_command_line(tmp_path: Path, envs: Environments) -> None:
    """The README's commands: `submit --ml ... --train`, `submit --data ...`, `result --extract`."""
    import os
    import sys

    from helpers.harness import PASSWORD, USER

    table = tmp_path / "data.csv"
    table.write_text("a,b,label\n" + "".join(f"{i},{i % 4},{i % 2}\n" for i in range(40)))
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node", pool.address, executor=process_executor(envs))
    env = {**os.environ, "HIVEMIND_PASSWORD": PASSWORD}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "hivemind_worker.pool.cli", *args, "--pool", pool.address,
             "--user", USER], capture_output=True, text=True, timeout=300, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    try:
        train = await asyncio.to_thread(
            cli, "submit", "--ml", "scikit-learn", "--model", "random-forest-classifier",
            "--train", str(table), "--target", "label", "--param", "n_estimators=20",
        )  # fmt: skip
        words = await asyncio.to_thread(
            cli, "submit", "--data", "csv-analysis", "--input", str(table), "--group-by", "label"
        )
        async with queue_client(pool.address) as queue:
            done = await queue.wait_done([train, words], timeout=300)
        assert all(i.status == pb.TASK_STATUS_SUCCEEDED for i in done.values()), done
        out = tmp_path / "out"
        await asyncio.to_thread(cli, "result", train, "--extract", str(out))
        metrics = json.loads((out / "results" / "metrics.json").read_text())
        assert metrics["estimator"] == "RandomForestClassifier" and metrics["rows"] == 40
        assert (out / "results" / "model.joblib").stat().st_size > 0
    finally:
        await worker.stop()
        await pool.stop()


async def test_the_demo_runs_the_ml_and_data_samples_showing_progress(tmp_path: Path) -> None:
    """`hivemind-worker demo` as a person runs it, first use: the environments are built while
    the person watches, then the forest's accuracy and the CSV's summary are printed."""
    import os
    import sys

    env = {**os.environ, "HIVEMIND_HOME": str(tmp_path), "DOCKER_ENABLED": "false"}
    for name in (
        "NODE_ID",
        "NODE_POOL_ADDRESS",
        "MAX_CPU_CORES",
        "HIVEMIND_ACCOUNT",
        "HIVEMIND_ML_SCIKIT_LEARN",
        "HIVEMIND_DATA_PROCESSING",
    ):
        env.pop(name, None)  # fmt: skip
    # The environments live in the work folder, which tasks running as nobody (a root
    # worker's) must pass through: made 0700 here, as the worker's first workspace makes it.
    parent = reachable_dir("hivemind-test-demo-")
    work = parent / "work"
    work.mkdir(mode=0o700)
    env["WORK_DIR"] = str(work)
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "hivemind_worker", "demo", "--headless", "--tasks", "1"],
            capture_output=True, text=True, env=env, timeout=540, check=False,
        )  # fmt: skip
    finally:
        remove_environments(parent)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Done: 3 of 3 tasks succeeded." in out
    forest = "random forest on iris (scikit-learn)"
    assert f"{forest}: preparing: scikit-learn: building the scikit-learn environment" in out
    assert f"{forest}: preparing: scikit-learn: the scikit-learn environment is ready" in out
    assert f"{forest}: step 10 of 10" in out
    accuracy = out.split(f"{forest}: random-forest-classifier on the iris data set: accuracy ")
    assert len(accuracy) == 2 and float(accuracy[1].split(",")[0]) >= 0.9, out
    assert "sales by region (csv analysis): preparing: data: building the data environment" in out
    assert "sales by region (csv analysis): sales.csv: 2000 rows, 4 columns (2 numeric), " in out
