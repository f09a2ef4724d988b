"""Fixtures for the e2e tier: the built artefacts in dist/ and the tools that check them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from artefacts import BUILD_HINT, DIST, unavailable


@pytest.fixture
def artefact() -> Callable[[str], Path]:
    """artefact("hivemind-worker_*.deb") -> the one file in dist/ matching it."""

    def find(pattern: str) -> Path:
        found = sorted(DIST.glob(pattern))
        if not found:
            unavailable(f"dist/{pattern} is missing: {BUILD_HINT}")
        return found[-1]

    return find


@pytest.fixture
def binary(artefact: Callable[[str], Path]) -> Path:
    return artefact("hivemind-worker.exe" if os.name == "nt" else "hivemind-worker")


@pytest.fixture
def app_folder(artefact: Callable[[str], Path]) -> Path:
    """The one-folder build (what the installers and the image ship): its executable."""
    folder = artefact("hivemind-worker-onedir")
    return folder / ("hivemind-worker.exe" if os.name == "nt" else "hivemind-worker")


@pytest.fixture
def need_tool() -> Callable[[str], str]:
    def find(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            unavailable(f"`{name}` is not installed")
        return str(path)

    return find
