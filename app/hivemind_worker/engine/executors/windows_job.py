"""The process sandbox on Windows: a Job Object per task and a task token without privileges
at low integrity.

The Job Object holds the task's whole tree (the launcher is created suspended, put in the job,
then resumed, so nothing it starts is outside): a memory limit for the job, a CPU-rate hard
cap (the task's cpus out of the machine's), an active-process limit, the idle priority class
(the person's programs first), kill-on-close (the tree dies with the worker) and UI
restrictions (no clipboard, desktop switching, global atoms, system settings, other
processes' windows, logoff). The launcher (WINDOWS_LAUNCHER) then lowers its own token before
running main.py: every privilege removed and the integrity level set to Low, so the task
cannot write anywhere but in folders labelled Low: its workspace, which the worker labels so.

Only the ctypes structures and the arithmetic are platform-independent (tested everywhere,
as "fake_windows"); the calls into kernel32 run in the release workflow's Windows job.
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
from dataclasses import dataclass

# winnt.h
JOB_OBJECT_LIMIT_ACTIVE_PROCESS = 0x00000008
JOB_OBJECT_LIMIT_PRIORITY_CLASS = 0x00000020
JOB_OBJECT_LIMIT_JOB_MEMORY = 0x00000200
JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION = 0x00000400
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000
JOB_OBJECT_CPU_RATE_CONTROL_ENABLE = 0x1
JOB_OBJECT_CPU_RATE_CONTROL_HARD_CAP = 0x4
JOB_OBJECT_UILIMIT_ALL = 0xFF  # handles, clipboard r/w, system parameters, display, atoms,
# desktop, exit windows
IDLE_PRIORITY_CLASS = 0x00000040
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION = 9
JOB_OBJECT_CPU_RATE_CONTROL_INFORMATION = 15
JOB_OBJECT_BASIC_UI_RESTRICTIONS = 4
CREATE_SUSPENDED = 0x00000004
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
PROCESS_ALL_FOR_JOB = 0x0001 | 0x0100 | 0x0200 | 0x0400 | 0x0800  # terminate, set quota,
# set information, query information, suspend/resume
EXIT_KILLED = 137  # what a task killed by the worker exits with, as on Linux (128 + 9)


class BasicLimits(ctypes.Structure):
    """JOBOBJECT_BASIC_LIMIT_INFORMATION."""

    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_int64),
        ("PerJobUserTimeLimit", ctypes.c_int64),
        ("LimitFlags", ctypes.c_uint32),
        ("MinimumWorkingSetSize", ctypes.c_size_t),
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", ctypes.c_uint32),
        ("Affinity", ctypes.c_size_t),
        ("PriorityClass", ctypes.c_uint32),
        ("SchedulingClass", ctypes.c_uint32),
    ]


class IoCounters(ctypes.Structure):
    """IO_COUNTERS."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
            "ReadTransferCount", "WriteTransferCount", "OtherTransferCount",
        )
    ]  # fmt: skip


