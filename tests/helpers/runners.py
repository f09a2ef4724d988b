"""Builders of ml and data task specs, and one shared set of runner environments for a test run."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.engine.runners.environments import Environments
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.task_params import param_value

RESOURCES = pb.Resources(cpus=1, memory_bytes=1536 << 20, disk_bytes=512 << 20)


def reachable_dir(prefix: str) -> Path:
    """A fresh folder that tasks running as nobody can reach (when the tests run as root, the
    process sandbox runs tasks as nobody, and pytest's own temporary folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp" if os.name != "nt" else None))
    folder.chmod(0o755)
    return folder


def shared_environments(root: Path) -> Environments:
    """Environments under `root`, built once and reused by every test that passes the same root
    (uv's own download cache is shared with the machine's)."""
    return Environments(root)


def process_executor(environments: Environments):  # type: ignore[no-untyped-def]
    """For start_worker(executor=...): the process sandbox with runner environments."""
    return lambda settings: ProcessExecutor(settings.work_dir, environments=environments)


def ml_task(
    *,
    inputs: dict[str, bytes] | None = None,
    hyperparameters: dict[str, int | float | str | bool] | None = None,
    timeout: int = 300,
    **ml: object,
) -> pb.TaskSpec:
    params = pb.MlParams(**ml)  # type: ignore[arg-type]
    for name, value in (hyperparameters or {}).items():
        params.hyperparameters[name].CopyFrom(param_value(value))
    return pb.TaskSpec(
        kind=pb.TASK_KIND_ML,
        ml=params,
        input_files=[pb.InputFile(path=k, content=v) for k, v in (inputs or {}).items()],
        resources=RESOURCES,
        timeout_seconds=timeout,
    )


def data_task(
    processing: str,
    input_path: str,
    inputs: dict[str, bytes],
    *,
    timeout: int = 300,
    **options: object,
) -> pb.TaskSpec:
    data = pb.DataParams(processing=processing, input_path=input_path)
    if processing == "csv_analysis":
        data.csv.CopyFrom(pb.CsvAnalysis(**options))  # type: ignore[arg-type]
    elif processing == "image_processing":
        data.image.CopyFrom(pb.ImageProcessing(**options))  # type: ignore[arg-type]
    else:
        data.text.CopyFrom(pb.TextAnalysis(**options))  # type: ignore[arg-type]
    return pb.TaskSpec(
        kind=pb.TASK_KIND_DATA,
        data=data,
        input_files=[pb.InputFile(path=k, content=v) for k, v in inputs.items()],
        resources=RESOURCES,
        timeout_seconds=timeout,
    )


def remove_environments(root: Path) -> None:
    """Remove a folder holding read-only environments."""

    def writable(func, name, _exc):  # type: ignore[no-untyped-def]
        os.chmod(os.path.dirname(name), stat.S_IRWXU)
        func(name)

    shutil.rmtree(root, onerror=writable)  # onexc from Python 3.12 on; 3.11 is supported
