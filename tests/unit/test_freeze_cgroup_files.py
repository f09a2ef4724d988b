"""What TreeControl writes to a task's cgroup v2 folder (a plain folder standing in for cgroupfs:
this machine has cgroup v1 only), and its fall-back to signals when the cgroup refuses."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from hivemind_worker.engine.executors.freeze import TreeControl


def test_fake_cgroupfs_gets_freeze_and_cpu_max(tmp_path: Path) -> None:
    sent: list[int] = []
    control = TreeControl(sent.append, cgroup=tmp_path, cpus=2.0)
    control.freeze()
    assert (tmp_path / "cgroup.freeze").read_text() == "1"
    control.thaw()
    assert (tmp_path / "cgroup.freeze").read_text() == "0"
    control.set_share(0.25)
    assert (tmp_path / "cpu.max").read_text() == "50000 100000"  # a quarter of two cores
    control.set_share(1.0)
    assert (tmp_path / "cpu.max").read_text() == "max 100000"
    assert sent == []  # the cgroup did it all; no signal was needed
    assert control.mechanism == "cgroup"


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="no process sandbox on Windows")
def test_a_cgroup_that_refuses_falls_back_to_signals(tmp_path: Path) -> None:
    sent: list[int] = []
    control = TreeControl(sent.append, cgroup=tmp_path / "gone")
    control.freeze()
    assert sent == [signal.SIGSTOP]
    assert control.mechanism == "signals"
    control.thaw()
    assert sent == [signal.SIGSTOP, signal.SIGCONT]
