"""What a test can learn from outside the process sandbox about a task's processes and files.

A sandboxed task sees only its own PID namespace and its workspace (as /workspace), so it
names a process as 'pid:[namespace inode]@pid inside' (TASK_PID, an expression for its
source) and writes into its working folder; the test maps the name to a host pid and finds
the file under the worker's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

# A Python expression, for a task's source: this process's name as host_pid() reads it:
# its PID namespace, its pid there, and its start time (ticks since boot, the same inside and
# outside), so that a namespace inode and pid reused after the task ended never match.
TASK_PID = (
    "os.readlink('/proc/self/ns/pid') + '@' + os.readlink('/proc/self') + '@' + "
    "open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]"
)


def host_pid(token: str) -> int | None:
    """The host pid of the process a task named with TASK_PID; None when none is left."""
    ns, inner, started = token.strip().split("@")
    for pid in psutil.pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != ns:
                continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[19] != started:
                    continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("NSpid:") and line.split()[-1] == inner:
                        return pid
        except OSError:
            continue
    return None


def written(root: Path, name: str) -> list[Path]:
    """Files called `name` that tasks wrote in their workspaces under a worker's folder."""
    return sorted(root.rglob(name))
