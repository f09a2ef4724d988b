"""The test tiers collect in any order and any subset: shared helpers are imported from
tests/helpers, never through another tier's conftest or a sys.path insert."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIERS = ["unit", "integration", "docker", "gui", "e2e"]


def collect(*tiers: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *(f"tests/{t}" for t in tiers)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_the_tiers_collect_in_reverse_order() -> None:
    done = collect(*reversed(TIERS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower().splitlines()[-1]
    for tier in TIERS:
        assert f"tests/{tier}/" in done.stdout, f"nothing collected from tests/{tier}"
