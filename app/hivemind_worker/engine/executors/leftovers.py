"""The Docker executor's housekeeping: the labels that find a node's containers, the kept spec
of each prepared task, and the sweep at start that adopts or removes what an earlier run left.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container

from hivemind_worker.engine.executors.base import ExecutorError
from hivemind_worker.engine.executors.images import force_remove
from hivemind_worker.engine.executors.workspace import (
    ARCHIVES_DIR,
    TRASH_DIR,
    rmtree,
    workspace_path,
)
from hivemind_worker.tasks import TaskSpec

log = logging.getLogger(__name__)

LABEL_NODE = "hivemind.node"
LABEL_TASK = "hivemind.task"
LABEL_LEASE = "hivemind.lease"
# A warm sandbox's container (warm.py), made before its task was known: it carries the slot's
# name instead of a task and lease, and the task it runs is told by a `.slot` file (below).
LABEL_SLOT = "hivemind.slot"
# In the work folder, beside (never inside: the task could rewrite it) each workspace: the spec
# of every prepared task, `<task>-<lease>.json` (TaskSpec.to_dict()), so that a restarted
# worker can re-attach; a task started in a warm sandbox also has `<task>-<lease>.slot`, which
# names the slot.
SPECS_DIR = "_specs"
SPEC_SUFFIX = ".json"
SLOT_SUFFIX = ".slot"
# Specs kept by versions before this one, in the wire format; their containers are removed as
# orphans and the files with them.
OLD_SPEC_SUFFIX = ".pb"
ADOPTABLE_STATES = ("running", "paused", "exited")
# The warm sandboxes' workspaces, `<work dir>/_warm/<slot>` (warm.py).
WARM_DIR = "_warm"


def spec_path(work_dir: Path, task: TaskSpec) -> Path:
    name = f"{task.task_id}-{task.lease_id or 'nolease'}{SPEC_SUFFIX}"
    return work_dir / SPECS_DIR / name


def keep_spec(path: Path, task: TaskSpec, *, slot: str = "") -> None:
    """Keep the task's spec (without its inputs, which are in the workspace already) for
    re-attaching after a crash; with `slot`, the warm sandbox it runs in."""
    try:
        path.parent.mkdir(exist_ok=True, mode=0o700)
        if slot:
            path.with_suffix(SLOT_SUFFIX).write_text(slot, encoding="utf-8")
            return
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(task.to_dict()), encoding="utf-8")
        partial.replace(path)
    except OSError as exc:
        raise ExecutorError(f"cannot keep the task's spec in {path.parent}: {exc}") from exc


def forget_spec(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(SLOT_SUFFIX).unlink(missing_ok=True)


@dataclass(frozen=True)
class Adopted:
    """A container an earlier run left, with the kept spec of its task: to be followed."""

    spec: TaskSpec
    container: Container
    workspace: Path
    spec_file: Path
    image: str


def sweep(client: docker.DockerClient, work_dir: Path, node_id: str) -> tuple[list[Adopted], int]:
    """Settle what an earlier run of this node left behind: (containers to adopt, how many
    were removed). Blocking; called once at start, before any task runs.

    A labelled container that still runs (or is paused), or has exited without its result
    collected, is adopted when its task's spec was kept (SPECS_DIR). Every other labelled
    container is removed with its workspace, and so is a kept spec's workspace when no
    container is adopted for it, and every warm sandbox's workspace.
    """
    found = client.containers.list(
        all=True, filters={"label": f"{LABEL_NODE}={node_id}"}, ignore_removed=True
    )
    root = work_dir.resolve()
    specs = work_dir / SPECS_DIR
    slots = _slot_files(specs)
    adopted: list[Adopted] = []
    removed = 0
    for container in found:
        record = _adoptable(container, work_dir, slots, {a.spec.task_id for a in adopted})
        if record is not None:
            adopted.append(record)
            log.info(
                "adopting container %s (%s) of task %s left by an earlier run",
                container.short_id,
                container.status,
                record.spec.task_id,
            )
            continue
        sources = [m.get("Source", "") for m in container.attrs.get("Mounts", [])]
        log.info("removing container %s left by an earlier run", container.short_id)
        force_remove(container)  # a removal the earlier run began counts too
        removed += 1
        for source in sources:
            path = Path(source).resolve() if source else None
            # Only a workspace of ours: a direct child of the work folder (or of _warm).
            if path is not None and (
                path.parent == root / WARM_DIR
                or (
                    path.parent == root
                    and path.name not in (ARCHIVES_DIR, SPECS_DIR, TRASH_DIR, WARM_DIR)
                )
            ):
                rmtree(path)
    kept_files = (
        sorted(
            p for p in specs.iterdir() if p.suffix in (SPEC_SUFFIX, OLD_SPEC_SUFFIX, SLOT_SUFFIX)
        )
        if specs.is_dir()
        else []
    )
    stems = {a.spec_file.stem for a in adopted}
    for kept in kept_files:
        if kept.stem in stems:
            continue
        # The task's workspace has the spec file's name (workspace_path).
        orphan = work_dir / kept.stem
        if kept.suffix != SLOT_SUFFIX and orphan.is_dir() and not orphan.is_symlink():
            rmtree(orphan)
        kept.unlink(missing_ok=True)
    warm = work_dir / WARM_DIR
    if warm.is_dir():
        keep = {a.workspace.name for a in adopted if a.workspace.parent == warm}
        for slot_dir in warm.iterdir():
            if slot_dir.name not in keep:
                rmtree(slot_dir)
    return adopted, removed


def _slot_files(specs: Path) -> dict[str, str]:
    """slot name: the `<task>-<lease>` stem of the kept spec of the task it runs."""
    found: dict[str, str] = {}
    if not specs.is_dir():
        return found
    for path in specs.glob(f"*{SLOT_SUFFIX}"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            found[path.read_text(encoding="utf-8").strip()] = path.stem
    return found


def _adoptable(
    container: Container, work_dir: Path, slots: dict[str, str], taken: set[str]
) -> Adopted | None:
    """The container with its kept spec when this run can follow it, or None (it is removed)."""
    labels = container.labels or {}
    task_id = labels.get(LABEL_TASK, "")
    lease_id = labels.get(LABEL_LEASE, "")
    slot = labels.get(LABEL_SLOT, "")
    if container.status not in ADOPTABLE_STATES:
        return None
    if slot:
        stem = slots.get(slot, "")
        path = work_dir / SPECS_DIR / f"{stem}{SPEC_SUFFIX}"
    elif task_id and lease_id:
        path = work_dir / SPECS_DIR / f"{task_id}-{lease_id}{SPEC_SUFFIX}"
    else:
        return None
    if path.parent != work_dir / SPECS_DIR or not path.stem:  # a label naming another folder
        return None
    try:
        spec = TaskSpec.from_dict(json.loads(path.read_text(encoding="utf-8")), require_lease=True)
    except (OSError, ValueError) as exc:  # TaskSpecError and bad JSON are ValueErrors
        log.info("container %s cannot be re-attached: %s", container.short_id, exc)
        return None
    if spec.task_id in taken:  # a second container of the task: keep one at most
        return None
    if not slot and (spec.task_id != task_id or spec.lease_id != lease_id):
        return None
    workspace = work_dir / WARM_DIR / slot if slot else workspace_path(work_dir, spec)
    if workspace.parent not in (work_dir, work_dir / WARM_DIR) or not workspace.is_dir():
        return None
    image = str((container.attrs.get("Config") or {}).get("Image"))
    return Adopted(spec, container, workspace, path, image)
