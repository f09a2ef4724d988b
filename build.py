#!/usr/bin/env python3
"""The project's task runner: bootstrap the venv, generate stubs, run the demo, run the tests."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = Path("hivemind/nodepool/v1/nodepool.proto")
PROTOCOL_DIR = ROOT / "app" / "hivemind_worker" / "protocol"
STAMP = VENV / ".hivemind-installed"


def venv_python(venv: Path = VENV) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def tool(name: str) -> Path:
    """An executable installed in the venv."""
    if os.name == "nt":
        return VENV / "Scripts" / f"{name}.exe"
    return VENV / "bin" / name


def run(cmd: list[str | Path], **kwargs: object) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def bootstrap(venv: Path = VENV, interpreter: str = sys.executable) -> None:
    """Create the venv if missing; install the project and dev extras when pyproject changes."""
    python = venv_python(venv)
    if not python.exists():
        print(f"Creating virtual environment in {venv}", flush=True)
        run([interpreter, "-m", "venv", venv])
    stamp = venv / STAMP.name
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return
    run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    run([python, "-m", "pip", "install", "--quiet", "-e", ".[dev]"])
    stamp.write_text(wanted)


def generate_stubs(out_dir: Path) -> None:
    """Run protoc (grpcio-tools) and make the generated imports package-relative."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                str(venv_python()),
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                # mypy-protobuf: typed .pyi for messages and for the gRPC stubs.
                f"--plugin=protoc-gen-mypy={tool('protoc-gen-mypy')}",
                f"--plugin=protoc-gen-mypy_grpc={tool('protoc-gen-mypy_grpc')}",
                f"--mypy_out={tmp}",
                f"--mypy_grpc_out={tmp}",
                str(PROTO_ROOT / PROTO_FILE),
            ],
            check=True,
        )
        generated = Path(tmp) / PROTO_FILE.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(generated.iterdir()):
            text = src.read_text()
            # protoc writes absolute imports from the proto path; the stubs live in our package.
            text = re.sub(
                r"^from hivemind\.nodepool\.v1 import (\w+)",
                r"from . import \1",
                text,
                flags=re.MULTILINE,
            )
            text = re.sub(
                r"^import hivemind\.nodepool\.v1\.(\w+)$",
                r"from . import \1",
                text,
                flags=re.MULTILINE,
            )
            (out_dir / src.name).write_text(text)
    init = out_dir / "__init__.py"
    init.write_text('"""Generated gRPC and protobuf stubs for the Node Pool protocol."""\n')


def cmd_proto(_: argparse.Namespace) -> None:
    bootstrap()
    generate_stubs(PROTOCOL_DIR)
    print(f"Stubs written to {PROTOCOL_DIR.relative_to(ROOT)}")


def cmd_run(args: argparse.Namespace) -> None:
    bootstrap()
    generate_stubs(PROTOCOL_DIR)
    run([venv_python(), "-m", "hivemind_worker", "demo", *args.rest])


def cmd_test(args: argparse.Namespace) -> None:
    bootstrap()
    py = venv_python()
    run([py, "-m", "ruff", "check", "app", "tests", "bench", "tools", "build.py"])
    run([py, "-m", "ruff", "format", "--check", "app", "tests", "bench", "tools", "build.py"])
    run([py, "-m", "mypy"])
    run([py, "-m", "pytest", *args.rest])


# Where PyTorch's CPU build lies on these machines (it is not on PyPI; uv looks only where told).
LOCAL_WHEELS = Path("/opt/wheels")


def cmd_test_ml(args: argparse.Namespace) -> None:
    """The TensorFlow and PyTorch runners' tier, apart for its downloads (about 2.5 GB of
    environments): `pytest -m ml_frameworks tests/ml`."""
    bootstrap()
    env = dict(os.environ)
    if not env.get("HIVEMIND_RUNNER_FIND_LINKS") and LOCAL_WHEELS.is_dir():
        env["HIVEMIND_RUNNER_FIND_LINKS"] = str(LOCAL_WHEELS)
    run([venv_python(), "-m", "pytest", "-m", "ml_frameworks", "tests/ml", *args.rest], env=env)


