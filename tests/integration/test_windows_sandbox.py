"""The process sandbox on real Windows: Job Object limits, low integrity, a task end to end.

Runs in the release workflow's Windows job (these need kernel32); skipped elsewhere, where
tests/unit/test_windows_job.py checks the platform-independent parts.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "win32", reason="needs Windows (kernel32)")

if sys.platform == "win32":
    from hivemind_worker.engine.executors import windows_job as wj
    from hivemind_worker.engine.executors.process import ProcessExecutor
    from hivemind_worker.tasks import MiB, Resources, TaskKind, TaskSpec, TaskStatus


def start_in_job(
    limits: wj.JobLimits, code: str, cwd: Path
) -> tuple[subprocess.Popen[str], wj.Job]:
    job = wj.Job(limits)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=cwd, creationflags=wj.creation_flags(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    job.adopt(proc.pid)
    return proc, job


def test_job_memory_limit_holds_for_the_tree(tmp_path: Path) -> None:
    proc, job = start_in_job(wj.JobLimits(64 * MiB, 1.0, 8), "x = bytearray(300 << 20)", tmp_path)
    out, _ = proc.communicate(timeout=60)
    job.close()
    assert proc.returncode != 0 and "MemoryError" in out


def test_job_active_process_limit_caps_children(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys\n"
        "kids = []\n"
        "try:\n"
        "    for _ in range(10):\n"
        "        kids.append(subprocess.Popen([sys.executable, '-c',\n"
        "                                      'import time; time.sleep(30)']))\n"
        "    print('UNCAPPED')\n"
        "except OSError as exc:\n"
        "    print('CAPPED', len(kids))\n"
        "for k in kids: k.kill()\n"
    )
    proc, job = start_in_job(wj.JobLimits(512 * MiB, 1.0, 3), code, tmp_path)
    out, _ = proc.communicate(timeout=60)
    job.close()
    assert "CAPPED 2" in out, out


def test_closing_the_job_kills_the_tree(tmp_path: Path) -> None:
    proc, job = start_in_job(
        wj.JobLimits(512 * MiB, 1.0, 8), "import time; time.sleep(60)", tmp_path
    )
    job.close()
    assert proc.wait(timeout=30) == wj.EXIT_KILLED or proc.returncode != 0


def test_low_integrity_task_writes_only_in_its_workspace(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    outside = tmp_path / "outside"
    workspace.mkdir()
    outside.mkdir()
    wj.label_low(str(workspace))
    (workspace / "main.py").write_text(
        "import sys\n"
        "open('inside.txt', 'w').write('ok')\n"
        "try:\n"
        f"    open({str(outside / 'escape.txt')!r}, 'w').write('x'); print('ESCAPED')\n"
        "except OSError as exc:\n"
        "    print('DENIED', exc.errno)\n"
    )
    job = wj.Job(wj.JobLimits(256 * MiB, 1.0, 8))
    proc = subprocess.Popen(
        wj.launch_argv(sys.executable, "main.py", ()), cwd=workspace,
        creationflags=wj.creation_flags(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    job.adopt(proc.pid)
    out, _ = proc.communicate(timeout=60)
    job.close()
    assert proc.returncode == 0, out
    assert "DENIED" in out and "ESCAPED" not in out
    assert (workspace / "inside.txt").read_text() == "ok"
    assert not (outside / "escape.txt").exists()


async def test_process_executor_runs_a_task_on_windows(tmp_path: Path) -> None:
    executor = ProcessExecutor(tmp_path / "work")
    task = TaskSpec(
        task_id="w1", lease_id="l1", kind=TaskKind.PYTHON, timeout_seconds=60,
        resources=Resources(1.0, 256 * MiB, 64 * MiB),
        source="open('results/out.txt', 'w').write('hello from a job')\n",
    )  # fmt: skip
    await executor.prepare(task)
    started = time.monotonic()
    result = await executor.run(task)
    await executor.cleanup(task.task_id)
    await executor.close()
    assert result.status is TaskStatus.SUCCEEDED, (result.error, result.log_tail)
    assert result.archive is not None and time.monotonic() - started < 60
