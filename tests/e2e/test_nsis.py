"""The Windows installer script compiles with makensis, warnings treated as errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from artefacts import ROOT, run

from hivemind_worker import __version__

pytestmark = pytest.mark.e2e


def test_nsis_script_compiles(need_tool: Callable[[str], str], tmp_path: Path) -> None:
    makensis = need_tool("makensis")
    built = ROOT / "dist" / "hivemind-worker.exe"
    if built.exists():
        exe = built
    else:  # off Windows: a stand-in, so the script itself is still checked
        exe = tmp_path / "hivemind-worker.exe"
        exe.write_bytes(b"MZ placeholder\n")
    out = tmp_path / "hivemind-worker-test-setup.exe"
    done = run(
        [
            makensis, "-V2", "-WX", f"-DVERSION={__version__}", f"-DEXE={exe}",
            f"-DICON={ROOT / 'file.ico'}", f"-DOUTFILE={out}",
            ROOT / "installer" / "windows" / "hivemind-worker.nsi",
        ],
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.stat().st_size > 0
