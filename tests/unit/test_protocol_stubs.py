"""The committed gRPC stubs match the .proto, and the engine stays free of Qt."""

from __future__ import annotations

import filecmp
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_build_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("hivemind_build", ROOT / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    build = _load_build_module()
    build.generate_stubs(tmp_path)
    committed = ROOT / "app" / "hivemind_worker" / "protocol"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
    stale = [n for n in names if not filecmp.cmp(tmp_path / n, committed / n, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `python3 build.py proto` and commit"


def test_lint_rule_keeps_qt_out_of_the_engine(tmp_path: Path) -> None:
    probe = ROOT / "app" / "hivemind_worker" / "engine" / "_qt_probe_test.py"
    probe.write_text("from PySide6 import QtCore\n\nprint(QtCore)\n")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", str(probe)],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
    finally:
        probe.unlink()
    assert done.returncode != 0
    assert "TID251" in done.stdout and "Qt stays out of the engine" in done.stdout