def cmd_test_on(args: argparse.Namespace) -> None:
    """The test suite on another interpreter, in its own venv: `test-on PYTHON [pytest args]`.

    CI runs the unit and integration tiers this way on the oldest Python the project claims
    (Debian 12's /usr/bin/python3, 3.11.2), beside the full suite on the newest.
    """
    if not args.rest:
        sys.exit("usage: build.py test-on PYTHON [pytest arguments]")
    interpreter, *rest = args.rest
    version = subprocess.run(
        [interpreter, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    venv = ROOT / f".venv-{version}"
    bootstrap(venv, interpreter)
    run([venv_python(venv), "-m", "pytest", *rest])


TEST_IMAGE = "hivemind-test-python:bookworm"
# TEST_IMAGE with Python's whole standard library (json, ctypes, decimal...): what the ml and
# data runners need of a Python image, as python:*-slim has it. Built from TEST_IMAGE with
# Debian's libpython3.11-stdlib.
STDLIB_IMAGE = "hivemind-test-python-stdlib:bookworm"
STDLIB_DOCKERFILE = f"""FROM {TEST_IMAGE}
RUN apt-get update -q && apt-get install -y -q --no-install-recommends libpython3.11-stdlib \\
    && rm -rf /var/lib/apt/lists/*
"""
CI_CACHE = Path(os.environ.get("HIVEMIND_CI_CACHE", "/var/cache/hivemind-ci"))


def cmd_test_image(args: argparse.Namespace) -> None:
    """Import the Docker tests' image from a debootstrap rootfs (no registry needed).

    The rootfs tarball is cached in CI_CACHE/rootfs.tar, so only the first run pays for
    debootstrap; `--force` rebuilds both.
    """
    force = "--force" in args.rest
    _test_image(force)
    have = subprocess.run(
        ["docker", "image", "inspect", STDLIB_IMAGE], capture_output=True, check=False
    )
    if have.returncode == 0 and not force:
        print(f"{STDLIB_IMAGE} is present")
        return
    # The only build with a network: apt fetches from the Debian mirror, as debootstrap does.
    subprocess.run(["docker", "build", "-q", "-t", STDLIB_IMAGE, "-"],
                   input=STDLIB_DOCKERFILE.encode(), check=True)  # fmt: skip


def _test_image(force: bool) -> None:
    have = subprocess.run(
        ["docker", "image", "inspect", TEST_IMAGE], capture_output=True, check=False
    )
    if have.returncode == 0 and not force:
        print(f"{TEST_IMAGE} is present")
        return
    tarball = CI_CACHE / "rootfs.tar"
    if force or not tarball.exists():
        if shutil.which("debootstrap") is None:
            sys.exit("debootstrap is missing: apt-get install debootstrap (and run as root)")
        CI_CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CI_CACHE) as tmp:
            rootfs = Path(tmp) / "rootfs"
            mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
            run(["debootstrap", "--variant=minbase", "--include=python3-minimal",
                 "bookworm", rootfs, mirror])  # fmt: skip
            partial = tarball.with_suffix(".tar.partial")
            with partial.open("wb") as out:
                subprocess.run(["tar", "-C", rootfs, "-c", "."], stdout=out, check=True)
            partial.replace(tarball)  # only a complete tarball is ever cached
    run(["docker", "import", tarball, TEST_IMAGE])


def cmd_bench(args: argparse.Namespace) -> None:
    """Every bench/*.py (or those named: `build.py bench idle_footprint gui_footprint`), each
    writing its section of docs/benchmarks.md; one that fails does not stop the others."""
    bootstrap()
    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
    if args.rest:
        wanted = {Path(name).stem for name in args.rest}
        scripts = [p for p in scripts if p.stem in wanted]
        if missing := wanted - {p.stem for p in scripts}:
            sys.exit(f"no such benchmark: {', '.join(sorted(missing))}")
    failed = []
    for script in scripts:
        try:
            run([venv_python(), script.relative_to(ROOT)])
        except subprocess.CalledProcessError:
            failed.append(script.name)
    if failed:
        sys.exit(f"benchmarks that failed: {', '.join(failed)}")


def cmd_screenshots(args: argparse.Namespace) -> None:
    """Render the desktop app with live tasks into docs/screenshots/, light and dark."""
    bootstrap()
    out = ROOT / "docs" / "screenshots"
    # A private X server when there is one to start; else the current display (Windows, a desktop).
    xvfb = ["xvfb-run", "-a", "-s", "-screen 0 1400x1000x24"] if shutil.which("xvfb-run") else []
    for palette in ([], ["--dark"]):
        run([*xvfb, venv_python(), ROOT / "tools" / "screenshots.py", out,
             *palette, *args.rest])  # fmt: skip


def cmd_package(args: argparse.Namespace) -> None:
    """exe, deb, tarball, nsis: installer/packaging.py does the work with the venv's tools."""
    bootstrap()
    if args.command == "exe":
        generate_stubs(PROTOCOL_DIR)  # the binary carries the stubs of this proto/
    run([venv_python(), ROOT / "installer" / "packaging.py", args.command, *args.rest])


def cmd_clean(_: argparse.Namespace) -> None:
    for path in (ROOT / "build", ROOT / "dist", VENV):
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[argparse.Namespace], None]] = {}
    for name, func, help_text in (
        ("proto", cmd_proto, "regenerate the gRPC stubs from proto/"),
        ("run", cmd_run, "set up and run the demo: a local pool and the worker"),
        ("test", cmd_test, "set up and run lint, type checks and the whole test suite"),
        ("test-ml", cmd_test_ml, "run the TensorFlow and PyTorch runners' tests (large downloads)"),
        ("test-on", cmd_test_on, "run tests on another interpreter: test-on PYTHON [pytest args]"),
        ("bench", cmd_bench, "run the benchmarks and write docs/benchmarks.md"),
        ("screenshots", cmd_screenshots, "render the desktop app into docs/screenshots/"),
        ("test-image", cmd_test_image, "build the Docker tests' image (debootstrap, cached)"),
        ("exe", cmd_package, "build dist/hivemind-worker and the one-folder app for installers"),
        ("deb", cmd_package, "build the Linux .deb from the one-folder app"),
        ("tarball", cmd_package, "build the Linux tarball (install.sh, uninstall.sh)"),
        ("nsis", cmd_package, "build the Windows installer with makensis"),
        ("clean", cmd_clean, "remove .venv, build/ and dist/"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("rest", nargs=argparse.REMAINDER, help="passed on to the tool")
        p.set_defaults(func=func)
        commands[name] = func
    if len(sys.argv) > 1 and sys.argv[1] in commands:
        # What follows the command belongs to its tool (pytest, installer/packaging.py...);
        # argparse's REMAINDER would read `build.py test -x` or `build.py deb --no-lintian`
        # as unknown options of build.py's own.
        command = sys.argv[1]
        args = argparse.Namespace(command=command, rest=sys.argv[2:], func=commands[command])
    else:
        args = parser.parse_args()  # --help, or the error for an unknown command
    try:
        args.func(args)
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode or 1)


if __name__ == "__main__":
    main()
