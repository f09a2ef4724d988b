"""The sandbox's pure rules: the seccomp program, the result-name rule, cgroup arguments."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest

from hivemind_worker.engine.executors import cgroups, sandbox_linux, seccomp
from hivemind_worker.engine.executors.workspace import ResultError, check_result_name, disk_usage

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
ALLOW, KILL = 0x7FFF0000, 0x80000000
EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38


def run_bpf(program: bytes, arch: int, nr: int, arg0: int = 0) -> int:
    """A classic-BPF interpreter for the instructions seccomp.build_filter emits."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    code = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    for _ in range(len(code) + 1):  # no loops in classic BPF: one pass at most
        op, jt, jf, k = code[pc]
        if op == 0x20:  # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif op == 0x15:  # jeq
            pc += 1 + (jt if acc == k else jf)
        elif op == 0x35:  # jge
            pc += 1 + (jt if acc >= k else jf)
        elif op == 0x45:  # jset
            pc += 1 + (jt if acc & k else jf)
        elif op == 0x06:  # ret
            return k
        else:
            raise AssertionError(f"unexpected instruction {op:#x}")
    raise AssertionError("ran off the program")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_filter_refuses_what_no_computation_needs(machine: str) -> None:
    program = seccomp.build_filter(machine)
    arch = AUDIT_ARCH[machine]
    table = seccomp._X86_64 if machine == "x86_64" else seccomp._AARCH64
    for name in seccomp.DENIED:
        if name in table:
            assert run_bpf(program, arch, table[name]) == EPERM, name
    # Everyday calls pass: read, write, openat, mmap, exit_group.
    everyday = {"x86_64": (0, 1, 257, 9, 231), "aarch64": (63, 64, 56, 222, 94)}[machine]
    for nr in everyday:
        assert run_bpf(program, arch, nr) == ALLOW, nr
    # A new user namespace is refused; other clone and unshare flags are not.
    for call in ("clone", "unshare"):
        assert run_bpf(program, arch, table[call], seccomp.CLONE_NEWUSER) == EPERM
        assert run_bpf(program, arch, table[call], 0x00020000 | 0x01000000) == ALLOW
    assert run_bpf(program, arch, table["clone3"]) == ENOSYS  # the C library falls back
    other = AUDIT_ARCH["aarch64" if machine == "x86_64" else "x86_64"]
    assert run_bpf(program, other, 0) == KILL  # another architecture's calling convention
    if machine == "x86_64":
        assert run_bpf(program, arch, 0x40000000 | 101) == KILL  # x32 ptrace


def test_seccomp_filter_names_an_unknown_architecture() -> None:
    assert not seccomp.supported_machine("riscv64")
    with pytest.raises(ValueError, match="riscv64"):
        seccomp.build_filter("riscv64")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("results/..\\..\\escape", "backslashes"),
        ("results/../escape", "'..'"),
        ("/etc/passwd", "absolute"),
        ("results/a\x01b", "control characters"),
        ("results/a\x7fb", "control characters"),
        ("results//x", "empty"),
        ("results/./x", "empty or '.'"),
        ("results/C:evil", "':'"),
        ("", "empty"),
    ],
)
def test_result_names_follow_one_rule(name: str, why: str) -> None:
    with pytest.raises(ResultError, match="refused an entry of the results") as info:
        check_result_name(name)
    assert why in str(info.value)


def test_ordinary_result_names_pass() -> None:
    assert str(check_result_name("results/sub dir/data-1.csv")) == "results/sub dir/data-1.csv"


def test_disk_usage_counts_allocated_bytes_and_stops_past_the_limit(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for i in range(4):
        (tmp_path / "a" / f"f{i}").write_bytes(os.urandom(1 << 20))
    os.symlink("/usr", tmp_path / "link")  # never followed
    total = disk_usage(tmp_path)
    assert 4 << 20 <= total < 5 << 20
    assert (1 << 20) < disk_usage(tmp_path, stop_above=1 << 20) < total


def test_systemd_scope_arguments_carry_every_limit() -> None:
    limits = cgroups.TaskLimits(max_processes=256, memory_bytes=512 << 20, cpus=1.5)
    argv = cgroups.Cgroups("systemd-user", "").wrap(["python3", "-c", "pass"], limits)
    assert argv[-4:] == ["--", "python3", "-c", "pass"]
    assert {"--user", "--scope"} <= set(argv)
    props = [argv[i + 1] for i, a in enumerate(argv) if a == "-p"]
    assert props == [
        "TasksMax=256", f"MemoryMax={512 << 20}", "MemorySwapMax=0", "CPUQuota=150%",
        "CPUWeight=1",
    ]  # fmt: skip
    assert cgroups.Cgroups("", "none here").wrap(["x"], limits) == ["x"]


def test_an_interpreter_outside_usr_is_bound_read_only(tmp_path: Path) -> None:
    assert sandbox_linux.interpreter_binds("/usr/bin/python3.11") == ()
    assert sandbox_linux.interpreter_binds("/opt/py/bin/python3") == ("/opt/py",)


def test_tasks_under_a_root_worker_use_an_interpreter_nobody_can_run(tmp_path: Path) -> None:
    private = tmp_path / "private" / "bin"
    private.mkdir(parents=True)
    (tmp_path / "private").chmod(0o700)
    python = private / "python3"  # as a pyenv interpreter under /root
    shutil.copy("/bin/true", python)
    assert not sandbox_linux._reachable_by_others(str(python))
    chosen = sandbox_linux.task_python(str(python), (65534, 65534))
    assert chosen != str(python) and sandbox_linux._reachable_by_others(chosen)
    assert "python3" in os.path.basename(chosen)
    # The worker's own user runs tasks with the worker's interpreter.
    assert sandbox_linux.task_python(str(python), None) == str(python)


def test_a_folder_tasks_cannot_reach_is_named_with_the_parent_that_closes_it() -> None:
    """Under a root worker tasks run as nobody: the reason names the folder to open, wherever
    it is (not only under /root)."""
    top = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp_path sits in a closed folder
    top.chmod(0o755)
    closed = top / "home"
    env = closed / "share" / "environments" / "data"
    env.mkdir(parents=True)
    closed.chmod(0o700)
    try:
        why = sandbox_linux.reachable_by_tasks(env)
        assert f"cannot reach {env} ({closed} is closed to other users)" in why
        assert "set work_dir to a folder other users can pass through" in why
        closed.chmod(0o755)
        assert sandbox_linux.reachable_by_tasks(env) == ""
    finally:
        shutil.rmtree(top)