class ExtendedLimits(ctypes.Structure):
    """JOBOBJECT_EXTENDED_LIMIT_INFORMATION."""

    _fields_ = [
        ("BasicLimitInformation", BasicLimits),
        ("IoInfo", IoCounters),
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


class CpuRate(ctypes.Structure):
    """JOBOBJECT_CPU_RATE_CONTROL_INFORMATION (the CpuRate member of its union)."""

    _fields_ = [("ControlFlags", ctypes.c_uint32), ("CpuRate", ctypes.c_uint32)]


class UiRestrictions(ctypes.Structure):
    """JOBOBJECT_BASIC_UI_RESTRICTIONS."""

    _fields_ = [("UIRestrictionsClass", ctypes.c_uint32)]


@dataclass(frozen=True)
class JobLimits:
    """What one task's tree may use together."""

    memory_bytes: int
    cpus: float
    max_processes: int


def extended_limits(limits: JobLimits) -> ExtendedLimits:
    info = ExtendedLimits()
    basic = info.BasicLimitInformation
    basic.LimitFlags = (
        JOB_OBJECT_LIMIT_ACTIVE_PROCESS
        | JOB_OBJECT_LIMIT_PRIORITY_CLASS
        | JOB_OBJECT_LIMIT_JOB_MEMORY
        | JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION
        | JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    )
    basic.ActiveProcessLimit = max(int(limits.max_processes), 1)
    basic.PriorityClass = IDLE_PRIORITY_CLASS
    info.JobMemoryLimit = max(int(limits.memory_bytes), 1 << 20)
    return info


def cpu_rate(cpus: float, cores: int) -> CpuRate:
    """A hard cap of `cpus` cores out of `cores`, in 1/10,000ths of the whole machine."""
    share = min(max(cpus, 0.01) / max(cores, 1), 1.0)
    return CpuRate(
        JOB_OBJECT_CPU_RATE_CONTROL_ENABLE | JOB_OBJECT_CPU_RATE_CONTROL_HARD_CAP,
        max(math.ceil(share * 10_000), 1),
    )


def ui_restrictions() -> UiRestrictions:
    return UiRestrictions(JOB_OBJECT_UILIMIT_ALL)


def creation_flags() -> int:
    """Popen creationflags for a task: suspended until it is in its job, no console window."""
    return CREATE_SUSPENDED | CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW


class JobError(OSError):
    """A Job Object call failed; str() names the call and Windows' reason."""


class Job:
    """One task's Job Object (Windows only)."""

    def __init__(self, limits: JobLimits) -> None:
        self._k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        self._k32.CreateJobObjectW.restype = ctypes.c_void_p
        self._k32.OpenProcess.restype = ctypes.c_void_p
        handle = self._k32.CreateJobObjectW(None, None)
        if not handle:
            raise self._error("CreateJobObject")
        self.handle = ctypes.c_void_p(handle)
        try:
            self._set(JOB_OBJECT_EXTENDED_LIMIT_INFORMATION, extended_limits(limits))
            self._set(JOB_OBJECT_CPU_RATE_CONTROL_INFORMATION,
                      cpu_rate(limits.cpus, os.cpu_count() or 1))  # fmt: skip
            self._set(JOB_OBJECT_BASIC_UI_RESTRICTIONS, ui_restrictions())
        except BaseException:
            self.close()
            raise

    def _error(self, call: str) -> JobError:
        code = ctypes.get_last_error()  # type: ignore[attr-defined]
        return JobError(code, f"{call} failed: {ctypes.FormatError(code)}")  # type: ignore[attr-defined]

    def _set(self, info_class: int, info: ctypes.Structure) -> None:
        if not self._k32.SetInformationJobObject(
            self.handle, info_class, ctypes.byref(info), ctypes.sizeof(info)
        ):
            raise self._error("SetInformationJobObject")

    def adopt(self, pid: int) -> None:
        """Put a suspended process in the job, then let it run."""
        process = self._k32.OpenProcess(PROCESS_ALL_FOR_JOB, False, pid)
        if not process:
            raise self._error("OpenProcess")
        try:
            if not self._k32.AssignProcessToJobObject(self.handle, ctypes.c_void_p(process)):
                raise self._error("AssignProcessToJobObject")
            ntdll = ctypes.WinDLL("ntdll")  # type: ignore[attr-defined]
            if ntdll.NtResumeProcess(ctypes.c_void_p(process)) != 0:
                raise self._error("NtResumeProcess")
        finally:
            self._k32.CloseHandle(ctypes.c_void_p(process))

    def terminate(self) -> None:
        self._k32.TerminateJobObject(self.handle, EXIT_KILLED)

    def close(self) -> None:
        """Close the job; kill-on-close ends whatever is left in it."""
        if self.handle:
            self._k32.CloseHandle(self.handle)
            self.handle = ctypes.c_void_p(0)


def label_low(folder: str) -> None:
    """Label a workspace Low integrity (inherited by what is made in it), so that a Low task
    may write there and nowhere else the person can."""
    subprocess.run(
        ["icacls", folder, "/setintegritylevel", "(OI)(CI)L", "/Q"],
        check=True,
        capture_output=True,
        creationflags=CREATE_NO_WINDOW,
    )


def describe() -> list[tuple[str, bool, str]]:
    """(wall, built, what it means) for doctor."""
    windows = sys.platform == "win32"
    return [
        ("job object", windows,
         "memory, CPU rate, process count, idle priority, kill on close, no UI access"),
        ("token", windows, "no privileges, low integrity: writes only in the workspace"),
        ("mount view", False, "none on Windows: a task can read what low integrity may read"),
        ("network", False, "not cut off on Windows: use Docker Desktop for tasks that must not"),
    ]  # fmt: skip


# Runs as `python -E -s -c WINDOWS_LAUNCHER main.py ARGS...` in the task's workspace, inside
# its job: removes every privilege from its own token and lowers it to Low integrity (a
# process may lower, never raise, its own level), then runs main.py.
WINDOWS_LAUNCHER = r"""
def _hivemind():
    import ctypes, sys
    from ctypes import wintypes as W
    k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    adv = ctypes.WinDLL("advapi32", use_last_error=True)
    k32.GetCurrentProcess.restype = W.HANDLE
    def fail(what):
        sys.stderr.write("hivemind: cannot isolate the task (%s: %s)\n"
                         % (what, ctypes.FormatError(ctypes.get_last_error())))
        sys.stderr.flush()
        k32.ExitProcess(125)
    token = W.HANDLE()
    # TOKEN_QUERY | TOKEN_ADJUST_PRIVILEGES | TOKEN_ADJUST_DEFAULT
    if not adv.OpenProcessToken(k32.GetCurrentProcess(), 0x8 | 0x20 | 0x80, ctypes.byref(token)):
        fail("OpenProcessToken")
    size = W.DWORD()
    adv.GetTokenInformation(token, 3, None, 0, ctypes.byref(size))  # TokenPrivileges
    buf = ctypes.create_string_buffer(size.value)
    if not adv.GetTokenInformation(token, 3, buf, size, ctypes.byref(size)):
        fail("GetTokenInformation")
    count = ctypes.c_uint32.from_buffer(buf).value
    for i in range(count):  # LUID_AND_ATTRIBUTES: 8-byte LUID + 4-byte attributes
        ctypes.c_uint32.from_buffer(buf, 4 + i * 12 + 8).value = 0x4  # SE_PRIVILEGE_REMOVED
    if not adv.AdjustTokenPrivileges(token, False, buf, 0, None, None):
        fail("AdjustTokenPrivileges")
    sid = ctypes.c_void_p()
    if not adv.ConvertStringSidToSidW("S-1-16-4096", ctypes.byref(sid)):  # Low
        fail("ConvertStringSidToSid")
    class Label(ctypes.Structure):
        _fields_ = [("Sid", ctypes.c_void_p), ("Attributes", W.DWORD)]
    label = Label(sid, 0x20)  # SE_GROUP_INTEGRITY
    if not adv.SetTokenInformation(token, 25, ctypes.byref(label),  # TokenIntegrityLevel
                                   ctypes.sizeof(label) + adv.GetLengthSid(sid)):
        fail("SetTokenInformation")
    k32.CloseHandle(token)
    sys.argv = sys.argv[1:]
    with open(sys.argv[0], "rb") as f:
        return compile(f.read(), sys.argv[0], "exec")


__file__ = "main.py"
exec(globals().pop("_hivemind")())
"""


def launch_argv(python: str, script: str, argv: tuple[str, ...]) -> list[str]:
    """The command that runs `script` behind the Windows walls (in a job made by Job)."""
    return [python, "-E", "-s", "-c", WINDOWS_LAUNCHER, script, *argv]
