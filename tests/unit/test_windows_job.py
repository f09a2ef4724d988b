"""The Windows sandbox's platform-independent parts: Job Object structures and arithmetic.

Named fake_windows: these build the structures the kernel32 calls take and check them
against the Windows SDK's layouts, on any platform; the calls themselves run on Windows
(tests/integration/test_windows_sandbox.py, in the release workflow's Windows job).
"""

from __future__ import annotations

import ctypes

import pytest

from hivemind_worker.engine.executors import windows_job as wj

wide = ctypes.sizeof(ctypes.c_void_p) == 8


@pytest.mark.skipif(not wide, reason="the SDK sizes below are those of 64-bit Windows")
def test_fake_windows_structures_have_the_sdk_layout() -> None:
    assert ctypes.sizeof(wj.BasicLimits) == 64
    assert ctypes.sizeof(wj.IoCounters) == 48
    assert ctypes.sizeof(wj.ExtendedLimits) == 144
    assert wj.ExtendedLimits.JobMemoryLimit.offset == 120
    assert wj.BasicLimits.ActiveProcessLimit.offset == 40
    assert ctypes.sizeof(wj.CpuRate) == 8
    assert ctypes.sizeof(wj.UiRestrictions) == 4


def test_fake_windows_job_limits_hold_the_whole_tree() -> None:
    info = wj.extended_limits(wj.JobLimits(memory_bytes=512 << 20, cpus=1.5, max_processes=64))
    basic = info.BasicLimitInformation
    for flag in (
        wj.JOB_OBJECT_LIMIT_ACTIVE_PROCESS,
        wj.JOB_OBJECT_LIMIT_JOB_MEMORY,
        wj.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
        wj.JOB_OBJECT_LIMIT_PRIORITY_CLASS,
        wj.JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION,
    ):
        assert basic.LimitFlags & flag, hex(flag)
    assert basic.ActiveProcessLimit == 64
    assert basic.PriorityClass == wj.IDLE_PRIORITY_CLASS  # the person's programs first
    assert info.JobMemoryLimit == 512 << 20
    assert wj.ui_restrictions().UIRestrictionsClass == 0xFF


@pytest.mark.parametrize(
    ("cpus", "cores", "rate"), [(1.0, 4, 2500), (1.5, 2, 7500), (8.0, 4, 10_000), (0.0, 8, 13)]
)
def test_fake_windows_cpu_rate_is_a_hard_cap_of_the_task_cpus(
    cpus: float, cores: int, rate: int
) -> None:
    info = wj.cpu_rate(cpus, cores)
    assert info.CpuRate == rate
    assert info.ControlFlags == (
        wj.JOB_OBJECT_CPU_RATE_CONTROL_ENABLE | wj.JOB_OBJECT_CPU_RATE_CONTROL_HARD_CAP
    )


def test_fake_windows_task_starts_suspended_and_windowless() -> None:
    flags = wj.creation_flags()
    assert flags & wj.CREATE_SUSPENDED and flags & wj.CREATE_NO_WINDOW
    argv = wj.launch_argv(r"C:\Python311\python.exe", "main.py", ("a", "b"))
    assert argv[:4] == [r"C:\Python311\python.exe", "-E", "-s", "-c"]
    assert argv[5:] == ["main.py", "a", "b"]
    compile(wj.WINDOWS_LAUNCHER, "<launcher>", "exec")  # valid Python on every platform


def test_fake_windows_doctor_lines_say_what_is_not_covered() -> None:
    lines = {name: (built, text) for name, built, text in wj.describe()}
    assert set(lines) == {"job object", "token", "mount view", "network"}
    assert lines["network"][0] is False and "Docker" in lines["network"][1]
