"""The seccomp filter of the process sandbox: a classic-BPF denylist of what no computation needs.

Built here, byte by byte, rather than through libseccomp: the filter is a fixed list of about
fifty system calls on two architectures, which fits in a hundred lines; libseccomp's Python
bindings are a Debian package (python3-seccomp) that a virtualenv or the one-file binary
cannot use, and `pyseccomp` needs libseccomp.so at run time, which many desktops lack. A
filter built here works wherever the kernel has seccomp (Linux 3.5+), with nothing to install.

Denied calls fail with EPERM (the task sees an ordinary error, not a crash); `clone3` fails
with ENOSYS so that the C library falls back to `clone`, whose flags a classic filter can
read (clone3's are behind a pointer). A call made with another architecture's calling
convention (x32 on x86-64, or a foreign `AUDIT_ARCH`) kills the process: it can only be an
attempt to get around the table.
"""

from __future__ import annotations

import platform
import struct

# linux/seccomp.h, linux/filter.h, linux/audit.h
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARG0_LOW = 16  # args[0], low 32 bits on a little-endian machine
_EPERM = 1
_ENOSYS = 38
_X32_SYSCALL_BIT = 0x40000000
CLONE_NEWUSER = 0x10000000

# What no computation needs, and what a sandbox escape would: debugging other processes,
# (un)mounting, kernel keyrings, eBPF, perf, userfaultfd (a favourite of kernel exploits),
# kexec, kernel modules, reboot, swap, namespaces of other processes, accounting, quotas,
# the kernel log, the clock, raw I/O ports, reading other processes' memory, file handles
# (open_by_handle_at escapes a bind mount), the new mount API and io_uring (a large, often
# patched attack surface that Docker's default profile blocks too).
DENIED = (
    "ptrace", "mount", "umount2", "pivot_root", "chroot", "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "reboot", "swapon", "swapoff", "setns", "acct",
    "quotactl", "quotactl_fd", "syslog", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "iopl", "ioperm", "process_vm_readv", "process_vm_writev",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "vhangup", "uselib",
    "fsopen", "fsconfig", "fsmount", "fspick", "open_tree", "move_mount", "mount_setattr",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "kcmp", "pidfd_getfd",
    "nfsservctl", "create_module", "get_kernel_syms", "query_module", "_sysctl",
)  # fmt: skip

# System call numbers from the kernel's tables (asm/unistd_64.h; asm-generic/unistd.h for
# arm64). A name missing from an architecture's table does not exist there.
_X86_64 = {
    "ptrace": 101, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168,
    "setns": 308, "acct": 163, "quotactl": 179, "quotactl_fd": 443, "syslog": 103,
    "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
    "iopl": 172, "ioperm": 173, "process_vm_readv": 310, "process_vm_writev": 311,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "lookup_dcookie": 212,
    "vhangup": 153, "uselib": 134, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "open_tree": 428, "move_mount": 429, "mount_setattr": 442,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "kcmp": 312,
    "pidfd_getfd": 438, "nfsservctl": 180, "create_module": 174, "get_kernel_syms": 177,
    "query_module": 178, "_sysctl": 156,
    "clone": 56, "unshare": 272, "clone3": 435,
}  # fmt: skip
_AARCH64 = {
    "ptrace": 117, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
    "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280, "perf_event_open": 241,
    "userfaultfd": 282, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
    "finit_module": 273, "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225,
    "setns": 268, "acct": 89, "quotactl": 60, "quotactl_fd": 443, "syslog": 116,
    "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171,
    "process_vm_readv": 270, "process_vm_writev": 271, "open_by_handle_at": 265,
    "name_to_handle_at": 264, "lookup_dcookie": 18, "vhangup": 58, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "open_tree": 428, "move_mount": 429,
    "mount_setattr": 442, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "kcmp": 272, "pidfd_getfd": 438, "nfsservctl": 42,
    "clone": 220, "unshare": 97, "clone3": 435,
}  # fmt: skip
# machine -> (AUDIT_ARCH_*, syscall table, whether the x32 ABI shares the arch value)
_ARCHES = {
    "x86_64": (0xC000003E, _X86_64, True),
    "amd64": (0xC000003E, _X86_64, True),
    "aarch64": (0xC00000B7, _AARCH64, False),
    "arm64": (0xC00000B7, _AARCH64, False),
}


def supported_machine(machine: str | None = None) -> bool:
    """Whether a filter can be built for this CPU architecture."""
    return (machine or platform.machine()).lower() in _ARCHES


def build_filter(machine: str | None = None) -> bytes:
    """The filter program (struct sock_filter[]) for `machine` (default: this one).

    Raises ValueError for an architecture without a table here.
    """
    arch = (machine or platform.machine()).lower()
    if arch not in _ARCHES:
        raise ValueError(f"no seccomp table for the {arch} architecture")
    audit_arch, table, has_x32 = _ARCHES[arch]
    denied = [table[name] for name in DENIED if name in table]
    # Instructions as (code, jump-if-true label, jump-if-false label, k); labels are the
    # names of the return blocks at the end, or None for "next instruction".
    body: list[tuple[int, str | None, str | None, int]] = [
        (_LD_W_ABS, None, None, _OFFSET_ARCH),
        (_JEQ_K, None, "kill", audit_arch),
        (_LD_W_ABS, None, None, _OFFSET_NR),
    ]
    if has_x32:
        body.append((_JGE_K, "kill", None, _X32_SYSCALL_BIT))
    body += [(_JEQ_K, "deny", None, nr) for nr in denied]
    body += [
        (_JEQ_K, "enosys", None, table["clone3"]),
        (_JEQ_K, "flags", None, table["clone"]),
        (_JEQ_K, "flags", None, table["unshare"]),
        (_RET_K, None, None, _RET_ALLOW),
    ]
    blocks: dict[str, list[tuple[int, str | None, str | None, int]]] = {
        # clone and unshare: refused only when they ask for a new user namespace (inside
        # one, a task would hold every capability again).
        "flags": [
            (_LD_W_ABS, None, None, _OFFSET_ARG0_LOW),
            (_JSET_K, "deny", None, CLONE_NEWUSER),
            (_RET_K, None, None, _RET_ALLOW),
        ],
        "deny": [(_RET_K, None, None, _RET_ERRNO | _EPERM)],
        "enosys": [(_RET_K, None, None, _RET_ERRNO | _ENOSYS)],
        "kill": [(_RET_K, None, None, _RET_KILL_PROCESS)],
    }
    program = list(body)
    where: dict[str, int] = {}
    for label, block in blocks.items():
        where[label] = len(program)
        program += block
    out = bytearray()
    for index, (code, jt, jf, k) in enumerate(program):
        t = where[jt] - index - 1 if jt else 0
        f = where[jf] - index - 1 if jf else 0
        if not (0 <= t <= 255 and 0 <= f <= 255):  # pragma: no cover - the list is fixed
            raise ValueError("seccomp filter too long for an 8-bit jump")
        out += struct.pack("=HBBI", code, t, f, k)
    return bytes(out)
