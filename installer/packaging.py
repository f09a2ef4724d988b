#!/usr/bin/env python3
"""Build the release artefacts: the executables, the .deb, the tarball, the NSIS installer.

Run by `build.py exe|deb|tarball|nsis` with the project's venv Python (PyInstaller, Pillow).
`exe` builds both PyInstaller forms: the one-file executable (download and run) and the
one-folder app, which the installers ship because it starts without unpacking anything.
Every artefact lands in dist/; scratch space is build/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version as dist_version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
BUILD = ROOT / "build"
INSTALLER = ROOT / "installer"
RESOURCES = ROOT / "resources"
ICON = ROOT / "file.ico"
WINDOWS = sys.platform == "win32"
EXE_NAME = "hivemind-worker.exe" if WINDOWS else "hivemind-worker"
EXE = DIST / EXE_NAME
# The one-folder build: the executable and its _internal/ folder (Python, Qt, libraries).
APP_DIR = DIST / "hivemind-worker-onedir"
NAME = "hivemind-worker"
APP_ID = "org.hivemind.HiveMindWorker"
MAINTAINER = "HiveMind Worker developers <hivemind-worker@users.noreply.github.com>"
HOMEPAGE = "https://github.com/hivemind/hivemind-worker"
SUMMARY = "donate spare compute to the HiveMind distributed computing platform"
# hicolor sizes a desktop looks for; resources/icons has a PNG for each (drawn by the GUI).
ICON_SIZES = (16, 22, 24, 32, 48, 64, 128, 256)


def log(message: str) -> None:
    print(message, flush=True)


def run(cmd: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    log("+ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, text=True, **kwargs)  # type: ignore[call-overload]


def package_version() -> str:
    return dist_version(NAME)


def binary_version(exe: Path = EXE) -> str:
    """The version the built binary reports: what an installer built from it must carry."""
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split()[-1]


def require_exe() -> Path:
    if not EXE.exists():
        raise SystemExit(f"{EXE.relative_to(ROOT)} is missing: run `python3 build.py exe` first")
    return EXE


def require_app() -> Path:
    """The one-folder app's executable; its folder is what the installers ship."""
    exe = APP_DIR / EXE_NAME
    if not exe.exists():
        raise SystemExit(f"{exe.relative_to(ROOT)} is missing: run `python3 build.py exe` first")
    return exe


# ---------------------------------------------------------------------------- exe


def windows_version_info(version: str) -> Path:
    """The VERSIONINFO resource Explorer shows in the exe's Properties → Details."""
    nums = [int(n) for n in re.findall(r"\d+", version)[:4]]
    nums += [0] * (4 - len(nums))
    path = BUILD / "version_info.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {
        "CompanyName": "HiveMind",
        "FileDescription": "HiveMind Worker",
        "FileVersion": version,
        "InternalName": NAME,
        "OriginalFilename": f"{NAME}.exe",
        "ProductName": "HiveMind Worker",
        "ProductVersion": version,
        "LegalCopyright": "MIT License",
    }
    strings = ",\n".join(f"StringStruct('{k}', '{v}')" for k, v in fields.items())
    path.write_text(
        f"""VSVersionInfo(
  ffi=FixedFileInfo(filevers={tuple(nums)}, prodvers={tuple(nums)}, mask=0x3f, flags=0x0,
                    OS=0x40004, fileType=0x1, subtype=0x0, date=(0, 0)),
  kids=[StringFileInfo([StringTable('040904B0', [{strings}])]),
        VarFileInfo([VarStruct('Translation', [1033, 1200])])]
)
"""
    )
    return path


