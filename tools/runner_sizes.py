"""Measure what building each runner environment downloads, per platform, and write the figures
to engine/runners/requirements/download-sizes.toml (the settings dialog shows them).

For each pinned requirement set and platform, `uv lock` resolves the set (index pages and
wheel metadata only: no wheel is downloaded) and its lock file records each wheel's size; the
download is the sum of the wheels that platform fetches. Run it after changing a requirement
set: `.venv/bin/python tools/runner_sizes.py [--find-links DIR]`. It needs PyPI. PyTorch's
`+cpu` build is not on PyPI: on Linux it is taken from --find-links (or
HIVEMIND_RUNNER_FIND_LINKS), on Windows PyPI's own torch wheel is measured (a CPU build there).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "app" / "hivemind_worker" / "engine" / "runners" / "requirements"
OUT = REQUIREMENTS / "download-sizes.toml"
PYTHON = "3.11"  # the interpreter the worker's builds ship, so the one environments are made for
PLATFORMS = {
    # key: (uv environment marker, what a wheel's platform tag must contain)
    "linux-x86_64": (
        "sys_platform == 'linux' and platform_machine == 'x86_64'",
        ("manylinux", "x86_64"),
    ),
    "windows-amd64": ("sys_platform == 'win32' and platform_machine == 'AMD64'", ("win_amd64",)),
}
PYTHON_TAGS = re.compile(r"^(cp311|py3|py2\.py3|py311|cp3\d+-abi3)$")


def uv() -> str:
    import uv as uv_package

    found: str = uv_package.find_uv_bin()
    return found


def pins(name: str, platform: str) -> list[str]:
    lines = (line.strip() for line in (REQUIREMENTS / f"{name}.txt").read_text().splitlines())
    out = [line for line in lines if line and not line.startswith("#")]
    if platform.startswith("windows"):  # PyPI's Windows torch is the CPU build
        out = [line.replace("+cpu", "") for line in out]
    return out


def wheel_fits(filename: str, platform: str) -> bool:
    parts = filename[: -len(".whl")].split("-")
    python, abi, plat = parts[-3], parts[-2], parts[-1]
    python_ok = any(PYTHON_TAGS.match(p) for p in python.split(".")) or (
        abi == "abi3" and python.startswith("cp3")
    )
    plat_ok = plat == "any" or all(word in plat for word in PLATFORMS[platform][1])
    return python_ok and plat_ok


def download_bytes(name: str, platform: str, find_links: str) -> int:
    marker = PLATFORMS[platform][0]
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        deps = ", ".join(f'"{line}"' for line in pins(name, platform))
        (project / "pyproject.toml").write_text(
            f'[project]\nname = "measure"\nversion = "0"\nrequires-python = "=={PYTHON}.*"\n'
            f'dependencies = [{deps}]\n[tool.uv]\nenvironments = ["{marker}"]\n'
        )
        command = [uv(), "lock", "--quiet", "--python", PYTHON, "--no-build"]
        if find_links and not platform.startswith("windows"):
            command += ["--find-links", find_links]
        subprocess.run(command, cwd=project, check=True)
        lock = tomllib.loads((project / "uv.lock").read_text())
    total = 0
    for package in lock["package"]:
        if package["name"] == "measure":
            continue
        sizes = [
            # A wheel from a local folder (--find-links) has a path and no recorded size.
            wheel["size"] if "size" in wheel else Path(wheel["path"]).stat().st_size
            for wheel in package.get("wheels", [])
            if wheel_fits(wheel.get("url", wheel.get("path", "")).rsplit("/", 1)[-1], platform)
        ]
        if not sizes:
            raise SystemExit(f"{name} on {platform}: no wheel of {package['name']} fits")
        total += max(sizes)  # where several fit (manylinux levels), the larger: an estimate
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--find-links", default=os.environ.get("HIVEMIND_RUNNER_FIND_LINKS", ""))
    args = parser.parse_args()
    names = sorted(p.stem for p in REQUIREMENTS.glob("*.txt"))
    version = subprocess.run(
        [uv(), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    lines = [
        "# What building each runner environment downloads the first time, in MB (10^6 bytes):",
        f"# the wheels of its pinned set for Python {PYTHON}. Written by tools/runner_sizes.py",
        f"# ({version}, {datetime.date.today()}); run it again after changing a set.",
    ]
    for platform in PLATFORMS:
        lines += ["", f"[{platform}]"]
        for name in names:
            megabytes = round(download_bytes(name, platform, args.find_links) / 1e6)
            print(f"{platform} {name}: {megabytes} MB", file=sys.stderr)
            lines.append(f'"{name}" = {megabytes}')
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