def build_exe(_: argparse.Namespace) -> None:
    if WINDOWS:
        windows_version_info(package_version())
    start = time.monotonic()
    run(
        [
            sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean",
            "--distpath", DIST, "--workpath", BUILD / "pyinstaller",
            INSTALLER / "hivemind-worker.spec",
        ],
        cwd=ROOT,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    folder = sum(p.lstat().st_size for p in APP_DIR.rglob("*") if not p.is_dir())
    log(f"built {EXE.relative_to(ROOT)}: {EXE.stat().st_size / 1e6:.1f} MB in {elapsed:.0f} s")
    log(f"built {APP_DIR.relative_to(ROOT)}/: {folder / 1e6:.1f} MB")


# ---------------------------------------------------------------------------- shared bits


def icon_pngs(out_dir: Path) -> dict[int, Path]:
    """The app icon as PNG per hicolor size: resources/icons if drawn, else cut from file.ico."""
    out_dir.mkdir(parents=True, exist_ok=True)
    found: dict[int, Path] = {}
    for size in ICON_SIZES:
        src = RESOURCES / "icons" / f"{NAME}-{size}.png"
        if src.exists():
            found[size] = shutil.copy2(src, out_dir / src.name)
    missing = [s for s in ICON_SIZES if s not in found]
    if missing:
        from PIL import Image  # only when the GUI's drawn icons are absent

        with Image.open(ICON) as ico:
            largest = max(ico.info.get("sizes", {ico.size}))
            ico.size = largest
            ico.load()
            for size in missing:
                path = out_dir / f"{NAME}-{size}.png"
                ico.resize((size, size), Image.Resampling.LANCZOS).save(path)
                found[size] = path
    return found


def desktop_entry(exec_line: str | None = None) -> str:
    text = (RESOURCES / f"{NAME}.desktop").read_text()
    if exec_line is not None:
        text = re.sub(r"^Exec=.*$", f"Exec={exec_line}", text, flags=re.MULTILINE)
    return text


# ---------------------------------------------------------------------------- deb


def elf_files(app_dir: Path) -> list[Path]:
    """The shared objects and executables of the one-folder app, to see what they link."""
    found = []
    for path in sorted(app_dir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _output(cmd: list[str]) -> str:
    """A query's stdout; empty when it fails (the callers treat that as "nothing found")."""
    return subprocess.run(cmd, check=False, capture_output=True, text=True).stdout


def _needed(elf: Path) -> list[str]:
    return re.findall(
        r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _output(["readelf", "-d", str(elf)])
    )


def _glibc_versions(elf: Path) -> set[str]:
    return set(re.findall(r"GLIBC_([0-9.]+)", _output(["objdump", "-T", str(elf)])))


# Libraries the bundle expects from the system that this build machine may not have
# (so `dpkg -S` cannot say), by soname: the Debian package that ships them.
KNOWN_SONAMES = {
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libOpenGL.so.0": "libopengl0",
    "libxcb.so.1": "libxcb1",
    "libwayland-client.so.0": "libwayland-client0",
    "libwayland-cursor.so.0": "libwayland-cursor0",
    "libwayland-egl.so.1": "libwayland-egl1",
    "libvulkan.so.1": "libvulkan1",
    "libdrm.so.2": "libdrm2",
    "libgbm.so.1": "libgbm1",
}
GLIBC_SONAMES = re.compile(r"^(ld-linux.*|lib(c|m|dl|pthread|rt|util|resolv|anl|nsl)\.so\..*)$")


def _package_of(soname: str) -> str | None:
    if soname in KNOWN_SONAMES:
        return KNOWN_SONAMES[soname]
    cache = _output(["ldconfig", "-p"])
    match = re.search(rf"^\s+{re.escape(soname)} \(libc6[^)]*\) => (\S+)$", cache, re.M)
    if not match:
        return None
    owner = _output(["dpkg-query", "-S", os.path.realpath(match.group(1))])
    return owner.split(":")[0] or None


def compute_dependencies(app_dir: Path) -> tuple[list[str], list[str]]:
    """(Depends, Recommends) from what the bundle links against but does not carry.

    The core (bootloader, Python, Qt, the xcb platform plugin) makes Depends; the libraries
    only optional Qt plugins need (Wayland, EGL, input methods) make Recommends, because Qt
    falls back to xcb and GLX without them.
    """
    exe = app_dir / EXE_NAME
    internal = app_dir / "_internal"
    files = elf_files(app_dir)
    by_name = {f.name: f for f in files}
    needed = {f: _needed(f) for f in files}
    glibc: set[str] = set().union(*(_glibc_versions(f) for f in files))

    def is_root(f: Path) -> bool:
        rel = "/" + str(f.relative_to(internal)) if f != exe else "/"
        if "/plugins/" in rel:  # Qt loads these on demand; xcb and GLX are the must-haves
            return rel.endswith(("/platforms/libqxcb.so", "/libqxcb-glx-integration.so"))
        return f == exe or ".cpython-" in f.name or ".abi3.so" in f.name or rel.count("/") == 1

    core_files = {f for f in files if is_root(f)}
    todo = list(core_files)
    while todo:  # everything a must-have links against, through the bundle
        for soname in needed[todo.pop()]:
            dep = by_name.get(soname)
            if dep is not None and dep not in core_files:
                core_files.add(dep)
                todo.append(dep)
    core = {s for f in core_files for s in needed[f] if s not in by_name}
    optional = {s for f in files if f not in core_files for s in needed[f] if s not in by_name}
    newest_glibc = max(glibc, key=lambda v: tuple(int(n) for n in v.split(".")))
    depends = {f"libc6 (>= {newest_glibc})"}
    unknown = []
    for soname in sorted(core):
        if GLIBC_SONAMES.match(soname):
            continue
        pkg = _package_of(soname)
        if pkg is None:
            unknown.append(soname)
        else:
            depends.add(pkg)
    recommends = set()
    for soname in sorted(optional - core):
        if GLIBC_SONAMES.match(soname):
            continue
        pkg = _package_of(soname)
        if pkg and not any(d.split()[0] == pkg for d in depends):
            recommends.add(pkg)
    if unknown:
        raise SystemExit(f"no package known for {', '.join(unknown)}: add them to KNOWN_SONAMES")
    # The bundled fontconfig reads the system's configuration and fonts.
    depends.add("fontconfig-config")
    return sorted(depends), sorted(recommends)


def _man_page(version: str) -> bytes:
    today = dt.date.today().strftime("%B %Y")
    page = f""".TH HIVEMIND-WORKER 1 "{today}" "hivemind-worker {version}" "User Commands"
.SH NAME
hivemind-worker \\- donate spare compute to the HiveMind distributed computing platform
.SH SYNOPSIS
.B hivemind-worker
[\\fB\\-\\-data\\-dir\\fR \\fIDIR\\fR] [\\fICOMMAND\\fR] [\\fIOPTIONS\\fR]
.SH DESCRIPTION
Without a command, starts the desktop app in the system tray.
.TP
.B run \\-\\-headless
run the worker without a window, logging to the console
.TP
.B login
sign in to a pool; the token is kept in the system keyring
.TP
.B doctor
check the pool, the login, Docker and free resources
.TP
.B demo
run a local pool and the worker on sample tasks
.TP
.B pool
the reference Node Pool (see \\fBhivemind\\-worker pool \\-\\-help\\fR)
.PP
Every command takes \\fB\\-\\-help\\fR.
.SH FILES
Settings in \\fI~/.config/hivemind\\-worker/settings.toml\\fR; data and logs in
\\fI~/.local/share/hivemind\\-worker/\\fR and \\fI~/.local/state/hivemind\\-worker/\\fR.
Removing the package leaves them in place.
"""
    return gzip.compress(page.encode(), compresslevel=9, mtime=0)


def _copyright() -> str:
    year = dt.date.today().year
    return f"""Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: hivemind-worker
Source: {HOMEPAGE}
Comment: The program is a PyInstaller one-file bundle. Besides HiveMind Worker it carries
 Python 3.11 (PSF-2.0), Qt 6 and PySide6 (LGPL-3.0), gRPC (Apache-2.0), protobuf
 (BSD-3-clause), keyring and keyrings.alt (MIT), psutil (BSD-3-clause), platformdirs
 (MIT), docker-py (Apache-2.0), pyqtgraph (MIT), NumPy (BSD-3-clause), cryptography
 (Apache-2.0 or BSD-3-clause) and the shared libraries they link against.

Files: *
Copyright: {year} HiveMind Worker developers
License: MIT

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy of this
 software and associated documentation files (the "Software"), to deal in the Software
 without restriction, including without limitation the rights to use, copy, modify,
 merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
 permit persons to whom the Software is furnished to do so, subject to the following
 conditions:
 .
 The above copyright notice and this permission notice shall be included in all copies
 or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
 INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A
 PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT
 HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
 CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
 THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def _changelog(version: str) -> bytes:
    when = dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    text = (
        f"hivemind-worker ({version}) unstable; urgency=medium\n\n"
        f"  * Release {version}: see {HOMEPAGE}/releases.\n\n"
        f" -- {MAINTAINER}  {when}\n"
    )
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    path.chmod(mode)


def deb_architecture() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _copy_app(dest: Path) -> None:
    """The one-folder app into dest/, with the modes a package wants.

    Only the program is executable; shared libraries are loaded, not run (0644, as Debian
    ships them and lintian insists).
    """
    shutil.copytree(APP_DIR, dest, symlinks=True)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path == dest / EXE_NAME else 0o644)


# lintian's errors and warnings that the vendored one-folder app raises, each with why it
# is expected. The app carries its own Python, Qt and the wheels' libraries as their
# projects built them; Debian's rules for its own packages (shared system libraries,
# hardened rebuilds) cannot apply to them. A tag not listed here still fails the build.
LINTIAN_OVERRIDES = {
    "embedded-library": "the app bundles its own zlib, expat, freetype, libpng... (PyInstaller)",
    "hardening-no-pie": "PyInstaller's prebuilt bootloader, as PyInstaller ships it",
    "shared-library-lacks-prerequisites": "Python extension modules resolve symbols from "
    "the bundled libpython at load time, as upstream builds them",
    "library-not-linked-against-libc": "Python extension modules built by CPython, "
    "loaded into the bundled interpreter",
    "unstripped-binary-or-object": "numpy's auditwheel-repaired OpenBLAS breaks when stripped",
}


def lintian_overrides() -> str:
    return "".join(f"# {why}\n{NAME}: {tag}\n" for tag, why in LINTIAN_OVERRIDES.items())


def build_deb(args: argparse.Namespace) -> Path:
    exe = require_app()
    version = binary_version(exe)
    arch = deb_architecture()
    root = BUILD / "deb" / "root"
    shutil.rmtree(root.parent, ignore_errors=True)
    root.mkdir(parents=True)
    _copy_app(root / "usr/lib" / NAME)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin" / NAME).symlink_to(f"../lib/{NAME}/{NAME}")
    _write(root / "usr/share/applications" / f"{NAME}.desktop", desktop_entry())
    for size, png in icon_pngs(BUILD / "deb" / "icons").items():
        _write(root / f"usr/share/icons/hicolor/{size}x{size}/apps/{NAME}.png", png.read_bytes())
    metainfo = (INSTALLER / "linux" / f"{APP_ID}.metainfo.xml").read_text()
    metainfo = metainfo.replace("@VERSION@", version).replace("@DATE@", dt.date.today().isoformat())
    _write(root / "usr/share/metainfo" / f"{APP_ID}.metainfo.xml", metainfo)
    doc = root / "usr/share/doc" / NAME
    _write(doc / "copyright", _copyright())
    _write(doc / "changelog.gz", _changelog(version))
    _write(root / "usr/share/man/man1" / f"{NAME}.1.gz", _man_page(version))
    _write(root / "usr/share/lintian/overrides" / NAME, lintian_overrides())

    depends, recommends = compute_dependencies(APP_DIR)
    installed_kb = sum(
        (p.lstat().st_size + 1023) // 1024 for p in root.rglob("*") if not p.is_dir()
    )
    control = "\n".join(
        [
            f"Package: {NAME}",
            f"Version: {version}",
            f"Architecture: {arch}",
            f"Maintainer: {MAINTAINER}",
            f"Installed-Size: {installed_kb}",
            f"Depends: {', '.join(depends)}",
            f"Recommends: docker.io | docker-ce, python3, {', '.join(recommends)}".rstrip(", "),
            "Suggests: gnome-keyring | kwalletmanager",
            "Section: net",
            "Priority: optional",
            f"Homepage: {HOMEPAGE}",
            f"Description: {SUMMARY}",
            " The HiveMind Worker is the volunteer side of the HiveMind distributed",
            " computing platform. It sits in the system tray and, while allowed to",
            " contribute, takes tasks from a Node Pool over gRPC, runs each in a",
            " locked-down Docker container (or, without Docker, a process sandbox)",
            " within the CPU, memory and disk limits the person chose, and reports the",
            " results. A reference Node Pool is included (hivemind-worker pool).",
            "",
        ]
    )
    _write(root / "DEBIAN/control", control)
    sums = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root)
        if rel.parts[0] != "DEBIAN":
            sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
    _write(root / "DEBIAN/md5sums", "".join(sums))
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        d.chmod(0o755)

    DIST.mkdir(exist_ok=True)
    deb = DIST / f"{NAME}_{version}_{arch}.deb"
    # The payload is one zlib-compressed archive already: xz would spend half a minute to gain
    # nothing, so gzip at its fastest.
    run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", root, deb])
    log(f"Depends: {', '.join(depends)}")
    log(f"Recommends: {', '.join(recommends)}")
    if shutil.which("lintian") and not getattr(args, "no_lintian", False):
        lint = _output(["lintian", "--tag-display-limit", "0", str(deb)])
        log("lintian:\n" + (lint or "(nothing to report)"))
        if any(line.startswith("E:") for line in lint.splitlines()):
            raise SystemExit("lintian reports errors")
    log(f"built {deb.relative_to(ROOT)}: {deb.stat().st_size / 1e6:.1f} MB")
    return deb


# ---------------------------------------------------------------------------- tarball


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Owned by nobody in particular (root:root), readable by all, as a release tarball is."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if not info.issym():
        info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


def build_tarball(_: argparse.Namespace) -> Path:
    exe = require_app()
    version = binary_version(exe)
    machine = os.uname().machine
    top = f"{NAME}-{version}"
    DIST.mkdir(exist_ok=True)
    out = DIST / f"{NAME}-{version}-linux-{machine}.tar.gz"
    linux = INSTALLER / "linux"
    with tarfile.open(out, "w:gz", compresslevel=6) as tar:
        # The one-folder app, which install.sh copies: it starts without unpacking anything.
        tar.add(APP_DIR, arcname=f"{top}/app", filter=_normalised)
        # ./hivemind-worker runs it in place, without installing (the README says so).
        link = _normalised(tarfile.TarInfo(f"{top}/{NAME}"))
        link.type, link.linkname, link.mtime = tarfile.SYMTYPE, f"app/{NAME}", int(time.time())
        tar.addfile(link)
        _add(tar, f"{top}/install.sh", (linux / "install.sh").read_bytes(), 0o755)
        _add(tar, f"{top}/uninstall.sh", (linux / "uninstall.sh").read_bytes(), 0o755)
        _add(tar, f"{top}/{NAME}.desktop", desktop_entry().encode())
        for size, png in icon_pngs(BUILD / "tarball" / "icons").items():
            _add(tar, f"{top}/icons/{size}x{size}/{NAME}.png", png.read_bytes())
        _add(tar, f"{top}/README", (linux / "README.tarball").read_bytes())
        # What the bundle carries and under which licences (the .deb has the same file).
        _add(tar, f"{top}/COPYRIGHT", _copyright().encode())
    log(f"built {out.relative_to(ROOT)}: {out.stat().st_size / 1e6:.1f} MB")
    return out


# ---------------------------------------------------------------------------- nsis


def _icon_image(size: int):  # type: ignore[no-untyped-def]
    """The app icon at `size` px (RGBA), from the drawn PNGs or else from file.ico."""
    from PIL import Image

    png = RESOURCES / "icons" / f"{NAME}-256.png"
    if png.exists():
        icon = Image.open(png).convert("RGBA")
    else:
        icon = Image.open(ICON)
        icon.size = max(icon.info.get("sizes", {icon.size}))
        icon = icon.convert("RGBA")
    return icon.resize((size, size), Image.Resampling.LANCZOS)


def wizard_artwork(out_dir: Path) -> tuple[Path, Path]:
    """The installer's sidebar (164x314) and header (150x57) bitmaps, drawn from the icon.

    Their colours are the icon's own (its outline and its fill), so they follow it when it
    changes. Modern UI wants 24-bit BMPs of exactly these sizes (at 96 dpi).
    """
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    icon = _icon_image(256)
    counted = sorted(icon.getcolors(maxcolors=256 * 256) or [], reverse=True)
    colours = [rgba[:3] for _, rgba in counted if rgba[3] == 255 and rgba[:3] != (255, 255, 255)]
    dark, fill = sorted(colours[:2], key=sum)

    sidebar = Image.new("RGB", (164, 314), dark)
    draw = ImageDraw.Draw(sidebar)
    # A band of the icon's fill colour fading into the outline colour towards the bottom.
    for y in range(314):
        t = max(0.0, (y - 150) / 164)
        mix = tuple(round(d + (f - d) * t * 0.55) for d, f in zip(dark, fill, strict=True))
        draw.line([(0, y), (163, y)], fill=mix)
    badge = _icon_image(112)
    sidebar.paste(badge, ((164 - 112) // 2, 44), badge)
    draw.rectangle([0, 310, 163, 313], fill=fill)
    wizard = out_dir / "wizard.bmp"
    sidebar.save(wizard, format="BMP")

    header = Image.new("RGB", (150, 57), (255, 255, 255))
    small = _icon_image(48)
    header.paste(small, (150 - 48 - 6, (57 - 48) // 2), small)
    header_path = out_dir / "header.bmp"
    header.save(header_path, format="BMP")
    return wizard, header_path


def build_nsis(args: argparse.Namespace) -> Path:
    """makensis on installer/windows/hivemind-worker.nsi; off Windows, against a stand-in app."""
    makensis = shutil.which("makensis")
    if not makensis:
        raise SystemExit("makensis not found: install NSIS (Debian: apt-get install nsis)")
    version = args.as_version or package_version()
    app_dir = APP_DIR
    out_dir = args.out_dir or DIST
    if not (app_dir / "hivemind-worker.exe").exists():
        # The real app is built on Windows; here the script is still compiled, so any error
        # in it shows up on Linux CI, against a stand-in that is never shipped.
        app_dir = args.stand_in or BUILD / "nsis" / "app"
        if args.stand_in is None:
            shutil.rmtree(app_dir, ignore_errors=True)
            (app_dir / "_internal").mkdir(parents=True)
            (app_dir / "hivemind-worker.exe").write_bytes(
                b"MZ placeholder: the real hivemind-worker.exe is built on Windows\n"
            )
            (app_dir / "_internal" / "placeholder.txt").write_text("the app's libraries\n")
        out_dir = args.out_dir or BUILD / "nsis"
        log(f"note: {APP_DIR.name}/hivemind-worker.exe is absent; compiling with a stand-in")
    wizard, header = wizard_artwork(BUILD / "nsis" / "artwork")
    out = Path(out_dir) / f"{NAME}-{version}-setup.exe"
    out.parent.mkdir(parents=True, exist_ok=True)
    run(
        [
            makensis, "-V2", "-WX",
            f"-DVERSION={version}", f"-DAPPDIR={app_dir}", f"-DICON={ICON}",
            f"-DWIZARD_BITMAP={wizard}", f"-DHEADER_BITMAP={header}", f"-DOUTFILE={out}",
            *([f"-DTARGET={args.target}"] if args.target else []),
            INSTALLER / "windows" / "hivemind-worker.nsi",
        ],
        cwd=ROOT,
    )  # fmt: skip
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    log(f"built {shown}: {out.stat().st_size / 1e6:.1f} MB")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="artefact", required=True)
    sub.add_parser("exe", help="dist/hivemind-worker(.exe) with PyInstaller").set_defaults(
        func=build_exe
    )
    p = sub.add_parser("deb", help="dist/hivemind-worker_<version>_<arch>.deb")
    p.add_argument("--no-lintian", action="store_true")
    p.set_defaults(func=build_deb)
    sub.add_parser(
        "tarball", help="dist/hivemind-worker-<version>-linux-<arch>.tar.gz"
    ).set_defaults(func=build_tarball)
    p = sub.add_parser("nsis", help="the Windows installer with makensis")
    p.add_argument("--out-dir", type=Path, help="where the setup.exe goes (default: dist/)")
    p.add_argument(
        "--stand-in",
        type=Path,
        metavar="DIR",
        help="off Windows: the app folder to package instead of a placeholder (tests)",
    )
    p.add_argument(
        "--as-version", metavar="X.Y.Z", help="another version number (tests: an upgrade)"
    )
    p.add_argument("--target", help="makensis Target, e.g. amd64-unicode (tests under Wine)")
    p.set_defaults(func=build_nsis)
    args = parser.parse_args()
    try:
        args.func(args)
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode or 1)


if __name__ == "__main__":
    main()
